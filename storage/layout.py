"""Which arrays a store of each kind holds, their dtypes, shapes, chunks and codecs.

One store shard (`shard_rows` rows) is one Zarr shard file per array, so one worker
writes it whole and no two writers ever touch the same file. Inner chunks of
`chunk_rows` rows let a reader fetch a few rows without reading a whole shard. Zarr
spends a fixed ~0.5 ms of Python per inner chunk read, so chunks are sized by bytes
(`suggest_chunk_rows`, ~256 KB of targets), not one row each.

Codecs were chosen by measurement (benchmarks/store_io.py): Blosc-zstd with byte
shuffle beat plain zstd, bit shuffle, lz4 and rank-major transposes on realistic top-k
ids and log-probs. A crc32c per inner chunk makes every read check its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

from kdcache.storage.metadata import StoreMeta

ARRAYS_BY_KIND: dict[str, tuple[str, ...]] = {
    "topk": ("tokens", "ids", "logprobs", "tail_logmass", "target_logprob"),
    "full": ("tokens", "logprobs", "target_logprob"),
    "sampled": ("tokens", "ids", "logprobs", "counts", "target_logprob"),
}

# Unwritten rows read as obviously invalid values through plain zarr.
_FILL = {"tokens": -1, "ids": 0, "counts": 0}


@dataclass(frozen=True)
class ArraySpec:
    name: str
    dtype: np.dtype
    row_shape: tuple[int, ...]  # shape of one row

    @property
    def fill_value(self) -> float | int:
        return _FILL.get(self.name, float("nan"))


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def array_specs(meta: StoreMeta) -> dict[str, ArraySpec]:
    t, k = meta.seq_len, meta.k
    every = {
        "tokens": ArraySpec("tokens", np.dtype(np.int32), (t + 1,)),
        "ids": ArraySpec("ids", id_dtype(meta.vocab_size), (t, k)),
        "logprobs": ArraySpec("logprobs", np.dtype(np.float16), (t, k)),
        "tail_logmass": ArraySpec("tail_logmass", np.dtype(np.float32), (t,)),
        "target_logprob": ArraySpec("target_logprob", np.dtype(np.float32), (t,)),
        "counts": ArraySpec("counts", np.dtype(np.uint8), (t, k)),
    }
    return {name: every[name] for name in ARRAYS_BY_KIND[meta.kind]}


TARGET_CHUNK_BYTES = 1 << 18


def suggest_chunk_rows(seq_len: int, k: int, shard_rows: int, value_bytes: int = 2) -> int:
    """The largest divisor of `shard_rows` whose chunk of k values per token stays near 256 KB."""
    want = max(1, TARGET_CHUNK_BYTES // (seq_len * k * value_bytes))
    return max(d for d in range(1, min(want, shard_rows) + 1) if shard_rows % d == 0)


def compressors() -> tuple[BloscCodec, Crc32cCodec]:
    return (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec())
