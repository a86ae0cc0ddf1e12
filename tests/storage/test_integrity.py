"""Missing files and edited metadata: found by inspect and verify, refused by the reader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from kdcache.storage import (
    ARRAYS_BY_KIND,
    StoreError,
    StoreReader,
    StoreWriter,
    summarize,
    verify_store,
)

from .conftest import make_meta, make_rows, shard_of


def build(path: Path, kind: str, *, shards: list[int] | None = None, finalize: bool = True):
    meta = make_meta(kind, rows=9, seq_len=8, vocab=300, k=4, shard_rows=3, chunk_rows=3)
    writer = StoreWriter.open(path, meta)
    rows = make_rows(meta)
    for shard in writer.pending_shards() if shards is None else shards:
        writer.write_shard(shard, shard_of(meta, rows, shard))
    if finalize:
        writer.finalize()
    return meta


def edit_attrs(path: Path, **changes) -> None:
    doc = json.loads((path / "zarr.json").read_text())
    attrs = doc["attributes"]["kdcache"]
    for key, value in changes.items():
        target = attrs
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    (path / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("kind", ["topk", "full", "sampled"])
def test_every_missing_shard_file_is_named(store_path, kind):
    build(store_path, kind)
    for name in ARRAYS_BY_KIND[kind]:
        ndim = len(json.loads((store_path / name / "zarr.json").read_text())["shape"])
        shard_file = store_path / name / "c" / "1" / Path(*["0"] * (ndim - 1))
        moved = store_path.parent / "moved"
        shard_file.rename(moved)
        try:
            with pytest.raises(StoreError, match=f"shard 1 array '{name}': shard file is missing"):
                StoreReader(store_path).read_rows([0, 4])
            assert StoreReader(store_path).read_rows([0, 8])["tokens"].shape == (2, 9)
            assert summarize(store_path)["damaged"] == [f"shard 1 array '{name}': shard file is missing"]
            assert [(p.shard, p.array) for p in verify_store(store_path)] == [(1, name)]
        finally:
            moved.rename(shard_file)
    assert summarize(store_path)["damaged"] == [] and verify_store(store_path) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k": 8}, "array 'ids': shape .*fields 'data.rows', 'seq_len', 'k'"),
        ({"seq_len": 16}, "array 'tokens': shape"),
        ({"data.rows": 12}, "array 'tokens': shape"),
        ({"vocab_size": 70000}, "array 'ids': dtype uint16 is not uint32"),
        ({"kind": "sampled", "draws": 8}, "array 'tail_logmass': present, but a sampled store"),
        ({"temperature": 2.0}, "shard 0 was written under other metadata"),
        ({"teacher.name": "other"}, "shard 0 was written under other metadata"),
        ({"teacher_loss": -1.0}, "field 'teacher_loss' is -1.0 but the ledger's NLL sums give"),
        ({"k": 4.5}, "field 'k' must be an integer, got 4.5"),
        ({"k": "4"}, "field 'k' must be an integer, got '4'"),
        ({"temperature": "hot"}, "field 'temperature' must be a number"),
        ({"teacher.params": None}, "field 'teacher.params' must be an integer"),
    ],
)
def test_edited_metadata_is_found(store_path, change, message):
    build(store_path, "topk")
    edit_attrs(store_path, **change)
    try:
        problems = [str(p) for p in verify_store(store_path)]
    except StoreError as exc:  # metadata that does not even parse
        problems = [str(exc)]
    assert any(re.search(message, p) for p in problems), problems
    with pytest.raises(StoreError, match=message):
        StoreReader(store_path)


def test_complete_with_uncommitted_shards_is_refused_not_waited_on(store_path):
    meta = build(store_path, "topk", shards=[0, 2], finalize=False)
    StoreReader(store_path)  # a store being built is fine
    edit_attrs(store_path, complete=True, teacher_loss=1.0)
    with pytest.raises(StoreError, match="field 'complete' is true but only 2 of 3 shards"):
        StoreReader(store_path)
    assert any("field 'complete'" in str(p) for p in verify_store(store_path))
    assert meta.num_shards == 3


def test_intact_and_legacy_stores_pass(store_path):
    build(store_path, "topk")
    assert verify_store(store_path) == [] and summarize(store_path)["damaged"] == []
    # Entries written before they pinned the metadata digest still read.
    for entry in (store_path / "ledger").glob("shard-*/zarr.json"):
        doc = json.loads(entry.read_text())
        del doc["attributes"]["identity"]
        entry.write_text(json.dumps(doc))
    assert verify_store(store_path) == []
    assert StoreReader(store_path).read_rows(np.arange(9))["ids"].shape == (9, 8, 4)
    # Without the digest, an edited vocab_size still shows: the ids no longer fit it.
    edit_attrs(store_path, vocab_size=200)
    assert any("beyond field 'vocab_size' (200)" in str(p) for p in verify_store(store_path))
