"""Helpers shared by the storage tests: metadata and valid shard data for any kind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from kdcache.storage import ARRAYS_BY_KIND, JOB_LOG, DataInfo, StoreMeta, TeacherInfo, id_dtype
from kdcache.storage.layout import untrained_fill
from kdcache.storage.location import LocalDir


def make_meta(kind="topk", *, rows=10, seq_len=8, vocab=300, k=4, shard_rows=4, chunk_rows=2,
              draws=None, teacher="teacher-a", temperature=1.0, documents=False,
              values="exact", temperatures=None) -> StoreMeta:
    if kind == "full":
        k = vocab
    if kind == "sampled":
        draws = draws or max(k, 8)
    return StoreMeta(
        kind=kind, k=k, vocab_size=vocab, seq_len=seq_len, temperature=temperature,
        teacher=TeacherInfo(name=teacher, fingerprint=f"fp-{teacher}", params=1000,
                            nonembedding_params=800),
        data=DataInfo(fingerprint="data-fp", split="student", rows=rows, tokenizer="tok-fp",
                      mask_fingerprint="mask-fp" if documents else ""),
        shard_rows=shard_rows, chunk_rows=chunk_rows, draws=draws, values=values,
        temperatures=temperatures or [],
    )


def make_rows(meta: StoreMeta, seed: int = 0) -> dict[str, np.ndarray]:
    """Valid arrays for every row of the store, from a random teacher distribution (with
    random documents and loss mask, targets only where trained, when `meta.documents`)."""
    out = _target_rows(meta, seed)
    return with_documents(meta, out, seed) if meta.documents else out


def with_documents(meta: StoreMeta, rows: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """`rows` packing random documents: ~1 in 4 tokens starts one (never the second, so every
    row trains at least its second token), ~60% of the rest are trained, and untrained
    positions hold the fill values."""
    rng = np.random.default_rng(seed + 1)
    r, width = rows["tokens"].shape
    starts = rng.random((r, width)) < 0.25
    starts[:, 0], starts[:, 1:2] = True, False
    index = np.arange(width)
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    mask = (rng.random((r, width)) < 0.6) & ~starts
    mask[:, 1:2] = True
    out = {**rows, "loss_mask": mask.astype(np.uint8), "position_ids": positions.astype(np.int32)}
    untrained = ~mask[:, 1:]
    for name in ARRAYS_BY_KIND[meta.kind][1:]:
        value = out[name].copy()
        value[untrained] = untrained_fill(name, value[untrained].shape, value.dtype, meta.draws or 0)
        out[name] = value
    return out


def _target_rows(meta: StoreMeta, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    r, t, v, k = meta.rows, meta.seq_len, meta.vocab_size, meta.k
    logits = rng.normal(size=(r, t, v)) * 3
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    tokens = rng.integers(0, v, size=(r, t + 1)).astype(np.int32)
    target = np.take_along_axis(logp, tokens[:, 1:, None].astype(np.int64), -1)[..., 0]
    out = {"tokens": tokens, "target_logprob": target.astype(np.float32)}
    if meta.kind == "full":
        out["logprobs"] = logp.astype(np.float16)
        return out
    order = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(logp, order, -1)
    out["ids"] = order.astype(id_dtype(v))
    out["logprobs"] = top.astype(np.float16)
    if meta.kind == "topk":
        with np.errstate(divide="ignore"):  # k == vocab leaves no tail: log(0) = -inf
            tail = np.log1p(-np.exp(top).sum(-1).clip(max=1.0))
        out["tail_logmass"] = tail.astype(np.float32)
    else:
        counts = np.zeros((r, t, k), dtype=np.uint8)
        counts[..., 0] = meta.draws  # all draws on the mode: valid and simple
        out["counts"] = counts
    return out


def shard_of(meta: StoreMeta, rows: dict[str, np.ndarray], shard: int) -> dict[str, np.ndarray]:
    start, stop = meta.shard_bounds(shard)
    return {name: values[start:stop] for name, values in rows.items()}


def tree_digest(path: Path | LocalDir) -> dict[str, str]:
    """Relative path -> sha256 of every file under `path` (to prove nothing changed)."""
    path = Path(str(path))
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def store_digest(path: Path) -> dict[str, str]:
    """`tree_digest` of a logit store less its cache-job log: the files that must not depend on
    workers, failures or restarts. The log (`jobs/`) records each invocation's timings, so a
    resumed or re-sharded job's log differs by design."""
    return {k: v for k, v in tree_digest(path).items() if not k.startswith(JOB_LOG + "/")}


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store.zarr"


def write_previous_layout(path: Path, meta: StoreMeta, rows: dict[str, np.ndarray]) -> None:
    """A store in the layout before kdcache's own codecs (v0.3): top-k log-probs as uint16 bit
    patterns behind numcodecs' delta filter (the attribute `kdcache_bits_of` says float16), every
    array behind Blosc-zstd; its shards committed through the writer, as that kdcache did."""
    import zarr
    from zarr.codecs.numcodecs import Delta

    from kdcache.storage import StoreWriter
    from kdcache.storage.layout import BITS_ATTR, array_specs, compressors
    from kdcache.storage.writer import ATTR

    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    for spec in array_specs(meta).values():
        bits = spec.bits
        group.create_array(spec.name, shape=(meta.rows, *spec.row_shape),
                           dtype=np.uint16 if bits else spec.dtype,
                           chunks=(meta.chunk_rows, *spec.row_shape),
                           shards=(meta.shard_rows, *spec.row_shape),
                           filters=(Delta(dtype="<u2"),) if bits else (), compressors=compressors(),
                           fill_value=0x7E00 if bits else spec.fill_value,
                           attributes={BITS_ATTR: "float16"} if bits else None)
    group.create_group("ledger")
    attrs = meta.to_json()
    del attrs["values"], attrs["temperatures"]  # that kdcache had neither
    group.attrs[ATTR] = attrs
    writer = StoreWriter.open(path, meta)
    for shard in range(meta.num_shards):
        writer.write_shard(shard, shard_of(meta, rows, shard))
    writer.finalize()
