"""A resumed cache compares the teacher's validation loss with the store's before writing a
shard, so one store never mixes two teachers' targets; and a damaged job log never fails a
store the job has finished."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from kdcache.pipeline.cache.config import CacheConfig
from kdcache.pipeline.cache.job import _log_job, run_cache
from kdcache.pipeline.cli import main
from kdcache.storage import CacheJob, StoreError, StoreWriter, read_jobs, read_meta
from kdcache.storage.integrity import Problem
from kdcache.storage.ledger import committed
from kdcache.storage.verify import repair_store
from kdcache.storage.writer import VALID_RTOL
from tests.storage.conftest import make_meta, tree_digest


def _writer(tmp_path: Path) -> StoreWriter:
    return StoreWriter.open(tmp_path / "s.zarr", make_meta(rows=8, shard_rows=4))


def test_the_first_measurement_is_recorded_and_an_equal_one_accepted(tmp_path):
    writer = _writer(tmp_path)
    writer.record_valid_loss(3.25, 640)
    assert (read_meta(writer.path).valid_loss, read_meta(writer.path).valid_tokens) == (3.25, 640)
    reopened = _writer(tmp_path)
    reopened.record_valid_loss(3.25, 640)
    reopened.record_valid_loss(3.25 * (1 + VALID_RTOL / 2), 640)


@pytest.mark.parametrize(("loss", "tokens", "match"), [
    (3.25 * (1 + 10 * VALID_RTOL), 640, r"field 'valid_loss' is 3.25 but this job's teacher measures"),
    (3.40, 640, r"another teacher \(or other weights\) would write the remaining shards"),
    (3.25, 320, r"field 'valid_tokens' is 640 but this job measures the teacher on 320"),
])
def test_another_measurement_is_refused_naming_the_store_and_field(tmp_path, loss, tokens, match):
    _writer(tmp_path).record_valid_loss(3.25, 640)
    before = tree_digest(tmp_path)
    with pytest.raises(StoreError, match=r"s.zarr/zarr.json: attribute 'kdcache': .*" + match):
        _writer(tmp_path).record_valid_loss(loss, tokens)
    assert tree_digest(tmp_path) == before


def _cache(teacher: Path, data: Path, out: Path, **kw) -> None:
    run_cache(CacheConfig(teacher=str(teacher), data=str(data), out=str(out), k=8, shard_rows=16,
                          batch_rows=4, quiet=True, **kw))


def _reopen_shard(store: Path, shard: int = 1) -> None:
    """What `kdcache verify --repair` does to a damaged shard: the next job rewrites it."""
    assert repair_store(store, [Problem(shard, "ids", "checksum does not match the ledger")]) == [shard]


@pytest.fixture(scope="module")
def built(token_data, teacher, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "store.zarr"
    _cache(teacher, token_data, out)
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_a_resume_with_the_same_teacher_measures_the_same_loss_exactly(built, teacher, token_data, tmp_path):
    """Same teacher, same rows: bit-identical, at any number of workers (so VALID_RTOL is margin
    for other devices' kernels, not for this machine)."""
    store = tmp_path / "store.zarr"
    shutil.copytree(built, store)
    recorded = read_meta(store).valid_loss
    assert recorded is not None and math.isfinite(recorded)
    _reopen_shard(store)
    _cache(teacher, token_data, store, workers=2)
    meta = read_meta(store)
    assert meta.complete and meta.valid_loss == recorded


@pytest.mark.ray
@pytest.mark.slow
def test_a_resume_whose_teacher_measures_another_loss_writes_nothing(built, teacher, token_data, tmp_path):
    store = tmp_path / "store.zarr"
    shutil.copytree(built, store)
    _reopen_shard(store)
    path = store / "zarr.json"
    doc = json.loads(path.read_text())
    doc["attributes"]["kdcache"]["valid_loss"] += 0.01  # as another teacher measured it
    path.write_text(json.dumps(doc))
    before = tree_digest(store)
    with pytest.raises(StoreError, match=r"store.zarr/zarr.json: attribute 'kdcache': field 'valid_loss'"):
        _cache(teacher, token_data, store)
    assert tree_digest(store) == before and 1 not in committed(store)


@pytest.mark.ray
@pytest.mark.slow
def test_a_resume_over_a_torn_job_log_finishes_and_keeps_the_old_log(built, teacher, token_data, tmp_path,
                                                                   capsys):
    store = tmp_path / "store.zarr"
    shutil.copytree(built, store)
    _reopen_shard(store)
    log = store / "jobs" / "zarr.json"
    torn = log.read_text()[:30]
    log.write_text(torn)
    argv = ["cache", "--teacher", str(teacher), "--data", str(token_data), "--out", str(store), "--k", "8",
            "--shard-rows", "16", "--batch-rows", "4", "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "jobs/zarr.json was unreadable: kept as zarr.json.unreadable-" in err
    assert read_meta(store).complete and len(read_jobs(store)) == 1
    kept = [p for p in log.parent.iterdir() if p.name.startswith("zarr.json.unreadable-")]
    assert len(kept) == 1 and kept[0].read_text() == torn


def test_a_log_that_cannot_be_written_is_reported_not_raised(tmp_path, capsys):
    writer = _writer(tmp_path)
    (Path(str(writer.path)) / "jobs").write_text("a file where the log's folder goes")
    _log_job(str(writer.path), CacheJob(seconds=1.0, tokens=8, shards=1, workers=1, backend="native"))
    assert "s.zarr: this job's timing was not logged" in capsys.readouterr().err
