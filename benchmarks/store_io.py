"""Store write/read throughput and size for top-k stores on realistic teacher distributions.

For k in {16, 64, 128} and vocab in {4096, 32768, 128256}: tokens/s writing whole shards
of the cache job's default 64 rows through StoreWriter (validation, compression,
checksums, ledger commit; creating the store, once per cache job, is timed apart as
`create_store_ms`); tokens/s
reading through StoreReader in the loader's pattern (whole inner chunks in shuffled
order, every array of the store); the same for batches of 8 random rows; bytes per
token on disk; and the reader's throughput divided by reading the same rows from an
uncompressed numpy memmap of the same arrays, measured in the same run.

Two limits are measured in the same run, one core each: zstd (level 1) decoding the
same arrays as one frame (`zstd_decode_*`), and decoding every inner chunk of the store
with the store's own codecs and no reader around them (`decode_floor_tokens_per_s`),
split into crc32c, Blosc-zstd and the delta's prefix sum (`split_ns_per_token`; `copy`
is what the reader spends beyond them, Python and copies included, on its thread pool).

    python benchmarks/store_io.py [--json] [--rows 64] [--seq-len 256] [--repeats 3]
        [--ks 16 64 128] [--vocabs 4096 32768 128256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import crc32c
import numpy as np
import zarr
from numcodecs import Zstd

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import best_time, synthetic_meta, topk_family

from kdcache.storage import (
    StoreReader,
    StoreWriter,
)
from kdcache.storage.shardio import ShardPlan

KS = (16, 64, 128)
VOCABS = (4096, 32768, 128256)
RANDOM_ROWS = 8
SHARD_ROWS = 64  # the cache job's default --shard-rows


def measure(arrays: dict[str, np.ndarray], vocab: int, k: int, repeats: int, tmp: Path) -> dict:
    rows, seq_len = arrays["target_logprob"].shape
    meta = synthetic_meta(rows, seq_len, vocab, k, min(SHARD_ROWS, rows))
    tokens = rows * seq_len
    counter = iter(range(10**6))

    creates, writes = [], []
    for _ in range(repeats):
        # Creating a store is once per cache job; shard writes are its steady state.
        t0 = time.perf_counter()
        writer = StoreWriter.open(tmp / f"w{next(counter)}.zarr", meta)
        t1 = time.perf_counter()
        for shard in range(meta.num_shards):
            start, stop = meta.shard_bounds(shard)
            writer.write_shard(shard, {n: a[start:stop] for n, a in arrays.items()})
        writes.append(time.perf_counter() - t1)
        creates.append(t1 - t0)
        writer.finalize()
    write_s, create_s = min(writes), min(creates)
    path = tmp / "w0.zarr"
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    rng = np.random.default_rng(0)
    c = meta.chunk_rows
    chunks = [np.arange(s, s + c) for s in rng.permutation(np.arange(0, rows, c))]
    randoms = [rng.choice(rows, RANDOM_ROWS, replace=False) for _ in range(rows // RANDOM_ROWS)]
    reader = StoreReader(path)
    read_s = best_time(lambda: [reader.read_rows(b) for b in chunks], repeats)
    random_s = best_time(lambda: [reader.read_rows(b) for b in randoms], repeats)
    maps = {}
    for name, values in arrays.items():
        mm = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=values.dtype,
                                       shape=values.shape)
        mm[:] = values
        mm.flush()
        maps[name] = np.load(tmp / f"{name}.npy", mmap_mode="r")
    raw_s = best_time(lambda: [{n: np.array(m[b[0]:b[-1] + 1]) for n, m in maps.items()}
                           for b in chunks], repeats)
    floor = decode_split(path, list(arrays), meta.num_shards, tokens)
    return {
        "k": k,
        "vocab": vocab,
        "chunk_rows": c,
        **floor,
        **zstd_rate(arrays, tokens),
        "write_tokens_per_s": tokens / write_s,
        "create_store_ms": 1000 * create_s,
        "read_tokens_per_s": tokens / read_s,
        "random_rows_tokens_per_s": len(randoms) * RANDOM_ROWS * seq_len / random_s,
        "bytes_per_token": size / tokens,
        "raw_bytes_per_token": sum(a.nbytes for a in arrays.values()) / tokens,
        "raw_read_ratio": raw_s / read_s,
        "read_vs_floor": tokens / read_s / floor["decode_floor_tokens_per_s"],
    }


def zstd_rate(arrays: dict[str, np.ndarray], tokens: int) -> dict:
    """One core of zstd decoding the arrays' raw bytes as one frame: the codec's limit."""
    raw = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    codec = Zstd(level=1)
    frame = codec.encode(raw)
    seconds = best_time(lambda: codec.decode(frame), 3)
    return {"zstd_decode_mb_per_s": len(raw) / seconds / 1e6, "zstd_decode_tokens_per_s": tokens / seconds}


def decode_split(path: Path, names: list[str], shards: int, tokens: int) -> dict:
    """Decode every inner chunk on one core, timing crc32c, Blosc and the delta apart."""
    group = zarr.open_group(str(path), mode="r")
    spent = {"crc32c": 0.0, "blosc": 0.0, "delta": 0.0}
    for name in names:
        plan = ShardPlan.of(group[name], path / name)  # type: ignore[arg-type]
        assert plan is not None, name
        for shard in range(shards):
            index = plan.read_index(shard)
            for raw in plan.read_chunks(shard, index, list(range(plan.chunks_per_shard))):
                assert raw is not None
                t0 = time.perf_counter()
                crc32c.crc32c(memoryview(raw)[:-4])
                t1 = time.perf_counter()
                data = np.frombuffer(plan.blosc.decode(memoryview(raw)[:-4]), dtype=plan.dtype)
                t2 = time.perf_counter()
                if plan.delta:
                    np.cumsum(data, dtype=plan.dtype)
                spent["crc32c"] += t1 - t0
                spent["blosc"] += t2 - t1
                spent["delta"] += time.perf_counter() - t2
    total = sum(spent.values())
    return {"decode_floor_tokens_per_s": tokens / total,
            "split_ns_per_token": {k: v / tokens * 1e9 for k, v in spent.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    args = parser.parse_args()
    results = []
    rng = np.random.default_rng(0)
    for vocab in args.vocabs:
        family = topk_family(rng, args.rows, args.seq_len, vocab, args.ks)
        for k in args.ks:
            with tempfile.TemporaryDirectory() as tmp:
                results.append(measure(family[k], vocab, k, args.repeats, Path(tmp)))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| k | vocab | chunk rows | write tok/s | read tok/s | random-8 read tok/s | B/token "
          "| raw B/token | read / memmap | decode floor tok/s | zstd decode tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['k']} | {r['vocab']} | {r['chunk_rows']} | {r['write_tokens_per_s']:,.0f} "
              f"| {r['read_tokens_per_s']:,.0f} | {r['random_rows_tokens_per_s']:,.0f} "
              f"| {r['bytes_per_token']:.1f} | {r['raw_bytes_per_token']:.1f} "
              f"| {r['raw_read_ratio']:.3f} | {r['decode_floor_tokens_per_s']:,.0f} "
              f"| {r['zstd_decode_tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
