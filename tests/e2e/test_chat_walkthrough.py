"""The README's "Distil on chat data" walkthrough, at a tiny size, through the command line.

SmolLM2-135M-Instruct (imported from the GGUF the dev dependencies ship) is the teacher;
the stdlib chat corpus is prepared with its tokenizer and chat template, cached by the hf
backend, and distilled into a small Hugging Face Llama from `examples/chat_student.json`.
The student directory must be a drop-in model: `transformers` loads it, its tokenizer
carries the teacher's special tokens and chat template, and `apply_chat_template` renders
a conversation exactly as the teacher's tokenizer does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcache.pipeline.cli import main
from kdcache.storage import StoreReader
from kdcache.storage.tokens.format import open_token_data

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MESSAGES = [{"role": "user", "content": "What does json.dumps do?"}]


@pytest.fixture(scope="module")
def walkthrough(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("chat")
    steps = [
        ["prepare", "--source", "stdlib-chat", "--format", "chat",
         "--tokenizer", str(smollm2 / "tokenizer.json"),
         "--seq-len", "256", "--max-tokens", "40000", "--out", str(w / "chat-data"), "--quiet"],
        ["cache", "--teacher", str(smollm2), "--backend", "hf", "--data", str(w / "chat-data"), "--k", "16",
         "--max-rows", "16", "--shard-rows", "8", "--out", str(w / "chat-store"), "--quiet"],
        ["train", "--data", str(w / "chat-data"), "--distill", str(w / "chat-store"),
         "--student-config", str(EXAMPLES / "chat_student.json"), "--tokens", "2048", "--batch-size", "4",
         "--out", str(w / "student"), "--quiet"],
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    return w


def test_the_store_holds_targets_only_where_the_assistant_speaks(walkthrough: Path) -> None:
    data = open_token_data(walkthrough / "chat-data")
    assert data.format == "chat" and data.packing == "documents"
    reader = StoreReader(walkthrough / "chat-store")
    assert reader.meta.data.mask_fingerprint == data.mask_fingerprint("student")
    batch = reader.read_rows(np.arange(reader.meta.rows))
    rows = data.read_rows("student", np.arange(reader.meta.rows))
    trained = rows.trained()
    assert 0.2 < trained.mean() < 0.9  # system and user turns, and the padding, are not trained
    assert np.array_equal(np.asarray(batch["loss_mask"]).astype(bool), rows.loss_mask)
    assert np.isfinite(np.asarray(batch["target_logprob"])[trained]).all()


def test_the_student_is_a_drop_in_chat_model(walkthrough: Path, smollm2: Path) -> None:
    student = walkthrough / "student"
    teacher_tok = AutoTokenizer.from_pretrained(smollm2)
    tok = AutoTokenizer.from_pretrained(student)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (teacher_tok.bos_token, teacher_tok.eos_token,
                                                             teacher_tok.pad_token)
    prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt == teacher_tok.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                                     tokenize=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert out.shape[1] == len(prompt) + 4
    run = json.loads((student / "kdcache.json").read_text())["training"]
    # `tokens` counts trained targets: the assistant's, not every position the steps ran.
    assert 0 < run["tokens"] < run["steps"] * run["batch_size"] * run["seq_len"]
