"""Losses as pure tensor functions returning sums; the trainer divides by the token count.

A loss function for the trainer (`LossFn`) maps (logits [B, T, V], batch) to `LossSums`,
or (hidden states, output layer, batch) through `from_hidden`. Supervised training uses
`NextTokenLoss`; distillation losses plug in the same way.

Positions labelled `IGNORE_INDEX` (-100: prompts, user turns, padding) are dropped before
any math (`trained_index`): the sums and their gradients are over trained positions alone,
and `LossSums.tokens` counts them. Dropping, rather than multiplying by a 0/1 weight, keeps
whatever an untrained position holds (a store's fill values) out of the values and the
gradients (0 * inf is nan), and skips the projection and log-normaliser there. Hidden
states are cut to the trained rows up front (a copy of [n, d], small); logits are selected
chunk by chunk inside the chunk's function, so no copy of [n, V] is kept for backward.

Both losses work over chunks of positions, and both also take the student's final hidden
states [B, T, d] and its output layer's weight instead of logits (`from_hidden`): each
chunk's logits are computed from the hidden states, used, and dropped, and backward
recomputes them (activation checkpointing, as a fused linear cross-entropy does). At a
vocabulary of 150k and a few thousand positions per step the logits and their gradient
are several GiB, far more than the rest of a small student's step; chunked, the loss
holds one chunk's worth at a time. Chunks are sized in bytes of float32 logits
(`LOSS_CHUNK_BYTES`), so the bound does not change with the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdcache.storage.tokens.format import IGNORE_INDEX
from kdcache.train.batches import Batch
from kdcache.train.errors import TrainError

LOSS_CHUNK_BYTES = 64 * 2**20
"""Float32 logits per chunk: 64 MiB is 110 positions at V = 151,936 and 341 at 49,152.

A chunk's forward and backward hold a few tensors of this size at once (the logits, their
softmax, their gradient), so the loss adds a few hundred MiB at most to a step whatever
B * T is; matmuls of ~100+ rows against the output layer still run near full speed."""


@dataclass(frozen=True)
class LossSums:
    """`total` is what gets differentiated (a sum over `tokens` positions); `metrics` are
    detached sums over the same positions, reported divided by `tokens`."""

    total: Tensor
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)


class LossFn(Protocol):
    """What the trainer calls: from logits, or from hidden states and the output layer."""

    def __call__(self, logits: Tensor, batch: Batch) -> LossSums: ...

    def from_hidden(
        self, hidden: Tensor, head: Tensor, batch: Batch, *, vocab: int | None = None
    ) -> LossSums: ...


def cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed next-token cross-entropy (nats) over the trained targets, computed in float32."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="sum",
                           ignore_index=IGNORE_INDEX)


def trained_index(targets: Tensor) -> Tensor | None:
    """Indices of the trained targets in the flat `targets` [N]; None when every one is."""
    keep = targets != IGNORE_INDEX
    if bool(keep.all()):
        return None
    return keep.nonzero().squeeze(-1)


def trained_rows(targets: Tensor, *per_position: Tensor) -> list[Tensor]:
    """[targets, *per_position] with their leading (position) dim cut to the trained targets.

    `targets` [N] and each `per_position` [N, ...] are flat over positions; with every
    position trained they come back as they are (no copy).
    """
    index = trained_index(targets)
    if index is None:
        return [targets, *per_position]
    return [t.index_select(0, index) for t in (targets, *per_position)]


def positions_per_chunk(chunk_bytes: int, vocab: int) -> int:
    """Positions whose float32 logits over `vocab` ids fit in `chunk_bytes` (at least one)."""
    return max(1, chunk_bytes // (4 * vocab))


def check_chunk_bytes(chunk_bytes: int) -> None:
    if chunk_bytes < 1:
        raise TrainError(f"chunk_bytes must be >= 1, got {chunk_bytes}")


def sum_chunks(
    fn: Callable[..., Tensor], per_position: Sequence[Tensor], *, positions: int,
    shared: Sequence[Tensor] = (), recompute: bool = False, rows: Tensor | None = None,
) -> Tensor:
    """sum over chunks of `fn(*shared, *chunks)`, each `per_position` tensor split on dim 0.

    With `recompute` each chunk runs under non-reentrant activation checkpointing: only its
    inputs (views of `per_position`, and `shared`) are kept for backward, which reruns it.
    With `rows` (indices into dim 0) only those positions are summed, `positions` of them a
    chunk, selected inside the chunk: a recomputed chunk keeps its indices, not a copy.
    With no positions `fn` runs once on the empty tensors: zero sums, still in the graph.
    """
    n_shared = len(shared)

    def selected(*args: Tensor) -> Tensor:
        *inputs, index = args
        return fn(*inputs[:n_shared], *(t.index_select(0, index) for t in inputs[n_shared:]))

    calls: list[tuple[Callable[..., Tensor], tuple[Tensor, ...]]]
    if rows is None:
        parts = [t.split(positions) for t in per_position]
        calls = [(fn, (*shared, *chunk)) for chunk in zip(*parts, strict=True)]
    else:
        calls = [(selected, (*shared, *per_position, index)) for index in rows.split(positions)]
    total: Tensor | None = None
    for f, args in calls:
        out = checkpoint(f, *args, use_reentrant=False) if recompute else f(*args)
        total = out if total is None else total + out
    assert total is not None, "no positions"
    return total


def output_rows(hidden: Tensor, head: Tensor, vocab: int | None) -> tuple[Tensor, Tensor]:
    """(hidden flattened to [N, d], the first `vocab` rows of `head` [V_rows, d]), checked.

    A padded output layer (V_rows rounded up for speed) has rows past the tokenizer's
    vocabulary; those ids cannot be targets, so the loss is over the first `vocab` rows.
    """
    if head.dim() != 2 or hidden.dim() < 2 or hidden.shape[-1] != head.shape[1]:
        raise TrainError(
            f"hidden states {tuple(hidden.shape)} and output layer {tuple(head.shape)} do not fit: "
            "expected hidden [..., d] and a head weight [V, d]"
        )
    rows = head.shape[0]
    vocab = rows if vocab is None else vocab
    if not 1 <= vocab <= rows:
        raise TrainError(f"vocab {vocab} must lie in [1, {rows}] (the output layer's rows)")
    return hidden.flatten(0, -2), head[:vocab]


def head_logits(hidden: Tensor, head: Tensor) -> Tensor:
    """hidden [n, d] @ head.T in the head's dtype (or autocast's), upcast to at least float32."""
    if hidden.dtype != head.dtype and not torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(head.dtype)  # a chunk's worth; casting the head would copy [V, d]
    s = hidden @ head.T
    return s.to(torch.promote_types(s.dtype, torch.float32))


def needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@dataclass(frozen=True)
class NextTokenLoss:
    """Supervised objective: cross-entropy + z_loss_weight * z-loss."""

    z_loss_weight: float = 1e-4
    chunk_bytes: int = LOSS_CHUNK_BYTES
    """Bytes of float32 logits per chunk (`LOSS_CHUNK_BYTES`)."""

    def __post_init__(self) -> None:
        check_chunk_bytes(self.chunk_bytes)

    def __call__(self, logits: Tensor, batch: Batch) -> LossSums:
        s, targets = logits.flatten(0, -2), batch.targets.reshape(-1)
        rows = trained_index(targets)
        # Float32 logits keep only [chunk] tensors for backward (logsumexp saves its input, a
        # view); upcast ones (bf16), or trained rows selected (a copy), would keep a float32
        # copy per chunk, so they recompute.
        sums = sum_chunks(self._chunk_sums, [s, targets],
                          positions=positions_per_chunk(self.chunk_bytes, s.shape[-1]),
                          recompute=needs_grad(s) and (s.dtype != torch.float32 or rows is not None),
                          rows=rows)
        return self._result(sums, batch)

    def from_hidden(
        self, hidden: Tensor, head: Tensor, batch: Batch, *, vocab: int | None = None
    ) -> LossSums:
        """The loss of logits hidden @ head[:vocab].T, never holding more than a chunk of them."""
        h, w = output_rows(hidden, head, vocab)
        targets, h = trained_rows(batch.targets.reshape(-1), h)
        sums = sum_chunks(lambda w, h, t: self._chunk_sums(head_logits(h, w), t),
                          [h, targets], shared=[w],
                          positions=positions_per_chunk(self.chunk_bytes, w.shape[0]),
                          recompute=needs_grad(h, w))
        return self._result(sums, batch)

    def _chunk_sums(self, s: Tensor, targets: Tensor) -> Tensor:
        """[total, ce, z] over one chunk of logits [n, V]; only `total` carries a gradient."""
        # One log-partition serves both terms: cross-entropy and z-loss, log(Z)^2 (PaLM).
        s = s.to(torch.promote_types(s.dtype, torch.float32))
        lse = torch.logsumexp(s, dim=-1)
        ce = (lse - s.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).sum()
        z = lse.pow(2).sum()
        return torch.stack([ce + self.z_loss_weight * z, ce.detach(), z.detach()])

    def _result(self, sums: Tensor, batch: Batch) -> LossSums:
        ce, z = sums[1:].tolist()
        return LossSums(total=sums[0].clone(), tokens=batch.tokens, metrics={"ce": ce, "z": z})
