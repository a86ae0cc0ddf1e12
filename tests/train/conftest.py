"""Shared fixtures: one thread (CI machines have two cores, shared), tiny token data, chat data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.pipeline.prepare.job import PrepareConfig, prepare
from kdcache.storage.tokens.format import TokenData, open_token_data
from kdcache.storage.tokens.writer import write_documents
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
    return Path(tiny_data.path)


CHAT_VOCAB, CHAT_SEQ_LEN, CHAT_EOS = 64, 32, 1


CHAT_TEMPLATE = ("{% for m in messages %}t2 t{{ m['role'] | length }} {{ m['content'] }} t3 {% endfor %}"
                 "{% if add_generation_prompt %}t2 t9 {% endif %}")
"""A ChatML-like template over the word tokenizer: t2 opens a turn, t4/t9 name the role, t3 ends it."""


def word_tokenizer(vocab: int = CHAT_VOCAB) -> bytes:
    """tokenizer.json of `vocab` space-separated words t0, t1, ...: the data needs one, the
    tests pick ids themselves."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer.to_str().encode()


def add_chat_template(directory: Path | os.PathLike[str]) -> None:
    """The files `kdcache prepare` keeps beside tokenizer.json for chat data: the tokenizer's
    config (special tokens, the template) and chat_template.jinja."""
    directory = Path(directory)  # TokenData.path is a LocalDir: a path-like
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": f"t{CHAT_EOS}",
              "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def chat_documents(n: int, *, seed: int, vocab: int = CHAT_VOCAB, longest: int = 24
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` conversations as (ids, loss mask): a prompt, then one or two answered turns, the
    answers (and only they) trained, as `kdcache prepare --format chat` masks them."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(6, longest + 1))
        ids = rng.integers(1, vocab, length)
        mask = np.zeros(length, dtype=bool)
        turns = np.sort(rng.choice(np.arange(2, length), size=2 if length > 8 else 1, replace=False))
        mask[turns[0]:] = True
        if len(turns) == 2:  # a second user turn inside: untrained again for a while
            mask[(turns[0] + turns[1]) // 2 : turns[1]] = False
        docs.append((ids, mask))
    return docs


def chat_splits() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """The documents of `chat_data`, per split, in order."""
    return {name: chat_documents(n, seed=i)
            for i, (name, n) in enumerate((("teacher", 300), ("student", 300), ("valid", 60)))}


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> TokenData:
    """Conversations packed by document, rows of 33 tokens, vocab 64, about a third of targets trained."""
    return write_documents(tmp_path_factory.mktemp("chat") / "data", word_tokenizer(), CHAT_SEQ_LEN,
                           chat_splits(), eos_token_id=CHAT_EOS)
