"""The serial core of the cache job: compute and commit one store shard.

`cache_shard` is a plain function of a teacher, the token data and a store writer, with
no Ray in it: the job's actors (`worker.py`) call it for each shard they are
given, and unit tests call it directly, so a store built shard by shard in one process
is byte-identical to one the job builds on a cluster.
"""

from __future__ import annotations

import numpy as np

from kdcache.pipeline.cache.teachers import TargetSpec, Teacher
from kdcache.storage import ShardEntry, StoreMeta, StoreWriter
from kdcache.storage.tokens.format import TokenData


def target_spec(meta: StoreMeta, seed: int) -> TargetSpec:
    """What the teacher extracts for a store of these settings."""
    return TargetSpec(kind=meta.kind, k=meta.k, temperature=meta.temperature, vocab=meta.vocab_size,
                      draws=meta.draws or 0, seed=seed)


def cache_shard(teacher: Teacher, data: TokenData, split: str, writer: StoreWriter, shard: int) -> ShardEntry:
    """Run `teacher` over the shard's rows of `data`'s `split`, then write and commit it.

    The reader refuses ids outside the data's vocabulary (the store's `vocab_size`), so
    the teacher only ever sees valid ids.
    """
    meta = writer.meta
    start, stop = meta.shard_bounds(shard)
    rows = np.asarray(data.read(split, slice(start, stop)), dtype=np.int32)
    arrays = teacher.targets(rows, target_spec(meta, meta.seed), start)
    padded = arrays.pop("padded_mass", None)
    mass = None if padded is None else float(np.asarray(padded, dtype=np.float64).sum())
    return writer.write_shard(shard, arrays, padded_mass_sum=mass)
