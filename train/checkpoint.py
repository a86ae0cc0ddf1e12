"""Training checkpoints: safetensors for tensors, JSON for everything else (no pickle).

A checkpoint directory holds `state-<step>.safetensors` (model weights and AdamW moments)
and `state.json` naming it. The JSON is replaced atomically after the tensors are on
disk, so a run killed at any moment leaves the previous complete checkpoint readable; a
write that fails (a full disk) removes its parts and says so in one line, keeping it too.

State is full (unsharded) and keyed by parameter name, `model.<name>` and
`opt.<name>.<moment>`, taken and restored through `torch.distributed.checkpoint`'s
state-dict helpers, which gather FSDP shards and see through DDP. So one checkpoint
serves one rank, many ranks, or FSDP, and resumes at any world size.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from kdcache.train.errors import TrainError

STATE = "state.json"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]


def full_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, *, prefix: str = ""
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """(weights, optimizer moments) gathered in full on the CPU, named without `prefix`.

    Every rank must call it (FSDP gathers shards); under a process group only rank 0's
    result is filled, the others get empty dicts.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights: dict[str, Any] = dict(get_model_state_dict(module, options=options))
    optim: Any = get_optimizer_state_dict(module, optimizer, options=options)
    moments: dict[str, Any] = dict(optim.get("state", {}))
    cut = len(prefix)
    return ({k[cut:]: v for k, v in weights.items() if k.startswith(prefix)},
            {str(k)[cut:]: v for k, v in moments.items() if str(k).startswith(prefix)})


def save_checkpoint(
    directory: Path,
    *,
    step: int,
    model: dict[str, Tensor],
    optimizer: dict[str, dict[str, Tensor]],
    info: dict[str, Any],
) -> None:
    """Write the state after `step` completed steps (`full_state`'s two dicts); `info` is JSON."""
    directory.mkdir(parents=True, exist_ok=True)
    # Tied weights (an HF student's lm_head is its embedding) come back sharing memory, which
    # safetensors refuses to write: each name gets its own copy.
    seen: set[int] = set()
    tensors: dict[str, Tensor] = {}
    for k, v in model.items():
        t = v.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[f"model.{k}"] = t
    for name, state in optimizer.items():
        for key, value in state.items():
            tensors[f"opt.{name}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    name = f"state-{step:09d}.safetensors"
    tmp = directory / (STATE + ".tmp")
    try:
        save_file(tensors, str(directory / (name + ".tmp")))
        os.replace(directory / (name + ".tmp"), directory / name)
        tmp.write_text(json.dumps({"step": step, "tensors": name, "info": info}, indent=1))
        os.replace(tmp, directory / STATE)
    except (OSError, SafetensorError) as exc:
        for part in (directory / (name + ".tmp"), directory / name, tmp):
            part.unlink(missing_ok=True)  # state.json still names the previous checkpoint, whole
        raise TrainError(f"{directory}: cannot write the checkpoint of step {step} ({write_failure(exc)}); "
                         "the previous checkpoint is kept") from None
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def write_failure(exc: OSError | SafetensorError) -> str:
    """Why a write failed, in a few words: safetensors wraps the OS error's text in its own."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = str(exc)
    found = re.search(r'message: "([^"]+)"|I/O error: (.+?) \(os error \d+\)', text)
    return (found[1] or found[2]) if found else text.splitlines()[0]


def load_checkpoint(directory: Path) -> Checkpoint | None:
    """The latest complete checkpoint in `directory`, or None if there is none."""
    if not (directory / STATE).is_file():
        return None
    try:
        record = json.loads((directory / STATE).read_text())
        tensors = load_file(str(directory / record["tensors"]))
    except (OSError, ValueError, KeyError) as exc:
        raise TrainError(f"{directory / STATE}: unreadable checkpoint ({exc})") from exc
    return Checkpoint(step=int(record["step"]), tensors=tensors, info=record["info"])


def restore(
    ckpt: Checkpoint, module: nn.Module, optimizer: torch.optim.Optimizer, *, prefix: str = ""
) -> None:
    """Load weights and AdamW moments saved by `save_checkpoint` into fresh objects (every rank)."""
    weights: dict[str, Any] = {prefix + k[len("model."):]: v for k, v in ckpt.tensors.items()
                               if k.startswith("model.")}
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, weights, options=options)
    state: dict[str, Any] = {}
    for key, value in ckpt.tensors.items():
        if key.startswith("opt."):
            name, moment = key[len("opt."):].rsplit(".", 1)
            state.setdefault(prefix + name, {})[moment] = value
    groups = get_optimizer_state_dict(module, optimizer, options=options)["param_groups"]
    full: Any = {"state": state, "param_groups": groups}
    set_optimizer_state_dict(module, optimizer, full, options=options)
