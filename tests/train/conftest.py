"""Shared fixtures: one thread (CI machines have two cores, shared), tiny token data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdcache.pipeline.prepare.job import PrepareConfig, prepare
from kdcache.storage.tokens.format import TokenData, open_token_data
from kdcache.train.runtime import tune_cpu_allocator

torch.set_num_threads(1)
tune_cpu_allocator()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TokenData:
    """~200k tokens of the standard library, vocab 512, rows of 65 tokens."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(PrepareConfig(out=str(out), vocab_size=512, seq_len=64, max_tokens=200_000, quiet=True))
    return open_token_data(out)


@pytest.fixture
def tiny_data_path(tiny_data: TokenData) -> Path:
    return tiny_data.path
