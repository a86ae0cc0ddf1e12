"""Hugging Face students through `kdcache train`: from a config or a directory, supervised,
offline and online, a padded output layer, 2 Ray Train ranks against 1, and chat data (a
student distilled on conversations is a drop-in chat model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kdcache.pipeline.cli import main
from kdcache.storage.tokens.writer import write_documents
from tests.train.conftest import (
    CHAT_EOS,
    CHAT_SEQ_LEN,
    CHAT_VOCAB,
    add_chat_template,
    chat_splits,
    word_tokenizer,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REAL_IDS, PADDED_ROWS = 384, 400
LLAMA = {  # a Llama-shaped student whose output layer pads the 384 ids to 400 rows, untied
    "model_type": "llama", "vocab_size": PADDED_ROWS, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False,
    "max_position_embeddings": 64,
}
QWEN = {  # Qwen2-shaped, tied embeddings, exactly the tokenizer's ids
    "model_type": "qwen2", "vocab_size": REAL_IDS, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    paths = {name: root / name for name in ("data", "teacher", "topk")}
    assert main(["prepare", "--out", str(paths["data"]), "--vocab-size", str(REAL_IDS), "--seq-len", "32",
                 "--max-tokens", "60000", "--quiet"]) == 0
    assert main(["train", "--data", str(paths["data"]), "--split", "teacher", "--out", str(paths["teacher"]),
                 "--layers", "2", "--rho", "32", "--tokens", "20000", "--quiet", "--threads", "1"]) == 0
    assert main(["cache", "--teacher", str(paths["teacher"]), "--data", str(paths["data"]),
                 "--out", str(paths["topk"]), "--k", "16", "--shard-rows", "32"]) == 0
    for name, config in (("llama", LLAMA), ("qwen", QWEN)):
        paths[name] = root / f"{name}.json"
        paths[name].write_text(json.dumps(config))
    return paths


def _train(world: dict[str, Path], out: Path, *extra: str) -> dict:
    argv = ["train", "--data", str(world["data"]), "--out", str(out), "--tokens", str(16 * 8 * 32),
            "--batch-size", "8", "--lr", "1e-3", "--weight-decay", "0", "--checkpoint-every", "4",
            "--quiet", "--threads", "1", "--runs", str(out.parent / "runs.parquet"), *extra]
    assert main(argv) == 0
    return json.loads((out / "kdcache.json").read_text())["training"]


def _non_embedding(model: torch.nn.Module) -> int:
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


@pytest.mark.parametrize("objective", ["supervised", "distill", "online"])
def test_a_padded_hf_student_trains_over_the_real_ids(world: dict[str, Path], tmp_path: Path,
                                                      objective: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    extra = {"supervised": [], "distill": ["--distill", str(world["topk"])],
             "online": ["--online-teacher", str(world["teacher"])]}[objective]
    out = tmp_path / "s"
    row = _train(world, out, "--student-config", str(world["llama"]), *extra)
    trained = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert isinstance(trained, LlamaForCausalLM)  # loads as its own class
    assert row["params"] == _non_embedding(trained) and row["kind"] == objective
    assert row["layers"] == 2 and row["d_model"] == 32 and row["vocab_size"] == REAL_IDS
    assert np.isfinite(row["loss"]) and row["loss"] < np.log(REAL_IDS)
    # The padded rows took no gradient (and, without weight decay, did not move from their init).
    torch.manual_seed(0)
    values = dict(LLAMA)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values))
    head, init = trained.get_output_embeddings().weight, fresh.get_output_embeddings().weight
    assert torch.equal(head[REAL_IDS:], init[REAL_IDS:])
    assert not torch.equal(head[:REAL_IDS], init[:REAL_IDS])
    assert pq.read_table(tmp_path / "runs.parquet").num_rows == 1


def test_a_student_directory_trains_on_from_its_weights(world: dict[str, Path], tmp_path: Path) -> None:
    first = _train(world, tmp_path / "a", "--student-config", str(world["qwen"]))
    again = _train(world, tmp_path / "b", "--student", str(tmp_path / "a"), "--seed", "1")
    from safetensors.torch import load_file

    from kdcache.train.student import load_hf_student

    # It starts from the saved weights (exactly), so twice the training ends lower.
    saved = load_file(str(tmp_path / "a" / "model.safetensors"))
    loaded = load_hf_student(str(tmp_path / "a"), vocab=REAL_IDS, data="data").lm.state_dict()
    assert saved and all(torch.equal(loaded[name], tensor) for name, tensor in saved.items())
    assert again["loss"] < first["loss"]


def test_two_ray_train_workers_train_the_one_rank_hf_student(world: dict[str, Path], tmp_path: Path) -> None:
    flags = ("--student-config", str(world["qwen"]), "--distill", str(world["topk"]))
    one = _train(world, tmp_path / "one", *flags)
    two = _train(world, tmp_path / "two", *flags, "--workers", "2")
    assert two["world"] == 2 and two["tokens"] == one["tokens"]
    np.testing.assert_allclose(two["loss_history"], one["loss_history"], rtol=1e-3)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-3)
    rows = pq.read_table(tmp_path / "runs.parquet").to_pylist()
    assert sorted(r["run_id"] for r in rows) == ["one", "two"]


def test_a_killed_tied_student_resumes_exactly(world: dict[str, Path], tmp_path: Path) -> None:
    """A tied student's checkpoint (lm_head is the embedding) saves, and resumes bit-exactly."""
    import os
    import signal
    import subprocess
    import sys
    import time

    flags = ["--student-config", str(world["qwen"]), "--distill", str(world["topk"])]
    whole = _train(world, tmp_path / "whole", *flags)
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "kdcache.pipeline.cli", "train", "--data", str(world["data"]),
            "--out", str(out), "--tokens", str(16 * 8 * 32), "--batch-size", "8", "--lr", "1e-3",
            "--weight-decay", "0", "--checkpoint-every", "4", "--quiet", "--threads", "1", *flags]
    proc = subprocess.Popen(argv, env={**os.environ, "OMP_NUM_THREADS": "1"})
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.is_file() and not (out / "kdcache.json").exists(), "ended before a checkpoint"
    step = json.loads(state.read_text())["step"]
    resumed = _train(world, out, *flags)
    assert resumed["loss_history"] == whole["loss_history"][step:]
    assert resumed["loss"] == whole["loss"]


def test_an_hf_student_distilled_on_chat_data_is_a_drop_in_chat_model(world: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    """Conversations packed by document (a third of the targets trained), a teacher and a store
    of them, an HF student distilled from it: its directory carries the data's tokenizer config
    and chat template, so `AutoTokenizer.apply_chat_template` and the model load from it alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_documents(tmp_path / "chat", word_tokenizer(), CHAT_SEQ_LEN, chat_splits(),
                           eos_token_id=CHAT_EOS)
    add_chat_template(data.path)
    assert main(["train", "--data", str(data.path), "--split", "teacher", "--out", str(tmp_path / "teacher"),
                 "--layers", "1", "--rho", "32", "--tokens", "8000", "--quiet", "--threads", "1"]) == 0
    assert main(["cache", "--teacher", str(tmp_path / "teacher"), "--data", str(data.path),
                 "--out", str(tmp_path / "store"), "--k", "16", "--shard-rows", "32"]) == 0
    out, llama = tmp_path / "student", str(world["llama"])
    assert main(["train", "--data", str(data.path), "--out", str(out), "--student-config", llama,
                 "--distill", str(tmp_path / "store"), "--tokens", "4000", "--batch-size", "8", "--quiet",
                 "--threads", "1", "--runs", str(tmp_path / "runs.parquet")]) == 0
    row = pq.read_table(tmp_path / "runs.parquet").to_pylist()[0]
    # --tokens counts trained tokens: whole steps of ~8 rows' mean, so within a step's positions.
    assert row["kind"] == "distill" and abs(row["tokens"] - 4000) < 8 * CHAT_SEQ_LEN
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (Path(data.path) / name).read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "t20 t21"}, {"role": "assistant", "content": "t30"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids == [2, 4, 20, 21, 3, 2, 9, 30, 3] and tokenizer.eos_token == f"t{CHAT_EOS}"
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model(torch.tensor([ids])).logits.shape[-1] == PADDED_ROWS >= CHAT_VOCAB
