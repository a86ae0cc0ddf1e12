"""The examples run: a Hugging Face student distilled from a store with `transformers.Trainer`
(from a text store, and from a chat store with gradient accumulation), and with a plain loop
on 2 torchrun ranks (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kdcache.pipeline.cli import main
from kdcache.storage.tokens.writer import write_documents
from tests.train.conftest import CHAT_EOS, CHAT_SEQ_LEN, chat_splits, word_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.ray]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STUDENT = {"model_type": "qwen2", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "tie_word_embeddings": True, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("examples")
    assert main(["prepare", "--out", str(root / "data"), "--vocab-size", "300", "--seq-len", "32",
                 "--max-tokens", "40000", "--quiet"]) == 0
    assert main(["train", "--data", str(root / "data"), "--split", "teacher", "--out", str(root / "teacher"),
                 "--layers", "1", "--rho", "32", "--tokens", "8000", "--quiet", "--threads", "1"]) == 0
    assert main(["cache", "--teacher", str(root / "teacher"), "--data", str(root / "data"),
                 "--out", str(root / "store"), "--k", "16", "--shard-rows", "32"]) == 0
    config = root / "student.json"
    config.write_text(json.dumps(STUDENT))
    return root / "store", config


@pytest.fixture(scope="module")
def chat_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A top-k store of a teacher trained on conversations packed by document."""
    root = tmp_path_factory.mktemp("chat-example")
    write_documents(root / "data", word_tokenizer(), CHAT_SEQ_LEN, chat_splits(), eos_token_id=CHAT_EOS)
    assert main(["train", "--data", str(root / "data"), "--split", "teacher", "--out", str(root / "teacher"),
                 "--layers", "1", "--rho", "32", "--tokens", "8000", "--quiet", "--threads", "1"]) == 0
    assert main(["cache", "--teacher", str(root / "teacher"), "--data", str(root / "data"),
                 "--out", str(root / "store"), "--k", "16", "--shard-rows", "32"]) == 0
    return root / "store"


def _run(cmd: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 20 and result["last_loss"] < result["first_loss"]
    return result


def test_hf_trainer_example(store: tuple[Path, Path], tmp_path: Path) -> None:
    """The saved student loads with transformers' Auto classes, its tokenizer tokenising as the
    data's. A Llama student: AutoTokenizer swaps its own class in for a qwen2 model's generic
    tokenizer (transformers 5.19), whose pre-tokenizer then differs from the data's."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = store
    config = tmp_path / "llama.json"
    config.write_text(json.dumps({**STUDENT, "model_type": "llama"}))
    out = tmp_path / "out"
    _run([sys.executable, str(EXAMPLES / "hf_trainer_distill.py"), "--store", str(path),
          "--data", str(path.parent / "data"), "--student-config", str(config), "--out", str(out)])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.vocab_size == STUDENT["vocab_size"]
    text = "def distil(teacher, student):\n    return student"
    want = Tokenizer.from_file(str(path.parent / "data" / "tokenizer.json")).encode(text).ids
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == want


def test_hf_trainer_example_on_chat_data_with_gradient_accumulation(
    store: tuple[Path, Path], chat_store: Path, tmp_path: Path
) -> None:
    _, config = store
    _run([sys.executable, str(EXAMPLES / "hf_trainer_distill.py"), "--store", str(chat_store),
          "--data", str(chat_store.parent / "data"), "--student-config", str(config),
          "--out", str(tmp_path / "out"), "--grad-accum", "2", "--bf16"])
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_torchrun_example_on_two_ranks(store: tuple[Path, Path]) -> None:
    path, config = store
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                   "--master-addr", "127.0.0.1", "--master-port", str(port),
                   str(EXAMPLES / "torchrun_distill.py"), "--store", str(path),
                   "--student-config", str(config)])
    assert result["world"] == 2


def test_torchrun_example_on_chat_data(store: tuple[Path, Path], chat_store: Path) -> None:
    """Packed conversations through the plain loop: position ids and the document mask reach the student."""
    _, config = store
    result = _run([sys.executable, str(EXAMPLES / "torchrun_distill.py"), "--store", str(chat_store),
                   "--student-config", str(config)])
    assert result["world"] == 1
