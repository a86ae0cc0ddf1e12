"""The cache-job log: every field validated on read and named with its file, appends that
never tear the log, and a damaged log set aside rather than blocking or silently lost."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from kdcache.pipeline.study.cost import cache_timing
from kdcache.storage import CacheJob, StoreError, StoreWriter, append_job, read_jobs

from .conftest import make_meta, make_rows, shard_of

JOB = CacheJob(seconds=12.5, tokens=640, shards=3, workers=2, backend="native", startup_seconds=4.0)


def _log(store: Path) -> Path:
    return store / "jobs" / "zarr.json"


def _write_log(store: Path, entries) -> None:
    _log(store).parent.mkdir(parents=True, exist_ok=True)
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {"cache_jobs": entries}}
    _log(store).write_text(json.dumps(doc))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    meta = make_meta(rows=8, shard_rows=4)
    writer = StoreWriter.open(tmp_path / "s.zarr", meta)
    rows = make_rows(meta)
    for shard in writer.pending_shards():
        writer.write_shard(shard, shard_of(meta, rows, shard))
    writer.finalize()
    return tmp_path / "s.zarr"


def test_appends_read_back_in_order_and_keep_fields_a_newer_kdcache_logged(store):
    assert read_jobs(store) == []
    _write_log(store, [{**asdict(JOB), "gpu": "H100"}])
    assert append_job(store, CacheJob(seconds=1.0, tokens=64, shards=1, workers=1, backend="hf")) is None
    assert [j.backend for j in read_jobs(store)] == ["native", "hf"]
    assert json.loads(_log(store).read_text())["attributes"]["cache_jobs"][0]["gpu"] == "H100"
    assert sorted(p.name for p in _log(store).parent.iterdir()) == ["zarr.json"]  # no temporary left


def test_an_old_log_without_startup_seconds_reads(store):
    entry = asdict(JOB)
    del entry["startup_seconds"]
    _write_log(store, [entry])
    assert read_jobs(store)[0].startup_seconds == 0.0


BAD = [
    ("seconds", "abc", r"field 'seconds' must be a finite number of seconds in \(0, 1e\+09\), got 'abc'"),
    ("seconds", 1e30, r"field 'seconds' .* got 1e\+30"),
    ("seconds", -3.0, r"field 'seconds' .* got -3.0"),
    ("seconds", 0, r"field 'seconds' .* got 0"),
    ("seconds", True, r"field 'seconds' .* got True"),
    ("startup_seconds", -1, r"field 'startup_seconds' must be a finite number of seconds in \[0"),
    ("tokens", 1.5, r"field 'tokens' must be an integer in \[0, 1e\+15\), got 1.5"),
    ("tokens", -1, r"field 'tokens' .* got -1"),
    ("shards", 0, r"field 'shards' must be an integer in \[1"),
    ("workers", "2", r"field 'workers' .* got '2'"),
    ("backend", 3, r"field 'backend' must be a non-empty string, got 3"),
]


@pytest.mark.parametrize(("field", "value", "match"), BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_an_invalid_field_is_named_with_the_log_file(store, field, value, match):
    _write_log(store, [asdict(JOB), {**asdict(JOB), field: value}])
    with pytest.raises(StoreError, match=rf"s.zarr/jobs/zarr.json: cache_jobs\[1\]: {match}"):
        read_jobs(store)


def test_a_non_finite_seconds_is_refused(store):
    _log(store).parent.mkdir()
    _log(store).write_text('{"attributes": {"cache_jobs": [{"seconds": NaN, "tokens": 1, "shards": 1, '
                           '"workers": 1, "backend": "native"}]}}')
    with pytest.raises(StoreError, match=r"cache_jobs\[0\]: field 'seconds' .* got nan"):
        read_jobs(store)


@pytest.mark.parametrize(("text", "match"), [
    ('{\n  "attributes": {\n    "cache_j', r"jobs/zarr.json: the cache-job log is not readable JSON"),
    ('{"attributes": {"cache_jobs": {"seconds": 1}}}', r"field 'cache_jobs' must be a list, got dict"),
    ('{"attributes": {"cache_jobs": [7]}}', r"cache_jobs\[0\] must be an object, got 7"),
    ('{"attributes": {"cache_jobs": [{"seconds": 1.0}]}}', r"cache_jobs\[0\]: missing field 'tokens'"),
    ('[1]', r"field 'attributes' must be an object"),
])
def test_an_unreadable_log_is_named(store, text, match):
    _log(store).parent.mkdir()
    _log(store).write_text(text)
    with pytest.raises(StoreError, match=match):
        read_jobs(store)


@pytest.mark.parametrize("text", ['{\n  "attributes": {\n    "cache_j',
                                  '{"attributes": {"cache_jobs": [{"seconds": "abc", "tokens": 1, '
                                  '"shards": 1, "workers": 1, "backend": "x"}]}}'])
def test_append_sets_an_unreadable_log_aside_and_starts_a_new_one(store, text):
    _log(store).parent.mkdir()
    _log(store).write_text(text)
    aside = append_job(store, JOB)
    assert aside is not None and Path(aside).parent == _log(store).parent
    assert Path(aside).read_text() == text  # its bytes are kept, not lost
    assert read_jobs(store) == [JOB]


def test_an_invalid_job_is_refused_before_the_log_is_touched(store):
    append_job(store, JOB)
    before = _log(store).read_bytes()
    with pytest.raises(StoreError, match=r"new entry: field 'seconds'"):
        append_job(store, CacheJob(seconds=float("inf"), tokens=1, shards=1, workers=1, backend="native"))
    assert _log(store).read_bytes() == before


def test_the_cost_model_refuses_an_invalid_log_naming_it(store):
    _write_log(store, [{**asdict(JOB), "seconds": -5.0}])
    with pytest.raises(StoreError, match=r"jobs/zarr.json: cache_jobs\[0\]: field 'seconds'"):
        cache_timing(str(store), 100.0, rho=32)


def test_the_cost_model_sums_the_logged_jobs(store):
    _write_log(store, [asdict(JOB), asdict(JOB)])
    timing = cache_timing(str(store), 100.0, rho=32)
    assert timing is not None and (timing.seconds, timing.tokens) == (25.0, 1280.0)
    _log(store).unlink()
    assert cache_timing(str(store), 100.0, rho=32) is None
