"""A teacher nobody here trained: SmolLM2-135M-Instruct from a GGUF file (49,152-token vocabulary).

Imported once per module (`kdcache import-teacher`), checked against the GGUF model as
transformers loads it, then run by the hf and vllm backends over a slice of the stdlib
tokenised with its own tokenizer; both stores must match a direct float64 transformers
computation at the contract test's tolerances.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcache.pipeline.cache import gguf as cache_gguf
from kdcache.pipeline.cache.config import CacheConfig, ImportConfig
from kdcache.pipeline.cache.job import run_cache
from kdcache.pipeline.cache.teachers.native import NativeTeacher
from kdcache.pipeline.cache.teachers.torch_teacher import LOGITS_BUDGET, TorchTeacher
from kdcache.pipeline.cli import main
from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.config import PrepareConfig
from kdcache.pipeline.prepare.job import prepare
from kdcache.storage import StoreReader, verify_store
from kdcache.storage.tokens.format import open_token_data
from tests.pipeline.cache.test_cache import F32_ABS, assert_topk_matches

pytestmark = pytest.mark.slow
VOCAB, ROWS, K = 49152, 8, 64


@pytest.fixture(scope="module")
def gguf_file(smollm2_gguf: Path) -> Path:
    return smollm2_gguf


@pytest.fixture(scope="module")
def smol(smollm2: Path) -> Path:
    """Imported once per session (tests/conftest.py), shared with the chat walkthrough."""
    return smollm2


@pytest.fixture(scope="module")
def gguf_model(gguf_file: Path):
    """The GGUF file as transformers loads it (float32): what the import must reproduce."""
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def smol_data(smol: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smol-data") / "data"
    prepare(PrepareConfig(out=str(out), source="stdlib", tokenizer=str(smol / "tokenizer.json"),
                          seq_len=64, max_tokens=6000, quiet=True))
    return out


def test_import_writes_a_plain_llama(smol):
    config = json.loads((smol / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["vocab_size"] == VOCAB and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (smol / name).is_file()
    record = json.loads((smol / "gguf_import.json").read_text())
    assert record["max_abs_logit_diff"] <= cache_gguf.LOGITS_ATOL
    assert not list(smol.parent.glob(".smollm2.tmp-*"))


def test_converted_logits_equal_the_gguf_models(smol, gguf_model, smol_data):
    converted = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()
    assert converted.get_output_embeddings().weight is converted.get_input_embeddings().weight
    rows = open_token_data(smol_data).read("student", slice(0, 4))
    ids = torch.from_numpy(rows[:, :-1])
    with torch.inference_mode():
        diff = (converted(input_ids=ids).logits - gguf_model(input_ids=ids).logits).abs().max()
        prompt = AutoTokenizer.from_pretrained(smol)("The capital city of France is", return_tensors="pt")
        nxt = int(converted(**prompt).logits[0, -1].argmax())
    assert float(diff) <= cache_gguf.LOGITS_ATOL
    assert AutoTokenizer.from_pretrained(smol).decode([nxt]) == " Paris"  # a trained LM, not noise


def test_import_carries_the_chat_template(smol):
    """The imported directory is a drop-in chat tokenizer: ChatML template and special tokens."""
    config = json.loads((smol / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "<|im_start|>" in (smol / "chat_template.jinja").read_text()
    tok = AutoTokenizer.from_pretrained(smol)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    # SmolLM2's template adds its own system prompt when the conversation has none.
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n")
    ids = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids == Tokenizer.from_file(str(smol / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def test_prepare_uses_the_teachers_tokenizer(smol, smol_data):
    data = open_token_data(smol_data)
    assert data.vocab_size == VOCAB and data.seq_len == 64
    assert data.eos_token_id == 0  # <|endoftext|>, SmolLM2's document separator
    rows = data.read("student", slice(0, ROWS))
    assert rows.min() >= 0 and rows.max() < VOCAB


@pytest.mark.ray
@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_cache_matches_transformers(ray_local, tmp_path, smol, smol_data, backend):
    if backend == "vllm":
        pytest.importorskip("vllm")
    store = tmp_path / f"{backend}.zarr"
    assert main(["cache", "--teacher", str(smol), "--data", str(smol_data), "--out", str(store),
                 "--backend", backend, "--max-rows", str(ROWS), "--k", str(K), "--quiet"]) == 0
    assert verify_store(store) == []
    meta = StoreReader(store).meta
    assert (meta.vocab_size, meta.k, meta.data.rows) == (VOCAB, K, ROWS)
    assert StoreReader(store).read_rows(np.arange(1))["ids"].dtype == np.uint16
    # 30 float32 layers: log-probs sit up to ~7e-5 from float64 ones, within F32_ABS.
    assert_topk_matches(store, smol, k=K, forward_abs=F32_ABS)
    embedding = VOCAB * 576  # tied: lm_head is embed_tokens, counted once
    assert (meta.teacher.params, meta.teacher.nonembedding_params) == (134_515_008, 134_515_008 - embedding)


@pytest.mark.ray
def test_cache_refuses_another_tokenizer(ray_local, tmp_path, smol, smol_data):
    """Same vocabulary size, two ids swapped: the token ids would mean other strings."""
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).symlink_to(smol / name)
    tok = json.loads((smol / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (1000, 1001))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(PipelineError, match="tokenizer.json: differs from the data's tokenizer"):
        run_cache(CacheConfig(teacher=str(other), data=str(smol_data), out=str(tmp_path / "s.zarr"),
                              backend="hf", max_rows=ROWS, quiet=True))
    assert not (tmp_path / "s.zarr").exists()


def test_native_backend_refuses_it_clearly(smol):
    with pytest.raises(PipelineError, match="num_key_value_heads.*--backend hf or vllm"):
        NativeTeacher(str(smol))


# --- bad input: one line naming the file, nothing at --out ----------------------------


def import_error(capsys, gguf: Path, out: Path) -> str:
    """The one stderr line of a failed `kdcache import-teacher`; asserts nothing was written."""
    assert main(["import-teacher", "--gguf", str(gguf), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert not out.exists()
    return err[0]


def test_missing_gguf(tmp_path, capsys):
    err = import_error(capsys, tmp_path / "none.gguf", tmp_path / "m")
    assert f"{tmp_path / 'none.gguf'}: no such GGUF file" in err


def test_truncated_gguf(tmp_path, capsys, gguf_file):
    cut = tmp_path / "cut.gguf"
    with open(gguf_file, "rb") as fh:
        cut.write_bytes(fh.read(1 << 20))
    err = import_error(capsys, cut, tmp_path / "m")
    assert f"{cut}: not a readable GGUF file, truncated or corrupt" in err


def test_unknown_architecture(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    err = import_error(capsys, path, tmp_path / "m")
    assert f"{path}: field 'general.architecture' is 'mamba'; supported: llama" in err


def test_out_exists(tmp_path, capsys, gguf_file):
    taken = tmp_path / "taken"
    taken.mkdir()
    assert main(["import-teacher", "--gguf", str(gguf_file), "--out", str(taken)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"kdcache import-teacher: error: {taken}: output already exists (field 'out')"
    assert list(taken.iterdir()) == []


def test_failed_check_leaves_nothing(tmp_path, monkeypatch, gguf_file, gguf_model, smol):
    """A conversion whose logits disagree is refused, and no directory (or temporary) remains."""
    tokenizer = AutoTokenizer.from_pretrained(smol)
    monkeypatch.setattr(cache_gguf, "load_gguf", lambda path, quiet=True: (gguf_model, tokenizer))
    monkeypatch.setattr(cache_gguf, "LOGITS_ATOL", -1.0)
    out = tmp_path / "m"
    with pytest.raises(PipelineError, match="differ from the GGUF model's"):
        cache_gguf.import_gguf(ImportConfig(gguf=str(gguf_file), out=str(out), quiet=True))
    assert list(tmp_path.iterdir()) == []


def test_large_vocab_logits_are_projected_in_chunks():
    """49k float32 logits: a micro-batch's trained positions are projected 1,365 at a time,
    within the budget; an output layer too large for the budget still projects one."""
    teacher = TorchTeacher()
    teacher.output_rows = VOCAB
    assert teacher.positions_per_chunk() == LOGITS_BUDGET // (4 * VOCAB) == 1365
    assert teacher.positions_per_chunk() * 4 * VOCAB <= LOGITS_BUDGET
    teacher.output_rows = LOGITS_BUDGET
    assert teacher.positions_per_chunk() == 1
