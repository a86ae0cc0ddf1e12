"""Whole-store checks (`kdcache verify`) and the summary `kdcache inspect` prints."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from kdcache.storage import ledger
from kdcache.storage.integrity import Problem, store_problems
from kdcache.storage.layout import DOCUMENT_ARRAYS, array_specs
from kdcache.storage.location import Location, locate, open_group
from kdcache.storage.metadata import identity_digest
from kdcache.storage.tokens.format import document_problem
from kdcache.storage.writer import ATTR, read_attrs, read_meta

INPUT_ARRAYS = ("tokens", *DOCUMENT_ARRAYS)
"""Copied from the token data, not the teacher's: left out of the target bytes."""


def verify_store(path: str | os.PathLike[str] | Location) -> list[Problem]:
    """The cheap checks, then decode every committed shard and compare it with its checksums
    (and, over documents, check its loss mask and position ids as the token data's are)."""
    path = locate(path)
    meta = read_meta(path)
    problems, entries = store_problems(path, meta, identity_digest(read_attrs(path)))
    if any(p.shard is None for p in problems):
        return problems  # the layout itself is off: decoding against it would mislead
    group = open_group(path)
    flagged = {p.shard for p in problems}
    for entry in entries:
        if entry.shard in flagged:
            continue
        intact: dict[str, np.ndarray] = {}
        for name in array_specs(meta):
            try:
                values = np.asarray(group[name][entry.start:entry.stop])
            except Exception as exc:  # any decode failure is corruption
                problems.append(Problem(entry.shard, name, f"unreadable ({exc})"))
                continue
            if name not in entry.arrays or ledger.checksum(values) != entry.arrays[name]:
                problems.append(Problem(entry.shard, name, "checksum does not match the ledger"))
            elif name in ("tokens", "ids") and values.size and int(values.max()) >= meta.vocab_size:
                # Bytes intact but ids beyond field 'vocab_size': the metadata was edited
                # (stores whose entries pin the metadata's digest are caught earlier).
                problems.append(Problem(entry.shard, name, f"holds id {int(values.max())}, beyond field "
                                                           f"'vocab_size' ({meta.vocab_size})"))
            elif name in DOCUMENT_ARRAYS:
                intact[name] = values
        if meta.documents and len(intact) == len(DOCUMENT_ARRAYS):
            # Checksums prove the bytes are what was committed, not that a writer other
            # than kdcache's (which validates them) committed a sound mask.
            found = document_problem(intact["loss_mask"], intact["position_ids"], meta.seq_len + 1)
            if found is not None:
                problems.append(Problem(entry.shard, "loss_mask", found))
    return sorted(problems, key=lambda p: (-1 if p.shard is None else p.shard, p.array))


def repair_store(path: str | os.PathLike[str] | Location, problems: list[Problem]) -> list[int]:
    """Uncommit the shards with problems so the next cache run rewrites them.

    Problems of the store as a whole (edited metadata, arrays of the wrong shape) cannot be
    repaired by rewriting shards; they are left for the caller to report.
    """
    path = locate(path)
    shards = sorted({p.shard for p in problems if p.shard is not None})
    for shard in shards:
        ledger.remove_entry(path, shard)
    if shards:
        group = open_group(path, write=True)
        # The raw attribute, not a re-serialised StoreMeta: shard entries pin its digest.
        group.attrs[ATTR] = dict(read_attrs(path), complete=False, teacher_loss=None, padded_mass=None)
    return shards


def summarize(path: str | os.PathLike[str] | Location) -> dict[str, Any]:
    """Metadata, progress, size and cheap-check problems of a store, as JSON-able values.

    `tokens` counts positions (rows x seq_len), `trained_tokens` the positions holding targets
    (fewer where the data's loss mask leaves prompts untrained): bytes are given per both."""
    path = locate(path)
    meta = read_meta(path)
    problems, entries = store_problems(path, meta, identity_digest(read_attrs(path)))
    done = [s for s in ledger.committed(path) if s < meta.num_shards]
    rows = sum(stop - start for start, stop in map(meta.shard_bounds, done))
    tokens = rows * meta.seq_len
    # Ledger entries count trained positions (all of them where the data packs no documents).
    trained = sum(e.tokens for e in entries if e.shard < meta.num_shards)
    sizes = path.objects()
    array_bytes = {name: sum(b for key, b in sizes.items() if key.startswith(f"{name}/"))
                   for name in array_specs(meta)}
    total = sum(sizes.values())
    targets = sum(b for name, b in array_bytes.items() if name not in INPUT_ARRAYS)
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
        "trained_tokens": trained,
        "bytes_per_trained_token": total / trained if trained else None,
        "target_bytes_per_trained_token": targets / trained if trained else None,
        "teacher_loss": meta.teacher_loss,
        "damaged": [str(p) for p in problems],
    }
