"""Flipped bytes are named by verify and refused by the reader; repair uncommits them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdcache.storage import StoreError, StoreReader, StoreWriter, repair_store, verify_store

from .conftest import make_meta, make_rows, shard_of


@pytest.fixture
def built(store_path):
    meta = make_meta(rows=9, seq_len=32, vocab=1000, k=16, shard_rows=3, chunk_rows=3)
    writer = StoreWriter.open(store_path, meta)
    rows = make_rows(meta)
    for shard in writer.pending_shards():
        writer.write_shard(shard, shard_of(meta, rows, shard))
    writer.finalize()
    return store_path, meta


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["data", "index"])
def test_flipped_byte_is_found(built, where):
    path, meta = built
    shard_file = path / "logprobs" / "c" / "1" / "0" / "0"
    # The shard index sits at the end of the file; data chunks come first.
    flip(shard_file, 40 if where == "data" else shard_file.stat().st_size - 6)
    problems = verify_store(path)
    assert [(p.shard, p.array) for p in problems] == [(1, "logprobs")]
    reader = StoreReader(path)
    with pytest.raises(StoreError, match="logprobs.*corrupt"):
        reader.read_rows([4])
    assert reader.read_rows([0, 8])["logprobs"].shape == (2, 32, 16)  # other shards still read
    assert repair_store(path, problems) == [1]
    assert StoreWriter.open(path, meta).pending_shards() == [1]
    assert not StoreReader(path).meta.complete


def test_corrupt_ledger_entry_is_named(built):
    path, _ = built
    entry = path / "ledger" / "shard-000002" / "zarr.json"
    entry.write_text(entry.read_text()[:-20])
    problems = verify_store(path)
    assert [p.shard for p in problems] == [2] and "corrupt ledger entry" in problems[0].reason


def test_ledger_checksum_mismatch_is_found(built):
    path, _ = built
    entry = path / "ledger" / "shard-000000" / "zarr.json"
    doc = json.loads(entry.read_text())
    doc["attributes"]["arrays"]["ids"]["crc32c"] = "00000000"
    entry.write_text(json.dumps(doc))
    assert [(p.shard, p.array) for p in verify_store(path)] == [(0, "ids")]


def test_missing_shard_file_is_refused(built):
    path, _ = built
    (path / "tail_logmass" / "c" / "2" / "0").rename(path / "moved")
    assert [(p.shard, p.array) for p in verify_store(path)] == [(2, "tail_logmass")]
    with pytest.raises(StoreError, match="shard 2 array 'tail_logmass': shard file is missing"):
        StoreReader(path).read_rows(np.array([6]))
