"""Batch sources: what the trainer pulls each step, and the supervised one over a token split.

A source yields `Batch`es and can save and restore its position as a small JSON-able
dict, so a resumed run sees exactly the batches an uninterrupted one would. Distillation
sources (a logit store, an online teacher) add their targets under `Batch.extras`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from kdcache.train.errors import TrainError
from kdcache.train.tokens import TokenData


@dataclass(frozen=True)
class Batch:
    """One step's data: `inputs` [B, T] predict `targets` [B, T] (int64)."""

    inputs: Tensor
    targets: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    """Source-specific tensors, e.g. teacher log-probs for distillation losses."""

    @property
    def tokens(self) -> int:
        return self.targets.numel()

    def to(self, device: torch.device) -> Batch:
        if self.inputs.device == device:
            return self
        extras = {k: v.to(device, non_blocking=True) for k, v in self.extras.items()}
        return Batch(self.inputs.to(device), self.targets.to(device), extras)


class BatchSource(Protocol):
    """Anything the trainer can pull batches from and checkpoint."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def rows_to_batch(rows: np.ndarray) -> Batch:
    """Token rows [B, T+1] -> a next-token batch."""
    t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    return Batch(inputs=t[:, :-1], targets=t[:, 1:])


class TokenBatches:
    """Endless batches of rows from one split: a fresh seeded permutation every epoch.

    The position is (epoch, offset), so the state is two integers and resuming at any
    step reproduces the order exactly.
    """

    def __init__(self, data: TokenData, split: str, *, batch_size: int, seed: int) -> None:
        self.data, self.split, self.batch_size, self.seed = data, split, batch_size, seed
        self.n_rows = data.rows(split)
        if self.n_rows < batch_size:
            raise TrainError(
                f"{data.path}: split {split!r} has {self.n_rows} rows, fewer than the batch size "
                f"{batch_size} (lower --batch-size or prepare more data)"
            )
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def next_batch(self) -> Batch:
        # Batches never straddle epochs: the tail of a permutation shorter than a batch is
        # skipped, so every batch has the same shape.
        if self.offset + self.batch_size > self.n_rows:
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        idx = self._perm[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return rows_to_batch(self.data.read(self.split, idx))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)
