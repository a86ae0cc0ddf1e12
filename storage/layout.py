"""Which arrays a store of each kind holds, their dtypes, shapes, chunks and codecs.

One store shard (`shard_rows` rows) is one Zarr shard file per array, so one worker
writes it whole and no two writers ever touch the same file. Inner chunks of
`chunk_rows` rows let a reader fetch a few rows without reading a whole shard; a chunk is
the unit every read decodes and checks, so chunks are sized by bytes
(`suggest_chunk_rows`, ~256 KB of targets), not one row each.

Codecs were chosen by measurement (benchmarks/store_io.py): Blosc-zstd with byte
shuffle beat plain zstd, bit shuffle, lz4 and rank-major transposes on realistic top-k
ids and log-probs. A crc32c per inner chunk makes every read check its bytes.

A top-k store's log-probs are sorted within each position, so their float16 bit patterns
(all non-positive values) rise along k by a few units each. New stores keep them as those
bit patterns (uint16, the array attribute `kdcache_bits_of` says "float16") through
numcodecs' lossless `delta` filter, which takes a third off their size. Zarr has no codec
that reinterprets bits, so plain zarr returns uint16 here: `.view(np.float16)` is the one
extra step (docs/store-format.md). Stores written before keep float16 arrays, and
every reader accepts both.

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
from zarr.codecs.numcodecs import Delta

from kdcache.storage.metadata import Kind, StoreMeta
from kdcache.storage.tokens import format as token_format

ARRAYS_BY_KIND: dict[Kind, tuple[str, ...]] = {
    "topk": ("tokens", "ids", "logprobs", "tail_logmass", "target_logprob"),
    "full": ("tokens", "logprobs", "target_logprob"),
    "sampled": ("tokens", "ids", "logprobs", "counts", "target_logprob"),
}

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
    bits: bool = False  # new stores keep it as delta-coded unsigned bit patterns of `dtype`

    @property
    def stored_dtype(self) -> np.dtype:
        return np.dtype(f"<u{self.dtype.itemsize}") if self.bits else self.dtype

    @property
    def fill_value(self) -> float | int:
        fill = _FILL.get(self.name, float("nan"))
        if self.bits:  # NaN's bit pattern, so a viewed unwritten row still reads as NaN
            return int(np.array(fill, dtype=self.dtype).view(self.stored_dtype))
        return fill


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def array_names(meta: StoreMeta) -> tuple[str, ...]:
    """The arrays a store of these settings holds: its kind's, and the document arrays."""
    return ARRAYS_BY_KIND[meta.kind] + (DOCUMENT_ARRAYS if meta.documents else ())


def array_specs(meta: StoreMeta) -> dict[str, ArraySpec]:
    t, k = meta.seq_len, meta.k
    every = {
        "tokens": ArraySpec("tokens", np.dtype(np.int32), (t + 1,)),
        "ids": ArraySpec("ids", id_dtype(meta.vocab_size), (t, k)),
        "logprobs": ArraySpec("logprobs", np.dtype(np.float16), (t, k), bits=meta.kind == "topk"),
        "tail_logmass": ArraySpec("tail_logmass", np.dtype(np.float32), (t,)),
        "target_logprob": ArraySpec("target_logprob", np.dtype(np.float32), (t,)),
        "counts": ArraySpec("counts", np.dtype(np.uint8), (t, k)),
        **{name: ArraySpec(name, dtype, (t + 1,)) for name, dtype in token_format.DOCUMENT_ARRAYS.items()},
    }
    return {name: every[name] for name in array_names(meta)}


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


def filters(spec: ArraySpec) -> tuple[Any, ...]:
    """The array-to-array codecs of a new array: the delta of bit patterns, or none."""
    if not spec.bits:
        return ()

    return (Delta(dtype=spec.stored_dtype.str),)


def holds_bits(array: zarr.Array, spec: ArraySpec) -> bool:
    """Whether a store's array holds `spec`'s values as bit patterns (new layout) or as is."""
    return (spec.bits and array.dtype == spec.stored_dtype
            and array.attrs.get(BITS_ATTR) == str(spec.dtype))
