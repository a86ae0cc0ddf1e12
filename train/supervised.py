"""Supervised training end to end: token data -> trained MODEL directory + runs-table row."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcache.fit.flops import training_flops
from kdcache.train.batches import TokenBatches
from kdcache.train.config import ModelConfig
from kdcache.train.errors import TrainError
from kdcache.train.evaluate import evaluate
from kdcache.train.job import TOKENS_PER_PARAM, TrainJobConfig
from kdcache.train.losses import NextTokenLoss
from kdcache.train.model import build_model
from kdcache.train.model_dir import META, save_model_dir
from kdcache.train.runtime import tune_cpu_allocator
from kdcache.train.tokens import open_token_data
from kdcache.train.trainer import LoopConfig, Trainer

CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class TrainResult:
    out: Path
    row: dict[str, Any]
    """The runs-table row (also returned when no table was given)."""


def plan_steps(cfg: TrainJobConfig, n_params: int, seq_len: int) -> tuple[int, int]:
    """(steps, tokens per step) for the token budget, rounding the budget up to whole steps."""
    budget = cfg.tokens if cfg.tokens is not None else TOKENS_PER_PARAM * n_params
    per_step = cfg.batch_size * seq_len
    return max(1, math.ceil(budget / per_step)), per_step


def train_supervised(cfg: TrainJobConfig) -> TrainResult:
    """Train, evaluate, save and record one supervised run; resumes from `out/checkpoint`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tune_cpu_allocator()
    out = Path(cfg.out)
    if (out / META).is_file():
        raise TrainError(f"{out}: already holds a finished model (choose another --out)")
    data = open_token_data(cfg.data)
    data.rows(cfg.split), data.rows("valid")  # fail early, naming the missing split
    model_cfg = ModelConfig(
        layers=cfg.layers, vocab_size=data.vocab_size, rho=cfg.rho, head_dim=cfg.head_dim,
        qk_norm=cfg.qk_norm, max_position=max(2048, data.seq_len + 1),
    )
    n_params = model_cfg.non_embedding_params()
    steps, per_step = plan_steps(cfg, n_params, data.seq_len)
    if cfg.device != "cpu" and not torch.cuda.is_available():
        raise TrainError(f"--device {cfg.device}: no CUDA device is available")
    model = build_model(model_cfg, seed=cfg.seed).to(cfg.device)
    loop = LoopConfig(
        steps=steps, lr=cfg.lr, warmup_steps=round(cfg.warmup_frac * steps),
        final_lr_frac=cfg.final_lr_frac, weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip, checkpoint_every=cfg.checkpoint_every,
    )
    trainer = Trainer(
        model,
        TokenBatches(data, cfg.split, batch_size=cfg.batch_size, seed=cfg.seed),
        NextTokenLoss(cfg.z_loss),
        loop,
        checkpoint_dir=out / CHECKPOINT_DIR,
        run_fingerprint=cfg.fingerprint(data.fingerprint),
        progress=not cfg.quiet,
    )
    result = trainer.run()
    metrics = evaluate(model, data, max_rows=cfg.eval_rows, batch_size=cfg.batch_size)
    row: dict[str, Any] = {
        "run_id": cfg.run_id or out.name,
        "kind": "supervised",
        "params": n_params,
        "tokens": result.tokens,
        "loss": metrics.loss,
        "ece": metrics.ece,
        "flops": training_flops(n_params, result.tokens, rho=cfg.rho, context=data.seq_len,
                                vocab=data.vocab_size),
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
                         "batch_size": cfg.batch_size, "lr": cfg.lr, "tokens_per_step": per_step},
            "data": {"path": str(Path(cfg.data).resolve()), "fingerprint": data.fingerprint,
                     "tokenizer_fingerprint": data.tokenizer_fingerprint, "seq_len": data.seq_len},
        },
    )
    if cfg.runs:
        from kdcache.fit.runs import append_run

        append_run(cfg.runs, row)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return TrainResult(out=out, row=row)
