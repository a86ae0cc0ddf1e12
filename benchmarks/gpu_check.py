"""One prepared run of the measurements that need a GPU, for a briefly lent, offline machine.

`benchmarks/gpu_check.sh OUT [--cpu]` sets up the machine (wheels, the package's import
path) and runs this driver, which needs neither Ray nor vLLM (the lent machine has
neither) and writes `OUT/gpu_check.json` after every part, so a part that fails or a run
cut off still leaves what was measured:

1. `capture`: the hf teacher backend through the cache's serial core (`cache_shard`,
   one shard at a time, and two in flight as the cache job's actor runs them) against a
   bare loop of forward + log-softmax + top-k over the same rows, both bf16, on a
   freshly initialised Llama-shaped model (weights do not change the cost; nothing can
   be downloaded there). Target: cache / bare >= 0.95.
2. `train`: an HF student's tokens/s under `--precision bf16` in kdcache's trainer,
   supervised (`TokenBatches`) and distilled from the store of 1 (`StoreBatches`,
   `DistillLoss`).
3. `kd_memory`: `benchmarks/kd_memory.py --device cuda` (peak allocated memory of the
   chunked distillation loss against chunked cross-entropy).
4. `feeding`: `benchmarks/store_dataset.py --store` on the store of 1: the tokens/s a
   `StoreDataset` (and its loader's workers) delivers over the distilled student's
   consumption; above 1 the reader keeps up.

`--device cpu` runs tiny sizes that take every code path in well under a minute
(tests/test_gpu_check.py); the ratios mean nothing there.

    python benchmarks/gpu_check.py [--device auto|cuda|cpu] [--out DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zarr
from run_all import parse_json
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoModelForCausalLM, LlamaConfig

from kdcache.pipeline.cache.shard import cache_shard
from kdcache.pipeline.cache.teachers import TargetSpec
from kdcache.pipeline.cache.teachers.hf import HFTeacher
from kdcache.storage import DataInfo, StoreMeta, StoreWriter, suggest_chunk_rows, summarize
from kdcache.storage.tokens.format import TokenData, open_token_data
from kdcache.storage.tokens.writer import SplitWriter, ThreadWrites, finish_token_data
from kdcache.train.batches import TokenBatches
from kdcache.train.job import LoopSettings
from kdcache.train.kd_losses import DistillLoss
from kdcache.train.losses import NextTokenLoss
from kdcache.train.store_batches import StoreBatches
from kdcache.train.student import new_hf_student
from kdcache.train.trainer import LoopConfig, StepInfo, Trainer

HERE = Path(__file__).resolve().parent
JSON_NAME = "gpu_check.json"
CAPTURE_TARGET = 0.95


@dataclass(frozen=True)
class Sizes:
    vocab: int
    seq_len: int
    k: int
    teacher: dict[str, Any]
    """LlamaConfig fields of the teacher."""
    student: dict[str, Any]
    cache_rows: int
    shard_rows: int
    batch_rows: int
    train_batch: int
    train_steps: int
    warmup_steps: int
    lr: float
    kd_memory: list[str]
    """Arguments of benchmarks/kd_memory.py."""
    feed_repeats: int


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int) -> dict[str, Any]:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=ffn)


SIZES = {
    # Llama-shaped: a 256M-parameter teacher (189M non-embedding), a 135M student (85M), 1,024-token rows.
    "cuda": Sizes(vocab=32768, seq_len=1024, k=64, teacher=_llama(1024, 16, 16, 8, 2816),
                  student=_llama(768, 12, 12, 12, 2048), cache_rows=512, shard_rows=64, batch_rows=8,
                  train_batch=16, train_steps=20, warmup_steps=3, lr=3e-4,
                  kd_memory=["--vocab", "49152", "151936", "--seq-len", "1024", "--batch", "8"],
                  feed_repeats=2),
    "cpu": Sizes(vocab=512, seq_len=32, k=16, teacher=_llama(64, 2, 4, 2, 128),
                 student=_llama(32, 2, 2, 2, 64), cache_rows=64, shard_rows=16, batch_rows=4,
                 train_batch=4, train_steps=3, warmup_steps=1, lr=3e-4,
                 kd_memory=["--vocab", "8192", "--seq-len", "256", "--d", "32", "--k", "16"],
                 feed_repeats=1),
}


# -- inputs: token data, a teacher, a student config -----------------------------------------


def write_inputs(root: Path, sizes: Sizes) -> None:
    """Random stream-packed token data (a word-level tokenizer of `vocab` ids), the teacher's
    HF directory (bf16 safetensors) and the student's config file, all without Ray."""
    tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(sizes.vocab)}, unk_token="t0"))
    width = sizes.seq_len + 1
    tokens = np.random.default_rng(0).integers(1, sizes.vocab, sizes.cache_rows * width, dtype=np.int32)
    group = zarr.open_group(store=str(root / "data"), mode="w", zarr_format=3)
    writes = ThreadWrites()
    try:
        split = SplitWriter(group, root / "data", "student", width, None, sizes.vocab, writes)
        split.feed(tokens)
        meta = {"student": split.close("random")}
    finally:
        writes.close()
    finish_token_data(group, root / "data", tokenizer.to_str().encode(), sizes.seq_len, meta,
                      source="random", vocab_size=sizes.vocab, eos_token_id=None, input_format="text",
                      packing="stream")
    common: dict[str, Any] = dict(vocab_size=sizes.vocab, max_position_embeddings=width,
                                  tie_word_embeddings=False)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(LlamaConfig(**common, **sizes.teacher),
                                               trust_remote_code=False)
    teacher.to(torch.bfloat16).save_pretrained(root / "teacher")
    (root / "student.json").write_text(json.dumps({"model_type": "llama", **common, **sizes.student}))


# -- 1. capture: the cache's serial core against a bare loop ---------------------------------


def bare_tokens_per_s(model_dir: Path, rows: np.ndarray, sizes: Sizes, device: str) -> float:
    """Forward (no KV cache) + float32 log-softmax + top-k (values and ids to the host), nothing else."""
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                      trust_remote_code=False)
    model.to(device).eval()

    def batch(lo: int) -> int:
        ids = torch.from_numpy(rows[lo : lo + sizes.batch_rows, :-1]).to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        values, index = torch.topk(torch.log_softmax(logits.float(), -1), sizes.k)
        values.cpu(), index.cpu()
        return ids.numel()

    with torch.inference_mode():
        batch(0)  # warm-up
        t0 = time.perf_counter()
        tokens = sum(batch(lo) for lo in range(0, len(rows), sizes.batch_rows))
        return tokens / (time.perf_counter() - t0)


def cache_store(teacher: HFTeacher, data: TokenData, path: Path, sizes: Sizes, in_flight: int) -> float:
    """Cache the student split's first rows into a new store at `path`; tokens/s of its shards."""
    meta = StoreMeta(
        kind="topk", k=sizes.k, vocab_size=data.vocab_size, seq_len=data.seq_len, temperature=1.0,
        teacher=teacher.info,
        data=DataInfo(fingerprint=data.split_fingerprint("student"), split="student",
                      rows=sizes.cache_rows, tokenizer=data.tokenizer_fingerprint,
                      mask_fingerprint=data.mask_fingerprint("student")),
        shard_rows=sizes.shard_rows, chunk_rows=suggest_chunk_rows(data.seq_len, sizes.k, sizes.shard_rows))
    writer = StoreWriter.open(path, meta)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(in_flight) as pool:
        list(pool.map(lambda shard: cache_shard(teacher, data, "student", writer, shard),
                      writer.pending_shards()))
    seconds = time.perf_counter() - t0
    if not writer.finalize():
        raise RuntimeError(f"{path}: shards missing after the cache run")
    return sizes.cache_rows * sizes.seq_len / seconds


def capture(root: Path, sizes: Sizes, device: str) -> dict[str, Any]:
    data = open_token_data(root / "data")
    rows = data.read("student", slice(0, sizes.cache_rows))
    bare = bare_tokens_per_s(root / "teacher", rows, sizes, device)
    _free(device)
    teacher = HFTeacher(str(root / "teacher"), batch_rows=sizes.batch_rows, max_k=sizes.k,
                        max_len=sizes.seq_len + 1, dtype="bfloat16", vocab=sizes.vocab)
    spec = TargetSpec(kind="topk", k=sizes.k, temperature=1.0, vocab=sizes.vocab)
    teacher.targets(data.read_rows("student", slice(0, sizes.batch_rows)), spec, 0)  # warm-up, as bare's
    serial = cache_store(teacher, data, root / "serial.zarr", sizes, in_flight=1)
    overlapped = cache_store(teacher, data, root / "store.zarr", sizes, in_flight=2)
    return {
        "backend": "hf", "dtype": teacher.dtype, "device": str(teacher.device), "k": sizes.k,
        "rows": sizes.cache_rows, "seq_len": sizes.seq_len, "params": teacher.info.params,
        "bare_tokens_per_s": bare, "cache_serial_tokens_per_s": serial, "cache_tokens_per_s": overlapped,
        "ratio": overlapped / bare, "serial_ratio": serial / bare, "target": CAPTURE_TARGET,
        "bytes_per_token": summarize(root / "store.zarr")["bytes_per_token"],
    }


# -- 2. train: supervised against distilled, bf16 --------------------------------------------


def train_rate(root: Path, sizes: Sizes, device: str, distilled: bool) -> dict[str, Any]:
    """Tokens/s of `train_steps` steps after `warmup_steps`, timed from the trainer's own steps."""
    data = open_token_data(root / "data")
    student = new_hf_student(str(root / "student.json"), vocab=data.vocab_size, data=str(data.path), seed=0)
    student.to(device)
    source: Any
    if distilled:  # prefetching off CPU only, as `kdcache train` does (store_batches.py)
        source = StoreBatches(str(root / "store.zarr"), batch_size=sizes.train_batch, seed=0,
                              prefetch=0 if device == "cpu" else 2)
        loss: Any = DistillLoss(kind=source.meta.kind, tau=source.meta.temperature)
    else:
        source = TokenBatches(data, "student", batch_size=sizes.train_batch, seed=0)
        loss = NextTokenLoss()
    stamps: list[tuple[float, int]] = []

    def on_step(info: StepInfo) -> None:
        stamps.append((time.perf_counter(), info.tokens))

    steps = sizes.warmup_steps + sizes.train_steps
    settings = LoopSettings(batch_size=sizes.train_batch, lr=sizes.lr, precision="bf16")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        Trainer(student, source, loss, LoopConfig(steps=steps, settings=settings), progress=False,
                on_step=on_step).run()
    finally:
        getattr(source, "close", lambda: None)()
    timed = stamps[sizes.warmup_steps - 1 :]
    result = {"tokens_per_s": sum(n for _, n in timed[1:]) / (timed[-1][0] - timed[0][0]),
              "params": student.non_embedding_params()}
    if device == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del student
    _free(device)
    return result


def train(root: Path, sizes: Sizes, device: str) -> dict[str, Any]:
    supervised = train_rate(root, sizes, device, distilled=False)
    distilled = train_rate(root, sizes, device, distilled=True)
    return {"precision": "bf16", "batch": sizes.train_batch, "seq_len": sizes.seq_len,
            "steps": sizes.train_steps, "supervised": supervised, "distilled": distilled,
            "ratio": distilled["tokens_per_s"] / supervised["tokens_per_s"]}


# -- 3 and 4: the other benchmarks, each its own process ------------------------------------


def run_benchmark(script: str, args: list[str]) -> Any:
    """The JSON of `benchmarks/SCRIPT --json ARGS`, run as its own process (as run_all.py runs it)."""
    cmd = [sys.executable, str(HERE / script), "--json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{script} exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    return parse_json(out.stdout)


def feeding(root: Path, sizes: Sizes, consumed: float) -> dict[str, Any]:
    """The store's delivery rates (benchmarks/store_dataset.py) over the distilled student's rate."""
    got = run_benchmark("store_dataset.py", ["--store", str(root / "store.zarr"), "--batch-size",
                                             str(sizes.train_batch), "--repeats", str(sizes.feed_repeats)])
    rates = {name: got[f"{name}_tokens_per_s"] for name in ("reader", "dataset", "loader_2")}
    return {**{f"{name}_tokens_per_s": rate for name, rate in rates.items()},
            "loader_2_first_batch_s": got["loader_2_first_batch_s"], "distilled_tokens_per_s": consumed,
            "dataset_over_distilled": rates["dataset"] / consumed,
            "loader_2_over_distilled": rates["loader_2"] / consumed}


# -- the run ---------------------------------------------------------------------------------


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def environment(device: str, sizes: Sizes) -> dict[str, Any]:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device": name, "mode": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "python": sys.version.split()[0],
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "sizes": asdict(sizes)}


def run(device: str, out: Path | None, work: Path) -> dict[str, Any]:
    """Every part in order; a part that fails is recorded and those that need it are skipped."""
    sizes = SIZES[device]
    report: dict[str, Any] = {**environment(device, sizes), "errors": {}, "seconds": {}}
    parts: list[tuple[str, Callable[[], Any], tuple[str, ...]]] = [
        ("inputs", lambda: write_inputs(work, sizes), ()),
        ("capture", lambda: capture(work, sizes, device), ("inputs",)),
        ("train", lambda: train(work, sizes, device), ("capture",)),
        ("kd_memory", lambda: run_benchmark("kd_memory.py", [*sizes.kd_memory, "--device", device]), ()),
        ("feeding", lambda: feeding(work, sizes, report["train"]["distilled"]["tokens_per_s"]), ("train",)),
    ]
    for name, part, needs in parts:
        missing = [n for n in needs if n in report["errors"]]
        print(f"[gpu_check] {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            if missing:
                raise RuntimeError(f"skipped: {', '.join(missing)} failed")
            result = part()
            if result is not None:
                report[name] = result
        except Exception as exc:
            traceback.print_exc()
            report["errors"][name] = f"{type(exc).__name__}: {exc}"
        report["seconds"][name] = time.perf_counter() - t0
        if out is not None:
            (out / JSON_NAME).write_text(json.dumps(report, indent=2))
    report["ok"] = not report["errors"]
    if out is not None:
        (out / JSON_NAME).write_text(json.dumps(report, indent=2))
    return report


def summary(r: dict[str, Any]) -> str:
    lines = [f"gpu_check on {r['device']} (torch {r['torch']}, {r['mode']} sizes)"]
    if c := r.get("capture"):
        lines.append(f"capture  hf {c['dtype']} k={c['k']}: cache {c['cache_tokens_per_s']:,.0f} tok/s "
                     f"(one shard at a time {c['cache_serial_tokens_per_s']:,.0f}), bare forward + top-k "
                     f"{c['bare_tokens_per_s']:,.0f}: ratio {c['ratio']:.3f} "
                     f"(serial {c['serial_ratio']:.3f}; target >= {c['target']})")
    if t := r.get("train"):
        lines.append(f"train    bf16 HF student: supervised {t['supervised']['tokens_per_s']:,.0f} tok/s, "
                     f"distilled {t['distilled']['tokens_per_s']:,.0f}: ratio {t['ratio']:.3f}")
    for m in r.get("kd_memory", []):
        lines.append(f"memory   V={m['vocab']}: hidden distill / chunked supervised "
                     f"{m['hidden_over_supervised']:.3f}, logits / hidden {m['logits_over_hidden']:.2f}")
    if f := r.get("feeding"):
        lines.append(f"feeding  StoreDataset {f['dataset_tokens_per_s']:,.0f} tok/s, loader(2 workers) "
                     f"{f['loader_2_tokens_per_s']:,.0f}: over the distilled student "
                     f"{f['dataset_over_distilled']:.2f}x, {f['loader_2_over_distilled']:.2f}x")
    lines += [f"FAILED   {name}: {error}" for name, error in r["errors"].items()]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="cuda: the GPU sizes; cpu: tiny sizes (auto: cuda when there is one)")
    p.add_argument("--out", type=Path, help=f"write {JSON_NAME} here (after every part)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the hf teacher takes a GPU whenever it sees one
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kdcache-gpu-check-") as work:
        report = run(device, args.out, Path(work))
    print(json.dumps(report, indent=2) if args.json else summary(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
