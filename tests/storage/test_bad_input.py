"""Bad input: a clear StoreError naming the field, and not one byte of the store changed."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from kdcache.storage import StoreError, StoreWriter

from .conftest import make_meta, make_rows, shard_of, tree_digest


@pytest.fixture
def half_built(store_path):
    meta = make_meta(rows=8, shard_rows=4)
    rows = make_rows(meta)
    writer = StoreWriter.open(store_path, meta)
    writer.write_shard(0, shard_of(meta, rows, 0))
    return writer, meta, shard_of(meta, rows, 1)


def _bad(good, name, fn):
    bad = dict(good)
    bad[name] = fn(good[name].copy())
    return bad


def _nan(a):
    a[0, 0, 0] = np.nan
    return a


def _inf(a):
    a[1, 2] = np.inf
    return a


def _big_id(a):
    a[0, 0, 0] = 300
    return a


def _big_token(a):
    a[0, 0] = 300
    return a


def _unsorted(a):
    a[0, 0, :2] = a[0, 0, 1::-1]
    return a


CASES = {
    "shape": (lambda g: _bad(g, "ids", lambda a: a[:, :-1]), "'ids' has shape"),
    "dtype": (lambda g: _bad(g, "logprobs", lambda a: a.astype(np.float32)), "'logprobs' has dtype"),
    "missing array": (lambda g: {k: v for k, v in g.items() if k != "tail_logmass"}, "missing"),
    "nan logprobs": (lambda g: _bad(g, "logprobs", _nan), "'logprobs' has NaN"),
    "inf target": (lambda g: _bad(g, "target_logprob", _inf), "'target_logprob' has NaN or inf"),
    "id >= vocab": (lambda g: _bad(g, "ids", _big_id), "'ids' has ids >= vocab_size"),
    "token >= vocab": (lambda g: _bad(g, "tokens", _big_token), "'tokens' has ids outside"),
    "unsorted": (lambda g: _bad(g, "logprobs", _unsorted), "not sorted"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_shard_leaves_store_unchanged(half_built, case):
    writer, _, good = half_built
    make, message = CASES[case]
    before = tree_digest(writer.path)
    with pytest.raises(StoreError, match=message):
        writer.write_shard(1, make(good))
    assert tree_digest(writer.path) == before
    assert writer.pending_shards() == [1]


def test_shard_index_out_of_range(half_built):
    writer, _, good = half_built
    before = tree_digest(writer.path)
    with pytest.raises(StoreError, match="shard index 2 out of range 0..1"):
        writer.write_shard(2, good)
    assert tree_digest(writer.path) == before


@pytest.mark.parametrize(
    ("change", "field"),
    [(dict(teacher="teacher-b"), "teacher.fingerprint"), (dict(k=8), "k:"),
     (dict(temperature=2.0), "temperature"), (dict(vocab=301), "vocab_size"),
     (dict(seq_len=9), "seq_len"), (dict(kind="sampled"), "kind")],
)
def test_reopen_with_other_metadata_is_refused(half_built, change, field):
    writer, _, _ = half_built
    before = tree_digest(writer.path)
    with pytest.raises(StoreError, match=field):
        StoreWriter.open(writer.path, make_meta(**{"rows": 8, "shard_rows": 4, **change}))
    assert tree_digest(writer.path) == before


def test_path_is_a_file(tmp_path):
    path = tmp_path / "file.zarr"
    path.write_text("hello")
    with pytest.raises(StoreError, match="is a file"):
        StoreWriter.open(path, make_meta())
    assert path.read_text() == "hello"


def test_path_is_not_a_kdcache_store(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="no zarr.json"):
        StoreWriter.open(plain, make_meta())
    group = tmp_path / "group.zarr"
    zarr.open_group(str(group), mode="w")
    before = tree_digest(group)
    with pytest.raises(StoreError, match="no 'kdcache' group attribute"):
        StoreWriter.open(group, make_meta())
    assert tree_digest(group) == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(k=0), "'k' must be >= 1"), (dict(k=400), "exceeds 'vocab_size'"),
     (dict(temperature=0.0), "temperature"), (dict(shard_rows=3), "must divide")],
)
def test_invalid_metadata(kwargs, message):
    with pytest.raises(StoreError, match=message):
        make_meta(**kwargs)
