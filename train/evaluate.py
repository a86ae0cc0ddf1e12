"""Validation metrics: cross-entropy (nats/token) and expected calibration error.

ECE follows the paper: the top-1 prediction's probability is its confidence, positions
fall into 21 equal-width confidence bins over [0, 1], and ECE is the position-weighted
mean of |accuracy - mean confidence| per bin, reported as a fraction (0.05 = 5%).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdcache.train.batches import rows_to_batch
from kdcache.train.model import Transformer
from kdcache.train.tokens import TokenData

ECE_BINS = 21


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


@torch.no_grad()
def evaluate(
    model: Transformer,
    data: TokenData,
    *,
    split: str = "valid",
    batch_size: int = 16,
    max_rows: int | None = None,
) -> EvalResult:
    """Cross-entropy and ECE of `model` over the first `max_rows` rows of `split`."""
    was_training = model.training
    model.eval()
    rows = data.rows(split) if max_rows is None else min(max_rows, data.rows(split))
    nll, tokens = 0.0, 0
    counter = CalibrationCounter()
    for start in range(0, rows, batch_size):
        rows_np = data.read(split, slice(start, min(start + batch_size, rows)))
        batch = rows_to_batch(rows_np).to(next(model.parameters()).device)
        logprobs = torch.log_softmax(model(batch.inputs).float(), dim=-1)
        nll -= logprobs.gather(-1, batch.targets.unsqueeze(-1)).sum().item()
        tokens += batch.tokens
        counter.update(logprobs.cpu(), batch.targets.cpu())
    model.train(was_training)
    return EvalResult(loss=nll / tokens, ece=counter.ece(), tokens=tokens)
