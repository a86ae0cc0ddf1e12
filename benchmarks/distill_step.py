"""What distilling from a store costs per training step, against supervised and online steps.

Builds token data from the standard library, a teacher of the model family, and a
top-k store of it for each k (the real cache job, native backend). Then, for one
student, times real trainer steps (forward, loss, backward, clip, AdamW, and the
batch source, prefetch thread included) in three modes, interleaved over `--reps`
rounds and taking the median of each:

- supervised: token batches, next-token loss;
- offline: batches streamed from the store, top-k KL with the tail category, windows read
  in the training thread as `kdcache train` does on CPU (and `offline_thread`: with the
  background prefetch thread instead);
- online: the teacher runs every step (full distribution), as without a cache.

Reports offline / supervised (target <= 1.1), online / offline next to the ideal
(3 F(N_S) + F(N_T)) / 3 F(N_S), the loader's tokens/s alone (reading inline, one thread)
over the offline student's consumption (target >= 20), and, with --concurrent, two students training from one
store at once (one thread each) against one alone: per-student throughput ratio.

    python benchmarks/distill_step.py [--k 16 64] [--student-layers 4] [--teacher-layers 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from kdcache.fit.flops import forward_flops
from kdcache.pipeline.cache.config import CacheConfig
from kdcache.pipeline.cache.job import run_cache
from kdcache.pipeline.prepare.job import PrepareConfig, prepare
from kdcache.storage.tokens.format import open_token_data
from kdcache.train.batches import TokenBatches
from kdcache.train.config import ModelConfig
from kdcache.train.kd_losses import DistillLoss
from kdcache.train.losses import NextTokenLoss
from kdcache.train.model import build_model
from kdcache.train.model_dir import load_model_dir, save_model_dir
from kdcache.train.online import OnlineTeacherBatches
from kdcache.train.runtime import tune_cpu_allocator
from kdcache.train.store_batches import StoreBatches
from kdcache.train.trainer import LoopConfig, Trainer


def build_world(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    data = root / "data"
    prepare(PrepareConfig(out=str(data), vocab_size=args.vocab, seq_len=args.seq_len,
                          max_tokens=args.max_tokens, quiet=True))
    tokens = open_token_data(data)
    cfg = ModelConfig(layers=args.teacher_layers, vocab_size=tokens.vocab_size, rho=args.rho, head_dim=32)
    teacher = build_model(cfg, seed=0)
    with torch.no_grad():  # peaked distributions, like a trained LM's
        teacher.lm_head.weight.mul_(10.0)
    save_model_dir(teacher, root / "teacher", tokenizer=tokens.tokenizer_path)
    stores = {}
    for k in args.k:
        stores[k] = root / f"store-k{k}"
        run_cache(CacheConfig(teacher=str(root / "teacher"), data=str(data), out=str(stores[k]), k=k,
                              max_rows=args.rows, quiet=True))
    return {"data": data, "teacher": root / "teacher", "stores": stores, "teacher_cfg": cfg}


def student(args: argparse.Namespace, vocab: int) -> torch.nn.Module:
    return build_model(ModelConfig(layers=args.student_layers, vocab_size=vocab, rho=args.rho, head_dim=32),
                       seed=0)


def time_steps(model: torch.nn.Module, source: Any, loss: Any, steps: int, warmup: int) -> float:
    """Seconds per step of the real trainer, after `warmup` steps."""
    Trainer(model, source, loss, LoopConfig(steps=warmup), progress=False).run()
    result = Trainer(model, source, loss, LoopConfig(steps=steps), progress=False).run()
    return result.wall_s / steps


def loader_tokens_per_s(store: Path, batch_size: int, batches: int) -> float:
    loader = StoreBatches(str(store), batch_size=batch_size, seed=1, prefetch=0)
    loader.next_batch()
    t0 = time.perf_counter()
    tokens = sum(loader.next_batch().tokens for _ in range(batches))
    seconds = time.perf_counter() - t0
    loader.close()
    return tokens / seconds


def measure(world: dict[str, Any], k: int, args: argparse.Namespace) -> dict[str, Any]:
    data = open_token_data(world["data"])
    teacher = load_model_dir(world["teacher"]).model
    store = world["stores"][k]
    modes = {
        "supervised": lambda: (TokenBatches(data, "student", batch_size=args.batch_size, seed=0),
                               NextTokenLoss()),
        "offline": lambda: (StoreBatches(str(store), batch_size=args.batch_size, seed=0, prefetch=0),
                            DistillLoss(kind="topk")),
        "offline_thread": lambda: (StoreBatches(str(store), batch_size=args.batch_size, seed=0, prefetch=2),
                                   DistillLoss(kind="topk")),
        "online": lambda: (OnlineTeacherBatches(TokenBatches(data, "student", batch_size=args.batch_size,
                                                             seed=0), teacher, temperature=1.0,
                                                        vocab=data.vocab_size),
                           DistillLoss(kind="full")),
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.reps):
        for mode, make in modes.items():
            source, loss = make()
            times[mode].append(time_steps(student(args, data.vocab_size), source, loss, args.steps, 1))
            getattr(source, "close", lambda: None)()
    per_step = {m: statistics.median(t) for m, t in times.items()}
    tokens_per_step = args.batch_size * data.seq_len
    loader = loader_tokens_per_s(store, args.batch_size, args.loader_batches)
    n_s = student(args, data.vocab_size).config.non_embedding_params()
    n_t = world["teacher_cfg"].non_embedding_params()
    f_s, f_t = (float(forward_flops(n, rho=args.rho, context=data.seq_len, vocab=data.vocab_size))
                for n in (n_s, n_t))
    return {
        "k": k,
        "student_params": n_s,
        "teacher_params": n_t,
        "supervised_step_s": per_step["supervised"],
        "offline_step_s": per_step["offline"],
        "online_step_s": per_step["online"],
        "offline_thread_step_s": per_step["offline_thread"],
        "offline_over_supervised": per_step["offline"] / per_step["supervised"],
        "offline_thread_over_supervised": per_step["offline_thread"] / per_step["supervised"],
        "online_over_offline": per_step["online"] / per_step["offline"],
        "ideal_online_over_offline": (3 * f_s + f_t) / (3 * f_s),
        "loader_tokens_per_s": loader,
        "loader_over_consumption": loader / (tokens_per_step / per_step["offline"]),
    }


def _student_tokens_per_s(store: str, args: dict[str, Any]) -> float:
    """One student process training offline from `store` with one thread."""
    torch.set_num_threads(1)
    tune_cpu_allocator()
    ns = argparse.Namespace(**args)
    loader = StoreBatches(store, batch_size=ns.batch_size, seed=0, prefetch=0)
    model = student(ns, loader.meta.vocab_size)
    seconds = time_steps(model, loader, DistillLoss(kind="topk"), ns.steps, 1)
    loader.close()
    return ns.batch_size * loader.meta.seq_len / seconds


def concurrency(store: Path, args: argparse.Namespace) -> dict[str, float]:
    """Per-student tokens/s with two students on one store at once, over one alone."""
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        alone = pool.submit(_student_tokens_per_s, str(store), vars(args)).result()
        pair = [pool.submit(_student_tokens_per_s, str(store), vars(args)) for _ in range(2)]
        together = statistics.mean(f.result() for f in pair)
    return {"alone_tokens_per_s": alone, "concurrent_tokens_per_s": together,
            "concurrent_over_alone": together / alone}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="+", default=[16, 64])
    p.add_argument("--student-layers", type=int, default=4)
    p.add_argument("--teacher-layers", type=int, default=8)
    p.add_argument("--rho", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rows", type=int, default=256, help="store rows (the steps cycle through them)")
    p.add_argument("--max-tokens", type=int, default=400_000, help="stdlib tokens to prepare")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--loader-batches", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrent", action="store_true", help="also measure two students on one store")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp), args)
        rows = [measure(world, k, args) for k in args.k]
        if args.concurrent:
            rows[-1].update(concurrency(world["stores"][args.k[-1]], args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"student N_S = {rows[0]['student_params']:,}, teacher N_T = {rows[0]['teacher_params']:,}, "
          f"batch {args.batch_size} x {args.seq_len}, vocab {args.vocab}, {args.threads} threads, "
          f"median of {args.reps}")
    print(f"{'k':>4} {'offline/sup':>11} {'online/offline':>14} {'ideal':>6} {'loader/consumption':>18}")
    for r in rows:
        print(f"{r['k']:>4} {r['offline_over_supervised']:>11.3f} {r['online_over_offline']:>14.2f} "
              f"{r['ideal_online_over_offline']:>6.2f} {r['loader_over_consumption']:>18.1f}")
    if args.concurrent:
        r = rows[-1]
        print(f"two students on one store (1 thread each): {r['concurrent_over_alone']:.2f}x "
              f"per-student throughput of one alone")


if __name__ == "__main__":
    main()
