"""One `kdcache train` run end to end: data -> trained MODEL directory + runs-table row.

The run is supervised, distilled offline from a logit store (`--distill`), or distilled
online from a live teacher (`--online-teacher`). The three share the trainer, the row
order and the evaluation; they differ only in the batch source and the loss, which
`_objective` picks. Rerunning resumes from `out/checkpoint`.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcache.fit.flops import forward_flops, training_flops
from kdcache.train.batches import BatchSource, TokenBatches
from kdcache.train.config import ModelConfig
from kdcache.train.errors import TrainError
from kdcache.train.evaluate import evaluate
from kdcache.train.job import TOKENS_PER_PARAM, TrainJobConfig
from kdcache.train.kd_losses import DistillLoss
from kdcache.train.losses import LossFn, NextTokenLoss
from kdcache.train.model import build_model
from kdcache.train.model_dir import META, load_model_dir, save_model_dir
from kdcache.train.runtime import tune_cpu_allocator
from kdcache.train.tokens import TokenData, open_token_data
from kdcache.train.trainer import LoopConfig, Trainer

CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class TrainResult:
    out: Path
    row: dict[str, Any]
    """The runs-table row (also returned when no table was given)."""


@dataclass
class Objective:
    """What a run learns from: its batches, its loss, and what the row says of the teacher."""

    source: BatchSource
    loss: LossFn
    teacher_fingerprint: str = ""
    teacher: dict[str, Any] | None = None
    """Runs-table teacher columns (teacher_params, store, k, temperature, lambda)."""
    teacher_flops_per_token: float = 0.0
    """Teacher forward FLOPs each training token costs (online distillation only)."""


def plan_steps(cfg: TrainJobConfig, n_params: int, seq_len: int) -> tuple[int, int]:
    """(steps, tokens per step) for the token budget, rounding the budget up to whole steps."""
    budget = cfg.tokens if cfg.tokens is not None else TOKENS_PER_PARAM * n_params
    per_step = cfg.batch_size * seq_len
    return max(1, math.ceil(budget / per_step)), per_step


def _objective(cfg: TrainJobConfig, data: TokenData) -> Objective:
    if cfg.distill:
        return _offline(cfg, data)
    if cfg.online_teacher:
        return _online(cfg, data)
    data.rows(cfg.split)  # fail early, naming a missing split
    return Objective(TokenBatches(data, cfg.split, batch_size=cfg.batch_size, seed=cfg.seed),
                     NextTokenLoss(cfg.z_loss))


def _offline(cfg: TrainJobConfig, data: TokenData) -> Objective:
    from kdcache.storage import read_meta
    from kdcache.train.store_batches import StoreBatches, check_store_matches

    assert cfg.distill is not None
    meta = read_meta(cfg.distill)
    check_store_matches(cfg.distill, meta, data)
    if cfg.temperature is not None and cfg.temperature != meta.temperature:
        raise TrainError(
            f"{cfg.distill}: field 'temperature' is {meta.temperature} but --temperature is "
            f"{cfg.temperature} (stored log-probs fix the temperature; cache again to change it)"
        )
    loss = DistillLoss(kind=meta.kind, divergence=cfg.divergence, tail=cfg.tail, lam=cfg.lam,
                       tau=meta.temperature, z_loss=cfg.z_loss)
    # On CPU a prefetch thread competes with torch's threads for the cores (store_batches.py).
    source = StoreBatches(cfg.distill, batch_size=cfg.batch_size, seed=cfg.seed,
                          prefetch=0 if cfg.device == "cpu" else 2)
    identity = json.dumps(meta.identity(), sort_keys=True)
    teacher = {"teacher_params": meta.teacher.nonembedding_params, "store": str(Path(cfg.distill).resolve()),
               "k": meta.k,
               "temperature": meta.temperature, "lambda": cfg.lam}
    return Objective(source, loss, teacher_fingerprint=identity, teacher=teacher)


def _online(cfg: TrainJobConfig, data: TokenData) -> Objective:
    from kdcache.train.online import OnlineTeacherBatches, check_teacher_matches

    assert cfg.online_teacher is not None
    loaded = load_model_dir(cfg.online_teacher)
    check_teacher_matches(loaded, data)
    tau = 1.0 if cfg.temperature is None else cfg.temperature
    tokens = TokenBatches(data, cfg.split, batch_size=cfg.batch_size, seed=cfg.seed)
    source = OnlineTeacherBatches(tokens, loaded.model.to(cfg.device), temperature=tau)
    loss = DistillLoss(kind="full", divergence=cfg.divergence, tail=cfg.tail, lam=cfg.lam,
                       tau=tau, z_loss=cfg.z_loss)
    n_t = loaded.config.non_embedding_params()
    teacher = {"teacher_params": n_t, "k": data.vocab_size, "temperature": tau, "lambda": cfg.lam}
    per_token = float(forward_flops(n_t, rho=loaded.config.rho, context=data.seq_len, vocab=data.vocab_size))
    return Objective(source, loss, teacher_fingerprint=loaded.fingerprint, teacher=teacher,
                     teacher_flops_per_token=per_token)


def _teacher_columns(cfg: TrainJobConfig, objective: Objective) -> dict[str, Any]:
    """The row's teacher columns, read at the end: a store may have completed meanwhile."""
    from kdcache.storage import read_meta
    from kdcache.train.online import OnlineTeacherBatches

    if objective.teacher is None:
        return {}
    if isinstance(objective.source, OnlineTeacherBatches):
        return {**objective.teacher, "teacher_loss": objective.source.teacher_loss}
    assert cfg.distill is not None
    return {**objective.teacher, "teacher_loss": read_meta(cfg.distill).teacher_loss}


def run_training(cfg: TrainJobConfig) -> TrainResult:
    """Train, evaluate, save and record one run; resumes from `out/checkpoint`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tune_cpu_allocator()
    out = Path(cfg.out)
    if (out / META).is_file():
        raise TrainError(f"{out}: already holds a finished model (choose another --out)")
    if cfg.device != "cpu" and not torch.cuda.is_available():
        raise TrainError(f"--device {cfg.device}: no CUDA device is available")
    data = open_token_data(cfg.data)
    data.rows("valid")
    objective = _objective(cfg, data)
    model_cfg = ModelConfig(
        layers=cfg.layers, vocab_size=data.vocab_size, rho=cfg.rho, head_dim=cfg.head_dim,
        qk_norm=cfg.qk_norm, max_position=max(2048, data.seq_len + 1),
    )
    n_params = model_cfg.non_embedding_params()
    steps, per_step = plan_steps(cfg, n_params, data.seq_len)
    model = build_model(model_cfg, seed=cfg.seed).to(cfg.device)
    loop = LoopConfig(
        steps=steps, lr=cfg.lr, warmup_steps=round(cfg.warmup_frac * steps),
        final_lr_frac=cfg.final_lr_frac, weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip, checkpoint_every=cfg.checkpoint_every,
    )
    trainer = Trainer(
        model, objective.source, objective.loss, loop,
        checkpoint_dir=out / CHECKPOINT_DIR,
        run_fingerprint=cfg.fingerprint(data.fingerprint, objective.teacher_fingerprint),
        progress=not cfg.quiet,
    )
    try:
        result = trainer.run()
    finally:
        close = getattr(objective.source, "close", None)
        if close is not None:
            close()
    metrics = evaluate(model, data, max_rows=cfg.eval_rows, batch_size=cfg.batch_size)
    flops = training_flops(n_params, result.tokens, rho=cfg.rho, context=data.seq_len, vocab=data.vocab_size)
    row: dict[str, Any] = {
        "run_id": cfg.run_id or out.name,
        "kind": cfg.kind,
        "params": n_params,
        "tokens": result.tokens,
        "loss": metrics.loss,
        **_teacher_columns(cfg, objective),
        "ece": metrics.ece,
        "flops": flops + objective.teacher_flops_per_token * result.tokens,
        "wall_s": result.wall_s,
        "tokens_per_s": result.tokens / result.wall_s,
        "layers": cfg.layers,
        "d_model": model_cfg.d_model,
        "n_heads": model_cfg.n_heads,
        "vocab_size": data.vocab_size,
        "seq_len": data.seq_len,
        "seed": cfg.seed,
    }
    save_model_dir(
        model, out, tokenizer=data.tokenizer_path, eos_token_id=data.eos_token_id,
        meta={
            "training": {**row, "train_loss": result.final_loss, "steps": steps, "split": cfg.split,
                         "batch_size": cfg.batch_size, "lr": cfg.lr, "tokens_per_step": per_step,
                         "loss_history": result.history},
            "data": {"path": str(Path(cfg.data).resolve()), "fingerprint": data.fingerprint,
                     "tokenizer_fingerprint": data.tokenizer_fingerprint, "seq_len": data.seq_len},
        },
    )
    if cfg.runs:
        from kdcache.fit.runs import append_run

        append_run(cfg.runs, row)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return TrainResult(out=out, row=row)
