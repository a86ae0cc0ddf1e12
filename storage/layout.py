"""Which arrays a store of each kind holds, their dtypes, shapes, chunks and codecs.

One store shard (`shard_rows` rows) is one Zarr shard file per array, so one worker
writes it whole and no two writers ever touch the same file. Inner chunks of
`chunk_rows` rows let a reader fetch a few rows without reading a whole shard; a chunk is
the unit every read decodes and checks, so chunks are sized by bytes
(`suggest_chunk_rows`, ~256 KB of targets), not one row each.

Codecs were chosen by measurement (benchmarks/store_io.py): Blosc-zstd with byte
shuffle beat plain zstd, bit shuffle, lz4 and rank-major transposes on realistic top-k
ids and log-probs. A crc32c per inner chunk makes every read check its bytes.

A top-k store's ids and log-probs use kdcache's own codecs (codecs.py, registered with
zarr): entropy-coded ids, and log-probs coded as rising integer codes along each sorted
row, exact or in a lossy `values` mode. Both arrays keep their own dtypes (uint16/uint32,
float16). Stores written between v0.3 and this layout hold top-k log-probs as uint16 bit
patterns (the array attribute `kdcache_bits_of` says "float16") behind numcodecs' `delta`
filter; stores before that hold float16 behind Blosc. Every reader accepts all three.

A store over data packed by document (chat, completion) also holds the data's
`loss_mask` and `position_ids` rows, and only trained positions hold targets: the others
hold zeros (`untrained_fill`), which cost almost nothing compressed, are finite (a masked
loss multiplying them by 0 stays 0) and add nothing to NLL sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from kdcache.storage.codecs import SortedLogprobs, TopkIds
from kdcache.storage.metadata import Kind, StoreMeta
from kdcache.storage.tokens import format as token_format

ARRAYS_BY_KIND: dict[Kind, tuple[str, ...]] = {
    "topk": ("tokens", "ids", "logprobs", "tail_logmass", "target_logprob"),
    "full": ("tokens", "logprobs", "target_logprob"),
    "sampled": ("tokens", "ids", "logprobs", "counts", "target_logprob"),
}

TEMPERATURE_ARRAYS: tuple[str, ...] = ("tau_logz", "tau_tail_logmass")
"""The arrays a top-k store with further `temperatures` adds, [R, T, len(temperatures)]
float32: per temperature tau_j, `tau_logz` = log Z(tau_j) - (tau / tau_j) log Z(tau) (the
log-normalisers over the whole vocabulary at tau_j and at the store's `temperature` tau) and
`tau_tail_logmass`, the log of the mass outside the stored ids at tau_j. The log-probs at
tau_j of the stored ids are then (tau / tau_j) * logprobs - tau_logz (`at_temperature`)."""

DOCUMENT_ARRAYS: tuple[str, ...] = tuple(token_format.DOCUMENT_ARRAYS)
"""The arrays a store over data packed by document adds (`StoreMeta.documents`), copied from
the token data's rows with their names and dtypes: which tokens are trained targets, where
each document starts."""

# Unwritten rows read as obviously invalid values through plain zarr.
_FILL = {"tokens": -1, "ids": 0, "counts": 0, "loss_mask": 255, "position_ids": -1}

BITS_ATTR = "kdcache_bits_of"
"""Array attribute naming the dtype whose bit patterns an unsigned array holds."""


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dtype: np.dtype
    row_shape: tuple[int, ...]  # shape of one row
    bits: bool = False  # stores of the previous layout may keep it as unsigned bit patterns
    serializer: Any = None  # kdcache's array-to-bytes codec for it in new stores (codecs.py)

    @property
    def fill_value(self) -> float | int:
        return _FILL.get(self.name, float("nan"))


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def array_names(meta: StoreMeta) -> tuple[str, ...]:
    """The arrays a store of these settings holds: its kind's, and the document arrays."""
    return (ARRAYS_BY_KIND[meta.kind] + (TEMPERATURE_ARRAYS if meta.temperatures else ())
            + (DOCUMENT_ARRAYS if meta.documents else ()))


def array_specs(meta: StoreMeta) -> dict[str, ArraySpec]:
    t, k = meta.seq_len, meta.k
    topk = meta.kind == "topk"
    every = {
        "tokens": ArraySpec("tokens", np.dtype(np.int32), (t + 1,)),
        "ids": ArraySpec("ids", id_dtype(meta.vocab_size), (t, k), serializer=TopkIds()),
        "logprobs": ArraySpec("logprobs", np.dtype(np.float16), (t, k), bits=topk,
                              serializer=SortedLogprobs(values=meta.values) if topk else None),
        "tail_logmass": ArraySpec("tail_logmass", np.dtype(np.float32), (t,)),
        "target_logprob": ArraySpec("target_logprob", np.dtype(np.float32), (t,)),
        "counts": ArraySpec("counts", np.dtype(np.uint8), (t, k)),
        **{name: ArraySpec(name, np.dtype(np.float32), (t, len(meta.temperatures)))
           for name in TEMPERATURE_ARRAYS},
        **{name: ArraySpec(name, dtype, (t + 1,)) for name, dtype in token_format.DOCUMENT_ARRAYS.items()},
    }
    return {name: every[name] for name in array_names(meta)}


def at_temperature(meta: StoreMeta, tau: float, logprobs: np.ndarray, tail_logmass: np.ndarray,
                   tau_logz: np.ndarray | None, tau_tail: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A top-k store's log-probs (float32) and tail at temperature `tau`: the stored ones at the
    store's `temperature`, or derived from the `tau_logz`/`tau_tail_logmass` rows at one of
    its `temperatures` (the same ids: top-k order does not depend on the temperature)."""
    j = meta.temperature_index(tau)
    if j is None:
        return logprobs.astype(np.float32), tail_logmass
    assert tau_logz is not None and tau_tail is not None
    scale = np.float32(meta.temperature / tau)
    return scale * logprobs.astype(np.float32) - tau_logz[..., j:j + 1], tau_tail[..., j]


def untrained_fill(name: str, shape: tuple[int, ...], dtype: np.dtype, draws: int = 0) -> np.ndarray:
    """What a target array holds at untrained positions, as an array of `shape` (positions
    first): zeros, except the sampled kind's `counts`, which put every draw on the first slot
    (id 0 at log-prob 0) so that counts still sum to `draws` everywhere."""
    fill = np.zeros(shape, dtype=dtype)
    if name == "counts":
        fill[..., 0] = draws
    return fill


TARGET_CHUNK_BYTES = 1 << 18


def suggest_chunk_rows(seq_len: int, k: int, shard_rows: int, value_bytes: int = 2) -> int:
    """The largest divisor of `shard_rows` whose chunk of k values per token stays near 256 KB."""
    want = max(1, TARGET_CHUNK_BYTES // (seq_len * k * value_bytes))
    return max(d for d in range(1, min(want, shard_rows) + 1) if shard_rows % d == 0)


CLEVEL = 1  # zstd level: level 3 is no smaller on delta-coded log-probs and 2x slower to write
# One Blosc block per inner chunk: Blosc's default blocks (tens of KB at level 1) cost 4%
# in size and a quarter of the decode speed on ids and log-probs.
BLOCK_BYTES = TARGET_CHUNK_BYTES


def compressors() -> tuple[BloscCodec, Crc32cCodec]:
    return (BloscCodec(cname="zstd", clevel=CLEVEL, shuffle="shuffle", blocksize=BLOCK_BYTES),
            Crc32cCodec())


def codec_chain(spec: ArraySpec) -> dict[str, Any]:
    """`create_array` arguments for a new array's codecs: kdcache's own serializer then a
    crc32c, or the bytes serializer, Blosc and a crc32c."""
    if spec.serializer is not None:
        return {"serializer": spec.serializer, "compressors": (Crc32cCodec(),)}
    return {"compressors": compressors()}


def holds_bits(array: zarr.Array, spec: ArraySpec) -> bool:
    """Whether a store's array holds `spec`'s values as bit patterns (the previous layout) or as is."""
    return (spec.bits and array.dtype == np.dtype(f"<u{spec.dtype.itemsize}")
            and array.attrs.get(BITS_ATTR) == str(spec.dtype))
