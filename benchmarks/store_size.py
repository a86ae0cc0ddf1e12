"""Bytes per token and KL of real teacher targets, in every value mode and against DistillKit.

Takes a top-k store a real teacher made (`kdcache cache`, e.g. SmolLM2-135M at k = 128
over stdlib text) and, for each k in --ks up to the store's, writes its first k ids and
log-probs with the cache job's own layout (`StoreWriter`, the chunk rows the cache job picks
for that k and the store's shard rows):
- `before`: the previous layout (uint16 bit patterns of the log-probs behind numcodecs'
  delta and Blosc-zstd, ids behind Blosc-zstd; written by zarr);
- `exact`: today's lossless layout (entropy-coded ids and log-prob codes, codecs.py);
- `sqrt8`, `sqrt9`: the lossy value modes (`kdcache cache --values`);
- `exact, V = 151,936`: the same targets in a store whose vocabulary needs uint32 ids.
The top-k of a top-K list is its first k entries; the tail mass of a prefix is recomputed in
float64 from the stored values. Every copy is read back through plain zarr and compared byte
for byte with what its writer was given (for the lossy modes, after the mode's rounding).

With --teacher (the model directory the store was made with) it also compares against
DistillKit: the teacher is rerun in float32 over the store's `tokens` (inputs `tokens[:, :-1]`,
log-softmax in float32, a few rows at a time) and its exact top-k log-probs are written in
DistillKit's compressed Parquet format with the README's recommended config (see
`distillkit_format.py`: a reimplementation from the documented format, not DistillKit's code).
The store's ids are first checked against the teacher's top-k (equal except at near-ties).
DistillKit's size is the Parquet file's bytes / positions. The KL reported for each format is,
per position, in float64,

    KL(P || Q) = sum_{i in S} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest)

over the format's k stored ids S plus one tail category. P is the teacher: p_i = exp(l_i) / Z
from its float32 log-softmax l, Z = sum over all V ids, p_rest the true mass of the other V - k
ids (summed directly). Q is what the format decodes: kdcache's stored log-probs and
`tail_logmass` (for k < the store's, the prefix tail described above); DistillKit's decoded
log-probs and, for the rest, max(1 - sum_i q_i, 1e-8), the floor DistillKit's KL loss applies
(its "zero" mode gives the rest nothing, an infinite KL). Q is renormalised to sum to 1 over
the k + 1 categories; mean and 99th percentile are over all positions. DistillKit's KL is given
for its documented float32 fit (torch.linalg.svd, as DistillKit runs it) and, as
`distillkit_kl_f64_fit`, for the same stored format fitted in float64.

    python benchmarks/store_size.py --store PATH [--ks 32 64 128] [--teacher MODEL_DIR] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs.numcodecs import Delta

from kdcache.storage import StoreReader, StoreWriter, array_specs, read_meta
from kdcache.storage.codecs import value_mode
from kdcache.storage.layout import compressors, id_dtype, suggest_chunk_rows
from kdcache.storage.writer import ATTR

try:
    from benchmarks import distillkit_format as dk
except ImportError:  # run as a script from benchmarks/
    import distillkit_format as dk  # type: ignore[no-redef]


def prefix(batch: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    out = dict(batch)
    out["ids"] = np.ascontiguousarray(batch["ids"][..., :k])
    out["logprobs"] = np.ascontiguousarray(batch["logprobs"][..., :k])
    rest = np.exp(batch["logprobs"][..., k:].astype(np.float64)).sum(-1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.exp(batch["tail_logmass"].astype(np.float64)) + rest)
    out["tail_logmass"] = tail.astype(np.float32)
    return out


def write_before(path: Path, meta, data: dict[str, np.ndarray]) -> None:
    """The previous layout: log-probs as delta-coded uint16 bit patterns, all arrays behind
    Blosc-zstd level 1 with byte shuffle and one block per chunk (zarr's own writer)."""
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    for spec in array_specs(meta).values():
        bits = spec.name == "logprobs"
        values = data[spec.name].view(np.uint16) if bits else data[spec.name]
        array = group.create_array(
            spec.name, shape=(meta.rows, *spec.row_shape), dtype=values.dtype,
            chunks=(meta.chunk_rows, *spec.row_shape), shards=(meta.shard_rows, *spec.row_shape),
            filters=(Delta(dtype="<u2"),) if bits else (), compressors=compressors(),
            fill_value=0 if bits else spec.fill_value)
        array[:] = values
    group.attrs[ATTR] = meta.to_json()


def write_store(path: Path, meta, data: dict[str, np.ndarray]) -> None:
    writer = StoreWriter.open(path, meta)
    for shard in writer.pending_shards():
        start, stop = meta.shard_bounds(shard)
        writer.write_shard(shard, {n: v[start:stop] for n, v in data.items()})
    writer.finalize()


def array_bytes(path: Path, names: list[str]) -> dict[str, int]:
    return {n: sum(p.stat().st_size for p in (path / n).rglob("*") if p.is_file()) for n in names}


def measure(store: Path, k: int, tmp: Path, ref: dict[str, np.ndarray] | None = None) -> dict:
    source = StoreReader(store)
    base = dataclasses.replace(source.meta, k=k, complete=False, teacher_loss=None, padded_mass=None,
                               valid_loss=None, valid_tokens=None,
                               chunk_rows=suggest_chunk_rows(source.meta.seq_len, k, source.meta.shard_rows))
    full = source.read_rows(source.committed_rows())
    data = prefix(full, k)
    tokens = data["target_logprob"].size
    out: dict = {"k": k, "vocab": base.vocab_size, "tokens": tokens, "chunk_rows": base.chunk_rows,
                 "formats": {}}
    wide = dataclasses.replace(base, vocab_size=151_936, teacher=dataclasses.replace(
        base.teacher, output_rows=max(151_936, base.teacher.output_rows or 0)))
    formats = [("before", base, write_before), ("exact", base, write_store),
               ("sqrt8", dataclasses.replace(base, values="sqrt8"), write_store),
               ("sqrt9", dataclasses.replace(base, values="sqrt9"), write_store),
               ("exact, V = 151,936", wide, write_store)]
    for name, meta, write in formats:
        path = tmp / f"{name.replace(' ', '').replace(',', '')}-{k}.zarr"
        given = dict(data, ids=data["ids"].astype(id_dtype(meta.vocab_size)))
        write(path, meta, given)
        held = dict(given, logprobs=value_mode(meta.values).round_trip(given["logprobs"]))
        group = zarr.open_group(str(path), mode="r")
        for array, values in held.items():
            got = group[array][:]
            got = got.view(np.float16) if name == "before" and array == "logprobs" else got
            assert got.tobytes() == values.tobytes(), (name, array)
        sizes = array_bytes(path, list(data))
        row = {"bytes_per_token": {n: b / tokens for n, b in sizes.items()},
               "total_bytes_per_token": sum(sizes.values()) / tokens}
        row["id_bits"] = row["bytes_per_token"]["ids"] * 8 / k
        if ref is not None:
            q = np.exp(held["logprobs"].astype(np.float64))
            q_rest = np.exp(held["tail_logmass"].astype(np.float64))
            row["kl_mean"], row["kl_p99"] = kl(ref["store_p"][..., :k], ref[f"store_rest_{k}"], q, q_rest)
        out["formats"][name] = row
    if ref is not None:
        out["id_check"] = check_ids(full, ref, k)
        out.update(measure_distillkit(data, ref, k, base.vocab_size, tmp))
    return out


def teacher_reference(model_dir: str, tokens: np.ndarray, ids: np.ndarray, ks: list[int],
                      rows_per_step: int = 2) -> dict[str, np.ndarray]:
    """Rerun the teacher in float32; per position: its probabilities at the store's ids, its own
    top-K (ids, float32 log-probs, probabilities) and the true rest mass of both id sets at each k."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 trust_remote_code=False).eval()
    top = ids.shape[-1]
    out: dict[str, list[np.ndarray]] = {}

    def add(name: str, value: torch.Tensor) -> None:
        out.setdefault(name, []).append(value.numpy())

    with torch.inference_mode():
        for start in range(0, tokens.shape[0], rows_per_step):
            inputs = torch.from_numpy(tokens[start:start + rows_per_step, :-1].astype(np.int64))
            logprobs = torch.log_softmax(model(inputs).logits.float(), dim=-1)
            store_ids = torch.from_numpy(ids[start:start + rows_per_step].astype(np.int64))
            values, top_ids = torch.topk(logprobs, top, dim=-1)
            probs = logprobs.double().exp()
            z = probs.sum(-1, keepdim=True)
            probs /= z
            add("store_lp", logprobs.gather(-1, store_ids))
            add("store_p", probs.gather(-1, store_ids))
            add("top_lp", values)
            add("top_ids", top_ids)
            add("top_p", probs.gather(-1, top_ids))
            add("z", z[..., 0])
            for k in ks:
                for name, chosen in (("store", store_ids), ("top", top_ids)):
                    add(f"{name}_rest_{k}", probs.scatter(-1, chosen[..., :k], 0.0).sum(-1))
            del logprobs, probs
    return {name: np.concatenate(parts) for name, parts in out.items()}


def kl(p: np.ndarray, p_rest: np.ndarray, q: np.ndarray, q_rest: np.ndarray) -> tuple[float, float]:
    """Mean and 99th percentile over positions of KL(P || Q) on k ids + a rest category, Q
    renormalised, float64."""
    p = np.concatenate([p, p_rest[..., None]], -1).astype(np.float64)
    q = np.concatenate([q, q_rest[..., None]], -1).astype(np.float64)
    q = q / q.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    per = terms.sum(-1).reshape(-1)
    return float(per.mean()), float(np.percentile(per, 99))


def check_ids(data: dict[str, np.ndarray], ref: dict[str, np.ndarray], k: int) -> dict:
    """The store's first k ids against the teacher's top-k: positions whose sets differ, and the
    largest log-prob gap that explains it (the k-th best value minus the worst stored one)."""
    same = np.sort(data["ids"][..., :k], -1) == np.sort(ref["top_ids"][..., :k], -1)
    differ = ~same.all(-1)
    gap = ref["top_lp"][..., k - 1] - ref["store_lp"][..., :k].min(-1)
    return {"positions_differ": int(differ.sum()),
            "max_gap_where_differ": float(gap[differ].max()) if differ.any() else 0.0,
            "max_abs_stored_minus_teacher_logprob": float(
                np.abs(data["logprobs"][..., :k].astype(np.float32) - ref["store_lp"][..., :k]).max())}


def measure_distillkit(data: dict[str, np.ndarray], ref: dict[str, np.ndarray], k: int, vocab: int,
                       tmp: Path) -> dict:
    cfg = dk.Config(k=k, d=vocab)
    tokens = data["target_logprob"].size
    ids, values = ref["top_ids"][..., :k], ref["top_lp"][..., :k]
    out: dict = {"distillkit_id_bits": cfg.id_bits,
                 "distillkit_raw_bytes_per_token": cfg.logprob_bytes + cfg.id_bytes}
    for solve, suffix in (("torch-float32", ""), ("float32", "_numpy_f32_fit"), ("float64", "_f64_fit")):
        lp_bytes, id_bytes = dk.encode(ids, values, cfg, solve=solve)
        path = tmp / f"distillkit-{k}{suffix}.parquet"
        size = dk.write_parquet(path, data["tokens"], lp_bytes, id_bytes)
        got_tokens, got_lp, got_ids = dk.read_parquet(path, cfg)
        assert (got_tokens == data["tokens"]).all()
        assert (got_lp == lp_bytes).all() and (got_ids == id_bytes).all()
        dec_ids, dec_lp = dk.decode(got_lp, got_ids, cfg)
        assert (dec_ids == ids).all()
        q = np.exp(dec_lp.astype(np.float64))
        out[f"distillkit{suffix}_bytes_per_token"] = size / tokens
        out[f"distillkit_kl{suffix}"], out[f"distillkit_kl_p99{suffix}"] = kl(
            ref["top_p"][..., :k], ref[f"top_rest_{k}"], q, dk.tail_mass(dec_lp))
        out[f"distillkit{suffix}_positions_mass_over_1"] = int((q.sum(-1) > 1).sum())
        out[f"distillkit{suffix}_max_abs_logprob_error"] = float(np.abs(dec_lp - values).max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="a top-k store made by a real teacher")
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--teacher", help="the store's teacher (model directory): adds the DistillKit "
                        "comparison and the KL to the teacher")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    top = read_meta(args.store).k
    ks = [k for k in args.ks if k <= top]
    ref = None
    if args.teacher:
        source = StoreReader(args.store)
        rows = source.read_rows(source.committed_rows())
        ref = teacher_reference(args.teacher, rows["tokens"], rows["ids"], ks)
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(Path(args.store), k, Path(tmp), ref) for k in ks]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    head = ["k", "format", "B/token (all arrays)", "ids B/token (bits/id)", "log-probs B/token"]
    if ref is not None:
        head += ["mean KL", "p99 KL"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        for name, row in r["formats"].items():
            per = row["bytes_per_token"]
            cells = [str(r["k"]), name, f"{row['total_bytes_per_token']:.1f}",
                     f"{per['ids']:.1f} ({row['id_bits']:.1f})", f"{per['logprobs']:.1f}"]
            if ref is not None:
                cells += [f"{row['kl_mean']:.1e}", f"{row['kl_p99']:.1e}"]
            print("| " + " | ".join(cells) + " |")
        if ref is not None:
            for suffix, label in (("", "DistillKit (f32 fit)"), ("_f64_fit", "DistillKit (f64 fit)")):
                print(f"| {r['k']} | {label} | {r[f'distillkit{suffix}_bytes_per_token']:.1f} | "
                      f"({r['distillkit_id_bits']}) | | {r[f'distillkit_kl{suffix}']:.1e} | "
                      f"{r[f'distillkit_kl_p99{suffix}']:.1e} |")


if __name__ == "__main__":
    main()
