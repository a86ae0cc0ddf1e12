"""Losses as pure tensor functions returning sums; the trainer divides by the token count.

A loss function for the trainer maps (logits [B, T, V], batch) to `LossSums`. Supervised
training uses `NextTokenLoss`; distillation losses plug in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.train.batches import Batch


@dataclass(frozen=True)
class LossSums:
    """`total` is what gets differentiated (a sum over `tokens` positions); `metrics` are
    detached sums over the same positions, reported divided by `tokens`."""

    total: Tensor
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)


class LossFn(Protocol):
    def __call__(self, logits: Tensor, batch: Batch) -> LossSums: ...


def cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed next-token cross-entropy (nats), computed in float32."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="sum")


@dataclass(frozen=True)
class NextTokenLoss:
    """Supervised objective: cross-entropy + z_loss_weight * z-loss."""

    z_loss_weight: float = 1e-4

    def __call__(self, logits: Tensor, batch: Batch) -> LossSums:
        # One log-partition serves both terms: cross-entropy and z-loss, log(Z)^2 (PaLM).
        logits = logits.float()
        lse = torch.logsumexp(logits, dim=-1)
        ce = (lse - logits.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)).sum()
        z = lse.pow(2).sum()
        return LossSums(
            total=ce + self.z_loss_weight * z,
            tokens=batch.tokens,
            metrics={"ce": ce.item(), "z": z.item()},
        )
