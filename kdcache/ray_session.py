"""The one way kdcache's jobs get a Ray to run on (`cache`, `prepare --workers`, `sweep`,
`train --workers`, `run`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import ray


@contextmanager
def ray_session(address: str | None, *, log_to_driver: bool = False,
                object_store_memory: int | None = None) -> Iterator[None]:
    """Reuse an initialised Ray, or start one (local, or the cluster at `address`) and
    always shut it down, also on errors: a local cluster left behind makes the next
    `ray.init()` on this machine hang. `object_store_memory` bounds a local Ray's
    object store (a cluster keeps its own).

    Without an address the local Ray is always a new one of this job's own (`"local"`):
    `ray.init()` alone joins whatever Ray another job on the machine started, and a second
    `kdcache run` beside a first then ran its teachers on the first one's Ray, whose raylet
    went away with it."""
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or "local", include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=log_to_driver, configure_logging=False,
                 object_store_memory=None if address else object_store_memory)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
