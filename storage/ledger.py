"""The ledger of committed shards: one entry per shard under `<store>/ledger/`.

Each entry is a Zarr v3 group of its own (`ledger/shard-000012/zarr.json`, the entry in
its attributes), so the whole store stays a plain Zarr hierarchy that any zarr reader
lists and opens without warnings.

A shard exists for readers exactly when its entry exists. Entries are written after the
shard's data, atomically (a temporary file and a rename on disk, a single PUT on an object
store, which has no rename), so a writer killed at any point leaves either no entry (the
shard is redone) or a whole one. Entries hold no
timestamps or host names: a finished store's bytes do not depend on who wrote it. Each
entry pins the digest of the store's identity metadata, so a `k`, `temperature` or row
count edited after shards were written is detected instead of silently reinterpreting them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import crc32c
import numpy as np

from kdcache.storage.errors import StoreError
from kdcache.storage.location import Location, locate

LEDGER_DIR = "ledger"


@dataclass(frozen=True, kw_only=True)
class ArraySum:
    crc32c: str  # of the decoded array bytes, C order, little-endian
    nbytes: int


@dataclass(frozen=True, kw_only=True)
class ShardEntry:
    shard: int
    start: int
    stop: int
    tokens: int
    nll_sum: float  # sum of -target_logprob over the shard, nats
    arrays: dict[str, ArraySum]
    identity: str = ""  # metadata.identity_digest of the store it was written into ("" before v0.2)
    padded_mass_sum: float | None = 0.0  # over the shard's positions; None: the teacher cannot see it


class RunningSum:
    """The checksum of an array fed in consecutive row blocks: equal to `checksum` of the whole
    (C order is the rows' bytes one after another), in memory of one block."""

    def __init__(self) -> None:
        self._crc, self._nbytes = 0, 0

    def update(self, block: np.ndarray) -> RunningSum:
        data = np.ascontiguousarray(block)
        self._crc = crc32c.crc32c(data.view(np.uint8).data, value=self._crc)
        self._nbytes += data.nbytes
        return self

    @property
    def value(self) -> ArraySum:
        return ArraySum(crc32c=f"{self._crc:08x}", nbytes=self._nbytes)


def checksum(array: np.ndarray) -> ArraySum:
    return RunningSum().update(array).value


def entry_key(shard: int) -> str:
    return f"{LEDGER_DIR}/shard-{shard:06d}/zarr.json"


def write_entry(store: Location, entry: ShardEntry) -> None:
    doc = {"zarr_format": 3, "node_type": "group", "attributes": asdict(entry)}
    store.publish(entry_key(entry.shard), json.dumps(doc, sort_keys=True, indent=1).encode())


def read_entry(store: Location, key: str) -> ShardEntry:
    try:
        raw = json.loads(store.read_text(key))["attributes"]
        raw["arrays"] = {name: ArraySum(**value) for name, value in raw["arrays"].items()}
        return ShardEntry(**raw)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise StoreError(f"{store}/{key}: corrupt ledger entry ({exc})") from exc


def read_entries(store: Location, keys: dict[int, str]) -> dict[int, ShardEntry | StoreError]:
    """Shard -> its entry, or the StoreError reading it raised (requests in flight together)."""

    def one(key: str) -> ShardEntry | StoreError:
        try:
            return read_entry(store, key)
        except StoreError as exc:
            return exc

    return dict(zip(keys, store.map(one, keys.values()), strict=True))


def committed(store: Location | str | os.PathLike[str]) -> dict[int, str]:
    """Shard index -> entry key, for every committed shard (entries are not parsed): one
    listing of the ledger folder."""
    store = locate(store)
    out = {}
    for key in store.objects(LEDGER_DIR):
        parts = key.split("/")
        if len(parts) == 3 and parts[1].startswith("shard-") and parts[2] == "zarr.json":
            try:
                out[int(parts[1].removeprefix("shard-"))] = key
            except ValueError:
                continue
    return dict(sorted(out.items()))


def remove_entry(store: Location, shard: int) -> None:
    store.delete(entry_key(shard))
