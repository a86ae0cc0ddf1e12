"""The model family against transformers' Llama/Qwen3, the hand count of N, MODEL dirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

from kdcache.train.config import ModelConfig
from kdcache.train.errors import TrainError
from kdcache.train.model import build_model
from kdcache.train.model_dir import load_model_dir, save_model_dir


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokenizer.json"
    Tokenizer(models.BPE()).save(str(path))
    return path


def _random_model(cfg: ModelConfig):
    model = build_model(cfg, seed=3)
    with torch.no_grad():  # non-trivial norm gains, so a mis-wired norm shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.2)
    return model


@pytest.mark.slow  # importing transformers alone takes seconds
@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3-qknorm"])
def test_logits_match_transformers(tmp_path: Path, tokenizer_file: Path, qk_norm: bool) -> None:
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(layers=2, vocab_size=300, rho=32, head_dim=32, qk_norm=qk_norm)
    model = _random_model(cfg)
    save_model_dir(model, tmp_path / "m", tokenizer=tokenizer_file)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.dtype == theirs.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_non_embedding_params_hand_count() -> None:
    # layers 2, rho 32: d = 64, FFN 8/3 * 64 = 170.7 -> 176 (multiple of 8).
    # per layer: q,k,v,o 4 * 64 * 64 = 16384; gate, up, down 3 * 64 * 176 = 33792; 2 norms 128.
    cfg = ModelConfig(layers=2, vocab_size=300, rho=32, head_dim=32)
    hand = 2 * (16384 + 33792 + 128) + 64  # + final norm
    assert hand == 100_672
    assert cfg.non_embedding_params() == hand
    assert build_model(cfg).non_embedding_params() == hand
    qk = ModelConfig(layers=2, vocab_size=300, rho=32, head_dim=32, qk_norm=True)
    assert qk.non_embedding_params() == build_model(qk).non_embedding_params() == hand + 2 * 2 * 32
    total = sum(p.numel() for p in build_model(cfg).parameters())
    assert total == hand + 2 * 300 * 64  # untied embedding + unembedding


def test_shape_follows_layers() -> None:
    cfg = ModelConfig(layers=4, vocab_size=512, rho=64, head_dim=32)
    assert (cfg.d_model, cfg.n_heads) == (256, 8)
    with pytest.raises(TrainError, match="head_dim"):
        ModelConfig(layers=1, vocab_size=512, rho=48, head_dim=32)


def test_causal() -> None:
    model = build_model(ModelConfig(layers=1, vocab_size=64, rho=32, head_dim=16))
    ids = torch.randint(0, 64, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64
    with torch.no_grad():
        assert torch.equal(model(ids)[:, :10], model(changed)[:, :10])


def test_save_load_roundtrip(tmp_path: Path, tokenizer_file: Path) -> None:
    model = _random_model(ModelConfig(layers=1, vocab_size=100, rho=32, head_dim=32))
    fp = save_model_dir(model, tmp_path / "m", tokenizer=tokenizer_file, eos_token_id=0,
                        training={"tokens": 5})
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.fingerprint == fp and loaded.record is not None and loaded.record.training == {"tokens": 5}
    assert loaded.config == model.config
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), model(ids))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "kdcache.json"):
        assert (tmp_path / "m" / name).is_file()


def test_load_plain_hf_directory(tmp_path: Path, tokenizer_file: Path) -> None:
    model = _random_model(ModelConfig(layers=2, vocab_size=100, rho=32, head_dim=16))
    save_model_dir(model, tmp_path / "m", tokenizer=tokenizer_file)
    (tmp_path / "m" / "kdcache.json").unlink()
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.config.non_embedding_params() == model.config.non_embedding_params()
    assert loaded.config.head_dim == 16 and loaded.record is None


def test_load_errors(tmp_path: Path, tokenizer_file: Path) -> None:
    with pytest.raises(TrainError, match="missing config.json"):
        load_model_dir(tmp_path)
    model = build_model(ModelConfig(layers=1, vocab_size=100, rho=32, head_dim=32))
    save_model_dir(model, tmp_path / "m", tokenizer=tokenizer_file)
    meta = json.loads((tmp_path / "m" / "kdcache.json").read_text())
    meta["model"]["layers"] = 2
    (tmp_path / "m" / "kdcache.json").write_text(json.dumps(meta))
    with pytest.raises(TrainError, match="do not match"):
        load_model_dir(tmp_path / "m")
    (tmp_path / "m" / "kdcache.json").unlink()
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(hf | {"tie_word_embeddings": True}))
    with pytest.raises(TrainError, match="tie_word_embeddings"):
        load_model_dir(tmp_path / "m")
