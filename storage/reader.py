"""Read committed rows of a logit store as numpy arrays.

The reader sees only shards whose ledger entry exists, so it can run while a cache job
is still writing (call `refresh` to pick up new shards). Reads go through Zarr's
sharding codec, which fetches only the inner chunks holding the requested rows, and
every chunk carries a crc32c, so a flipped byte fails the read instead of returning
wrong targets. The metadata is checked against the arrays on open, each ledger entry
against the metadata when its shard is first seen, and each shard's files for presence
before its first read (`integrity.py`): a deleted shard file would otherwise read as
fill values, some of which are valid ids. A store that says it is complete while shards
are uncommitted is refused, rather than waited on.

The first read of a shard decodes the whole shard, in blocks of bounded size, and compares
each array's running crc32c with the one its ledger entry committed, so a shard file
replaced by another shard's (whose inner chunks all check) fails instead of training on the
wrong rows. That is one extra decode of a shard per reader, not per read: the rows asked
for are served from it, and the other rows of the shard are decoded again when asked for
(docs/store-format.md, "Integrity", measures it).

Stores in kdcache's own codec chains are read straight from their shard files
(`shardio.RowSource`: no zarr-python per chunk, decoding on a thread pool); any other
store goes through zarr. Arrays kept as bit patterns are viewed back to their dtypes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import cast

import numpy as np
import zarr

from kdcache.storage import integrity, ledger
from kdcache.storage.concurrent import gather
from kdcache.storage.errors import StoreError
from kdcache.storage.layout import array_specs, holds_bits
from kdcache.storage.location import Location, locate, open_group
from kdcache.storage.metadata import StoreMeta, identity_digest
from kdcache.storage.shardio import RowSource, ShardPlan, distinct
from kdcache.storage.writer import read_attrs, read_meta

Batch = dict[str, np.ndarray]

CHECK_BLOCK_BYTES = 64 << 20
"""A shard is checked against its ledger in row blocks of at most this many decoded bytes (or
one row): the check's memory is bounded by it, not by the shard's size or the vocabulary."""


class StoreReader:
    """Random and sequential access to the committed rows of one store."""

    def __init__(self, path: str | os.PathLike[str] | Location, fields: Sequence[str] | None = None) -> None:
        self.path = locate(path)
        attrs = read_attrs(self.path)  # once: on an object store every read is a request
        self.meta: StoreMeta = StoreMeta.from_json(attrs, str(self.path))
        names = list(array_specs(self.meta))
        self.fields = tuple(names if fields is None else fields)
        unknown = set(self.fields) - set(names)
        if unknown:
            raise StoreError(f"{self.path}: a {self.meta.kind} store has no arrays {sorted(unknown)}")
        group = open_group(self.path)
        integrity.raise_first(self.path, integrity.layout_problems(self.path, self.meta))
        self._identity = identity_digest(attrs)
        self._arrays = {name: cast(zarr.Array, group[name]) for name in self.fields}
        specs = array_specs(self.meta)
        self._views = {name: specs[name].dtype for name, a in self._arrays.items()
                       if holds_bits(a, specs[name])}
        plans = {name: ShardPlan.of(a, self.path / name) for name, a in self._arrays.items()}
        ready = {name: p for name, p in plans.items() if p is not None}
        self._source = RowSource(ready) if ready and len(ready) == len(plans) else None
        self._committed = np.zeros(self.meta.num_shards, dtype=bool)
        self._present = np.zeros(self.meta.num_shards, dtype=bool)  # files checked
        self._summed = np.zeros(self.meta.num_shards, dtype=bool)  # decoded against the ledger
        self._entries: dict[int, ledger.ShardEntry] = {}
        self.refresh()

    def refresh(self) -> int:
        """Pick up shards committed since the last look; returns the committed count."""
        new = {s: key for s, key in ledger.committed(self.path).items() if s not in self._entries}
        for shard, entry in ledger.read_entries(self.path, new).items():
            if isinstance(entry, StoreError):
                raise entry
            integrity.raise_first(self.path, integrity.entry_problems(entry, self.meta, self._identity))
            self._entries[shard] = entry
            self._committed[shard] = True
        if self._committed.all() and not self.meta.complete:
            self.meta = read_meta(self.path)
        integrity.raise_first(self.path, integrity.completion_problems(self.meta, self._entries.values()))
        return int(self._committed.sum())

    @property
    def committed_shards(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(self._committed)]

    def committed_rows(self) -> np.ndarray:
        """Indices of every committed row, ascending."""
        parts = [np.arange(*self.meta.shard_bounds(s)) for s in self.committed_shards]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def read_rows(self, rows: Sequence[int] | np.ndarray) -> Batch:
        """Rows in the order given (any order, repeats allowed); each must be committed."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.meta.rows):
            raise StoreError(f"{self.path}: row index out of range 0..{self.meta.rows - 1}")
        ascending = bool((rows[1:] > rows[:-1]).all())  # the loader's case: skip the sorts
        unique, inverse = (rows, None) if ascending else np.unique(rows, return_inverse=True)
        shards = distinct(unique // self.meta.shard_rows)
        missing = shards[~self._committed[shards]]
        if missing.size:
            raise StoreError(f"{self.path}: rows asked for in uncommitted shards {missing.tolist()}")
        if not self.path.remote:  # on an object store the index GET finds a missing file, HEADs spared
            self._check_present(shards)
        try:
            batch = self._read(unique, f"shards {shards.tolist()}")
        except FileNotFoundError as exc:
            self._present[shards] = False
            self._check_present(shards)  # names the shard and array
            raise StoreError(f"{self.path}: shards {shards.tolist()}: a shard file is missing ({exc})") \
                from exc
        if inverse is not None and (unique.size != rows.size or not (unique == rows).all()):
            batch = {name: values[inverse] for name, values in batch.items()}
        return batch

    def iter_batches(self, batch_rows: int) -> Iterator[Batch]:
        """Committed rows in order, `batch_rows` at a time, never crossing a shard."""
        for shard in self.committed_shards:
            start, stop = self.meta.shard_bounds(shard)
            for lo in range(start, stop, batch_rows):
                yield self.read_rows(np.arange(lo, min(lo + batch_rows, stop)))

    def check_files(self) -> None:
        """Check now that every committed shard's files exist (one listing per array), rather
        than at its first read: a training run should fail before its first step, not midway."""
        self._check_present(np.flatnonzero(self._committed), integrity.listing(self.path, self._arrays))

    def _check_present(self, shards: np.ndarray, listing: set[str] | None = None) -> None:
        for shard in shards[~self._present[shards]].tolist():
            gone = integrity.missing_files(self.path, self._arrays, shard, listing)
            if gone:
                raise StoreError(f"{self.path}: shard {shard} array '{gone[0]}': shard file is missing "
                                 "(committed in the ledger; run kdcache verify --repair, then the cache job)")
            self._present[shard] = True

    def _read(self, unique: np.ndarray, where: str) -> Batch:
        """Sorted unique rows of every field, all arrays read concurrently."""
        batch = self._read_checked(unique, where)
        for name, dtype in self._views.items():
            batch[name] = batch[name].view(dtype)
        return batch

    def _read_checked(self, unique: np.ndarray, where: str) -> Batch:
        """`_read_stored`, taking the rows of shards not yet checked from their checked whole."""
        owner = unique // self.meta.shard_rows
        new = distinct(owner)
        new = new[~self._summed[new]]
        if not new.size:
            return self._read_stored(unique, where)
        seen = ~np.isin(owner, new)
        out = {name: np.empty((unique.size, *a.shape[1:]), dtype=a.dtype) for name, a in self._arrays.items()}
        if seen.any():
            for name, values in self._read_stored(unique[seen], where).items():
                out[name][seen] = values
        for shard in new.tolist():
            mine = owner == shard
            for name, values in self._checked_shard(shard, unique[mine]).items():
                out[name][mine] = values
        return out

    def _checked_shard(self, shard: int, rows: np.ndarray) -> Batch:
        """`rows` of one shard, decoding the whole shard in blocks of at most CHECK_BLOCK_BYTES
        and comparing each array's running crc32c with its ledger entry's."""
        start, stop = self.meta.shard_bounds(shard)
        row_bytes = sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize for a in self._arrays.values())
        step = max(1, CHECK_BLOCK_BYTES // max(row_bytes, 1))
        sums = {name: ledger.RunningSum() for name in self._arrays}
        out = {name: np.empty((rows.size, *a.shape[1:]), dtype=a.dtype) for name, a in self._arrays.items()}
        for lo in range(start, stop, step):
            hi = min(stop, lo + step)
            inside = (rows >= lo) & (rows < hi)
            for name, values in self._read_stored(np.arange(lo, hi), f"shards [{shard}]").items():
                sums[name].update(values)
                out[name][inside] = values[rows[inside] - lo]
        entry = self._entries[shard]
        for name, running in sums.items():
            problem = integrity.checksum_problem(entry, name, running.value)
            if problem:
                key = integrity.shard_key(name, self._arrays[name], shard)
                raise StoreError(f"{self.path}/{key}: shard {shard} array '{name}': {problem} "
                                 "(the file is not the one committed; run kdcache verify --repair, then the "
                                 "cache job)")
        self._summed[shard] = True
        return out

    def _read_stored(self, unique: np.ndarray, where: str) -> Batch:
        if self._source is not None and unique.size:
            try:
                return self._source.read(unique, where)
            except StoreError as exc:
                raise StoreError(f"{self.path}: {exc}") from exc
            except OSError as exc:  # a shard file removed or truncated after its check
                if self.path.remote and isinstance(exc, FileNotFoundError):
                    raise  # read_rows names the missing file
                raise StoreError(f"{self.path}: {where} is corrupt or unreadable ({exc})") from exc
        if unique.size and unique[-1] - unique[0] + 1 == unique.size:
            sel = slice(int(unique[0]), int(unique[-1]) + 1)
            coros = {n: a.async_array.getitem(sel) for n, a in self._arrays.items()}
        else:
            coros = {n: a.async_array.get_orthogonal_selection((unique,))
                     for n, a in self._arrays.items()}
        batch = {}
        for name, values in gather(coros).items():
            if isinstance(values, Exception):  # zarr/numcodecs raise several types on bad bytes
                raise StoreError(f"{self.path}: array '{name}' in {where} is corrupt ({values})")
            batch[name] = np.asarray(values)
        return batch
