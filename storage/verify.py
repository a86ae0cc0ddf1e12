"""Whole-store checks (`kdcache verify`) and the summary `kdcache inspect` prints."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kdcache.storage import ledger
from kdcache.storage.errors import StoreError
from kdcache.storage.layout import array_specs
from kdcache.storage.writer import ATTR, read_meta


@dataclass(frozen=True)
class Problem:
    shard: int
    array: str  # "" when the ledger entry itself is bad
    reason: str

    def __str__(self) -> str:
        where = f"shard {self.shard}" + (f" array '{self.array}'" if self.array else "")
        return f"{where}: {self.reason}"


def verify_store(path: str | os.PathLike[str]) -> list[Problem]:
    """Decode every committed shard and compare it with its ledger checksums."""
    path = Path(path)
    meta = read_meta(path)
    group = zarr.open_group(str(path), mode="r")
    problems = []
    for shard, entry_file in ledger.committed(path).items():
        try:
            entry = ledger.read_entry(entry_file)
        except StoreError as exc:
            problems.append(Problem(shard, "", str(exc)))
            continue
        start, stop = meta.shard_bounds(shard)
        for name in array_specs(meta):
            try:
                values = np.asarray(group[name][start:stop])  # type: ignore[index]
            except Exception as exc:  # any decode failure is corruption
                problems.append(Problem(shard, name, f"unreadable ({exc})"))
                continue
            if name not in entry.arrays or ledger.checksum(values) != entry.arrays[name]:
                problems.append(Problem(shard, name, "checksum does not match the ledger"))
    return problems


def repair_store(path: str | os.PathLike[str], problems: list[Problem]) -> list[int]:
    """Uncommit the shards with problems so the next cache run rewrites them."""
    path = Path(path)
    shards = sorted({p.shard for p in problems})
    for shard in shards:
        ledger.remove_entry(path, shard)
    if shards:
        group = zarr.open_group(str(path), mode="r+")
        meta = read_meta(path).to_json()
        group.attrs[ATTR] = dict(meta, complete=False, teacher_loss=None)
    return shards


def summarize(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Metadata, progress and size of a store, as plain JSON-able values."""
    path = Path(path)
    meta = read_meta(path)
    done = ledger.committed(path)
    rows = sum(stop - start for start, stop in map(meta.shard_bounds, done))
    tokens = rows * meta.seq_len
    array_bytes = {name: _du(path / name) for name in array_specs(meta)}
    total = _du(path)
    targets = sum(b for name, b in array_bytes.items() if name != "tokens")
    return {
        "path": str(path),
        "metadata": meta.to_json(),
        "shards": meta.num_shards,
        "shards_committed": len(done),
        "rows": rows,
        "tokens": tokens,
        "bytes": total,
        "array_bytes": array_bytes,
        "bytes_per_token": total / tokens if tokens else None,
        "target_bytes_per_token": targets / tokens if tokens else None,
        "teacher_loss": meta.teacher_loss,
    }


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
