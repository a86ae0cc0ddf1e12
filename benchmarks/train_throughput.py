"""Training throughput of the model family, and its FLOP/s against a large float32 matmul.

For three sizes (set by --layers), times real optimiser steps of the trainer (forward,
z-loss cross-entropy, backward, clipping, AdamW) on synthetic token batches, and reports
tokens/s, achieved FLOP/s counting 3 F(N) per token (6N plus attention and the
unembedding, `fit/flops.py`), and that divided by the FLOP/s of a 2048^3 float32 matmul
measured in the same run with the same threads. Prints a table, or JSON with --json.

    python benchmarks/train_throughput.py [--layers 2 4 6] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from kdcache.fit.flops import forward_flops
from kdcache.train.batches import Batch
from kdcache.train.config import ModelConfig
from kdcache.train.losses import NextTokenLoss
from kdcache.train.model import build_model
from kdcache.train.runtime import tune_cpu_allocator
from kdcache.train.trainer import LoopConfig, Trainer


class RandomBatches:
    """Uniform random tokens: throughput does not depend on what the tokens are."""

    def __init__(self, *, batch_size: int, seq_len: int, vocab: int) -> None:
        self.shape, self.vocab = (batch_size, seq_len + 1), vocab
        self.gen = torch.Generator().manual_seed(0)

    def next_batch(self) -> Batch:
        rows = torch.randint(0, self.vocab, self.shape, generator=self.gen)
        return Batch(inputs=rows[:, :-1], targets=rows[:, 1:])

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def matmul_flops_per_s(device: str, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm up the BLAS thread pool
    _sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(layers: int, args: argparse.Namespace, peak: float) -> dict[str, float]:
    cfg = ModelConfig(layers=layers, vocab_size=args.vocab, rho=args.rho, head_dim=args.head_dim)
    model = build_model(cfg).to(args.device)
    source = RandomBatches(batch_size=args.batch_size, seq_len=args.seq_len, vocab=args.vocab)

    def run(steps: int) -> float:
        trainer = Trainer(model, source, NextTokenLoss(), LoopConfig(steps=steps), progress=False)
        return trainer.run().wall_s

    run(args.warmup)
    tokens = args.steps * args.batch_size * args.seq_len
    tokens_per_s = tokens / run(args.steps)
    n = cfg.non_embedding_params()
    flops = 3 * forward_flops(n, rho=args.rho, context=args.seq_len, vocab=args.vocab) * tokens_per_s
    return {
        "layers": layers,
        "params": n,
        "tokens_per_s": tokens_per_s,
        "flops_per_s": flops,
        "matmul_flops_per_s": peak,
        "utilisation": flops / peak,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--rho", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (CPU is the target)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_cpu_allocator()  # as `kdcache train` does
    peak = matmul_flops_per_s(args.device)
    rows = [measure(layers, args, peak) for layers in args.layers]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"vocab {args.vocab}, rho {args.rho}; 2048^3 fp32 matmul {peak / 1e9:.1f} GFLOP/s")
    print(f"{'layers':>6} {'params N':>10} {'tokens/s':>10} {'GFLOP/s':>9} {'utilisation':>11}")
    for r in rows:
        print(f"{r['layers']:>6} {r['params']:>10,} {r['tokens_per_s']:>10,.0f} "
              f"{r['flops_per_s'] / 1e9:>9.2f} {r['utilisation']:>11.1%}")


if __name__ == "__main__":
    main()
