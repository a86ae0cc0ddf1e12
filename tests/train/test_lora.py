"""LoRA students: only the adapters train, and both outputs (merged, adapter-only) give the trained logits.

Tolerance of the merged output: the trained model computes x W^T + s (x A^T) B^T, the merged
one x (W + s B A)^T, in float32 (unit roundoff u = 6e-8). Rounding W + s B A once and
summing in another order moves each projection's output by a few u relative per layer (a
dot product of n terms rounds to ~sqrt(n) u, n <= 64 here), and the 2 blocks of 7
projections, norms and the head compound that to ~1e-6 relative on logits of O(1). So
merged logits must match to MERGED_RTOL = 1e-5 of the logits' largest magnitude (measured:
~2e-7). Training moves the logits by ~0.2 (lr 1e-2, 3 steps), 10^4 times more, so a merge
that dropped or double-counted the adapters, or took the wrong scale, fails. The adapter
directory loads into the same peft layers doing the same ops, so its logits are identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kdcache.storage.tokens.format import TokenData
from kdcache.train.batches import TokenBatches
from kdcache.train.checkpoint import load_checkpoint
from kdcache.train.config import ModelConfig
from kdcache.train.errors import TrainError
from kdcache.train.job import LoopSettings
from kdcache.train.lora import (
    adapter_config,
    apply_lora,
    lora_output_state,
    save_adapter,
    trainable_parameters,
)
from kdcache.train.losses import NextTokenLoss
from kdcache.train.model import build_model
from kdcache.train.student import HFStudent, load_hf_student, save_hf_student
from kdcache.train.trainer import LoopConfig, StepInfo, Trainer, as_student

MERGED_RTOL = 1e-5
RANK, ALPHA = 4, 8.0
SHAPE: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2}
KINDS = ("llama", "qwen2")  # untied; tied (lm_head is the embedding)


class Interrupt(Exception):
    pass


def _pretrained(kind: str, vocab: int, out: Path) -> Path:
    """A tiny 'pretrained' model directory, as `--student DIR` finds one."""
    torch.manual_seed(0)
    model: PreTrainedModel
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, tie_word_embeddings=False, **SHAPE))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **SHAPE))
    model.save_pretrained(str(out))
    return out


def _student(directory: Path, data: TokenData) -> HFStudent:
    return load_hf_student(str(directory), vocab=data.vocab_size, data=str(data.path))


def _trainer(student: HFStudent, data: TokenData, *, steps: int = 3, ckpt: Path | None = None,
             on_step=None) -> Trainer:
    settings = LoopSettings(lr=1e-2, warmup_frac=0.0, weight_decay=0.0)
    return Trainer(student, TokenBatches(data, "student", batch_size=4, seed=0), NextTokenLoss(),
                   LoopConfig(steps=steps, settings=settings, checkpoint_every=2 if ckpt else 0),
                   checkpoint_dir=ckpt, run_fingerprint="lora", progress=False, on_step=on_step)


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(data: TokenData) -> Tensor:
    return torch.randint(0, data.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))


def _clone(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.fixture(scope="module", params=KINDS)
def trained(request: pytest.FixtureRequest, tiny_data: TokenData, tmp_path_factory: pytest.TempPathFactory
            ) -> dict:
    """A LoRA student trained 3 steps, with its base directory and its weights before and after."""
    base = _pretrained(request.param, tiny_data.vocab_size, tmp_path_factory.mktemp(request.param))
    student = _student(base, tiny_data)
    before = _clone(student.lm.state_dict())
    apply_lora(student, rank=RANK, alpha=ALPHA, targets=None)
    initial = _clone(student.lm.state_dict())
    trainer = _trainer(student, tiny_data)
    trainer.run()
    return {"kind": request.param, "base": base, "student": student, "before": before, "initial": initial,
            "state": trainer.full_state()}


def test_training_moves_the_adapters_and_no_base_weight(trained: dict) -> None:
    lm, state = trained["student"].lm, trained["state"]
    assert any(".base_layer." in k for k in state) and any(".lora_A.default." in k for k in state)
    base = {k.replace(".base_layer", ""): v for k, v in state.items() if ".lora_" not in k}
    assert base.keys() == trained["before"].keys()
    for name, weight in trained["before"].items():
        assert torch.equal(base[name], weight), name
    adapters = [k for k in state if ".lora_" in k]
    assert len(adapters) == 2 * 2 * 7  # A and B of 7 projections in 2 blocks
    for name in adapters:
        assert not torch.equal(state[name], trained["initial"][name]), name
    assert {n for n, p in lm.named_parameters() if p.requires_grad} == set(adapters)
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert tied == (trained["kind"] == "qwen2")


def test_the_merged_output_loads_and_gives_the_trained_logits(trained: dict, tiny_data: TokenData,
                                                              tmp_path: Path) -> None:
    student, state = trained["student"], trained["state"]
    ids = _ids(tiny_data)
    want, live, kept = _logits(student.lm, ids), _clone(student.lm.state_dict()), _clone(state)
    merged = lora_output_state(student, state)
    save_hf_student(student, merged, tmp_path, tokenizer=tiny_data.tokenizer_path, training={}, data={})
    # The original transformers names, nothing of peft's.
    assert load_file(str(tmp_path / "model.safetensors")).keys() == load_file(
        str(trained["base"] / "model.safetensors")).keys()
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert type(loaded) is type(student.lm)
    got = _logits(loaded, ids)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=MERGED_RTOL * scale)
    pretrained = _logits(AutoModelForCausalLM.from_pretrained(str(trained["base"])), ids)
    assert (pretrained - want).abs().max().item() > 1000 * MERGED_RTOL * scale
    # Neither the live student nor the state it came from changed.
    for name, weight in student.lm.state_dict().items():
        assert torch.equal(weight, live[name]), name
    for name, weight in state.items():
        assert torch.equal(weight, kept[name]), name


def test_the_adapter_directory_loads_with_peft_and_gives_the_trained_logits(
        trained: dict, tiny_data: TokenData, tmp_path: Path) -> None:
    student = trained["student"]
    save_adapter(student, trained["state"], tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == RANK
    base = AutoModelForCausalLM.from_pretrained(str(trained["base"]), dtype=torch.float32)
    ids = _ids(tiny_data)
    assert torch.equal(_logits(PeftModel.from_pretrained(base, str(tmp_path)), ids), _logits(student.lm, ids))


@pytest.mark.parametrize(("targets", "names"), [(None, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj")),
                                                (("q_proj", "mlp.down_proj"), ("q_proj", "down_proj"))])
def test_trainable_parameters_are_rank_times_in_plus_out(
        targets: tuple[str, ...] | None, names: tuple[str, ...], tiny_data: TokenData, tmp_path: Path
) -> None:
    student = _student(_pretrained("llama", tiny_data.vocab_size, tmp_path), tiny_data)
    layers = [(n, m) for n, m in student.lm.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    want = sum(RANK * (m.in_features + m.out_features) for n, m in layers if n.rsplit(".", 1)[-1] in names)
    info = apply_lora(student, rank=RANK, alpha=ALPHA, targets=targets)
    assert info.trainable == trainable_parameters(student) == want
    assert len(info.modules) == 2 * len(names)
    config = adapter_config(student)
    assert config is not None and config.r == RANK and config.lora_alpha == ALPHA


@pytest.mark.parametrize("kind", KINDS)
def test_a_lora_checkpoint_resumes_exactly(kind: str, tiny_data: TokenData, tmp_path: Path) -> None:
    base = _pretrained(kind, tiny_data.vocab_size, tmp_path / "base")

    def fresh(seed: int) -> HFStudent:
        student = _student(base, tiny_data)
        apply_lora(student, rank=RANK, alpha=ALPHA, targets=None, seed=seed)
        return student

    def stop_at_3(info: StepInfo) -> None:
        if info.step == 3:
            raise Interrupt

    reference = _trainer(fresh(0), tiny_data, steps=4)
    reference.run()
    with pytest.raises(Interrupt):
        _trainer(fresh(0), tiny_data, steps=4, ckpt=tmp_path / "ckpt", on_step=stop_at_3).run()
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt is not None and ckpt.step == 2
    moments = [k for k in ckpt.tensors if k.startswith("opt.")]
    assert moments and all(".lora_" in k for k in moments)  # frozen weights take no AdamW state
    # Other adapter inits: only a restore of the checkpoint's adapters can end equal.
    resumed = _trainer(fresh(1), tiny_data, steps=4, ckpt=tmp_path / "ckpt")
    assert len(resumed.run().history) == 2
    want = reference.full_state()
    got = resumed.full_state()
    assert got.keys() == want.keys()
    for name, weight in want.items():
        assert torch.equal(got[name], weight), name


def test_lora_refuses_what_it_cannot_adapt(tiny_data: TokenData, tmp_path: Path) -> None:
    base = _pretrained("qwen2", tiny_data.vocab_size, tmp_path)
    for targets, message in [(("nope",), "'nope' matches no module"),
                             (("lm_head",), "output layer 'lm_head'"),
                             (("self_attn",), r"\(Qwen2Attention\), not a linear layer"),
                             (("embed_tokens",), "not a linear layer")]:
        with pytest.raises(TrainError, match=f"^--lora-targets: .*{message}"):
            apply_lora(_student(base, tiny_data), rank=RANK, alpha=ALPHA, targets=targets)
    student = _student(base, tiny_data)
    for rank, alpha, dropout, flag in [(0, ALPHA, 0.0, "--lora-rank"), (RANK, 0.0, 0.0, "--lora-alpha"),
                                       (RANK, ALPHA, 1.0, "--lora-dropout")]:
        with pytest.raises(TrainError, match=f"^{flag}"):
            apply_lora(student, rank=rank, alpha=alpha, targets=None, dropout=dropout)
    assert adapter_config(student) is None
    apply_lora(student, rank=RANK, alpha=ALPHA, targets=("q_proj",))
    with pytest.raises(TrainError, match="already carries"):
        apply_lora(student, rank=RANK, alpha=ALPHA, targets=None)
    family = as_student(build_model(ModelConfig(layers=1, vocab_size=tiny_data.vocab_size, rho=32,
                                                head_dim=32)))
    with pytest.raises(TrainError, match="pretrained --student DIR"):
        apply_lora(family, rank=RANK, alpha=ALPHA, targets=None)
    plain = _student(base, tiny_data)
    with pytest.raises(TrainError, match="no LoRA adapters"):
        lora_output_state(plain, plain.lm.state_dict())
    state = dict(student.lm.state_dict())
    state.pop("model.layers.0.self_attn.q_proj.lora_A.default.weight")
    with pytest.raises(TrainError, match="lacks weight 'model.layers.0.self_attn.q_proj.lora_A"):
        lora_output_state(student, state)
