"""Tokens/s of a Hugging Face student through `kdcache train`, on 1 rank and on N ranks.

Prepares token data from the standard library, writes a Qwen2-shaped `--student-config`,
and trains it supervised with the same flags twice: once in one process (with all the
threads), once as N torchrun ranks (threads split between them on CPU; one GPU each
with --device cuda). Reports each run's tokens/s (from its runs-table row), the ratio,
and the two validation losses (which should agree: the batches do not depend on the
world size). Prints a table, or JSON with --json.

    python benchmarks/student_ranks.py [--ranks 2] [--device cpu|cuda] [--tokens 200000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

STUDENT = {"model_type": "qwen2", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704,
           "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "tie_word_embeddings": True, "max_position_embeddings": 1024}


def _kdcache(*argv: str, ranks: int = 1, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if ranks == 1:
        cmd = [sys.executable, "-m", "kdcache.pipeline.cli", *argv]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "kdcache.pipeline.cli", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:1])} failed: {done.stderr.strip().splitlines()[-1:]}")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="kdcache-student-ranks-"))
    _kdcache("prepare", "--out", str(root / "data"), "--vocab-size", str(STUDENT["vocab_size"]),
             "--seq-len", str(args.seq_len), "--max-tokens", str(4 * args.tokens), "--quiet",
             threads=args.threads)
    config = root / "student.json"
    config.write_text(json.dumps(STUDENT))
    rows = []
    cpu = args.device == "cpu"
    for ranks in (1, args.ranks):
        out = root / f"ranks{ranks}"
        threads = max(1, args.threads // ranks) if cpu else args.threads
        _kdcache("train", "--data", str(root / "data"), "--student-config", str(config), "--out", str(out),
                 "--tokens", str(args.tokens), "--batch-size", str(args.batch_size), "--lr", "1e-3",
                 "--checkpoint-every", "0", "--eval-rows", "64", "--device", args.device,
                 "--threads", str(threads), "--quiet", ranks=ranks, threads=threads)
        training = json.loads((out / "kdcache.json").read_text())["training"]
        rows.append({"ranks": ranks, "threads_per_rank": threads, "device": args.device,
                     "params": training["params"], "tokens": training["tokens"],
                     "tokens_per_s": training["tokens_per_s"], "loss": training["loss"]})
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all (split over ranks on CPU)")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:,.0f}" if isinstance(v, float) and v > 100 else
                                 f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
