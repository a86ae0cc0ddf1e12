"""The cache job's log: one entry per invocation that wrote shards, kept in the store.

It records how long the job took, for the cost model (`kdcache cost --runs`). It lives in
a group of its own (`jobs`, attribute `cache_jobs`) rather than in the `kdcache`
attribute, because timings differ from run to run while a finished store's data and
attributes must not depend on workers, failures or restarts. It is a measurement, not
data: nothing reads targets through it, and nothing but the cost model opens it, so a
damaged log never stops a store being trained on, inspected or verified.

The log is rewritten whole and atomically (a temporary file and a rename on disk, one PUT
on an object store), so a job killed while appending leaves the old log or the new one,
never a torn file. Reading validates every
entry (types, finite values, ranges) and names the file and field of the first bad one,
rather than costing a job at a garbage time. A log that cannot be read (torn by an older
kdcache, edited by hand) must not stop a cache job finishing its store, nor be silently
dropped: `append_job` moves it aside, next to the new log, and says where.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from kdcache.storage.errors import StoreError
from kdcache.storage.location import Location, locate

JOB_LOG = "jobs"
"""The group (a folder in the store) holding the log."""
ATTR = "cache_jobs"

MAX_SECONDS = 1e9
"""Thirty years: a larger time is a unit error or garbage, not a measurement."""
MAX_COUNT = 10**15
"""More tokens, shards or workers than any cache job writes or runs."""


@dataclass(frozen=True, kw_only=True)
class CacheJob:
    seconds: float
    """Shard-dispatch time: teacher forwards and writes; start-up and teacher loading excluded."""
    tokens: int
    """Tokens the invocation wrote."""
    shards: int
    workers: int
    backend: str
    startup_seconds: float = 0.0
    """Start-up before the first shard: Ray, the actors, loading the teacher."""


_COUNTS = {"tokens": 0, "shards": 1, "workers": 1}  # field -> least allowed value


LOG_KEY = f"{JOB_LOG}/zarr.json"


def read_jobs(store: str | os.PathLike[str] | Location) -> list[CacheJob]:
    """The logged invocations, oldest first; [] for a store without a log; a StoreError naming
    the log's file and field for a log that is unreadable or holds an invalid entry."""
    loc = locate(store)
    return _parsed(f"{loc}/{LOG_KEY}", _entries(loc))


def _parsed(path: str, entries: list[Any]) -> list[CacheJob]:
    return [_parse(entry, f"{path}: {ATTR}[{i}]") for i, entry in enumerate(entries)]


def _entries(loc: Location) -> list[Any]:
    """The log's entries as stored (unknown fields kept), the list itself checked."""
    path = f"{loc}/{LOG_KEY}"
    try:
        doc = json.loads(loc.read_text(LOG_KEY))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StoreError(f"{path}: the cache-job log is not readable JSON ({exc})") from exc
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else None
    if not isinstance(attrs, dict):
        raise StoreError(f"{path}: field 'attributes' must be an object")
    entries = attrs.get(ATTR, [])
    if not isinstance(entries, list):
        raise StoreError(f"{path}: field '{ATTR}' must be a list, got {type(entries).__name__}")
    return entries


def _parse(entry: Any, where: str) -> CacheJob:
    if not isinstance(entry, dict):
        raise StoreError(f"{where} must be an object, got {entry!r}")
    known = {f.name: f for f in fields(CacheJob)}
    for name, f in known.items():
        if name not in entry and f.default is MISSING:
            raise StoreError(f"{where}: missing field '{name}'")
    values = {k: v for k, v in entry.items() if k in known}  # newer kdcache may log more
    for name in ("seconds", "startup_seconds"):
        value = values.get(name, 0.0)
        timed = name == "seconds"  # a job that wrote shards took time; start-up may round to 0
        if not (_number(value) and (value > 0 if timed else value >= 0) and value < MAX_SECONDS):
            raise StoreError(f"{where}: field '{name}' must be a finite number of seconds in "
                             f"{'(' if timed else '['}0, {MAX_SECONDS:.0e}), got {value!r}")
    for name, least in _COUNTS.items():
        value = values[name]
        if not (isinstance(value, int) and not isinstance(value, bool)) or not least <= value < MAX_COUNT:
            raise StoreError(f"{where}: field '{name}' must be an integer in [{least}, {MAX_COUNT:.0e}), "
                             f"got {value!r}")
    if not isinstance(values["backend"], str) or not values["backend"]:
        raise StoreError(f"{where}: field 'backend' must be a non-empty string, got {values['backend']!r}")
    return CacheJob(**values)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def append_job(store: str | os.PathLike[str] | Location, job: CacheJob) -> str | None:
    """Add one entry; the cache job's driver is the only writer.

    A log that cannot be read is copied aside (its bytes kept) and a new log started with
    this entry; returns where the old one went, or None.
    """
    loc = locate(store)
    path = f"{loc}/{LOG_KEY}"
    _parse(asdict(job), f"{path}: new entry")
    aside = None
    try:
        entries = _entries(loc)
        _parsed(path, entries)
    except StoreError:
        key = f"{LOG_KEY}.unreadable-{uuid.uuid4().hex[:8]}"
        loc.publish(key, loc.read(LOG_KEY))
        aside = f"{loc}/{key}"
        entries = []
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {ATTR: [*entries, asdict(job)]}}
    loc.publish(LOG_KEY, json.dumps(doc, indent=2).encode())
    return aside
