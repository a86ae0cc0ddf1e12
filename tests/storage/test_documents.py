"""Stores over data packed by document: the loss mask and position ids are stored, checked,
checksummed and read like any array, and only trained positions hold targets."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import zarr

from kdcache.storage import (
    DOCUMENT_ARRAYS,
    StoreError,
    StoreReader,
    StoreWriter,
    ledger,
    read_meta,
    summarize,
    verify_store,
)
from kdcache.storage.layout import untrained_fill

from .conftest import make_meta, make_rows, shard_of
from .test_corruption import flip


def build(path, meta, rows):
    writer = StoreWriter.open(path, meta)
    for shard in writer.pending_shards():
        writer.write_shard(shard, shard_of(meta, rows, shard))
    writer.finalize()
    return writer


@pytest.mark.parametrize("kind", ["topk", "full", "sampled"])
def test_mask_and_positions_come_back_and_count_trained_tokens(store_path, kind):
    meta = make_meta(kind, rows=9, seq_len=16, vocab=200, k=8, shard_rows=3, chunk_rows=3, documents=True)
    rows = make_rows(meta)
    writer = build(store_path, meta, rows)
    got = StoreReader(store_path).read_rows(np.arange(meta.rows))
    assert set(DOCUMENT_ARRAYS) <= got.keys()
    assert got["loss_mask"].dtype == np.uint8 and got["position_ids"].dtype == np.int32
    for name, values in rows.items():
        assert got[name].tobytes() == values.tobytes(), name
    trained = rows["loss_mask"][:, 1:] == 1
    assert 0 < trained.sum() < trained.size
    nll = -rows["target_logprob"][trained].astype(np.float64)
    assert writer.meta.teacher_loss == pytest.approx(nll.mean(), rel=1e-12)
    info = summarize(store_path)
    assert info["trained_tokens"] == trained.sum() and info["tokens"] == trained.size
    assert info["bytes_per_trained_token"] == pytest.approx(info["bytes"] / trained.sum())
    assert verify_store(store_path) == []


def test_a_store_without_documents_has_no_mask_arrays(store_path):
    meta = make_meta()
    build(store_path, meta, make_rows(meta))
    assert not read_meta(store_path).documents
    assert set(DOCUMENT_ARRAYS).isdisjoint(StoreReader(store_path).read_rows([0]))
    assert summarize(store_path)["trained_tokens"] == meta.rows * meta.seq_len
    with pytest.raises(StoreError, match=r"has no arrays \['loss_mask'\]"):
        StoreReader(store_path, fields=("tokens", "loss_mask"))


def test_older_metadata_without_a_mask_fingerprint_reads(store_path):
    """A store made before the field existed (its attribute lacks it) resumes and reads."""
    meta = make_meta()
    StoreWriter.open(store_path, meta)
    group = zarr.open_group(str(store_path), mode="r+")
    attrs = dict(group.attrs["kdcache"])
    attrs["data"] = {k: v for k, v in attrs["data"].items() if k != "mask_fingerprint"}
    group.attrs["kdcache"] = attrs
    build(store_path, meta, make_rows(meta))
    assert read_meta(store_path).data.mask_fingerprint == ""
    assert StoreReader(store_path).read_rows([0])["tokens"].shape == (1, meta.seq_len + 1)
    assert verify_store(store_path) == []


def test_another_mask_is_refused_on_resume(store_path):
    meta = make_meta(documents=True)
    StoreWriter.open(store_path, meta)
    other = replace(meta, data=replace(meta.data, mask_fingerprint="other"))
    with pytest.raises(StoreError, match="data.mask_fingerprint: 'mask-fp' != 'other'"):
        StoreWriter.open(store_path, other)


def _bad(meta, rows, name, edit):
    shard = {k: v.copy() for k, v in shard_of(meta, rows, 0).items()}
    edit(shard[name])
    return shard


@pytest.mark.parametrize(("name", "edit", "message"), [
    ("loss_mask", lambda a: a.__setitem__((0, 3), 2), "loss_mask holds 2, not 0 or 1"),
    ("loss_mask", lambda a: a.__setitem__((0, 0), 1), "first token is marked trained"),
    ("position_ids", lambda a: a.__setitem__((0, 0), 1), "a row does not start a document"),
    ("position_ids", lambda a: a.__setitem__((1, slice(2, None)), 7), "neither restart at 0 nor step by 1"),
])
def test_inconsistent_mask_or_positions_are_refused(store_path, name, edit, message):
    meta = make_meta(documents=True)
    rows = make_rows(meta)
    writer = StoreWriter.open(store_path, meta)
    with pytest.raises(StoreError, match=message):
        writer.write_shard(0, _bad(meta, rows, name, edit))
    assert writer.pending_shards() == list(range(meta.num_shards))


@pytest.mark.parametrize("name", ["ids", "logprobs", "tail_logmass", "target_logprob"])
def test_targets_at_untrained_positions_are_refused(store_path, name):
    meta = make_meta(documents=True)
    rows = make_rows(meta)
    untrained = np.argwhere(rows["loss_mask"][:4, 1:] == 0)[0]
    value = {"ids": 5, "logprobs": -1.0, "tail_logmass": -2.0, "target_logprob": -3.0}[name]
    shard = {k: v.copy() for k, v in shard_of(meta, rows, 0).items()}
    shard[name][tuple(untrained)] = value
    with pytest.raises(StoreError, match=f"array '{name}' holds targets at untrained positions"):
        StoreWriter.open(store_path, meta).write_shard(0, shard)


def test_shard_without_the_mask_is_refused(store_path):
    meta = make_meta(documents=True)
    shard = shard_of(meta, make_rows(meta), 0)
    del shard["loss_mask"]
    with pytest.raises(StoreError, match=r"missing \['loss_mask'\]"):
        StoreWriter.open(store_path, meta).write_shard(0, shard)


def test_untrained_fill_is_zero_but_sampled_counts_sum_to_draws():
    assert not untrained_fill("logprobs", (3, 4), np.dtype(np.float16)).any()
    counts = untrained_fill("counts", (3, 4), np.dtype(np.uint8), draws=9)
    assert counts[:, 0].tolist() == [9, 9, 9] and not counts[:, 1:].any()


def test_flipped_mask_byte_is_found_by_verify(store_path):
    meta = make_meta(rows=9, seq_len=32, vocab=1000, k=16, shard_rows=3, chunk_rows=3, documents=True)
    build(store_path, meta, make_rows(meta))
    flip(store_path / "loss_mask" / "c" / "1" / "0", 30)
    assert [(p.shard, p.array) for p in verify_store(store_path)] == [(1, "loss_mask")]
    with pytest.raises(StoreError, match="loss_mask.*corrupt"):
        StoreReader(store_path).read_rows([4])


def test_mask_arrays_must_match_the_metadata(store_path, tmp_path):
    """Arrays of a store over documents under metadata that says there are none, and the
    reverse: refused on open, named by inspect."""
    meta = make_meta(documents=True)
    build(store_path, meta, make_rows(meta))
    group = zarr.open_group(str(store_path), mode="r+")
    attrs = json.loads(json.dumps(group.attrs["kdcache"]))
    attrs["data"]["mask_fingerprint"] = ""
    group.attrs["kdcache"] = attrs
    with pytest.raises(StoreError, match="'loss_mask': present, but field 'data.mask_fingerprint' is empty"):
        StoreReader(store_path)
    plain = tmp_path / "plain.zarr"
    build(plain, make_meta(), make_rows(make_meta()))
    group = zarr.open_group(str(plain), mode="r+")
    attrs = json.loads(json.dumps(group.attrs["kdcache"]))
    attrs["data"]["mask_fingerprint"] = "mask-fp"
    group.attrs["kdcache"] = attrs
    damaged = summarize(plain)["damaged"]
    assert damaged[0] == ("store array 'loss_mask': missing (field 'data.mask_fingerprint' says the data "
                          "packs documents)")


def test_verify_checks_the_committed_mask_itself(store_path):
    """A mask committed by another writer, its checksum in the ledger matching, is still
    checked by verify (kdcache's writer refuses such a shard before writing it)."""
    meta = make_meta(documents=True)
    rows = make_rows(meta)
    build(store_path, meta, rows)
    bad = rows["loss_mask"][0:4].copy()
    bad[0, 0] = 1
    zarr.open_array(str(store_path / "loss_mask"), mode="r+")[0:4] = bad
    entry = store_path / "ledger" / "shard-000000" / "zarr.json"
    doc = json.loads(entry.read_text())
    doc["attributes"]["arrays"]["loss_mask"] = asdict(ledger.checksum(bad))
    entry.write_text(json.dumps(doc))
    problems = verify_store(store_path)
    assert [(p.shard, p.array) for p in problems] == [(0, "loss_mask")]
    assert "first token is marked trained" in problems[0].reason
