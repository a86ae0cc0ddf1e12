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

`--url s3://BUCKET/PREFIX` measures an object store against local disk in one run (k = 64,
vocab 32768 and 512 rows, 8 shards of 64, unless --ks, --vocabs, --rows say otherwise):
the same store is written through StoreWriter to a temporary directory and to a fresh
prefix under the URL (deleted at the end), then read through StoreReader in the loader's
pattern, twice: the first pass of a fresh reader (which fetches each shard's index and
decodes each shard once more against its ledger checksum) and a warm pass (the same
reader, the next epoch's order); for comparison, a warm read of one whole shard per
`read_rows`, checked byte for byte against what was written. `*_ratio` is object store /
local disk, best of --repeats each. Credentials and endpoint come from the environment as
it is (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT_URL,
AWS_ALLOW_HTTP). `--url local-s3` starts tests/s3_server.py's moto server on 127.0.0.1
instead (a bucket of its own, the environment pointed at it before any client is built,
stopped at the end); only then are requests counted from its access log, by method (LIST
is a GET with `list-type`), per shard read (null otherwise). Rows are URL_DISTINCT_ROWS
drawn rows tiled (each inner chunk is coded alone, so it costs what fresh rows would).
Two limits of the object store are measured with the same requests and no kdcache code
around them: the warm pass's ranged GETs without decoding (`get_floor_tokens_per_s`), and
PUTs of the written shard files and ledger entries, one at a time as the writer sends
them and a shard's all at once (`put_serial_tokens_per_s`, `put_concurrent_tokens_per_s`).

    python benchmarks/store_io.py --url local-s3 [--json] [--repeats 3] [--rows 512]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import zarr
from numcodecs import Zstd

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import best_time, synthetic_meta, topk_family

from kdcache.storage import (
    StoreMeta,
    StoreReader,
    StoreWriter,
)
from kdcache.storage.ledger import entry_key
from kdcache.storage.location import LocalDir, Location, io_pool, locate
from kdcache.storage.shardio import ShardPlan

KS = (16, 64, 128)
VOCABS = (4096, 32768, 128256)
RANDOM_ROWS = 8
SHARD_ROWS = 64  # the cache job's default --shard-rows
LOCAL_S3 = "local-s3"  # --url: start tests/s3_server.py's moto server and use a bucket of it
BUCKET = "kdcache-bench"
URL_KS, URL_VOCABS, URL_ROWS = (64,), (32768,), 512  # --url's defaults
URL_DISTINCT_ROWS = 16  # drawn rows in --url mode, tiled to --rows (drawing costs ~0.7 s a row)
REPO = Path(__file__).resolve().parent.parent


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
    chunks = loader_chunks(rng, rows, c)
    randoms = [rng.choice(rows, RANDOM_ROWS, replace=False) for _ in range(rows // RANDOM_ROWS)]
    reader = StoreReader(path)
    read_s = best_time(lambda: loader_pass(reader, chunks), repeats)
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


def loader_chunks(rng: np.random.Generator, rows: int, chunk_rows: int) -> list[np.ndarray]:
    """One epoch in the loader's pattern: every whole inner chunk, in shuffled order."""
    return [np.arange(s, min(s + chunk_rows, rows)) for s in rng.permutation(np.arange(0, rows, chunk_rows))]


def loader_pass(reader: StoreReader, chunks: list[np.ndarray]) -> None:
    """Read `chunks` (loader_chunks) one `read_rows` each, every array of the store."""
    for rows in chunks:
        reader.read_rows(rows)


def zstd_rate(arrays: dict[str, np.ndarray], tokens: int) -> dict:
    """One core of zstd decoding the arrays' raw bytes as one frame: the codec's limit."""
    raw = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    codec = Zstd(level=1)
    frame = codec.encode(raw)
    seconds = best_time(lambda: codec.decode(frame), 3)
    return {"zstd_decode_mb_per_s": len(raw) / seconds / 1e6, "zstd_decode_tokens_per_s": tokens / seconds}


def decode_split(path: Path, names: list[str], shards: int, tokens: int) -> dict:
    """Decode every inner chunk on one core, timing crc32c, Blosc, the delta and kdcache's
    entropy-coded codecs (ids, log-probs) apart."""
    group = zarr.open_group(str(path), mode="r")
    spent = {"crc32c": 0.0, "blosc": 0.0, "delta": 0.0, "entropy": 0.0}
    for name in names:
        plan = ShardPlan.of(group[name], LocalDir(path / name))
        assert plan is not None, name
        for shard in range(shards):
            index = plan.read_index(shard)
            for raw in plan.read_chunks(shard, index, list(range(plan.chunks_per_shard))):
                assert raw is not None
                t0 = time.perf_counter()
                crc32c.crc32c(memoryview(raw)[:-4])
                t1 = time.perf_counter()
                if plan.serializer is not None:
                    plan.serializer.chunk_decode(memoryview(raw)[:-4], plan._chunk_shape(), plan.dtype)
                    spent["entropy"] += time.perf_counter() - t1
                    spent["crc32c"] += t1 - t0
                    continue
                assert plan.blosc is not None
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


# ---- --url: an object store against local disk ----------------------------------------


@contextmanager
def object_store(url: str) -> Iterator[tuple[str, Any]]:
    """(a fresh prefix under `url`, the moto server or None). `local-s3` starts the server,
    makes a bucket and points the environment at it before any client is built."""
    server = None
    if url == LOCAL_S3:
        sys.path.insert(0, str(REPO))
        from tests.s3_server import S3Server

        server = S3Server().start()
        os.environ.update(server.env)
        url = f"s3://{BUCKET}"
    prefix = f"{url.rstrip('/')}/store_io-{uuid.uuid4().hex[:12]}"
    try:
        if server is not None:
            server.create_bucket(BUCKET)
        else:
            locate(prefix).check()
        yield prefix, server
    finally:
        if server is not None:
            server.stop()  # its objects live in its memory
        else:
            locate(prefix).remove()


def shard_pass(reader: StoreReader, meta: StoreMeta) -> dict[str, np.ndarray]:
    """Every row, one `read_rows` per whole shard in order (a warm reader's fewest requests:
    one per array and shard); returns the store's arrays, for checking."""
    parts = [reader.read_rows(np.arange(*meta.shard_bounds(s))) for s in range(meta.num_shards)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def write_store(where: str | Path, meta: StoreMeta, arrays: dict[str, np.ndarray]) -> tuple[float, float]:
    """(seconds creating the store, seconds writing its shards), then finalize (untimed)."""
    t0 = time.perf_counter()
    writer = StoreWriter.open(where, meta)
    t1 = time.perf_counter()
    for shard in range(meta.num_shards):
        start, stop = meta.shard_bounds(shard)
        writer.write_shard(shard, {n: a[start:stop] for n, a in arrays.items()})
    t2 = time.perf_counter()
    writer.finalize()
    return t1 - t0, t2 - t1


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def tally(lines: list[str]) -> dict[str, int]:
    """Requests by method (LIST: a GET with `list-type`) from moto's access-log lines, and
    how many were answered 404 (zarr probes for v2 metadata, absent optional arrays)."""
    found: Counter[str] = Counter()
    for line in lines:
        m = re.search(r'([A-Z]+) (\S+) HTTP/[\d.]+\S*" (\d{3})', line)
        if m is None:
            found["unparsed"] += 1
            continue
        method, path, status = m.groups()
        found["LIST" if method == "GET" and "list-type=" in path else method] += 1
        found["not_found"] += status == "404"
    return {"total": len(lines), **dict(sorted(found.items()))}


def per_shard(counts: dict[str, int], shards: int) -> dict[str, float]:
    return {k: v / shards for k, v in counts.items()}


def plans(where: Location, names: list[str]) -> dict[str, ShardPlan]:
    group = zarr.open_group(where.zarr_store(read_only=True), mode="r")
    out = {name: ShardPlan.of(group[name], where / name) for name in names}
    assert all(p is not None for p in out.values()), "benchmark stores use kdcache's codec chains"
    return out


def get_floor(where: Location, names: list[str], shards: int, chunks: list[np.ndarray]) -> float:
    """Seconds for the warm pass's requests alone: each inner chunk's ranged GET for every
    array at once, as the reader issues them, indexes already fetched, nothing decoded."""
    plan = plans(where, names)
    index = {(n, s): p.read_index(s) for n, p in plan.items() for s in range(shards)}
    per = next(iter(plan.values())).chunks_per_shard
    c = next(iter(plan.values())).chunk_rows
    t0 = time.perf_counter()
    for rows in chunks:
        chunk = int(rows[0]) // c
        shard, inner = divmod(chunk, per)
        jobs = [io_pool().submit(p.read_chunks, shard, index[(n, shard)], [inner]) for n, p in plan.items()]
        for job in jobs:
            job.result()
    return time.perf_counter() - t0


def put_floor(local: Path, dst: Location, names: list[str], shards: int, concurrent: bool) -> float:
    """Seconds to PUT every shard's files and ledger entry (the bytes the writer wrote to
    `local`), one at a time as the writer sends them, or each shard's all at once."""
    source, plan = LocalDir(local), plans(LocalDir(local), names)
    keys = [[f"{n}/{p.path(s)}" for n, p in plan.items()] + [entry_key(s)] for s in range(shards)]
    blobs = [[(key, source.read(key)) for key in shard] for shard in keys]
    t0 = time.perf_counter()
    for shard in blobs:
        if concurrent:
            for job in [io_pool().submit(dst.publish, key, data) for key, data in shard]:
                job.result()
        else:
            for key, data in shard:
                dst.publish(key, data)
    return time.perf_counter() - t0


def measure_url(arrays: dict[str, np.ndarray], vocab: int, k: int, repeats: int, tmp: Path, prefix: str,
                server: Any) -> dict:
    """Write and read the same store on local disk and under `prefix`, alternating, best of
    `repeats`; then the object store's limits, and its requests when `server` counts them."""
    rows, seq_len = arrays["target_logprob"].shape
    meta = synthetic_meta(rows, seq_len, vocab, k, min(SHARD_ROWS, rows))
    tokens, names, shards = rows * seq_len, list(arrays), meta.num_shards
    sides = {"local": str(tmp / f"k{k}-v{vocab}"), "object_store": f"{prefix}/k{k}-v{vocab}"}
    best: dict[str, dict[str, float]] = {side: {} for side in sides}

    def keep(side: str, what: str, seconds: float) -> None:
        best[side][what] = min(seconds, best[side].get(what, float("inf")))

    for i in range(repeats):
        for side, base in sides.items():
            create_s, write_s = write_store(f"{base}/w{i}.zarr", meta, arrays)
            keep(side, "create", create_s)
            keep(side, "write", write_s)
    rng = np.random.default_rng(0)
    epochs = [loader_chunks(rng, rows, meta.chunk_rows) for _ in range(2)]
    for _ in range(repeats):
        for side, base in sides.items():
            open_s, reader = timed(lambda base=base: StoreReader(f"{base}/w0.zarr"))
            keep(side, "open", open_s)
            keep(side, "first", timed(lambda reader=reader: loader_pass(reader, epochs[0]))[0])
            keep(side, "warm", timed(lambda reader=reader: loader_pass(reader, epochs[1]))[0])
            whole_s, got = timed(lambda reader=reader: shard_pass(reader, meta))
            keep(side, "whole", whole_s)
            wrong = [n for n, v in arrays.items()
                     if got[n].dtype != v.dtype or got[n].tobytes() != v.tobytes()]
            if wrong:
                raise AssertionError(f"{base}/w0.zarr: arrays {wrong} read back differ from what was written")
    for _ in range(repeats):
        for side, base in sides.items():
            for prefetch in (0, 2):
                keep(side, f"train{prefetch}", training_pass(f"{base}/w0.zarr", rows, prefetch))
    remote = locate(f"{sides['object_store']}/w0.zarr")
    floors = {
        "get_floor_tokens_per_s": tokens / min(get_floor(remote, names, shards, epochs[1])
                                               for _ in range(repeats)),
        "put_serial_tokens_per_s": tokens / min(
            put_floor(Path(sides["local"]) / "w0.zarr", locate(f"{prefix}/put-s{i}"), names, shards, False)
            for i in range(repeats)),
        "put_concurrent_tokens_per_s": tokens / min(
            put_floor(Path(sides["local"]) / "w0.zarr", locate(f"{prefix}/put-c{i}"), names, shards, True)
            for i in range(repeats)),
    }
    out: dict[str, Any] = {
        "k": k, "vocab": vocab, "rows": rows, "seq_len": seq_len, "shard_rows": meta.shard_rows,
        "shards": shards, "chunk_rows": meta.chunk_rows, "repeats": repeats,
    }
    for side, t in best.items():
        out[side] = {
            "write_tokens_per_s": tokens / t["write"],
            "create_store_ms": 1000 * t["create"],
            "open_reader_ms": 1000 * t["open"],
            "read_first_pass_tokens_per_s": tokens / t["first"],
            "read_warm_pass_tokens_per_s": tokens / t["warm"],
            "read_shard_per_call_tokens_per_s": tokens / t["whole"],
            "train_loader_tokens_per_s": tokens / t["train0"],
            "train_loader_prefetch2_tokens_per_s": tokens / t["train2"],
        }
    out["train_step_ms"] = 1000 * STEP_SECONDS
    out["train_compute_only_tokens_per_s"] = 8 * seq_len / STEP_SECONDS
    for what in ("write", "read_first_pass", "read_warm_pass", "read_shard_per_call", "train_loader",
                 "train_loader_prefetch2"):
        key = f"{what}_tokens_per_s"
        out[f"{what}_ratio"] = out["object_store"][key] / out["local"][key]
    out["object_store"].update(floors)
    out["requests"] = count_requests(server, f"{sides['object_store']}/counted.zarr", meta, arrays, epochs)
    return out


STEP_SECONDS = 0.01
"""A training step's compute per batch of 8 rows in `training_pass` (~200k tokens/s at 256
positions): what the loader's prefetch thread overlaps its reads with."""


def training_pass(where: str, rows: int, prefetch: int) -> float:
    """Seconds for one epoch of `kdcache train`'s store source (`StoreBatches`, batch 8, its
    windows and row order), each batch followed by STEP_SECONDS of 'compute'."""
    from kdcache.train.store_batches import StoreBatches

    source = StoreBatches(where, batch_size=8, seed=0, prefetch=prefetch)
    started = time.perf_counter()
    for _ in range(rows // 8):
        source.next_batch()
        time.sleep(STEP_SECONDS)
    seconds = time.perf_counter() - started
    source.close()
    return seconds


def count_requests(server: Any, url: str, meta: StoreMeta, arrays: dict[str, np.ndarray],
                   epochs: list[list[np.ndarray]]) -> dict | None:
    """Requests the server logged: writing a store (creating it, per shard, finalizing), opening
    a reader, reading one whole shard with a fresh reader (and again, warm), and a first and a
    warm pass over every shard, per shard. None when the server is not ours to count."""
    if server is None:
        return None
    shards = meta.num_shards
    server.request_lines()
    writer = StoreWriter.open(url, meta)
    create = tally(server.request_lines())
    for shard in range(shards):
        start, stop = meta.shard_bounds(shard)
        writer.write_shard(shard, {n: a[start:stop] for n, a in arrays.items()})
    write = tally(server.request_lines())
    writer.finalize()
    finalize = tally(server.request_lines())
    reader = StoreReader(url)
    opened = tally(server.request_lines())
    one = [rows for rows in epochs[0] if rows[0] // meta.shard_rows == 0]
    loader_pass(reader, one)
    one_first = tally(server.request_lines())
    loader_pass(reader, one)
    one_warm = tally(server.request_lines())
    reader = StoreReader(url)
    server.request_lines()
    loader_pass(reader, epochs[0])
    first = tally(server.request_lines())
    loader_pass(reader, epochs[1])
    warm = tally(server.request_lines())
    shard_pass(reader, meta)
    whole = tally(server.request_lines())
    return {
        "create_store": create,
        "write_per_shard": per_shard(write, shards),
        "finalize": finalize,
        "open_reader": opened,
        "read_one_shard_fresh_reader": one_first,
        "read_one_shard_warm": one_warm,
        "read_first_pass_per_shard": per_shard(first, shards),
        "read_warm_pass_per_shard": per_shard(warm, shards),
        "read_shard_per_call_per_shard": per_shard(whole, shards),
        "inner_chunk_reads_per_shard": meta.shard_rows // meta.chunk_rows,
        "arrays": len(arrays),
    }


def url_main(args: argparse.Namespace) -> None:
    ks = args.ks or list(URL_KS)
    vocabs = args.vocabs or list(URL_VOCABS)
    rows = args.rows or URL_ROWS
    results = []
    rng = np.random.default_rng(0)
    with object_store(args.url) as (prefix, server):
        for vocab in vocabs:
            family = topk_family(rng, min(rows, URL_DISTINCT_ROWS), args.seq_len, vocab, ks)
            for k in ks:
                arrays = {n: np.resize(v, (rows, *v.shape[1:])) for n, v in family[k].items()}
                with tempfile.TemporaryDirectory() as tmp:
                    result = measure_url(arrays, vocab, k, args.repeats, Path(tmp), prefix, server)
                results.append({"url": args.url if server is None else f"{LOCAL_S3} ({prefix})", **result})
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for r in results:
        local, remote = r["local"], r["object_store"]
        print(f"{r['url']} against local disk: k={r['k']} vocab={r['vocab']}, {r['rows']} rows x "
              f"{r['seq_len']}, {r['shards']} shards of {r['shard_rows']} rows, chunk rows "
              f"{r['chunk_rows']}, best of {r['repeats']}")
        print("| | local disk | object store | object store / local |")
        print("|---|---|---|---|")
        for label, key, ratio in (("write tok/s", "write_tokens_per_s", r["write_ratio"]),
                                  ("read tok/s, first pass (fresh reader)", "read_first_pass_tokens_per_s",
                                   r["read_first_pass_ratio"]),
                                  ("read tok/s, warm pass", "read_warm_pass_tokens_per_s",
                                   r["read_warm_pass_ratio"]),
                                  ("read tok/s, warm, a whole shard per read_rows",
                                   "read_shard_per_call_tokens_per_s", r["read_shard_per_call_ratio"]),
                                  (f"training loader tok/s, {r['train_step_ms']:g} ms steps, no prefetch",
                                   "train_loader_tokens_per_s", r["train_loader_ratio"]),
                                  (f"training loader tok/s, {r['train_step_ms']:g} ms steps, prefetch 2",
                                   "train_loader_prefetch2_tokens_per_s", r["train_loader_prefetch2_ratio"])):
            print(f"| {label} | {local[key]:,.0f} | {remote[key]:,.0f} | {ratio:.3f} |")
        for label, key in (("create store, ms", "create_store_ms"), ("open reader, ms", "open_reader_ms")):
            print(f"| {label} | {local[key]:.1f} | {remote[key]:.1f} | |")
        print(f"object store alone: warm-pass GETs without decoding {remote['get_floor_tokens_per_s']:,.0f} "
              f"tok/s; PUTs of the shard files {remote['put_serial_tokens_per_s']:,.0f} tok/s one at a time, "
              f"{remote['put_concurrent_tokens_per_s']:,.0f} tok/s a shard's at once")
        req = r["requests"]
        if req is None:
            print("requests: not counted (only with --url local-s3)")
            continue
        print(f"requests ({req['arrays']} arrays, {req['inner_chunk_reads_per_shard']} inner chunks "
              "a shard):")
        for key, counts in req.items():
            if isinstance(counts, dict):
                print(f"  {key}: " + ", ".join(f"{m} {v:g}" for m, v in counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.add_argument("--rows", type=int, default=None, help=f"64 ({URL_ROWS} with --url)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ks", type=int, nargs="+", default=None, help=f"{KS} ({URL_KS} with --url)")
    parser.add_argument("--vocabs", type=int, nargs="+", default=None,
                        help=f"{VOCABS} ({URL_VOCABS} with --url)")
    parser.add_argument("--url", default=None,
                        help=f"an object-store prefix (s3://BUCKET/PREFIX) to compare with local disk, or "
                             f"'{LOCAL_S3}' for a moto server started here")
    args = parser.parse_args()
    if args.url is not None:
        url_main(args)
        return
    args.rows = args.rows or 64
    args.ks = args.ks or list(KS)
    args.vocabs = args.vocabs or list(VOCABS)
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
