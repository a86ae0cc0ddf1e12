"""Checks that a store's metadata, ledger and files agree, without decoding any data.

These are the cheap checks: array shapes, dtypes and codec chains against the metadata,
each ledger entry against the metadata it was written under, every committed shard's files
present, `complete` and `teacher_loss` against the ledger. The reader runs them as it goes
(each shard's once), `kdcache inspect` runs them all, and `kdcache verify` adds decoding and
checksums on top (the reader compares a shard's checksums too, the first time it decodes it:
`checksum_problem`).

Every array's codec chain must end its inner chunks and its shard index in a crc32c: without
one a flipped byte reads back as a wrong value instead of failing the read. That holds for
any store, whoever wrote it, since its chunks reach training the same way.

Only the arrays a store's kind names are opened, never the group's other members: the job
log (`jobs`) is a measurement, and a damaged one must not stop a store being read.

A committed shard whose file was deleted would otherwise read as fill values, and some
fill values are valid data (id 0; and a uint16 id array over a 65,536-token vocabulary
has no invalid value at all), so presence is checked against the ledger rather than
by scanning values: one `stat` (a HEAD on object storage) per array per shard, once per
reader, or one listing per array for the whole store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import zarr
from zarr.codecs import Crc32cCodec, ShardingCodec

from kdcache.storage import ledger
from kdcache.storage.errors import StoreError
from kdcache.storage.layout import (
    ARRAYS_BY_KIND,
    DOCUMENT_ARRAYS,
    TEMPERATURE_ARRAYS,
    array_specs,
    holds_bits,
)
from kdcache.storage.location import Location, open_group
from kdcache.storage.metadata import StoreMeta

# teacher_loss is nll / tokens over float64 sums; finalize computes it from the same entries.
LOSS_RTOL = 1e-9


@dataclass(frozen=True)
class Problem:
    shard: int | None  # None: the store as a whole (its metadata)
    array: str  # "" when not about one array
    reason: str

    def __str__(self) -> str:
        where = "store" if self.shard is None else f"shard {self.shard}"
        return where + (f" array '{self.array}'" if self.array else "") + f": {self.reason}"


def layout_problems(path: Location, meta: StoreMeta) -> list[Problem]:
    """Arrays of the store's kind with the shapes, dtypes and codecs its metadata implies; no others."""
    problems = []
    specs = array_specs(meta)
    group = open_group(path)
    every = ({name for names in ARRAYS_BY_KIND.values() for name in names} | set(DOCUMENT_ARRAYS)
             | set(TEMPERATURE_ARRAYS))
    present = {key.split("/")[0] for key in path.present(f"{name}/zarr.json" for name in sorted(every))}
    for name in sorted(present - set(specs)):
        why = ("field 'data.mask_fingerprint' is empty (the data packs no documents)"
               if name in DOCUMENT_ARRAYS
               else "field 'temperatures' is empty" if name in TEMPERATURE_ARRAYS
               else f"a {meta.kind} store has no such array (field 'kind' does not match the arrays)")
        problems.append(Problem(None, name, f"present, but {why}"))
    for name, spec in specs.items():
        if name not in present:
            why = ("field 'data.mask_fingerprint' says the data packs documents" if name in DOCUMENT_ARRAYS
                   else "field 'temperatures' is set" if name in TEMPERATURE_ARRAYS
                   else f"a {meta.kind} store has it")
            problems.append(Problem(None, name, f"missing ({why})"))
            continue
        array = open_array(group, name)
        if isinstance(array, str):
            problems.append(Problem(None, name, array))
            continue
        unchecked = codec_problem(array)
        if unchecked:
            problems.append(Problem(None, name, f"{name}/zarr.json field 'codecs': {unchecked}"))
        shape = (meta.rows, *spec.row_shape)
        if array.shape != shape:
            problems.append(Problem(None, name, f"shape {array.shape} does not match the metadata's "
                                                f"{shape} ({_shape_fields(name)})"))
        elif array.dtype != spec.dtype and not holds_bits(array, spec):
            problems.append(Problem(None, name, f"dtype {array.dtype} is not {spec.dtype}"
                                                + (" (field 'vocab_size' sets the id width)"
                                                   if name == "ids" else "")))
        elif array.shards != (meta.shard_rows, *spec.row_shape):
            problems.append(Problem(None, name, f"shards {array.shards} do not match field "
                                                f"'shard_rows' ({meta.shard_rows})"))
    return problems


def open_array(group: zarr.Group, name: str) -> zarr.Array | str:
    """The group's array `name`, or why it cannot be opened as one."""
    try:
        node = group[name]
    except Exception as exc:  # zarr raises JSON, key and value errors for unreadable metadata
        return f"{name}/zarr.json is unreadable ({type(exc).__name__}: {exc})"
    return node if isinstance(node, zarr.Array) else f"{name} is a group, not an array"


def codec_problem(array: zarr.Array) -> str | None:
    """Why some chunk of `array` is stored without a crc32c, or None."""
    codecs = tuple(getattr(array.metadata, "codecs", ()))
    if not codecs:
        return "not a Zarr v3 codec chain (no crc32c on its chunks)"
    sharding = next((c for c in codecs if isinstance(c, ShardingCodec)), None)
    if sharding is None:
        chains = {"its chunks": codecs}
    else:
        chains = {"the sharding codec's inner chunks": sharding.codecs,
                  "its shard index": sharding.index_codecs}
    for what, chain in chains.items():
        if not any(isinstance(c, Crc32cCodec) for c in chain):
            return f"{what} carry no crc32c, so a flipped byte would read back silently (crc32c is required)"
    return None


def _shape_fields(name: str) -> str:
    per_id = name in ("ids", "logprobs", "counts")
    return "fields 'data.rows', 'seq_len'" + (", 'k'" if per_id else "")


def entry_problems(entry: ledger.ShardEntry, meta: StoreMeta, identity: str) -> list[Problem]:
    """An entry's row range and identity digest against the store's metadata.

    These are problems of the metadata, not of the shard (rewriting the shard would not
    fix them), so they are the store's.
    """
    shard = entry.shard
    if not 0 <= shard < meta.num_shards or (entry.start, entry.stop) != meta.shard_bounds(shard):
        return [Problem(None, "", f"shard {shard} was committed for rows {entry.start}..{entry.stop}, "
                                  "which the metadata's 'data.rows' and 'shard_rows' do not give")]
    if entry.identity and entry.identity != identity:
        return [Problem(None, "", f"shard {shard} was written under other metadata: the 'kdcache' "
                                  "attribute was edited after shards were committed")]
    return []


def shard_key(name: str, array: zarr.Array, shard: int) -> str:
    """The key of an array's file for `shard`, within the store."""
    return f"{name}/" + array.metadata.encode_chunk_key((shard, *([0] * (array.ndim - 1))))


def listing(path: Location, group_arrays: Mapping[str, zarr.Array]) -> set[str]:
    """Every file key under the arrays' folders: one listing per array."""
    return {f"{name}/{key}" for name in group_arrays for key in (path / name).objects()}


def missing_files(path: Location, group_arrays: Mapping[str, zarr.Array], shard: int,
                  listed: set[str] | None = None) -> list[str]:
    """Names of the arrays whose file for `shard` is absent (from `listed` when given)."""
    keys = {name: shard_key(name, array, shard) for name, array in group_arrays.items()}
    found = set(listed) if listed is not None else path.present(keys.values())
    return [name for name, key in keys.items() if key not in found]


def checksum_problem(entry: ledger.ShardEntry, name: str, found: ledger.ArraySum) -> str | None:
    """Why one array's decoded shard, checksummed as `found`, is not what its ledger entry committed.

    Every inner chunk's crc32c can hold while the file is another shard's (copied over it):
    only the ledger knows which bytes belong to which rows.
    """
    recorded = entry.arrays.get(name)
    if recorded is None:
        return f"ledger/shard-{entry.shard:06d} records no checksum for it"
    if found != recorded:
        return (f"decoded crc32c {found.crc32c} ({found.nbytes} bytes) does not match "
                f"{recorded.crc32c} ({recorded.nbytes} bytes) in ledger/shard-{entry.shard:06d}")
    return None


def completion_problems(meta: StoreMeta, entries: Iterable[ledger.ShardEntry]) -> list[Problem]:
    """`complete` and `teacher_loss` against the ledger."""
    entries = list(entries)
    if not meta.complete:
        return []
    if len(entries) < meta.num_shards:
        return [Problem(None, "", f"field 'complete' is true but only {len(entries)} of "
                                  f"{meta.num_shards} shards are committed")]
    tokens = sum(e.tokens for e in entries)
    loss = sum(e.nll_sum for e in entries) / tokens if tokens else math.nan
    if meta.teacher_loss is None or not math.isclose(meta.teacher_loss, loss, rel_tol=LOSS_RTOL):
        return [Problem(None, "", f"field 'teacher_loss' is {meta.teacher_loss} but the ledger's NLL "
                                  f"sums give {loss:.6f}")]
    return []


def store_problems(
    path: Location, meta: StoreMeta, identity: str
) -> tuple[list[Problem], list[ledger.ShardEntry]]:
    """Every cheap check over the whole store; also returns the readable ledger entries."""
    problems = layout_problems(path, meta)
    group = open_group(path)
    there = path.present(f"{name}/zarr.json" for name in array_specs(meta))
    opened = {name: open_array(group, name) for name in array_specs(meta) if f"{name}/zarr.json" in there}
    arrays = {name: a for name, a in opened.items() if not isinstance(a, str)}
    listed = listing(path, arrays)
    entries = []
    committed = ledger.committed(path)
    off: list[Problem] = []  # entries that disagree with the metadata: reported once
    for shard, entry in ledger.read_entries(path, committed).items():
        if isinstance(entry, StoreError):
            problems.append(Problem(shard, "", str(entry)))
            continue
        entries.append(entry)
        found = entry_problems(entry, meta, identity)
        off += found
        if not found:
            problems += [Problem(shard, name, "shard file is missing")
                         for name in missing_files(path, arrays, shard, listed)]
    if off:
        more = f" ({len(off)} of {len(committed)} committed shards)" if len(off) > 1 else ""
        problems.append(Problem(None, "", off[0].reason + more))
    if len(entries) == len(committed):  # an unreadable entry is its own problem already
        problems += completion_problems(meta, entries)
    return problems, entries


def raise_first(path: Location, problems: list[Problem]) -> None:
    """Turn the first problem into the StoreError readers raise, naming the store."""
    if problems:
        first = problems[0]
        text = str(first) if first.shard is not None or first.array else first.reason
        more = f" (and {len(problems) - 1} more; run kdcache verify)" if len(problems) > 1 else ""
        raise StoreError(f"{path}: {text}{more}")
