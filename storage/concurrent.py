"""Run several Zarr array operations at once on zarr's own event loop.

A shard spans five arrays. Issued one by one, each read or write waits for zarr's
per-call round trip through its loop thread; gathered, they overlap, and numcodecs
(Blosc, crc32c) releases the GIL, so encoding and decoding use every core.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any

from zarr.core.sync import sync


async def _gather(coros: list[Coroutine[Any, Any, Any]]) -> list[Any]:
    return await asyncio.gather(*coros, return_exceptions=True)


def gather(coros: Mapping[str, Coroutine[Any, Any, Any]]) -> dict[str, Any]:
    """Run the named coroutines concurrently; exceptions are returned, not raised."""
    names = list(coros)
    results = sync(_gather([coros[n] for n in names]))
    return dict(zip(names, results, strict=True))
