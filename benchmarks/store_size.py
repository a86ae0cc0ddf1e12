"""Bytes per token of real teacher targets, before and after the bit-pattern layout.

Takes a top-k store a real teacher made (`kdcache cache`, e.g. SmolLM2-135M at k = 128
over stdlib text) and, for each k in --ks up to the store's, writes its first k ids and
log-probs twice: with the codecs of stores before this layout (float16 log-probs,
Blosc-zstd level 3 with Blosc's default blocks, written by zarr) and with today's
(`StoreWriter`). The top-k of a top-K list is its first k entries; the tail mass of a
prefix is recomputed in float64 from the stored values, so its bytes are representative,
not the teacher's exact ones. Both copies are read back and compared byte for byte.

    python benchmarks/store_size.py --store PATH [--ks 32 64 128] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from kdcache.storage import StoreReader, StoreWriter, array_specs, read_meta
from kdcache.storage.writer import ATTR


def prefix(batch: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    out = dict(batch)
    out["ids"] = np.ascontiguousarray(batch["ids"][..., :k])
    out["logprobs"] = np.ascontiguousarray(batch["logprobs"][..., :k])
    rest = np.exp(batch["logprobs"][..., k:].astype(np.float64)).sum(-1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.exp(batch["tail_logmass"].astype(np.float64)) + rest)
    out["tail_logmass"] = tail.astype(np.float32)
    return out


def write_old(path: Path, meta, data: dict[str, np.ndarray]) -> None:
    """The layout and codecs of stores written before (zarr's own writer)."""
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    for spec in array_specs(meta).values():
        array = group.create_array(
            spec.name, shape=(meta.rows, *spec.row_shape), dtype=spec.dtype,
            chunks=(meta.chunk_rows, *spec.row_shape), shards=(meta.shard_rows, *spec.row_shape),
            compressors=(BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()),
            fill_value=0 if spec.name == "ids" else (-1 if spec.name == "tokens" else float("nan")))
        array[:] = data[spec.name]
    group.attrs[ATTR] = meta.to_json()


def write_new(path: Path, meta, data: dict[str, np.ndarray]) -> None:
    writer = StoreWriter.open(path, meta)
    for shard in writer.pending_shards():
        start, stop = meta.shard_bounds(shard)
        writer.write_shard(shard, {n: v[start:stop] for n, v in data.items()})
    writer.finalize()


def array_bytes(path: Path, names: list[str]) -> dict[str, int]:
    return {n: sum(p.stat().st_size for p in (path / n).rglob("*") if p.is_file()) for n in names}


def measure(store: Path, k: int, tmp: Path) -> dict:
    source = StoreReader(store)
    meta = dataclasses.replace(source.meta, k=k, complete=False, teacher_loss=None, padded_mass=None)
    data = prefix(source.read_rows(source.committed_rows()), k)
    tokens = data["target_logprob"].size
    out = {"k": k, "vocab": meta.vocab_size, "tokens": tokens}
    for name, write in (("old", write_old), ("new", write_new)):
        path = tmp / f"{name}-{k}.zarr"
        write(path, meta, data)
        group = zarr.open_group(str(path), mode="r")
        for array, values in data.items():
            bits = group[array].attrs.get("kdcache_bits_of")
            got = group[array][:]
            assert (got.view(bits) if bits else got).tobytes() == values.tobytes(), (name, array)
        sizes = array_bytes(path, list(data))
        out[f"{name}_bytes_per_token"] = {n: b / tokens for n, b in sizes.items()}
        out[f"{name}_total_bytes_per_token"] = sum(sizes.values()) / tokens
    out["id_bits_new"] = out["new_bytes_per_token"]["ids"] * 8 / k
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="a top-k store made by a real teacher")
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    top = read_meta(args.store).k
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(Path(args.store), k, Path(tmp)) for k in args.ks if k <= top]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| k | tokens | before B/token | after B/token | ids before | ids after | log-probs before "
          "| log-probs after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        old, new = r["old_bytes_per_token"], r["new_bytes_per_token"]
        print(f"| {r['k']} | {r['tokens']} | {r['old_total_bytes_per_token']:.1f} "
              f"| {r['new_total_bytes_per_token']:.1f} | {old['ids']:.1f} | {new['ids']:.1f} "
              f"| {old['logprobs']:.1f} | {new['logprobs']:.1f} |")


if __name__ == "__main__":
    main()
