"""Peak memory of one distillation training step: chunked hidden-state loss against logits.

At a large vocabulary the student's logits dominate a training step's memory: at
V = 151,936 and 1,024 positions they are 0.6 GiB in float32, and the loss's softmax and
the logits' gradient add more copies. `distill_loss(batch, hidden=, lm_head=)` computes
the logits a chunk at a time and recomputes them in backward, so the step should cost
what a supervised step with the same chunked cross-entropy costs, whatever V is.

For each vocabulary, three cases run one forward + backward of the loss from the final
hidden states [B, T, d] and the output layer [V, d] (both leaves here; a tiny d keeps the
model itself out of the picture), each in a fresh process of this script (`--case`):

- hidden_distill: top-k KL (tail category, k ids per position) via `distill_loss(hidden=...)`;
- logits_distill: the same loss via `distill_loss(logits=hidden @ head.T)`, the logits
  materialised as a model's forward would;
- chunked_supervised: next-token cross-entropy + z-loss, chunked the same way
  (`distill_loss` on a batch without teacher keys, i.e. `NextTokenLoss.from_hidden`).

Memory is the process's peak resident set during the step (VmHWM, reset just before the
step through /proc/self/clear_refs; else ru_maxrss, the peak since the process started),
reported absolute and over the resident set just before the step. A tiny warm-up step
first loads the kernels and the modules a first call imports (the first checkpointed
chunk imports torch._dynamo: ~150 MB resident, once per process, so the chunked cases'
baseline is that much higher and their absolute peaks include it). Reports
hidden_distill / chunked_supervised over the baseline (target <= 1.1) and
logits_distill / hidden_distill.

`--device cuda` runs the same steps on the GPU and reports device memory instead: the peak
allocated during the step (`torch.cuda.max_memory_allocated`, reset just before it) over
what was allocated before it; the resident set does not see device memory.

    python benchmarks/kd_memory.py [--vocab 49152 151936] [--seq-len 1024] [--batch 1]
        [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdcache.train.kd_losses import distill_loss
from kdcache.train.losses import LOSS_CHUNK_BYTES

CASES = ("hidden_distill", "logits_distill", "chunked_supervised")
MIB = 2**20


def status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _batch(args: argparse.Namespace, t: int, teacher: bool) -> dict[str, Any]:
    """Random tokens and a top-k teacher: k distinct ids, log-probs holding 95% of the mass."""
    gen = torch.Generator().manual_seed(0)
    b, v, k = args.batch, args.vocab, args.k
    labels = torch.randint(v, (b, t), generator=gen)
    d: dict[str, Any] = {"input_ids": labels, "labels": labels}
    if teacher:
        offset = torch.randint(v, (b, t, 1), generator=gen)
        d["teacher_ids"] = (offset + torch.arange(k) * (v // k)) % v
        logprobs = torch.log_softmax(torch.randn(b, t, k, generator=gen) * 2, -1) + math.log(0.95)
        d["teacher_logprobs"] = logprobs.sort(-1, descending=True).values
        d["teacher_tail_logmass"] = torch.full((b, t), math.log(0.05))
        d["teacher_temperature"] = torch.tensor(1.0)
    return d


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """One case's step in this process; returns its memory and time."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(1)
    head = (torch.randn(args.vocab, args.d, generator=gen) / math.sqrt(args.d)).to(device).requires_grad_()

    def step(t: int) -> float:
        hidden = torch.randn(args.batch, t, args.d, generator=gen).to(device).requires_grad_()
        teacher = args.case != "chunked_supervised"
        batch = {k: v.to(device) for k, v in _batch(args, t, teacher=teacher).items()}
        t0 = time.perf_counter()
        if args.case == "logits_distill":
            loss = distill_loss(batch, logits=hidden @ head.T)
        else:
            loss = distill_loss(batch, hidden=hidden, lm_head=head)
        loss.backward()
        head.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    step(4)  # loads kernels and thread pools, with next to no memory
    gc.collect()
    if device.type == "cuda":
        return _cuda_case(step, args.seq_len)
    baseline_kb = status_kb("VmRSS") or 0
    reset = reset_peak()
    seconds = step(args.seq_len)
    if reset and (hwm := status_kb("VmHWM")) is not None:
        peak_kb, method = hwm, "VmHWM"
    else:
        peak_kb, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    return {"peak_mb": peak_kb / 1024, "baseline_mb": baseline_kb / 1024,
            "over_baseline_mb": (peak_kb - baseline_kb) / 1024, "step_s": seconds, "method": method}


def _cuda_case(step: Callable[[int], float], seq_len: int) -> dict[str, Any]:
    """On a GPU the caching allocator counts every byte: the peak allocated during the step,
    over what was allocated before it (the resident set says nothing about device memory)."""
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = step(seq_len)
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mb": peak / MIB, "baseline_mb": baseline / MIB, "over_baseline_mb": (peak - baseline) / MIB,
            "step_s": seconds, "method": "cuda.max_memory_allocated"}


def measure(args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    cases = {}
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--vocab", str(vocab),
               "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--d", str(args.d),
               "--k", str(args.k), "--threads", str(args.threads), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"case {case} at V={vocab} failed:\n{out.stderr}")
        cases[case] = json.loads(out.stdout.strip().splitlines()[-1])
    over = {c: r["over_baseline_mb"] for c, r in cases.items()}
    peak = {c: r["peak_mb"] for c, r in cases.items()}
    return {
        **({} if args.device == "cpu" else {"device": args.device}),
        "vocab": vocab, "seq_len": args.seq_len, "batch": args.batch, "d": args.d, "k": args.k,
        "logits_mb": args.batch * args.seq_len * vocab * 4 / MIB,
        "cases": cases,
        "hidden_over_supervised": over["hidden_distill"] / over["chunked_supervised"],
        "hidden_over_supervised_peak": peak["hidden_distill"] / peak["chunked_supervised"],
        "logits_over_hidden": over["logits_distill"] / over["hidden_distill"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[49_152, 151_936])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1, help="sequences in the step")
    p.add_argument("--d", type=int, default=64, help="hidden size")
    p.add_argument("--k", type=int, default=64, help="top-k ids per position")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: peak allocated GPU memory (torch.cuda.max_memory_allocated) instead of RSS")
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.case:
        (args.vocab,) = args.vocab
        print(json.dumps(run_case(args)))
        return
    rows = [measure(args, v) for v in args.vocab]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    before = "the resident set" if args.device == "cpu" else "GPU memory allocated"
    print(f"one step, batch {args.batch} x {args.seq_len}, d {args.d}, top-k {args.k}, "
          f"chunks of {LOSS_CHUNK_BYTES // MIB} MiB float32 logits; MiB over {before} "
          "before the step (absolute peak in brackets)")
    print(f"{'V':>8} {'logits':>7} {'hidden_distill':>16} {'logits_distill':>16} {'chunked_sup':>16} "
          f"{'hid/sup':>8} {'logits/hid':>10}")
    for r in rows:
        cells = [f"{r['cases'][c]['over_baseline_mb']:>6.0f} [{r['cases'][c]['peak_mb']:>5.0f}]"
                 for c in CASES]
        print(f"{r['vocab']:>8} {r['logits_mb']:>7.0f} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16} "
              f"{r['hidden_over_supervised']:>8.3f} {r['logits_over_hidden']:>10.2f}")


if __name__ == "__main__":
    main()
