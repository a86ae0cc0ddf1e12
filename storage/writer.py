"""Create or resume a logit store and write whole shards into it.

`StoreWriter.open` is an idempotent build-or-load: it creates the store (in a temporary
directory, then renamed into place on disk or uploaded with its root `zarr.json` last to an
object store, so a half-created store is never seen), or opens
an existing one whose identity matches, or refuses with the fields that differ.
A resumed store's arrays are checked against its metadata first (shapes, dtypes, a crc32c
in every codec chain). `write_shard` validates a shard completely before touching any file, writes its arrays
(one shard file each, coded by `shardio.py` on a thread pool; through zarr for codec
chains it does not know), then commits it through the ledger. `finalize` marks the store
complete.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import zarr

from kdcache.storage import integrity, ledger
from kdcache.storage.codecs import value_mode
from kdcache.storage.concurrent import gather
from kdcache.storage.errors import StoreError
from kdcache.storage.layout import ArraySpec, array_specs, codec_chain, holds_bits
from kdcache.storage.location import LocalDir, Location, locate, open_group, upload
from kdcache.storage.metadata import StoreMeta, identity_digest
from kdcache.storage.shardio import ShardPlan, pool
from kdcache.storage.validate import validate_shard

ATTR = "kdcache"
VALID_RTOL = 1e-6
"""`valid_loss` of a resumed job against the store's: bit-identical on one machine; float32
kernels of other devices move a mean NLL by ~1e-7; other weights move it by more."""


def read_meta(path: str | os.PathLike[str] | Location) -> StoreMeta:
    """The metadata of the store at `path`, or a StoreError saying why it is not one."""
    return StoreMeta.from_json(read_attrs(path), str(path))


def read_attrs(path: str | os.PathLike[str] | Location) -> Any:
    """The raw `kdcache` attribute of the store at `path` (None when the group has none)."""
    loc = locate(path)
    if isinstance(loc, LocalDir) and loc.path.is_file():
        raise StoreError(f"{loc}: is a file, not a kdcache store")
    if not loc.is_file("zarr.json"):
        loc.check()  # a missing bucket or a refused listing says so, rather than "no zarr.json"
        raise StoreError(f"{loc}: not a kdcache store (no zarr.json)")
    try:
        group = open_group(loc)
    except Exception as exc:  # zarr raises many types for unreadable metadata
        raise StoreError(f"{loc}: not a readable Zarr group ({exc})") from exc
    return group.attrs.get(ATTR)


def _build(folder: Path, meta: StoreMeta) -> None:
    """Every metadata file of a new store, in `folder`."""
    group = zarr.open_group(str(folder), mode="w-", zarr_format=3)
    for spec in array_specs(meta).values():
        _create_array(group, spec, meta)
    # The ledger folder is an empty Zarr group so plain-zarr listings stay clean.
    group.create_group(ledger.LEDGER_DIR)
    group.attrs[ATTR] = meta.to_json()


def _create(loc: Location, meta: StoreMeta) -> None:
    if isinstance(loc, LocalDir):
        path = loc.path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex}")
        _build(tmp, meta)
        try:
            os.rename(tmp, path)  # atomic; fails if another process created it first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (path / "zarr.json").is_file():
                raise
        return
    with tempfile.TemporaryDirectory(prefix="kdcache-create-") as tmp:
        _build(Path(tmp) / "store", meta)
        upload(LocalDir(Path(tmp) / "store"), loc)


def _create_array(group: zarr.Group, spec: ArraySpec, meta: StoreMeta) -> None:
    group.create_array(
        spec.name,
        shape=(meta.rows, *spec.row_shape),
        dtype=spec.dtype,
        chunks=(meta.chunk_rows, *spec.row_shape),
        shards=(meta.shard_rows, *spec.row_shape),
        fill_value=spec.fill_value,
        **codec_chain(spec),
    )


class StoreWriter:
    """Writes whole shards of one store. Exactly one writer may write a given shard."""

    def __init__(self, path: Location, meta: StoreMeta) -> None:
        self.path = path
        self.meta = meta
        self._group = open_group(path, write=True)
        self._specs = array_specs(meta)
        self._identity = identity_digest(read_attrs(path))
        self._zarrays = {name: cast(zarr.Array, self._group[name]) for name in self._specs}
        # Shard files of the store's own codec chains are written directly (shardio.py).
        self._plans = {name: ShardPlan.of(a, path / name) for name, a in self._zarrays.items()}

    @classmethod
    def open(cls, path: str | os.PathLike[str] | Location, meta: StoreMeta) -> StoreWriter:
        """Create the store, or resume it if its identity matches `meta`."""
        path = locate(path)
        if isinstance(path, LocalDir) and path.path.is_file():
            raise StoreError(f"{path}: is a file, not a kdcache store")
        if path.is_file("zarr.json") or path.exists():
            existing = read_meta(path)
            diff = existing.differences(meta)
            if diff:
                raise StoreError(
                    f"{path}: store was made with different settings (store != requested): "
                    + "; ".join(diff)
                )
            # Shards written into arrays of another shape or without checksums would be unreadable.
            integrity.raise_first(path, integrity.layout_problems(path, existing))
            return cls(path, existing)
        if isinstance(path, LocalDir) and path.path.is_dir():
            path.path.rmdir()  # an empty directory is a place to create the store
        _create(path, meta)
        return cls(path, read_meta(path))

    def committed_shards(self) -> list[int]:
        return list(ledger.committed(self.path))

    def pending_shards(self) -> list[int]:
        done = ledger.committed(self.path)
        return [s for s in range(self.meta.num_shards) if s not in done]

    def write_shard(self, shard: int, arrays: Mapping[str, np.ndarray],
                    padded_mass_sum: float | None = 0.0) -> ledger.ShardEntry:
        """Validate, write and commit one whole shard; returns its ledger entry.

        `padded_mass_sum` is the probability the teacher's padded output rows held, summed
        over the shard's trained positions (None when the teacher cannot measure it). The
        entry's `tokens` and `nll_sum` count trained positions only.
        """
        start, stop = self.meta.shard_bounds(shard)
        where = f"{self.path} shard {shard}"
        data = validate_shard(self.meta, self._specs, arrays, stop - start, where)
        if self.meta.values != "exact":  # what a lossy store holds, and what its ledger sums
            data = {**data, "logprobs": value_mode(self.meta.values).round_trip(data["logprobs"])}
        self._write_arrays(start, stop, data)
        # Over trained positions only: the teacher loss of chat data is its loss on the answers.
        target = data["target_logprob"]
        if "loss_mask" in data:
            target = target[data["loss_mask"][:, 1:].astype(bool)]
        entry = ledger.ShardEntry(
            shard=shard,
            start=start,
            stop=stop,
            tokens=int(target.size),
            nll_sum=float(-target.astype(np.float64).sum()),
            arrays={name: ledger.checksum(values) for name, values in data.items()},
            identity=self._identity,
            padded_mass_sum=padded_mass_sum,
        )
        ledger.write_entry(self.path, entry)
        return entry

    def _write_arrays(self, start: int, stop: int, data: Mapping[str, np.ndarray]) -> None:
        bits = {n for n in data if holds_bits(self._zarrays[n], self._specs[n])}
        stored = {n: v.view(self._zarrays[n].dtype) if n in bits else v for n, v in data.items()}
        direct = {n: p for n in stored if (p := self._plans[n]) is not None}
        jobs = {name: [pool().submit(plan.encode, c) for c in plan.split(stored[name])]
                for name, plan in direct.items()}
        coros = {name: self._zarrays[name].async_array.setitem(slice(start, stop), v)
                 for name, v in stored.items() if name not in direct}
        results: dict[str, object] = gather(coros) if coros else {}

        def put(name: str) -> Exception | None:
            try:
                direct[name].write_pieces(start // direct[name].shard_rows, [p.result() for p in jobs[name]])
            except Exception as exc:  # numcodecs, the file system and obstore raise several types
                return exc
            return None

        # One file after another on disk; on an object store every array's PUT in flight at once.
        for name, failed in zip(jobs, self.path.map(put, list(jobs)), strict=True):
            if failed is not None:
                results[name] = failed
        for name, result in results.items():
            if isinstance(result, Exception):
                raise StoreError(f"{self.path}: writing array '{name}' failed ({result})") from result

    def record_valid_loss(self, loss: float, tokens: int) -> None:
        """Record L_T as soon as it is measured, or, when the store has one, compare it.

        The same teacher on the same valid rows measures the same loss (the cache job sums
        it in fixed pieces, in row order), so a resumed job whose teacher measures another
        is another teacher, or other weights, and would mix their targets into one store.
        """
        where = f"{self.path}/zarr.json: attribute 'kdcache'"
        recorded, counted = self.meta.valid_loss, self.meta.valid_tokens
        if recorded is not None and counted != tokens:
            raise StoreError(f"{where}: field 'valid_tokens' is {counted} but this job measures the teacher "
                             f"on {tokens} valid tokens; resume with the store's --valid-rows")
        if recorded is not None and not math.isclose(recorded, loss, rel_tol=VALID_RTOL):
            raise StoreError(f"{where}: field 'valid_loss' is {recorded!r} but this job's teacher measures "
                             f"{loss!r} on the same {tokens} valid tokens: another teacher (or other "
                             "weights) would write the remaining shards; resume with the teacher the store "
                             "was begun with")
        if recorded is None:
            attrs = dict(read_attrs(self.path), valid_loss=float(loss), valid_tokens=int(tokens))
            self._group.attrs[ATTR] = attrs
            self.meta = StoreMeta.from_json(attrs, str(self.path))

    def finalize(self, *, valid: tuple[float, int] | None = None) -> bool:
        """Mark the store complete with its teacher losses once every shard is committed.

        `valid` is (L_T, tokens): the teacher's cross-entropy on the data's valid split, which
        the cache job measures (kept as recorded when None).
        """
        entries = []
        for entry in ledger.read_entries(self.path, ledger.committed(self.path)).values():
            if isinstance(entry, StoreError):
                raise entry
            entries.append(entry)
        if len(entries) < self.meta.num_shards:
            return False
        nll = sum(e.nll_sum for e in entries)
        tokens = sum(e.tokens for e in entries)
        if tokens == 0:
            raise StoreError(f"{self.path}: no trained positions in any shard (the data's loss_mask "
                             "trains nothing): no teacher loss to record")
        padded = [e.padded_mass_sum for e in entries]
        mass = None if None in padded else sum(p for p in padded if p is not None) / tokens
        # The raw attribute, not a re-serialised StoreMeta: shard entries pin its digest.
        attrs = dict(read_attrs(self.path), complete=True, teacher_loss=nll / tokens, padded_mass=mass)
        if valid is not None:
            attrs.update(valid_loss=float(valid[0]), valid_tokens=int(valid[1]))
        self._group.attrs[ATTR] = attrs
        self.meta = StoreMeta.from_json(attrs, str(self.path))
        return True
