"""The batch type, its public dict form, and the batch sources the trainer pulls from.

`Batch` is the one batch type from store to loss: a distillation source adds the
teacher's targets under `Batch.extras`, keyed by the store arrays they come from
(`KIND_EXTRAS`). The public API (`StoreDataset`, `distill_loss`) speaks Hugging
Face-style dicts instead (`input_ids`, `labels`, `position_ids`, `teacher_<array>`, ...);
`batch_to_dict` and `batch_from_dict` convert at that edge and nowhere else.

Targets follow Hugging Face's convention: `IGNORE_INDEX` (-100) marks a position that is
not trained (a prompt, a user turn, padding), and every loss leaves it out. Rows that pack
whole documents also carry their inputs' position ids, restarting at 0 per document; the
students turn them into rotary positions and a block-diagonal attention mask
(`attention.py`), so no document sees another. A batch's `tokens` counts its trained
targets: the runs table, tokens/s and `--tokens` budgets all count those.

A source yields `Batch`es and can save and restore its position as a small JSON-able
dict, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from kdcache.storage import ARRAYS_BY_KIND, Kind
from kdcache.storage.tokens.format import IGNORE_INDEX, Rows, TokenData
from kdcache.train.errors import TrainError
from kdcache.train.row_order import RowOrder

KIND_EXTRAS: dict[Kind, tuple[str, ...]] = {
    kind: tuple(name for name in arrays if name not in ("tokens", "target_logprob"))
    for kind, arrays in ARRAYS_BY_KIND.items()
}
"""Store kind -> the `Batch.extras` a distillation loss reads, in the order its functions take
them: the store's arrays but the tokens (the batch's inputs and targets) and the teacher's
log-prob of the true next token (the store's own record, not a target)."""

BATCH_KEYS: dict[str, str] = {f"teacher_{name}": name for names in KIND_EXTRAS.values() for name in names}
"""Key of a batch dict (`distill_loss`, `StoreDataset`) -> the `Batch.extras` key it maps to."""
_DICT_KEY = {name: key for key, name in BATCH_KEYS.items()}

TEMPERATURE_KEY = "teacher_temperature"
"""Batch-dict key of the store's temperature (a 0-d float32 tensor)."""
POSITIONS_KEY = "position_ids"
"""Batch-dict key of the inputs' position ids [B, T] (int64), present when rows pack documents."""
VOCAB_KEY = "vocab_size"
"""Batch-dict key of the tokenizer's vocabulary size (a 0-d int64 tensor): the ids a padded
student's logits or output layer must be cut to."""


@dataclass(frozen=True)
class Batch:
    """One step's data: `inputs` [B, T] predict `targets` [B, T] (int64, `IGNORE_INDEX` where
    a position is not trained)."""

    inputs: Tensor
    targets: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    """Source-specific tensors, e.g. teacher log-probs for distillation losses."""
    positions: Tensor | None = None
    """[B, T] int64 position ids of `inputs`, restarting at 0 at each document's first token;
    None for rows cut from one stream (positions 0..T-1, one causal context per row)."""

    @cached_property
    def tokens(self) -> int:
        """Trained target positions (every position when nothing is ignored)."""
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> Batch:
        if self.inputs.device == device:
            return self
        extras = {k: v.to(device, non_blocking=True) for k, v in self.extras.items()}
        positions = None if self.positions is None else self.positions.to(device, non_blocking=True)
        moved = Batch(self.inputs.to(device), self.targets.to(device), extras, positions)
        if "tokens" in self.__dict__:  # counted already: no device sync to count again
            moved.__dict__["tokens"] = self.tokens
        return moved

    def split(self, parts: int) -> list[Batch]:
        """The batch's rows cut into `parts` equal micro-batches, in order (gradient accumulation);
        every tensor here leads with the row dimension."""
        rows = self.inputs.shape[0]
        if parts < 1 or rows % parts:
            raise TrainError(f"{rows} rows do not split into {parts} equal micro-batches")
        if parts == 1:
            return [self]
        size = rows // parts
        cut = [slice(i * size, (i + 1) * size) for i in range(parts)]
        return [Batch(self.inputs[c], self.targets[c], {k: v[c] for k, v in self.extras.items()},
                      None if self.positions is None else self.positions[c]) for c in cut]


def batch_to_dict(
    batch: Batch, *, temperature: float | None = None, vocab_size: int | None = None
) -> dict[str, Tensor]:
    """A `Batch` as a batch dict; teacher targets need their `temperature`.

    The inverse of `batch_from_dict` (which drops the temperature: the trainer's loss holds it).
    """
    unknown = sorted(set(batch.extras) - set(_DICT_KEY))
    if unknown:
        raise TrainError(f"batch extras {unknown} have no batch-dict key (known: {sorted(_DICT_KEY)})")
    out = {"input_ids": batch.inputs, "labels": batch.targets}
    if batch.positions is not None:
        out[POSITIONS_KEY] = batch.positions
    out.update({_DICT_KEY[name]: values for name, values in batch.extras.items()})
    if temperature is not None:
        out[TEMPERATURE_KEY] = torch.tensor(temperature, dtype=torch.float32)
    elif batch.extras:
        raise TrainError("a batch with teacher targets needs the temperature they were computed at")
    if vocab_size is not None:
        out[VOCAB_KEY] = torch.tensor(vocab_size, dtype=torch.int64)
    return out


def batch_from_dict(batch: Mapping[str, Any]) -> Batch:
    """A batch dict (input_ids, labels, position_ids, teacher_* keys) as a `Batch`; bad input
    raises ValueError."""
    missing = [key for key in ("input_ids", "labels") if key not in batch]
    if missing:
        raise ValueError(f"batch has no {' or '.join(missing)} (has {sorted(batch)})")
    extras = {name: batch[key] for key, name in BATCH_KEYS.items() if key in batch}
    positions = batch.get(POSITIONS_KEY)
    return Batch(inputs=batch["input_ids"], targets=batch["labels"].long(), extras=extras,
                 positions=None if positions is None else positions.long())


class BatchSource(Protocol):
    """Anything the trainer can pull batches from and checkpoint."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def rows_to_batch(rows: Rows | np.ndarray) -> Batch:
    """Rows of a split (or bare token rows [B, T+1], all trained) -> a next-token batch."""
    rows = rows if isinstance(rows, Rows) else Rows(np.asarray(rows, dtype=np.int64))
    tokens = np.asarray(rows.tokens, dtype=np.int64)
    positions = rows.input_positions()

    def tensor(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    return Batch(inputs=tensor(tokens[:, :-1]), targets=tensor(rows.labels()),
                 positions=None if positions is None else tensor(positions))


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
        return rows_to_batch(self.data.read_rows(self.split, self.next_rows()))
