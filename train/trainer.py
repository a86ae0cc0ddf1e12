"""The training loop: any model, any batch source, any loss function.

The trainer owns the optimiser, the schedule, clipping, checkpointing and resume; what
a step learns from is the `BatchSource` and the `LossFn` passed in, so supervised
training, offline distillation from a store and online distillation share this loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kdcache.train.batches import BatchSource
from kdcache.train.checkpoint import load_checkpoint, restore, save_checkpoint
from kdcache.train.errors import TrainError
from kdcache.train.losses import LossFn
from kdcache.train.model import Transformer
from kdcache.train.optim import build_optimizer, lr_factor, set_lr


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Optimisation settings of one training loop."""

    steps: int
    lr: float = 3e-3
    warmup_steps: int = 0
    final_lr_frac: float = 0.1
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 disables them."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise TrainError(f"training needs at least one step, got steps={self.steps}")
        if not (self.lr > 0 and self.grad_clip > 0 and self.weight_decay >= 0):
            raise TrainError("lr and grad_clip must be positive, weight_decay non-negative")
        if not 0 <= self.warmup_steps <= self.steps:
            raise TrainError(f"warmup_steps {self.warmup_steps} must lie in [0, steps]")
        if not 0 <= self.final_lr_frac <= 1:
            raise TrainError(f"final_lr_frac {self.final_lr_frac} must lie in [0, 1]")


@dataclass(frozen=True)
class StepInfo:
    step: int  # 1-based count of completed steps
    loss: float
    metrics: dict[str, float]
    grad_norm: float
    lr_factor: float


@dataclass(frozen=True)
class LoopResult:
    steps: int
    tokens: int
    wall_s: float
    """Training time summed over every session of a resumed run."""
    final_loss: float
    """Mean training loss over the last 10% of steps of this session."""
    history: list[float] = field(repr=False, default_factory=list)


class Trainer:
    """Runs `cfg.steps` optimiser steps of `model` on `source` with `loss_fn`.

    With `checkpoint_dir`, state is saved every `checkpoint_every` steps and a later
    `run()` resumes from it (refusing a checkpoint whose `run_fingerprint` differs),
    ending with bit-identical weights to an uninterrupted run.
    """

    def __init__(
        self,
        model: Transformer,
        source: BatchSource,
        loss_fn: LossFn,
        cfg: LoopConfig,
        *,
        checkpoint_dir: Path | None = None,
        run_fingerprint: str = "",
        progress: bool = True,
        on_step: Callable[[StepInfo], None] | None = None,
    ) -> None:
        self.model, self.source, self.loss_fn, self.cfg = model, source, loss_fn, cfg
        self.checkpoint_dir, self.run_fingerprint = checkpoint_dir, run_fingerprint
        self.progress, self.on_step = progress, on_step
        self.optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.device = next(model.parameters()).device  # batches follow the model

    def _resume(self) -> tuple[int, int, float]:
        if self.checkpoint_dir is None:
            return 0, 0, 0.0
        ckpt = load_checkpoint(self.checkpoint_dir)
        if ckpt is None:
            return 0, 0, 0.0
        if ckpt.info.get("run_fingerprint") != self.run_fingerprint:
            raise TrainError(
                f"{self.checkpoint_dir}: checkpoint belongs to a run with different settings "
                "(use another --out, or delete the checkpoint)"
            )
        restore(ckpt, self.model, self.optimizer)
        self.source.load_state_dict(ckpt.info["source"])
        return ckpt.step, int(ckpt.info["tokens"]), float(ckpt.info["wall_s"])

    def _save(self, step: int, tokens: int, wall_s: float) -> None:
        assert self.checkpoint_dir is not None
        info: dict[str, Any] = {
            "run_fingerprint": self.run_fingerprint,
            "source": self.source.state_dict(),
            "tokens": tokens,
            "wall_s": wall_s,
        }
        save_checkpoint(self.checkpoint_dir, step=step, model=self.model,
                        optimizer=self.optimizer, info=info)

    def _step(self, step: int) -> tuple[float, int, StepInfo]:
        cfg = self.cfg
        factor = lr_factor(step, total=cfg.steps, warmup=cfg.warmup_steps, final=cfg.final_lr_frac)
        set_lr(self.optimizer, factor)
        batch = self.source.next_batch().to(self.device)
        sums = self.loss_fn(self.model(batch.inputs), batch)
        loss = sums.total / sums.tokens
        if not math.isfinite(loss.item()):
            raise TrainError(f"loss became non-finite at step {step + 1} (try a lower --lr)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip).item()
        self.optimizer.step()
        metrics = {k: v / sums.tokens for k, v in sums.metrics.items()}
        return loss.item(), sums.tokens, StepInfo(step + 1, loss.item(), metrics, grad_norm, factor)

    def run(self) -> LoopResult:
        """Train to `cfg.steps`, resuming from the checkpoint directory if it holds state."""
        cfg = self.cfg
        start, tokens, wall_before = self._resume()
        self.model.train()
        history: list[float] = []
        session_tokens, t0 = 0, time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=start, unit="step", disable=not self.progress,
                   desc="train", dynamic_ncols=True)
        for step in range(start, cfg.steps):
            loss, n_tokens, info = self._step(step)
            tokens += n_tokens
            session_tokens += n_tokens
            history.append(loss)
            rate = session_tokens / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
            if self.on_step is not None:
                self.on_step(info)
            done = step + 1
            every = cfg.checkpoint_every
            if self.checkpoint_dir is not None and every and done % every == 0 and done < cfg.steps:
                self._save(done, tokens, wall_before + time.perf_counter() - t0)
        bar.close()
        self.model.eval()
        tail = history[-max(1, len(history) // 10):] if history else [float("nan")]
        return LoopResult(
            steps=cfg.steps,
            tokens=tokens,
            wall_s=wall_before + time.perf_counter() - t0,
            final_loss=sum(tail) / len(tail),
            history=history,
        )
