"""Training checkpoints: safetensors for tensors, JSON for everything else (no pickle).

A checkpoint directory holds `state-<step>.safetensors` (model weights and AdamW moments)
and `state.json` naming it. The JSON is replaced atomically after the tensors are on
disk, so a run killed at any moment leaves the previous complete checkpoint readable.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kdcache.train.errors import TrainError

STATE = "state.json"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]


def save_checkpoint(
    directory: Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    info: dict[str, Any],
) -> None:
    """Write the state after `step` completed steps; `info` must be JSON-serialisable."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    name = f"state-{step:09d}.safetensors"
    save_file(tensors, str(directory / (name + ".tmp")))
    os.replace(directory / (name + ".tmp"), directory / name)
    tmp = directory / (STATE + ".tmp")
    tmp.write_text(json.dumps({"step": step, "tensors": name, "info": info}, indent=1))
    os.replace(tmp, directory / STATE)
    for old in directory.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


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


def restore(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load weights and AdamW moments saved by `save_checkpoint` into fresh objects."""
    prefix = "model."
    model.load_state_dict({k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)})
    fresh = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in ckpt.tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": fresh["param_groups"]})
