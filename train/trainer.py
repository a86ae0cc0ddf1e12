"""The training loop: any student, any batch source, any loss function, any number of ranks.

The trainer owns the optimiser, the schedule, clipping, checkpointing and resume; what
a step learns from is the `BatchSource` and the `LossFn` passed in, so supervised
training, offline distillation from a store and online distillation share this loop.

A step runs the student and its loss in one module's forward (`LossStep`): the student
gives hidden states, the loss projects them to logits chunk by chunk (`from_hidden`),
so no step holds [B, T, V], and DDP or FSDP (`distributed.py`) see every parameter,
the output layer's included, used inside the forward they wrap. A step's loss is the mean
over the global batch's trained tokens: ranks may hold different counts of them (chat data
trains only the assistant's turns), so each rank's sum is divided by the global count (one
all-reduce of the counts before the forward) and scaled by the world size, which DDP's and
FSDP's gradient average takes back out; every trained token then weighs the same. A rank's
share may run as several micro-batches (`--grad-accum`), each divided by the same count, so
accumulating them gives the same step as one batch. Under `--precision bf16` the step runs
under bf16 autocast: weights, gradients, optimiser state and the losses stay float32 (the
losses upcast each chunk of logits, `losses.head_logits`).

A step whose loss is non-finite, or has risen far above the first step's (`DIVERGED_STEPS`),
stops the run with one line naming `--lr`, before the optimiser applies it.

Checkpoints hold full (unsharded) state under parameter names, written by rank 0 and
read by every rank, so a run resumes at any world size, with or without FSDP: the data
position is a global batch index (`row_order.py`), the same at every world size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kdcache.train.batches import Batch, BatchSource
from kdcache.train.checkpoint import full_state, load_checkpoint, restore, save_checkpoint
from kdcache.train.distributed import World, wrap
from kdcache.train.errors import TrainError
from kdcache.train.job import LoopSettings, Recipe
from kdcache.train.losses import LossFn, LossSums
from kdcache.train.model import Transformer
from kdcache.train.optim import build_optimizer, lr_factor, set_lr
from kdcache.train.student import FamilyStudent, Student


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """One training loop: the run's `LoopSettings` and what follows from its budget and student."""

    steps: int
    settings: LoopSettings = field(default_factory=LoopSettings)
    """The optimiser flags (`recipe` fills the ones not given), the precision and the data order."""
    checkpoint_every: int = 0
    """Steps between checkpoints; 0 disables them."""
    pretrained: bool = False
    """The student starts from pretrained weights: the optimiser defaults are `FINE_TUNE`'s."""
    grad_accum: int = 1
    """Micro-batches per optimiser step on each rank (the global batch is split, not grown)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise TrainError(f"training needs at least one step, got steps={self.steps}")
        if self.grad_accum < 1:
            raise TrainError(f"--grad-accum must be >= 1, got {self.grad_accum}")

    @property
    def recipe(self) -> Recipe:
        return self.settings.recipe(pretrained=self.pretrained)

    @property
    def warmup_steps(self) -> int:
        return round(self.recipe.warmup_frac * self.steps)


DIVERGED_STEPS = 3
"""A run has diverged when the mean loss of its last `DIVERGED_STEPS` steps exceeds
max(2 L1, L1 + 1 nat), L1 being its first step's loss (the starting weights' loss on the first
batch). A student trained from scratch starts near ln V (9 nats at V = 8,192), so only a blow-up
trips it; a pretrained student starts low, and a learning rate that destroys it (the muP
default 3e-3 took a SmolLM2 student's distillation loss from 0.09 to 8.5 in one step) trips it
at once. Doubling alone would trip on noise at losses near zero, one nat alone on noise at high
losses; both must hold."""


def diverged(first: float, recent: list[float]) -> bool:
    """True when the mean of `recent` losses rose far above the `first` (see `DIVERGED_STEPS`)."""
    mean = sum(recent) / len(recent)
    return mean > max(2 * first, first + 1.0)


@dataclass(frozen=True)
class StepInfo:
    step: int  # 1-based count of completed steps
    loss: float
    metrics: dict[str, float]
    grad_norm: float
    lr_factor: float
    lr: float = 0.0
    """The peak learning rate times `lr_factor`: what the step used (muP scales it per group)."""
    tokens: int = 0
    """Trained tokens of the step, over every rank."""
    tokens_per_s: float = 0.0
    """Trained tokens per second of this session so far."""


@dataclass(frozen=True)
class LoopResult:
    steps: int
    tokens: int
    wall_s: float
    """Training time summed over every session of a resumed run."""
    final_loss: float
    """Mean training loss over the last 10% of steps of this session."""
    history: list[float] = field(repr=False, default_factory=list)


class LossStep(nn.Module):
    """`fn(hidden, head[:vocab], batch)` of the student, in one forward for DDP and FSDP to wrap."""

    def __init__(self, student: Student) -> None:
        super().__init__()
        self.student = student

    def forward(self, fn: Callable[[Tensor, Tensor, Batch], Any], batch: Batch) -> Any:
        hidden = self.student(batch.inputs, batch.positions)
        return fn(hidden, self.student.head()[: self.student.vocab], batch)


def as_student(model: nn.Module) -> Student:
    """A `Student` as it is; the family's `Transformer` wrapped, over all its output rows."""
    if isinstance(model, Student):
        return model
    if isinstance(model, Transformer):
        return FamilyStudent(model, model.config.vocab_size)
    raise TypeError(f"expected a Student or the family's Transformer, got {type(model).__name__}")


def decoder_layers(student: Student) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one (every transformers decoder names them so)."""
    base = student.lm.model if student.family else student.lm.base_model
    layers = getattr(base, "layers", None) or getattr(base, "h", None) or []
    return list(layers)


class Trainer:
    """Runs `cfg.steps` optimiser steps of a student on `source` with `loss_fn`.

    `model` is a `Student` or the family's `Transformer`. With `checkpoint_dir`, state is
    saved every `checkpoint_every` steps and a later `run()` resumes from it (refusing a
    checkpoint whose `run_fingerprint` differs), ending with bit-identical weights to an
    uninterrupted run. Under a process group (`world`), every rank runs this loop on its
    slice of each batch; rank 0 alone writes checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        source: BatchSource,
        loss_fn: LossFn,
        cfg: LoopConfig,
        *,
        checkpoint_dir: Path | None = None,
        run_fingerprint: str = "",
        progress: bool = True,
        on_step: Callable[[StepInfo], None] | None = None,
        world: World | None = None,
        fsdp: bool = False,
    ) -> None:
        self.student = as_student(model)
        self.model = self.student.lm
        self.source, self.loss_fn, self.cfg = source, loss_fn, cfg
        self.checkpoint_dir, self.run_fingerprint = checkpoint_dir, run_fingerprint
        self.world = world or World()
        self.progress, self.on_step = progress and self.world.main, on_step
        self.step_module = wrap(LossStep(self.student), self.world, fsdp=fsdp,
                                layers=decoder_layers(self.student))
        recipe = cfg.recipe
        self.optimizer = build_optimizer(self.student, lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.device = next(self.student.parameters()).device  # batches follow the model
        self.autocast = cfg.settings.precision == "bf16"
        self.first_loss: float | None = None
        """The first step's loss, the reference of the divergence check (kept in checkpoints)."""

    def _loss(self, hidden: Tensor, head: Tensor, batch: Batch) -> LossSums:
        return self.loss_fn.from_hidden(hidden, head, batch)

    def full_state(self) -> dict[str, Tensor]:
        """The student's unsharded weights under its own names (every rank must call it)."""
        return full_state(self.step_module, self.optimizer, prefix="student.lm.")[0]

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
        restore(ckpt, self.step_module, self.optimizer, prefix="student.lm.")
        self.source.load_state_dict(ckpt.info["source"])
        self.first_loss = ckpt.info.get("first_loss")
        return ckpt.step, int(ckpt.info["tokens"]), float(ckpt.info["wall_s"])

    def _save(self, step: int, tokens: int, wall_s: float) -> None:
        assert self.checkpoint_dir is not None
        info: dict[str, Any] = {
            "run_fingerprint": self.run_fingerprint,
            "source": self.source.state_dict(),
            "tokens": tokens,
            "wall_s": wall_s,
            "world": self.world.size,
            "first_loss": self.first_loss,
        }
        model, optim = full_state(self.step_module, self.optimizer, prefix="student.lm.")  # every rank
        directory = self.checkpoint_dir
        self.world.main_only(lambda: save_checkpoint(directory, step=step, model=model, optimizer=optim,
                                                     info=info))

    def _step(self, step: int, recent: list[float]) -> tuple[float, int, StepInfo]:
        """One optimiser step over the rank's share of a global batch, in `grad_accum` micro-batches.

        Each micro-batch's loss sum is divided by the global batch's trained tokens (counted
        first, one all-reduce), so the accumulated gradient is the gradient of the step's mean
        whatever the cut; DDP and FSDP synchronise gradients on the last micro-batch only.
        """
        cfg, recipe = self.cfg, self.cfg.recipe
        factor = lr_factor(step, total=cfg.steps, warmup=cfg.warmup_steps, final=recipe.final_lr_frac)
        set_lr(self.optimizer, factor)
        batch = self.source.next_batch().to(self.device)
        parts = batch.split(cfg.grad_accum)
        counted = self.world.sum_(torch.tensor([float(batch.tokens)], dtype=torch.float64))
        tokens = int(counted.item())
        scale = max(tokens, 1) / self.world.size  # DDP and FSDP average gradients over ranks
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        metrics: dict[str, float] = {}
        for i, part in enumerate(parts):
            with self._gradient_sync(i == len(parts) - 1), torch.autocast(
                    self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                sums = self.step_module(self._loss, part)
            (sums.total / scale).backward()
            total += sums.total.item()
            for name, value in sums.metrics.items():
                metrics[name] = metrics.get(name, 0.0) + value
        total, metrics = self._global_sums(total, metrics)
        mean = total / max(tokens, 1)  # every rank sees the same value, so all stop together
        self._check_loss(step + 1, mean, recent)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            [p for p in self.student.parameters() if p.requires_grad], recipe.grad_clip))
        self.optimizer.step()
        metrics = {k: v / max(tokens, 1) for k, v in metrics.items()}
        info = StepInfo(step + 1, mean, metrics, grad_norm, factor, lr=recipe.lr * factor, tokens=tokens)
        return mean, tokens, info

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient all-reduce of a micro-batch that is not the step's last."""
        module = self.step_module
        if sync:
            return contextlib.nullcontext()
        if isinstance(module, DistributedDataParallel):
            return module.no_sync()
        if isinstance(module, FSDPModule):
            return _fsdp_unsynced(module)
        return contextlib.nullcontext()

    def _check_loss(self, step: int, mean: float, recent: list[float]) -> None:
        """Stop, before the optimiser moves, a run whose loss is non-finite or has diverged."""
        lr = self.cfg.recipe.lr
        if not math.isfinite(mean):
            raise TrainError(f"loss became non-finite at step {step}: the run diverged; lower --lr "
                             f"(it is {lr:g})")
        if self.first_loss is None:
            self.first_loss = mean
        window = [*recent[-(DIVERGED_STEPS - 1):], mean]
        if diverged(self.first_loss, window):
            raise TrainError(
                f"loss rose from {self.first_loss:.4f} (step 1) to {sum(window) / len(window):.4f} (mean of "
                f"the last {len(window)} steps) at step {step}: the run diverged; lower --lr (it is {lr:g})")

    def _global_sums(self, total: float, metrics: dict[str, float]) -> tuple[float, dict[str, float]]:
        """(loss sum, metric sums) over every rank's share of the step: one all-reduce."""
        names = sorted(metrics)
        local = [total, *(metrics[k] for k in names)]
        reduced = self.world.sum_(torch.tensor(local, dtype=torch.float64)).tolist()
        return reduced[0], dict(zip(names, reduced[1:], strict=True))

    def run(self) -> LoopResult:
        """Train to `cfg.steps`, resuming from the checkpoint directory if it holds state."""
        cfg = self.cfg
        start, tokens, wall_before = self._resume()
        self.student.train()
        history: list[float] = []
        session_tokens, t0 = 0, time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=start, unit="step", disable=not self.progress,
                   desc="train", dynamic_ncols=True)
        for step in range(start, cfg.steps):
            loss, n_tokens, info = self._step(step, history)
            tokens += n_tokens
            session_tokens += n_tokens
            history.append(loss)
            rate = session_tokens / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
            if self.on_step is not None:
                self.on_step(dataclasses.replace(info, tokens_per_s=rate))
            done = step + 1
            every = cfg.checkpoint_every
            if self.checkpoint_dir is not None and every and done % every == 0 and done < cfg.steps:
                self._save(done, tokens, wall_before + time.perf_counter() - t0)
        bar.close()
        self.student.eval()
        tail = history[-max(1, len(history) // 10):] if history else [float("nan")]
        return LoopResult(
            steps=cfg.steps,
            tokens=tokens,
            wall_s=wall_before + time.perf_counter() - t0,
            final_loss=sum(tail) / len(tail),
            history=history,
        )


@contextlib.contextmanager
def _fsdp_unsynced(module: FSDPModule) -> Iterator[None]:
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
