"""Validation metrics: cross-entropy (nats/token) and expected calibration error.

ECE follows the paper: the top-1 prediction's probability is its confidence, positions
fall into 21 equal-width confidence bins over [0, 1], and ECE is the position-weighted
mean of |accuracy - mean confidence| per bin, reported as a fraction (0.05 = 5%).

Both are over the trained positions alone (labels other than -100: on chat data the
assistant's turns), with each row's documents apart, as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdcache.storage.tokens.format import TokenData
from kdcache.train.batches import Batch, rows_to_batch
from kdcache.train.distributed import World
from kdcache.train.losses import trained_rows
from kdcache.train.trainer import LossStep, as_student

ECE_BINS = 21
EVAL_CHUNK_BYTES = 64 * 2**20
"""float32 logits formed at once per chunk of positions."""


@dataclass(frozen=True)
class EvalResult:
    loss: float
    """Mean next-token cross-entropy, nats/token."""
    ece: float
    """Expected calibration error of the top-1 prediction, as a fraction."""
    tokens: int


class CalibrationCounter:
    """Accumulates per-bin counts, confidences and hits across batches."""

    def __init__(self, bins: int = ECE_BINS) -> None:
        self.bins = bins
        self.count = torch.zeros(bins, dtype=torch.float64)
        self.confidence = torch.zeros(bins, dtype=torch.float64)
        self.correct = torch.zeros(bins, dtype=torch.float64)

    def update(self, logprobs: Tensor, targets: Tensor) -> None:
        conf, pred = logprobs.max(dim=-1)
        conf, hit = conf.exp().flatten().double(), (pred == targets).flatten().double()
        idx = torch.clamp((conf * self.bins).long(), max=self.bins - 1)
        self.count += torch.bincount(idx, minlength=self.bins).double()
        self.confidence.index_add_(0, idx, conf)
        self.correct.index_add_(0, idx, hit)

    def ece(self) -> float:
        total = self.count.sum().item()
        if total == 0:
            return float("nan")
        return ((self.correct - self.confidence).abs().sum() / total).item()


def expected_calibration_error(logprobs: Tensor, targets: Tensor, bins: int = ECE_BINS) -> float:
    counter = CalibrationCounter(bins)
    counter.update(logprobs, targets)
    return counter.ece()


def eval_sums(hidden: Tensor, head: Tensor, batch: Batch, *, chunk_bytes: int = EVAL_CHUNK_BYTES) -> Tensor:
    """[nll sum, tokens, per-bin counts, confidences, hits] of one batch, float64.

    Logits are formed chunk by chunk of positions (`chunk_bytes` of float32 each), so
    evaluation, like training, never holds [B, T, V].
    """
    targets, h = trained_rows(batch.targets.flatten(), hidden.flatten(0, -2))
    per_chunk = max(1, chunk_bytes // (4 * head.shape[0]))
    nll = torch.zeros((), dtype=torch.float64)
    counter = CalibrationCounter()
    for h_c, t_c in zip(h.split(per_chunk), targets.split(per_chunk), strict=True):
        logprobs = torch.log_softmax((h_c @ head.T).float(), dim=-1)
        nll -= logprobs.gather(-1, t_c.unsqueeze(-1)).sum().double().cpu()
        counter.update(logprobs.cpu(), t_c.cpu())
    tokens = torch.tensor([targets.numel()], dtype=torch.float64)
    return torch.cat([nll.reshape(1), tokens, counter.count, counter.confidence, counter.correct])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: TokenData,
    *,
    split: str = "valid",
    batch_size: int = 16,
    max_rows: int | None = None,
    world: World | None = None,
    step_module: nn.Module | None = None,
) -> EvalResult:
    """Cross-entropy and ECE of `model` over the first `max_rows` rows of `split`.

    Under a process group every rank must call it: rank r evaluates the batches i with
    i % world == r and the sums are reduced, so every rank returns the same result.
    `step_module` is the trainer's (DDP or FSDP wrapped) step module; FSDP needs its
    forward, which gathers the shards. Without it, `model` (a `Student` or the family's
    `Transformer`) is run as it is.
    """
    world = world or World()
    student = as_student(model)
    step = step_module if step_module is not None else LossStep(student)
    was_training = student.training
    student.eval()
    rows = data.rows(split) if max_rows is None else min(max_rows, data.rows(split))
    starts = list(range(0, rows, batch_size))
    mine = starts[world.rank :: world.size]
    rounds = -(-len(starts) // world.size)  # every rank runs as many forwards (FSDP gathers in each)
    device = next(student.parameters()).device
    total = torch.zeros(2 + 3 * ECE_BINS, dtype=torch.float64)
    for i in range(rounds):
        start = mine[i] if i < len(mine) else starts[0]
        read = data.read_rows(split, slice(start, min(start + batch_size, rows)))
        sums = step(eval_sums, rows_to_batch(read).to(device))
        if i < len(mine):
            total += sums
    world.sum_(total)
    student.train(was_training)
    nll, tokens = total[0].item(), int(total[1].item())
    counter = CalibrationCounter()
    counter.count, counter.confidence, counter.correct = total[2:].reshape(3, ECE_BINS).unbind(0)
    return EvalResult(loss=nll / tokens if tokens else float("nan"), ece=counter.ece(), tokens=tokens)
