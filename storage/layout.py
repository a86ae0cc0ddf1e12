"""Which arrays a store of each kind holds, their dtypes, shapes, chunks and codecs.

One store shard (`shard_rows` rows) is one Zarr shard file per array, so one worker
writes it whole and no two writers ever touch the same file. Inner chunks of
`chunk_rows` rows let a reader fetch a few rows without reading a whole shard.

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


def compressors() -> tuple[BloscCodec, Crc32cCodec]:
    return (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"), Crc32cCodec())
