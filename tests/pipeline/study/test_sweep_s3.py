"""`kdcache sweep` over token data and a store on a real S3 API server (moto, tests/s3_server.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from kdcache.pipeline.cache.config import CacheConfig
from kdcache.pipeline.cache.job import run_cache
from kdcache.storage.location import LocalDir, locate, upload

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_a_sweep_reads_its_data_and_stores_from_s3(token_data: Path, teacher: Path, s3: str,
                                                    tmp_path: Path) -> None:
    store = tmp_path / "store.zarr"
    run_cache(CacheConfig(teacher=str(teacher), data=str(token_data), out=str(store), k=8, quiet=True))
    data_url, store_url = f"{s3}/data", f"{s3}/stores/t0"
    upload(LocalDir(token_data), locate(data_url))
    upload(LocalDir(store), locate(store_url))
    spec = {"data": data_url, "runs": str(tmp_path / "runs.parquet"), "out": str(tmp_path / "students"),
            "defaults": {"rho": 32, "batch_size": 4, "tokens": 512, "checkpoint_every": 0},
            "grid": [{"layers": 1}, {"layers": 1, "distill": store_url}]}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    # Its own process, so its Ray's workers start with this environment (on a cluster every
    # node needs the credentials in its own environment, or an instance role).
    done = subprocess.run([sys.executable, "-m", "kdcache.pipeline.cli", "sweep", "--config",
                           str(tmp_path / "sweep.yaml"), "--json"], capture_output=True, text=True,
                          env=dict(os.environ), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["done"] == 2 and not result["failed"]
    rows = pq.read_table(tmp_path / "runs.parquet").to_pylist()
    assert sorted(r["kind"] for r in rows) == ["distill", "supervised"]
    assert [r["store"] for r in rows if r["kind"] == "distill"] == [store_url]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret not in (tmp_path / "runs.parquet").read_bytes().decode("latin-1")
    for record in (tmp_path / "students").rglob("kdcache.json"):
        assert secret not in record.read_text()
