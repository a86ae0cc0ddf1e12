"""The cache job's log: one entry per invocation that wrote shards, kept in the store.

It records how long the job took, for the cost model (`kdcache cost --runs`). It lives in
a group of its own (`jobs`, attribute `cache_jobs`) rather than in the `kdcache`
attribute, because timings differ from run to run while a finished store's data and
attributes must not depend on workers, failures or restarts. It is a measurement, not
data: nothing reads targets through it, and an unreadable log reads as empty.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import zarr

JOB_LOG = "jobs"
"""The group (a folder in the store) holding the log."""


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


def _entries(store: str | os.PathLike[str]) -> list[Any]:
    try:
        value = zarr.open_group(str(Path(store) / JOB_LOG), mode="r").attrs.get("cache_jobs", [])
    except (OSError, ValueError, KeyError, zarr.errors.GroupNotFoundError):
        return []
    return list(value) if isinstance(value, list) else []


def append_job(store: str | os.PathLike[str], job: CacheJob) -> None:
    """Add one entry; the cache job's driver is the only writer."""
    group = zarr.open_group(str(Path(store) / JOB_LOG), mode="a")
    group.attrs["cache_jobs"] = [*_entries(store), asdict(job)]


def read_jobs(store: str | os.PathLike[str]) -> list[CacheJob]:
    """The logged invocations, oldest first; [] for a store without a log."""
    names = {f.name for f in fields(CacheJob)}
    jobs = []
    for entry in _entries(store):
        try:
            jobs.append(CacheJob(**{k: v for k, v in entry.items() if k in names}))
        except (AttributeError, TypeError):
            continue
    return jobs
