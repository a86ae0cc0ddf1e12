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

from kdcache.storage.tokens.format import TokenData
from kdcache.train.errors import TrainError
from kdcache.train.row_order import RowOrder


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


class OrderedBatches:
    """Position bookkeeping shared by sources that follow a `RowOrder`.

    The position is (epoch, global batch within the epoch): two integers, the same on
    every rank and at every world size, so the state dict is tiny and resuming at any
    step, on any number of ranks, reproduces the order exactly.
    """

    def __init__(self, order: RowOrder) -> None:
        self.order = order
        self.epoch, self.batch = 0, 0

    def _advance(self) -> None:
        self.batch += 1
        if self.batch == self.order.batches_per_epoch():
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.order.batches_per_epoch():
            raise TrainError(
                f"position (epoch {epoch}, batch {batch}) lies outside an epoch of "
                f"{self.order.batches_per_epoch()} batches (a checkpoint of another run?)"
            )
        self.epoch, self.batch = epoch, batch


class TokenBatches(OrderedBatches):
    """Endless batches of rows from one token split, in `RowOrder`: rank `rank` of `world`
    gets its batch_size // world rows of each global batch of `batch_size`."""

    def __init__(self, data: TokenData, split: str, *, batch_size: int, seed: int, rank: int = 0,
                 world: int = 1) -> None:
        n_rows = data.rows(split)
        if n_rows < batch_size:
            raise TrainError(
                f"{data.path}: split {split!r} has {n_rows} rows, fewer than the batch size "
                f"{batch_size} (lower --batch-size or prepare more data)"
            )
        super().__init__(RowOrder(n_rows=n_rows, batch_size=batch_size, seed=seed, rank=rank, world=world))
        self.data, self.split = data, split
        self._epoch_rows: tuple[int, np.ndarray] | None = None

    def next_rows(self) -> np.ndarray:
        """Row indices of this rank's share of the next batch (advances the position)."""
        if self._epoch_rows is None or self._epoch_rows[0] != self.epoch:
            self._epoch_rows = (self.epoch, np.concatenate(self.order.windows(self.epoch)))
        idx = self._epoch_rows[1][self.batch]
        self._advance()
        return idx

    def next_batch(self) -> Batch:
        return rows_to_batch(self.data.read(self.split, self.next_rows()))
