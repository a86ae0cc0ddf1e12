"""AdamW with muP (simple) learning rates, and the warmup + cosine schedule.

muP here is a reparametrisation through init and per-group Adam learning rates only,
so the forward pass stays a plain Llama and exports without rescaling. With width
multiplier m = d_model / base width:

| parameters | init std (model.py) | Adam learning rate |
|---|---|---|
| embedding | 0.02 | lr |
| hidden matrices (attention, FFN) | 0.02 / sqrt(m) | lr / m |
| unembedding (lm_head) | 0.02 / m | lr / m |
| norm gains | 1 | lr |

(The lm_head row is muP's 1/m output multiplier folded into the weights: under Adam,
scaling a weight's init and learning rate by 1/m is the same as multiplying its output
by 1/m.) Weight decay is fully decoupled: each step multiplies matrices by
(1 - weight_decay * schedule(t)), independent of the learning rate and of width;
norm gains are not decayed.

A Hugging Face student has no muP parametrisation: every parameter takes `lr`, and
matrices decay while vectors (norm gains, biases) do not, the usual AdamW recipe. Frozen
parameters (a LoRA student's base weights) are left out.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdcache.train.model import Transformer
from kdcache.train.student import Student


def param_groups(model: nn.Module, *, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups: (embedding, hidden, lm_head, norms) for the family, named for
    checkpointing; (matrices, vectors) for any other model."""
    lm = model.lm if isinstance(model, Student) else model
    if not isinstance(lm, Transformer):
        params = [p for p in lm.parameters() if p.requires_grad]  # LoRA freezes the base weights
        groups: dict[str, dict] = {
            "matrices": {"params": [p for p in params if p.ndim >= 2], "lr": lr, "decay": weight_decay},
            "vectors": {"params": [p for p in params if p.ndim < 2], "lr": lr, "decay": 0.0},
        }
    else:
        m = lm.config.width_mult
        groups = {
            "embedding": {"params": [], "lr": lr, "decay": weight_decay},
            "hidden": {"params": [], "lr": lr / m, "decay": weight_decay},
            "lm_head": {"params": [], "lr": lr / m, "decay": weight_decay},
            "norms": {"params": [], "lr": lr, "decay": 0.0},
        }
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight"):
                key = "norms"
            elif name == "model.embed_tokens.weight":
                key = "embedding"
            elif name == "lm_head.weight":
                key = "lm_head"
            else:
                key = "hidden"
            groups[key]["params"].append(p)
    out = []
    for key, g in groups.items():
        if not g["params"]:
            continue
        # torch's AdamW decays by lr * weight_decay; dividing by the group's peak lr makes
        # the decay per step weight_decay * schedule(t), whatever the muP lr scaling.
        out.append({"name": key, "params": g["params"], "lr": g["lr"], "base_lr": g["lr"],
                    "weight_decay": g["decay"] / g["lr"]})
    return out


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95)
) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, lr=lr, weight_decay=weight_decay), betas=betas, eps=1e-8, foreach=True
    )


def lr_factor(step: int, *, total: int, warmup: int, final: float) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then cosine to `final`."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
