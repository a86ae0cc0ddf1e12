"""The serial core of the cache job: compute and commit one store shard.

`cache_shard` is a plain function of a teacher, the token data and a store writer, with
no Ray in it: the job's actors (`worker.py`) call it for each shard they are
given, and unit tests call it directly, so a store built shard by shard in one process
is byte-identical to one the job builds on a cluster.
"""

from __future__ import annotations

import numpy as np

from kdcache.pipeline.cache.teachers import TargetSpec, Teacher
from kdcache.pipeline.errors import PipelineError
from kdcache.storage import ShardEntry, StoreMeta, StoreWriter
from kdcache.storage.tokens.format import Rows, TokenData


def target_spec(meta: StoreMeta, seed: int) -> TargetSpec:
    """What the teacher extracts for a store of these settings."""
    return TargetSpec(kind=meta.kind, k=meta.k, temperature=meta.temperature, vocab=meta.vocab_size,
                      draws=meta.draws or 0, seed=seed, temperatures=tuple(meta.temperatures))


def cache_shard(teacher: Teacher, data: TokenData, split: str, writer: StoreWriter, shard: int) -> ShardEntry:
    """Run `teacher` over the shard's rows of `data`'s `split`, then write and commit it.

    The reader refuses ids outside the data's vocabulary (the store's `vocab_size`), so
    the teacher only ever sees valid ids. Where the data packs documents the store keeps
    the rows' loss mask and position ids beside the targets.
    """
    meta = writer.meta
    start, stop = meta.shard_bounds(shard)
    rows = data.read_rows(split, slice(start, stop))
    arrays = teacher.targets(rows, target_spec(meta, meta.seed), start)
    padded = arrays.pop("padded_mass", None)
    mass = None if padded is None else float(np.asarray(padded, dtype=np.float64).sum())
    arrays["tokens"] = rows.tokens.astype(np.int32)
    if meta.documents:
        arrays.update(document_arrays(rows))
    return writer.write_shard(shard, arrays, padded_mass_sum=mass)


def document_arrays(rows: Rows) -> dict[str, np.ndarray]:
    """The store's `loss_mask` (uint8) and `position_ids` (int32) rows, as the data holds them."""
    if rows.loss_mask is None or rows.position_ids is None:
        raise PipelineError("the store records documents but the token data has no loss_mask and "
                            "position_ids (its field 'data.mask_fingerprint' does not match the data)")
    return {"loss_mask": rows.loss_mask.astype(np.uint8), "position_ids": rows.position_ids.astype(np.int32)}
