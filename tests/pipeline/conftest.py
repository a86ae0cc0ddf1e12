"""Fixtures for the cache-job tests: a small token dataset, teachers, and a local Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdcache.pipeline.prepare.job import PrepareConfig, prepare
from kdcache.storage.tokens import writer as prepare_write
from kdcache.storage.tokens.format import open_token_data
from kdcache.train.config import ModelConfig
from kdcache.train.model import build_model
from kdcache.train.model_dir import save_model_dir

VOCAB, SEQ_LEN = 384, 32


def make_teacher(out: Path, data: Path, *, seed: int = 0, vocab: int | None = None,
                 sharpen: float = 10.0) -> Path:
    """An untrained family model whose output layer is scaled up so its distributions are
    peaked like a trained LM's (near-uniform ones make top-k sets a matter of ties)."""
    tokens = open_token_data(data)
    # head_dim 32: vLLM's CPU attention has no kernel for 16.
    cfg = ModelConfig(layers=2, vocab_size=vocab or tokens.vocab_size, rho=32, head_dim=32)
    model = build_model(cfg, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    save_model_dir(model, out, tokenizer=tokens.tokenizer_path)
    return out


@pytest.fixture(scope="session")
def token_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "data"
    prepare(PrepareConfig(out=str(out), source="stdlib", vocab_size=VOCAB, seq_len=SEQ_LEN,
                          max_tokens=12_000, quiet=True))
    return out


@pytest.fixture(scope="session")
def teacher(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "teacher", token_data)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session; the cache job reuses an initialised Ray."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def interrupt_at_third_shard(monkeypatch: pytest.MonkeyPatch):
    """Ctrl-C in the driver once two shards are on their way to disk; returns the original."""
    emit, calls = prepare_write.SplitWriter._emit, []

    def interrupt(self, rows):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return emit(self, rows)

    monkeypatch.setattr(prepare_write.SplitWriter, "_emit", interrupt)
    return emit
