"""LoRA: train low-rank adapters on a pretrained Hugging Face student, through `peft`.

`apply_lora` injects the adapters in place, so `student.lm` stays the transformers causal
LM the rest of training knows (its `base_model` gives hidden states, its output embeddings
are the head) and the trainer, checkpoints and DDP/FSDP see an ordinary module whose only
trainable parameters are the adapters. Checkpoints then hold peft's names
(`...q_proj.base_layer.weight`, `...q_proj.lora_A.default.weight`) like any other.

By default every linear layer inside the decoder layers is adapted (attention and MLP
projections), never the embedding or the output layer: the chunked losses read the head's
weight directly, so an adapter there would be silently skipped. peft's own "all-linear"
excludes only the output layer and would also take linear layers outside the decoder
blocks, so the default is resolved here to the blocks' full module names.

The output is built from the full trained state (`Trainer.full_state()`, gathered on the
CPU, as FSDP leaves it), never from the live model, which may be sharded: the state is
assigned into a copy of the architecture made on the meta device (no memory until the
state's own tensors fill it), and peft merges or saves that copy. `lora_output_state`
gives the merged model's weights under the original transformers names, W + (alpha/r) B A
by peft's `merge_and_unload`; `save_adapter` writes peft's adapter directory instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from kdcache.train.errors import TrainError
from kdcache.train.student import HFStudent, Student
from kdcache.train.trainer import decoder_layers

ADAPTER = "default"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""What `save_adapter` writes the adapters to (peft's name)."""
LINEAR = (nn.Linear, Conv1D)  # what peft's "all-linear" counts as linear (GPT-2's blocks use Conv1D)


@dataclass(frozen=True, kw_only=True)
class LoraInfo:
    """The adapters `apply_lora` injected."""

    rank: int
    alpha: float
    dropout: float
    modules: tuple[str, ...]
    """Full names (in `student.lm`) of the adapted layers."""
    trainable: int
    """Adapter parameters: the sum over adapted layers of rank * (in + out)."""

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "modules": len(self.modules), "trainable": self.trainable}


def apply_lora(
    student: Student,
    *,
    rank: int,
    alpha: float,
    targets: tuple[str, ...] | None = None,
    dropout: float = 0.0,
    seed: int = 0,
) -> LoraInfo:
    """Inject LoRA adapters into `student.lm` in place and freeze everything else.

    `targets` are module names as peft matches them (a layer is adapted when its full name
    equals a target or ends with "." + target); None adapts every linear layer of the decoder
    blocks. The adapters' A matrices are drawn from `seed` (B starts at zero, so the adapted
    model starts equal to the pretrained one).
    """
    if not isinstance(student, HFStudent):
        raise TrainError("--lora-rank adapts a pretrained --student DIR, not kdcache's own family")
    if hasattr(student.lm, "peft_config"):
        raise TrainError("--lora-rank: the student already carries peft adapters")
    if rank < 1:
        raise TrainError(f"--lora-rank must be at least 1, got {rank}")
    if not alpha > 0:
        raise TrainError(f"--lora-alpha must be positive, got {alpha}")
    if not 0 <= dropout < 1:
        raise TrainError(f"--lora-dropout must lie in [0, 1), got {dropout}")
    modules = _default_targets(student) if targets is None else _matched_targets(student, targets)
    # peft annotates lora_alpha as int but only divides it by r: any positive number works.
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,  # type: ignore[arg-type]
                        target_modules=list(modules), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        get_peft_model(student.lm, config, adapter_name=ADAPTER)
    return LoraInfo(rank=rank, alpha=alpha, dropout=dropout, modules=modules,
                    trainable=trainable_parameters(student))


def _default_targets(student: Student) -> tuple[str, ...]:
    layers = {id(layer) for layer in decoder_layers(student)}
    prefixes = [name + "." for name, module in student.lm.named_modules() if id(module) in layers]
    if not prefixes:
        raise TrainError(f"--lora-targets: found no decoder layers in {type(student.lm).__name__}; "
                         "name the layers to adapt")
    return tuple(name for name, module in student.lm.named_modules()
                 if isinstance(module, LINEAR) and any(name.startswith(p) for p in prefixes))


def _matched_targets(student: Student, targets: tuple[str, ...]) -> tuple[str, ...]:
    """The full names `targets` select, refusing a target that selects nothing, or anything
    but a linear layer other than the output layer."""
    head = student.lm.get_output_embeddings()
    found: list[str] = []
    for target in targets:
        hits = [(name, module) for name, module in student.lm.named_modules()
                if name == target or name.endswith("." + target)]
        if not target or not hits:
            raise TrainError(f"--lora-targets: {target!r} matches no module of {type(student.lm).__name__}")
        for name, module in hits:
            if module is head:
                raise TrainError(f"--lora-targets: {target!r} matches the output layer {name!r}, whose "
                                 "weight the chunked losses read directly; adapt the decoder layers")
            if not isinstance(module, LINEAR):
                raise TrainError(f"--lora-targets: {target!r} matches {name!r} ({type(module).__name__}), "
                                 "not a linear layer")
            found.append(name)
    return tuple(dict.fromkeys(found))


def trainable_parameters(student: Student) -> int:
    return sum(p.numel() for p in student.parameters() if p.requires_grad)


def adapter_config(student: Student) -> LoraConfig | None:
    """The LoRA configuration `apply_lora` gave the student, or None for a plain student."""
    configs = getattr(student.lm, "peft_config", None)
    return None if configs is None else configs[ADAPTER]


def lora_output_state(student: Student, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The merged model's weights (W + alpha/r * B A, float32) under the transformers names,
    from the full trained `state` (the student's names, peft's included); `state` and the
    student are left as they are."""
    model = _filled_copy(student, state).merge_and_unload(safe_merge=True)  # safe: merges into copies
    return dict(model.state_dict())


def save_adapter(student: Student, state: dict[str, Tensor], out: Path) -> None:
    """Write peft's adapter directory (adapter_config.json, adapter_model.safetensors) of the
    trained `state`: `PeftModel.from_pretrained(base, out)` loads it onto the pretrained base."""
    _filled_copy(student, state).save_pretrained(str(out), safe_serialization=True,
                                                  save_embedding_layers=False)


def _filled_copy(student: Student, state: dict[str, Tensor]) -> PeftModel:
    """A PeftModel of the student's architecture and adapters holding `state`'s tensors."""
    config = adapter_config(student)
    if config is None:
        raise TrainError("the student carries no LoRA adapters (apply_lora was not called)")
    lm = student.lm
    with torch.device("meta"):
        skeleton = type(lm)(copy.deepcopy(lm.config))
    peft = get_peft_model(skeleton, copy.deepcopy(config), adapter_name=ADAPTER)
    model = peft.get_base_model()
    expected = set(model.state_dict())
    for names, what in ((expected - set(state), "lacks"), (set(state) - expected, "has an unknown")):
        if names:
            raise TrainError(f"the trained state {what} weight {min(names)!r} of the LoRA student")
    model.load_state_dict(state, strict=True, assign=True)
    return peft
