"""Students distilled from a logit store on a real S3 API server (moto, tests/s3_server.py).

The token data stays on local disk; the store is an `s3://` URL. A student reading while the
cache job is still writing it gets exactly the batches of the finished store, and
`kdcache train --distill s3://...` trains the model it trains from the same store on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdcache.pipeline.cache.config import CacheConfig
from kdcache.pipeline.cache.job import run_cache
from kdcache.pipeline.cli import main
from kdcache.pipeline.prepare.config import PrepareConfig
from kdcache.pipeline.prepare.job import prepare
from kdcache.storage import read_meta
from kdcache.storage.ledger import committed
from kdcache.storage.location import LocalDir, locate, upload
from kdcache.storage.runs import read_run_rows
from kdcache.train import run as train_run
from kdcache.train.dataset import StoreDataset
from kdcache.train.store_batches import StoreBatches
from tests.pipeline.conftest import make_teacher

pytestmark = [pytest.mark.slow, pytest.mark.ray]
FLAGS = ["--k", "16", "--shard-rows", "8", "--batch-rows", "4", "--quiet"]
BATCH, SEED = 8, 5


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Token data (163 student rows: 21 shards), a teacher, and its store on local disk."""
    root = tmp_path_factory.mktemp("s3distill")
    prepare(PrepareConfig(out=str(root / "data"), source="stdlib", vocab_size=384, seq_len=32,
                          max_tokens=12_000, quiet=True))
    teacher = make_teacher(root / "teacher", root / "data")
    local = root / "local.zarr"
    run_cache(CacheConfig(teacher=str(teacher), data=str(root / "data"), out=str(local), k=16, shard_rows=8,
                          batch_rows=4, quiet=True))
    return {"data": root / "data", "teacher": teacher, "local": local, "shards": read_meta(local).num_shards}


def _end_session(session: int) -> None:
    """SIGKILL every process left in the session `session` (a job's Ray and actors)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ProcessLookupError):
                if os.getsid(int(entry.name)) == session:
                    os.kill(int(entry.name), signal.SIGKILL)


def test_a_student_reading_the_store_on_s3_while_the_cache_job_writes_it_gets_the_finished_stores_batches(
        built, s3, tmp_path):
    url = f"{s3}/store.zarr"
    argv = [sys.executable, "-m", "kdcache.pipeline.cli", "cache", "--teacher", str(built["teacher"]),
            "--data", str(built["data"]), "--out", url, *FLAGS]
    with open(tmp_path / "job.err", "w") as err:
        job = subprocess.Popen(argv, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=err,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not locate(url).is_file("zarr.json"):  # the store exists (its root is uploaded last)
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "job.err").read_text()
            time.sleep(0.05)
        dataset = StoreDataset(url, batch_size=BATCH, seed=SEED, wait_timeout_s=120)
        at_open = len(committed(locate(url)))
        running = job.poll() is None
        read = list(dataset)  # one whole epoch: every row, so every shard, waited for as committed
        code = job.wait(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
        job.wait()
        _end_session(job.pid)
    assert code == 0, (tmp_path / "job.err").read_text()[-3000:]
    assert running and at_open < built["shards"], "the store was finished before the student read it"
    finished = list(StoreDataset(built["local"], batch_size=BATCH, seed=SEED))
    assert len(read) == len(finished) == len(dataset) > 0
    for got, want in zip(read, finished, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_kdcache_train_distills_from_a_store_on_s3_as_from_the_same_store_on_disk(
        built, s3, tmp_path, monkeypatch, capsys):
    url = f"{s3}/store.zarr"
    upload(LocalDir(built["local"]), locate(url))  # the bytes the cache job writes (tests/pipeline/cache)
    prefetch: dict[str, int] = {}

    class Recorded(StoreBatches):
        def __init__(self, path: str, **kwargs) -> None:
            prefetch[path] = kwargs["prefetch"]
            super().__init__(path, **kwargs)

    monkeypatch.setattr(train_run, "StoreBatches", Recorded)
    runs = tmp_path / "runs.parquet"
    rows = {}
    for name, store in (("disk", str(built["local"])), ("s3", url)):
        argv = ["train", "--data", str(built["data"]), "--distill", store, "--out", str(tmp_path / name),
                "--layers", "1", "--rho", "32", "--max-steps", "6", "--batch-size", str(BATCH),
                "--seed", str(SEED), "--threads", "1", "--quiet", "--runs", str(runs)]
        assert main(argv) == 0, capsys.readouterr().err
        rows[name] = json.loads((tmp_path / name / "kdcache.json").read_text())["training"]
    # A remote store is read ahead on CPU too (network latency, not the cores, is its cost).
    assert prefetch == {str(built["local"]): 0, url: 2}
    disk, remote = rows["disk"], rows["s3"]
    assert remote["kind"] == "distill" and remote["steps"] == 6 and remote["k"] == 16
    assert remote["store"] == url  # as given: not a path mangled into `s3:/bucket/...`
    assert disk["store"] == str(built["local"].resolve())
    assert remote["loss_history"] == disk["loss_history"]  # the same batches, the same steps
    assert remote["loss"] == disk["loss"] and remote["teacher_loss"] == disk["teacher_loss"]
    assert [r.store for r in read_run_rows(runs)] == [disk["store"], url]


def test_token_data_and_store_both_on_s3_train_the_student_the_disk_trains(built, s3, tmp_path, capsys):
    data, store = f"{s3}/data", f"{s3}/store.zarr"
    upload(LocalDir(built["data"]), locate(data))  # the bytes prepare publishes (tests/pipeline/prepare)
    upload(LocalDir(built["local"]), locate(store))
    records = {}
    for name, (d, s) in {"disk": (str(built["data"]), str(built["local"])), "s3": (data, store)}.items():
        argv = ["train", "--data", d, "--distill", s, "--out", str(tmp_path / name), "--layers", "1",
                "--rho", "32", "--max-steps", "4", "--batch-size", str(BATCH), "--seed", str(SEED),
                "--threads", "1", "--quiet"]
        assert main(argv) == 0, capsys.readouterr().err
        records[name] = json.loads((tmp_path / name / "kdcache.json").read_text())
    assert records["s3"]["training"]["loss_history"] == records["disk"]["training"]["loss_history"]
    assert records["s3"]["data"]["path"] == data  # the URL as given
    assert records["s3"]["data"]["fingerprint"] == records["disk"]["data"]["fingerprint"]
    # The student carries the data's tokenizer, fetched from the object store.
    carried = (tmp_path / "s3" / "tokenizer.json").read_bytes()
    assert carried == (built["data"] / "tokenizer.json").read_bytes()
