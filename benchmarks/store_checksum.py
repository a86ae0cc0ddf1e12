"""What the reader's per-shard ledger check costs (storage/reader.py, docs/store-format.md).

A reader decodes a whole shard the first time any of its rows is read (in blocks of at most
`CHECK_BLOCK_BYTES`) and compares every array's running crc32c with its ledger entry's;
rows asked for are served from that decode, the shard's other rows are decoded again when
asked for. So the check costs about
one extra decode of the store per reader, once, however many epochs it reads.

Measured on one top-k store of synthetic teacher targets, in the same run, best of
`--repeats`, for two read patterns: the loader's (`RowOrder` windows of `--batch` rows,
one `read_rows` per window, as `StoreDataset` reads) and store_io.py's (whole inner chunks
in shuffled order). For each, one pass over the store by a fresh reader (every shard
checked on its first read: `first_pass_tokens_per_s`) and by a reader that has checked
every shard already (`checked_tokens_per_s`, which is what every later epoch reads at);
their ratio; the seconds the checks add per reader; and the ratio over `--epochs` epochs
of one reader. `crc32c_ns_per_token` is the checksum alone over the decoded bytes: the
check's cost is the decode, not the crc.

    python benchmarks/store_checksum.py [--json] [--rows 512] [--seq-len 256] [--vocab 32768]
        [--k 64] [--shard-rows 64] [--drawn 64] [--batch 32] [--epochs 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import crc32c
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import best_time, write_topk_store

from kdcache.storage import StoreReader
from kdcache.train.row_order import RowOrder


def patterns(rows: int, chunk_rows: int, batch: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    chunks = [np.arange(s, s + chunk_rows) for s in rng.permutation(np.arange(0, rows, chunk_rows))]
    windows = [w.reshape(-1) for w in RowOrder(n_rows=rows, batch_size=batch, seed=0).windows(0)]
    return {"loader_windows": windows, "shuffled_chunks": chunks}


def measure(path: Path, reads: list[np.ndarray], tokens: int, epochs: int, repeats: int) -> dict:
    def one_pass(reader: StoreReader) -> None:
        for rows in reads:
            reader.read_rows(rows)

    def first_pass() -> Callable[[], None]:
        return lambda: one_pass(StoreReader(path))

    opened = best_time(lambda: StoreReader(path), repeats)  # opening is not the check: taken off
    first = best_time(first_pass(), repeats) - opened
    warm = StoreReader(path)
    one_pass(warm)
    checked = best_time(lambda: one_pass(warm), repeats)
    extra = max(first - checked, 0.0)
    return {
        "first_pass_tokens_per_s": tokens / first,
        "checked_tokens_per_s": tokens / checked,
        "first_pass_ratio": checked / first,
        "check_seconds_per_reader": extra,
        f"ratio_over_{epochs}_epochs": epochs * checked / (epochs * checked + extra),
    }


def crc_rate(path: Path, tokens: int, repeats: int) -> float:
    """ns per token of crc32c over every decoded array of the store (the checksum alone)."""
    reader = StoreReader(path)
    values = reader.read_rows(np.arange(reader.meta.rows))
    raw = [np.ascontiguousarray(v).view(np.uint8) for v in values.values()]
    seconds = best_time(lambda: [crc32c.crc32c(r.data) for r in raw], repeats)
    return seconds / tokens * 1e9


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--shard-rows", type=int, default=64)
    ap.add_argument("--drawn", type=int, default=64, help="rows of targets drawn, then tiled")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    tokens = args.rows * args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.zarr"
        t0 = time.perf_counter()
        write_topk_store(path, args.rows, args.drawn, args.seq_len, args.vocab, args.k, args.shard_rows)
        chunk_rows = StoreReader(path).meta.chunk_rows
        result = {
            "rows": args.rows, "seq_len": args.seq_len, "vocab": args.vocab, "k": args.k,
            "shard_rows": args.shard_rows, "chunk_rows": chunk_rows, "drawn": args.drawn, "batch": args.batch,
            "repeats": args.repeats, "build_s": time.perf_counter() - t0,
            "crc32c_ns_per_token": crc_rate(path, tokens, args.repeats),
            **{name: measure(path, reads, tokens, args.epochs, args.repeats)
               for name, reads in patterns(args.rows, chunk_rows, args.batch).items()},
        }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:24s} {value}")
    return result


if __name__ == "__main__":
    main()
