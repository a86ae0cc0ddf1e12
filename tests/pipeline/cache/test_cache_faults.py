"""The cache job survives a killed driver and a lost Ray node, and ends byte-identical."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kdcache.pipeline.cache.config import CacheConfig
from kdcache.pipeline.cache.job import run_cache
from kdcache.pipeline.prepare.config import PrepareConfig
from kdcache.pipeline.prepare.job import prepare
from kdcache.storage import StoreReader, read_jobs, verify_store
from kdcache.storage.ledger import committed
from tests.pipeline.conftest import make_teacher
from tests.storage.conftest import store_digest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
JOB = dict(k=16, shard_rows=8, batch_rows=4, quiet=True)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """Enough rows (~100 shards) that a job is still running when we kill part of it."""
    root = tmp_path_factory.mktemp("big")
    prepare(PrepareConfig(out=str(root / "data"), source="stdlib", vocab_size=384, seq_len=32,
                          max_tokens=60_000, quiet=True))
    teacher = make_teacher(root / "teacher", root / "data")
    return root, teacher, root / "data"


@pytest.fixture(scope="module")
def clean_store(big, ray_local):
    root, teacher, data = big
    out = root / "clean.zarr"
    run_cache(CacheConfig(teacher=str(teacher), data=str(data), out=str(out), **JOB))
    return out


def wait_for_commits(store: Path, count: int, proc: subprocess.Popen, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = len(committed(store)) if store.exists() else 0
        if done >= count or proc.poll() is not None:
            return done
        time.sleep(0.01)
    raise AssertionError("the job never committed a shard")


def settled_commits(store: Path, quiet_s: float = 2.0) -> int:
    last, since = -1, time.monotonic()
    while time.monotonic() - since < quiet_s:
        now = len(committed(store))
        if now != last:
            last, since = now, time.monotonic()
        time.sleep(0.05)
    return last


def test_driver_killed_then_resumed(big, clean_store, tmp_path, ray_local):
    _, teacher, data = big
    out = tmp_path / "s.zarr"
    cmd = [sys.executable, "-m", "kdcache.pipeline.cli", "cache", "--teacher", str(teacher),
           "--data", str(data), "--out", str(out), "--k", "16", "--shard-rows", "8",
           "--batch-rows", "4", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_commits(out, 3, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:  # the driver's own Ray processes are orphans now: end them too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    # Actors outlive their driver for a moment and may commit a shard or two more.
    done = settled_commits(out)
    total = StoreReader(out).meta.num_shards
    assert 0 < done < total, "the driver was not killed mid-job"
    assert verify_store(out) == []
    result = run_cache(CacheConfig(teacher=str(teacher), data=str(data), out=str(out), **JOB))
    assert result.shards_written == total - done
    assert verify_store(out) == []
    assert store_digest(out) == store_digest(clean_store)
    # The killed driver logged nothing; the log holds the rerun, which wrote the rest.
    assert [(j.shards, j.tokens > 0) for j in read_jobs(out)] == [(total - done, True)]


NODE_LOSS = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from kdcache.pipeline.cache.config import CacheConfig
    from kdcache.pipeline.cache.job import run_cache
    from kdcache.storage.ledger import committed

    teacher, data, out = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    seen = {}

    def remove_when_started():
        while len(committed(Path(out))) < 2:
            time.sleep(0.01)
        seen["committed_at_removal"] = len(committed(Path(out)))
        cluster.remove_node(node)

    threading.Thread(target=remove_when_started, daemon=True).start()
    result = run_cache(CacheConfig(teacher=teacher, data=data, out=out, workers=2,
                                   k=16, shard_rows=8, batch_rows=4, quiet=True))
    print("REPORT " + json.dumps({**seen, **result.to_json()}), flush=True)
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_node_removed_mid_job(big, clean_store, tmp_path):
    _, teacher, data = big
    out = tmp_path / "s.zarr"
    proc = subprocess.run([sys.executable, "-c", NODE_LOSS, str(teacher), str(data), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    assert report["complete"]
    assert report["committed_at_removal"] < report["shards"], "the node went away after the job"
    assert verify_store(out) == []
    assert store_digest(out) == store_digest(clean_store)
