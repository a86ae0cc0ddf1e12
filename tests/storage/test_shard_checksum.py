"""A reader compares each shard with its ledger checksums at its first read; every array's
codec chain must carry crc32c; a damaged job log does not stop a store being read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from kdcache.storage import StoreError, StoreReader, StoreWriter, summarize, verify_store
from kdcache.storage.layout import BITS_ATTR

from .conftest import make_meta, make_rows, shard_of, write_previous_layout

NAMES = ("tokens", "ids", "logprobs", "tail_logmass", "target_logprob")


def _store(path: Path, **meta_args) -> Path:
    meta = make_meta(**{"rows": 12, "seq_len": 8, "k": 4, "shard_rows": 4, "chunk_rows": 2, **meta_args})
    rows = make_rows(meta)
    writer = StoreWriter.open(path, meta)
    for shard in writer.pending_shards():
        writer.write_shard(shard, shard_of(meta, rows, shard))
    writer.finalize()
    return path


def _shard_file(store: Path, name: str, shard: int) -> Path:
    array = zarr.open_array(str(store / name), mode="r")
    return store / name / array.metadata.encode_chunk_key((shard, *([0] * (array.ndim - 1))))


def _copy_shard(store: Path, names: tuple[str, ...], src: int = 2, dst: int = 1) -> None:
    for name in names:
        shutil.copyfile(_shard_file(store, name, src), _shard_file(store, name, dst))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[n].view(np.uint8), b[n].view(np.uint8)) for n in a)


def test_a_shard_file_copied_over_another_is_refused_at_its_first_read(tmp_path):
    store = _store(tmp_path / "s.zarr")
    intact = StoreReader(store).read_rows(np.arange(12))
    _copy_shard(store, ("ids",))
    reader = StoreReader(store)
    assert _same(reader.read_rows([0, 3, 9]), {n: v[[0, 3, 9]] for n, v in intact.items()})
    with pytest.raises(StoreError, match=r"ids/c/1/0/0: shard 1 array 'ids': decoded crc32c .* does not "
                                         r"match .* in ledger/shard-000001"):
        reader.read_rows([5])
    with pytest.raises(StoreError, match="shard 1 array 'ids'"):  # not marked checked by the failure
        reader.read_rows([4, 8])


def test_every_array_of_a_shard_copied_over_another_is_refused(tmp_path):
    """Every inner crc32c holds (the chunks are shard 2's, intact): only the ledger tells."""
    store = _store(tmp_path / "s.zarr")
    _copy_shard(store, NAMES)
    with pytest.raises(StoreError, match="shard 1 array 'tokens'"):
        list(StoreReader(store).iter_batches(4))
    assert {p.shard for p in verify_store(store)} == {1}


@pytest.mark.parametrize("order", ["ascending", "shuffled", "repeats"])
def test_rows_served_from_the_checked_shard_equal_a_warm_readers(tmp_path, order):
    """The first read of a shard serves its rows from the whole decoded shard; the bytes are
    those a reader that has checked every shard returns."""
    store = _store(tmp_path / "s.zarr", rows=22, shard_rows=8, chunk_rows=2)
    warm = StoreReader(store)
    everything = warm.read_rows(np.arange(22))
    rows = {"ascending": np.array([1, 2, 9, 17, 21]), "shuffled": np.array([20, 3, 11, 0, 16, 7]),
            "repeats": np.array([5, 5, 13, 2, 13])}[order]
    cold = StoreReader(store)
    assert _same(cold.read_rows(rows), {n: v[rows] for n, v in everything.items()})
    assert _same(cold.read_rows(rows), warm.read_rows(rows))
    assert cold.read_rows([]).keys() == everything.keys()


@pytest.mark.parametrize("block_rows", [1, 3])
def test_the_check_decodes_a_shard_in_bounded_blocks(tmp_path, monkeypatch, block_rows):
    """The check's memory is a block of rows, not the shard: blocks that split the shard unevenly
    give the same rows and the same verdict as one whole-shard decode."""
    from kdcache.storage import reader as reader_module

    store = _store(tmp_path / "s.zarr", rows=22, shard_rows=8, chunk_rows=2)
    everything = StoreReader(store).read_rows(np.arange(22))
    row_bytes = sum(v[0].nbytes for v in everything.values())
    monkeypatch.setattr(reader_module, "CHECK_BLOCK_BYTES", block_rows * row_bytes)
    decoded: list[int] = []
    plain = reader_module.StoreReader._read_stored
    monkeypatch.setattr(reader_module.StoreReader, "_read_stored",
                        lambda self, unique, where: decoded.append(unique.size) or plain(self, unique, where))
    rows = np.array([20, 3, 11, 0, 16, 7])
    assert _same(StoreReader(store).read_rows(rows), {n: v[rows] for n, v in everything.items()})
    assert max(decoded) == block_rows and sum(decoded) == 22  # every row once, a block at a time
    _copy_shard(store, ("logprobs",))
    with pytest.raises(StoreError, match="shard 1 array 'logprobs'"):
        StoreReader(store).read_rows([15])


def test_a_subset_of_fields_is_checked_against_its_own_checksums(tmp_path):
    store = _store(tmp_path / "s.zarr")
    _copy_shard(store, ("logprobs",))
    assert StoreReader(store, fields=["tokens", "ids"]).read_rows([4, 5])["ids"].shape == (2, 8, 4)
    with pytest.raises(StoreError, match="shard 1 array 'logprobs'"):
        StoreReader(store, fields=["logprobs"]).read_rows([4])


def test_a_store_read_through_zarr_is_checked_too(tmp_path):
    """An array in a chain kdcache does not code itself (here no Blosc) goes through zarr: the
    check is the same."""
    store = _store(tmp_path / "s.zarr")
    group = zarr.open_group(str(store), mode="r+")
    old = group["tokens"]
    values, attrs = old[:], dict(old.attrs)
    del group["tokens"]
    new = group.create_array("tokens", shape=old.shape, dtype=old.dtype, chunks=(2, 9), shards=(4, 9),
                             compressors=(Crc32cCodec(),), fill_value=-1)
    new[:] = values
    new.attrs.update(attrs)
    intact = StoreReader(store).read_rows([4, 5])
    _copy_shard(store, ("tokens",))
    with pytest.raises(StoreError, match="tokens/c/1/0: shard 1 array 'tokens'"):
        StoreReader(store).read_rows([4, 5])
    assert intact["tokens"].shape == (2, 9)


def _edit_codecs(store: Path, name: str, edit) -> None:
    path = store / name / "zarr.json"
    doc = json.loads(path.read_text())
    edit(doc["codecs"][0]["configuration"])
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(("chain", "what"), [("codecs", "inner chunks"), ("index_codecs", "shard index")])
def test_a_codec_chain_without_crc32c_is_refused(tmp_path, chain, what):
    store = _store(tmp_path / "s.zarr")

    def drop(config):
        config[chain] = [c for c in config[chain] if c["name"] != "crc32c"]

    _edit_codecs(store, "ids", drop)
    expected = rf"array 'ids': ids/zarr.json field 'codecs': .*{what} carry no crc32c"
    with pytest.raises(StoreError, match=expected):
        StoreReader(store)
    problems = verify_store(store)
    assert any(p.array == "ids" and "crc32c" in p.reason for p in problems), problems
    assert summarize(store)["damaged"]


def test_a_chain_without_crc32c_written_through_zarr_is_refused(tmp_path):
    store = _store(tmp_path / "s.zarr", kind="full", vocab=16, rows=8)
    group = zarr.open_group(str(store), mode="r+")
    old = group["target_logprob"]
    values = old[:]
    del group["target_logprob"]
    group.create_array("target_logprob", shape=old.shape, dtype=old.dtype, chunks=(2, 8), shards=(4, 8),
                       compressors=None, fill_value=float("nan"))[:] = values
    with pytest.raises(StoreError, match="target_logprob/zarr.json field 'codecs': the sharding codec's"):
        StoreReader(store)


@pytest.mark.parametrize("damage", ["truncated", "not-an-object", "group-node"])
def test_a_damaged_job_log_does_not_stop_reading_verifying_or_inspecting(tmp_path, damage):
    store = _store(tmp_path / "s.zarr")
    log = store / "jobs" / "zarr.json"
    log.parent.mkdir(exist_ok=True)
    log.write_text({"truncated": '{\n  "attributes": {\n    "cache_j', "not-an-object": "[1, 2]",
                    "group-node": '{"zarr_format": 3, "node_type": "array"}'}[damage])
    assert StoreReader(store).read_rows([0])["ids"].shape == (1, 8, 4)
    assert verify_store(store) == []
    assert summarize(store)["damaged"] == []


def test_an_unreadable_array_metadata_is_named(tmp_path):
    store = _store(tmp_path / "s.zarr")
    path = store / "ids" / "zarr.json"
    path.write_text(path.read_text()[:40])
    with pytest.raises(StoreError, match=r"array 'ids': ids/zarr.json is unreadable"):
        StoreReader(store)
    assert [p.array for p in verify_store(store)] == ["ids"]


def test_bits_arrays_check_against_their_float_checksums(tmp_path):
    """Log-probs stored as bit patterns (the previous layout) are checksummed as the float16
    values committed, and a flipped bit in one is caught."""
    meta = make_meta(rows=12, seq_len=8, k=4, shard_rows=4, chunk_rows=2)
    rows = make_rows(meta)
    store = tmp_path / "s.zarr"
    write_previous_layout(store, meta, rows)
    assert zarr.open_array(str(store / "logprobs")).attrs[BITS_ATTR] == "float16"
    got = StoreReader(store, fields=["logprobs"]).read_rows([0, 5, 11])["logprobs"]
    assert got.dtype == np.float16 and got.tobytes() == rows["logprobs"][[0, 5, 11]].tobytes()
    assert verify_store(store) == []
