"""`kdcache train` on chat data end to end: supervised, from a store the cache job wrote, and
online; counts are of trained tokens; the student directory is a drop-in chat model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kdcache.pipeline.cache.config import CacheConfig
from kdcache.pipeline.cache.job import run_cache
from kdcache.storage import read_meta
from kdcache.storage.tokens.format import TokenData
from kdcache.storage.tokens.writer import write_documents
from kdcache.train.batches import TokenBatches
from kdcache.train.config import ModelConfig
from kdcache.train.job import TrainJobConfig
from kdcache.train.model import build_model
from kdcache.train.model_dir import save_model_dir
from kdcache.train.run import run_training, trained_per_row
from tests.train.conftest import CHAT_EOS, CHAT_SEQ_LEN, add_chat_template, chat_splits, word_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BATCH, TOKENS = 8, 1500


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ray_local: Any) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("chat-runs")
    data = write_documents(root / "data", word_tokenizer(), CHAT_SEQ_LEN, chat_splits(),
                           eos_token_id=CHAT_EOS)
    add_chat_template(data.path)
    teacher = build_model(ModelConfig(layers=1, vocab_size=data.vocab_size, rho=32, head_dim=16), seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10.0)  # peaked, like a trained LM
    save_model_dir(teacher, root / "teacher", tokenizer=data.tokenizer_path)
    run_cache(CacheConfig(teacher=str(root / "teacher"), data=str(data.path), out=str(root / "store"), k=8,
                          quiet=True))
    return {"data": data, "root": root, "store": root / "store", "teacher": root / "teacher"}


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for the cache job, shut down after this module if it started it."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


def _run(world: dict[str, Any], name: str, **flags: Any) -> dict[str, Any]:
    out = world["root"] / name
    cfg = TrainJobConfig.from_flat(data=str(world["data"].path), out=str(out), layers=1, rho=32, head_dim=16,
                                   batch_size=BATCH, tokens=TOKENS, checkpoint_every=0, threads=1, quiet=True,
                                   **flags)
    result = run_training(cfg)
    assert result.row is not None
    return {"row": result.row, "out": out,
            "training": json.loads((out / "kdcache.json").read_text())["training"]}


def _trained_tokens_seen(data: TokenData, steps: int) -> int:
    """Trained targets of the first `steps` batches every source of seed 0 reads."""
    source = TokenBatches(data, "student", batch_size=BATCH, seed=0)
    return sum(source.next_batch().tokens for _ in range(steps))


@pytest.mark.parametrize("objective", ["supervised", "distill", "online"])
def test_a_chat_run_counts_trained_tokens(world: dict[str, Any], objective: str) -> None:
    data: TokenData = world["data"]
    extra = {"supervised": {}, "distill": {"distill": str(world["store"])},
             "online": {"online_teacher": str(world["teacher"])}}[objective]
    run = _run(world, objective, **extra)
    row, training = run["row"], run["training"]
    steps = math.ceil(TOKENS / (BATCH * trained_per_row(data, "student")))
    assert training["steps"] == steps and row.kind == objective
    # Every source reads the same rows in the same order: the row counts their trained targets.
    assert row.tokens == _trained_tokens_seen(data, steps) < steps * BATCH * data.seq_len
    assert training["eval_tokens"] == data.trained_tokens("valid")
    assert math.isfinite(row.loss) and row.loss < math.log(data.vocab_size) + 1  # random tokens: ~log V
    assert row.flops is not None and row.flops > 6 * row.params * steps * BATCH * data.seq_len
    if objective == "distill":  # L_T is the teacher's loss on the valid split's trained tokens
        assert row.teacher_loss == read_meta(world["store"]).valid_loss


def test_a_student_directory_is_a_drop_in_chat_model(world: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _run(world, "drop-in")["out"]
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (Path(world["data"].path) / name).read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "t20 t21"}, {"role": "assistant", "content": "t30"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert text == "t2 t4 t20 t21 t3 t2 t9 t30 t3 "
    ids = tokenizer(text)["input_ids"]
    assert ids == [2, 4, 20, 21, 3, 2, 9, 30, 3] and tokenizer.eos_token == f"t{CHAT_EOS}"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), world["data"].vocab_size)
