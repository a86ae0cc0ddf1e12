"""One `kdcache train` run end to end: data -> trained MODEL directory + runs-table row.

The run is supervised, distilled offline from a logit store (`--distill`), or distilled
online from a live teacher (`--online-teacher`). The three share the trainer, the row
order and the evaluation; they differ only in the batch source and the loss, which
`_objective` picks. Rerunning resumes from `out/checkpoint`.

No lost work: every input is checked before the first step, `--out` (not a file, its
directory creatable and writable, by really writing) and `--runs` (an appendable
Parquet table, or a writable place for one) included, so a run never trains to the end
and then fails to save. One process writes an `--out` at a time: the run holds
`OUT/.kdcache-train.lock` (taken without waiting, after the checks) from the first step
to the last write; a second one is refused.

A run ends by writing the MODEL directory, whose `kdcache.json` (written last, it marks
the model finished) also holds the runs-table row under "training", then appending the
row to `--runs`, then removing the checkpoint. A run killed between the two writes, or
one whose table was lost, is healed by rerunning it: when OUT is finished and `--runs`
has no row for it (matched on run_id, tokens and loss, all stored exactly), the rerun
appends the row from `kdcache.json` and trains nothing. When the row is there, or no
`--runs` is given, a finished OUT is refused as before, so a row is never appended twice.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from kdcache.fit.flops import forward_flops, training_flops
from kdcache.fit.runs import SCHEMA, append_run, check_appendable, has_run
from kdcache.paths import check_writable
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
LOCK = ".kdcache-train.lock"
"""Held by the one process writing OUT; hidden, so model loaders never see it."""


@dataclass(frozen=True)
class TrainResult:
    out: Path
    row: dict[str, Any]
    """The runs-table row (also returned when no table was given)."""
    added_row: bool = False
    """True when OUT was finished already and the rerun only appended its missing row."""


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
    source = OnlineTeacherBatches(tokens, loaded.model.to(cfg.device), temperature=tau,
                                  vocab=data.vocab_size)
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


@contextmanager
def _writer(out: Path) -> Iterator[None]:
    """Hold OUT's lock: two writers would interleave checkpoints and append the row twice.

    An OUT this run created and left holding nothing but the lock (the run failed before
    its first checkpoint) is removed again, so a refused run leaves nothing behind.
    """
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(out / LOCK), timeout=0)
        lock.acquire()
    except Timeout:
        raise TrainError(f"another kdcache train is writing {out}") from None
    except OSError as exc:
        raise TrainError(f"{out}: --out cannot be created ({exc.strerror or exc})") from exc
    try:
        yield
    except BaseException:
        lock.release()
        if created and [p.name for p in out.iterdir()] == [LOCK]:
            shutil.rmtree(out, ignore_errors=True)
        raise
    else:
        lock.release()


def _recorded_row(out: Path) -> dict[str, Any] | None:
    """The runs-table row a finished OUT keeps in kdcache.json, or None (e.g. a teacher made elsewhere)."""
    try:
        meta = json.loads((out / META).read_text())
    except (OSError, ValueError) as exc:
        raise TrainError(f"{out / META}: unreadable ({exc})") from exc
    training = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(training, dict) or "run_id" not in training:
        return None
    return {name: training[name] for name in SCHEMA.names if name in training}


def _missing_row(cfg: TrainJobConfig, out: Path) -> dict[str, Any]:
    """The row of the finished OUT that --runs lacks; refuses a finished OUT with nothing to add."""
    if cfg.runs:
        row = _recorded_row(out)
        if row is not None and not has_run(cfg.runs, row):
            return row
    raise TrainError(f"{out}: already holds a finished model (choose another --out)")


def _add_missing_row(cfg: TrainJobConfig, out: Path) -> TrainResult:
    """Finish a finished run's tail (row, then checkpoint removal); the caller holds OUT's lock."""
    row = _missing_row(cfg, out)  # again under the lock: another rerun may have added it
    assert cfg.runs is not None
    append_run(cfg.runs, row)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return TrainResult(out=out, row=row, added_row=True)


def run_training(cfg: TrainJobConfig) -> TrainResult:
    """Train, evaluate, save and record one run; resumes from `out/checkpoint`.

    On a finished OUT it only appends a runs-table row that is missing (see the module
    docstring), else refuses.
    """
    out = Path(cfg.out)
    # Where the run's two outputs go is checked first: they are written only at the end.
    check_writable(out, "--out")
    if cfg.runs:
        check_appendable(cfg.runs, "--runs")
    if (out / META).is_file():
        _missing_row(cfg, out)  # refuses without taking the lock, so nothing on disk changes
        with _writer(out):
            return _add_missing_row(cfg, out)
    if cfg.device != "cpu" and not torch.cuda.is_available():
        raise TrainError(f"--device {cfg.device}: no CUDA device is available")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tune_cpu_allocator()
    data = open_token_data(cfg.data)
    data.rows("valid")
    objective = _objective(cfg, data)
    try:
        model_cfg = ModelConfig(
            layers=cfg.layers, vocab_size=data.vocab_size, rho=cfg.rho, head_dim=cfg.head_dim,
            qk_norm=cfg.qk_norm, max_position=max(2048, data.seq_len + 1),
        )
        with _writer(out):
            if (out / META).is_file():  # another process finished OUT while this one checked inputs
                return _add_missing_row(cfg, out)
            return _train(cfg, out, data, objective, model_cfg)
    finally:
        close = getattr(objective.source, "close", None)
        if close is not None:
            close()


def _train(
    cfg: TrainJobConfig, out: Path, data: TokenData, objective: Objective, model_cfg: ModelConfig
) -> TrainResult:
    """The run proper, under OUT's lock: train, evaluate, save the model, then append its row."""
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
    # kdcache.json first, holding the row: a kill before the append below is healed by a rerun.
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
        append_run(cfg.runs, row)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return TrainResult(out=out, row=row)
