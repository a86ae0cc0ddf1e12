"""Store write/read throughput and size for top-k stores on realistic teacher distributions.

For k in {16, 64, 128} and vocab in {4096, 32768, 128256}: tokens/s writing whole shards
through StoreWriter (validation, compression, checksums, ledger commit); tokens/s
reading through StoreReader in the loader's pattern (whole inner chunks in shuffled
order, every array of the store); the same for batches of 8 random rows; bytes per
token on disk; and the reader's throughput divided by reading the same rows from an
uncompressed numpy memmap of the same arrays, measured in the same run.

    python benchmarks/store_io.py [--json] [--rows 64] [--seq-len 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import topk_family

from kdcache.storage import (
    DataInfo,
    StoreMeta,
    StoreReader,
    StoreWriter,
    TeacherInfo,
    suggest_chunk_rows,
)

KS = (16, 64, 128)
VOCABS = (4096, 32768, 128256)
RANDOM_ROWS = 8
SHARD_ROWS = 32


def _meta(rows: int, seq_len: int, vocab: int, k: int, shard_rows: int) -> StoreMeta:
    return StoreMeta(
        kind="topk", k=k, vocab_size=vocab, seq_len=seq_len, temperature=1.0,
        teacher=TeacherInfo(name="synthetic", fingerprint="synthetic", params=0, nonembedding_params=0),
        data=DataInfo(fingerprint="synthetic", split="student", rows=rows),
        shard_rows=shard_rows, chunk_rows=suggest_chunk_rows(seq_len, k, shard_rows),
    )


def _best(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(arrays: dict[str, np.ndarray], vocab: int, k: int, repeats: int, tmp: Path) -> dict:
    rows, seq_len = arrays["target_logprob"].shape
    meta = _meta(rows, seq_len, vocab, k, min(SHARD_ROWS, rows))
    tokens = rows * seq_len
    counter = iter(range(10**6))

    def write() -> None:
        writer = StoreWriter.open(tmp / f"w{next(counter)}.zarr", meta)
        for shard in range(meta.num_shards):
            start, stop = meta.shard_bounds(shard)
            writer.write_shard(shard, {n: a[start:stop] for n, a in arrays.items()})
        writer.finalize()

    write_s = _best(write, repeats)
    path = tmp / "w0.zarr"
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    rng = np.random.default_rng(0)
    c = meta.chunk_rows
    chunks = [np.arange(s, s + c) for s in rng.permutation(np.arange(0, rows, c))]
    randoms = [rng.choice(rows, RANDOM_ROWS, replace=False) for _ in range(rows // RANDOM_ROWS)]
    reader = StoreReader(path)
    read_s = _best(lambda: [reader.read_rows(b) for b in chunks], repeats)
    random_s = _best(lambda: [reader.read_rows(b) for b in randoms], repeats)
    maps = {}
    for name, values in arrays.items():
        mm = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=values.dtype,
                                       shape=values.shape)
        mm[:] = values
        mm.flush()
        maps[name] = np.load(tmp / f"{name}.npy", mmap_mode="r")
    raw_s = _best(lambda: [{n: np.array(m[b[0]:b[-1] + 1]) for n, m in maps.items()}
                           for b in chunks], repeats)
    return {
        "k": k,
        "vocab": vocab,
        "chunk_rows": c,
        "write_tokens_per_s": tokens / write_s,
        "read_tokens_per_s": tokens / read_s,
        "random_rows_tokens_per_s": len(randoms) * RANDOM_ROWS * seq_len / random_s,
        "bytes_per_token": size / tokens,
        "raw_bytes_per_token": sum(a.nbytes for a in arrays.values()) / tokens,
        "raw_read_ratio": raw_s / read_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = []
    rng = np.random.default_rng(0)
    for vocab in VOCABS:
        family = topk_family(rng, args.rows, args.seq_len, vocab, list(KS))
        for k in KS:
            with tempfile.TemporaryDirectory() as tmp:
                results.append(measure(family[k], vocab, k, args.repeats, Path(tmp)))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| k | vocab | chunk rows | write tok/s | read tok/s | random-8 read tok/s | B/token "
          "| raw B/token | read / memmap |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['k']} | {r['vocab']} | {r['chunk_rows']} | {r['write_tokens_per_s']:,.0f} "
              f"| {r['read_tokens_per_s']:,.0f} | {r['random_rows_tokens_per_s']:,.0f} "
              f"| {r['bytes_per_token']:.1f} | {r['raw_bytes_per_token']:.1f} "
              f"| {r['raw_read_ratio']:.3f} |")


if __name__ == "__main__":
    main()
