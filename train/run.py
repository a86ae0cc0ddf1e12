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

Token counts are of trained tokens (`Batch.tokens`): on chat and completion data only the
assistant's turns (or the completion) are targets, and the runs table's `tokens`, tokens/s
and the `--tokens` budget count those; the budget is turned into steps with the split's
mean trained tokens per row. `flops` counts every position the student (and an online
teacher) ran, trained or not: the compute actually spent.

Any number of ranks (torchrun, or `--workers N` through Ray Train, `distributed.py`)
train one student: each reads its slice of every global batch, so the run equals a
one-rank run up to floating-point reduction order. Every rank checks its inputs; rank
0 alone takes the lock and writes the checkpoint, the MODEL directory and the row.

A run ends by writing the MODEL directory, whose `kdcache.json` (written last, it marks
the model finished) also holds the runs-table row under "training", then appending the
row to `--runs`, then removing the checkpoint. A run killed between the two writes, or
one whose table was lost, is healed by rerunning it: when OUT is finished and `--runs`
has no row for it (matched on run_id, tokens and loss, all stored exactly), the rerun
appends the row from `kdcache.json` and trains nothing. When the row is there, or no
`--runs` is given, a finished OUT is refused as before, so a row is never appended twice.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from transformers.utils import logging as hf_logging

from kdcache.fit.flops import forward_flops, training_flops
from kdcache.hub import resolve_model
from kdcache.paths import check_writable
from kdcache.storage import StoreError, read_meta
from kdcache.storage.location import is_url, resolved
from kdcache.storage.model_record import MODEL_RECORD, has_model_record, read_model_record
from kdcache.storage.runs import RunRow, append_run, check_appendable, has_run
from kdcache.storage.tokens.format import TokenData, open_token_data
from kdcache.train.batches import BatchSource, OrderedBatches, TokenBatches
from kdcache.train.checkpoint import STATE, write_failure
from kdcache.train.config import ModelConfig
from kdcache.train.distributed import World
from kdcache.train.errors import TrainError
from kdcache.train.evaluate import EvalResult, evaluate
from kdcache.train.job import TOKENS_PER_PARAM, TrainJobConfig
from kdcache.train.kd_losses import DistillLoss
from kdcache.train.losses import LossFn, NextTokenLoss
from kdcache.train.metrics_log import METRICS, MetricsLog, check_tensorboard
from kdcache.train.model import build_model
from kdcache.train.model_dir import file_sha256, load_model_dir, save_model_dir
from kdcache.train.online import OnlineTeacherBatches, check_teacher_matches
from kdcache.train.ray_launch import run_on_ray_train
from kdcache.train.runtime import tune_cpu_allocator
from kdcache.train.store_batches import StoreBatches, check_store_matches
from kdcache.train.student import (
    FamilyStudent,
    HFStudent,
    Student,
    load_hf_student,
    new_hf_student,
    save_hf_student,
)
from kdcache.train.trainer import LoopConfig, StepInfo, Trainer

CHECKPOINT_DIR = "checkpoint"
LOCK = ".kdcache-train.lock"
"""Held by the one process writing OUT; hidden, so model loaders never see it."""


@dataclass(frozen=True)
class TrainResult:
    out: Path
    row: RunRow | None
    """The runs-table row (also returned when no table was given; None on a rank other than 0
    that only saw rank 0 add a missing row to a model it could not read)."""
    added_row: bool = False
    """True when OUT was finished already and the rerun only appended its missing row."""


@dataclass
class Objective:
    """What a run learns from: its batches, its loss, and what the row says of the teacher."""

    source: BatchSource
    loss: LossFn
    teacher_fingerprint: str = ""
    teacher: dict[str, Any] | None = None
    """Runs-table teacher fields (teacher_params, store, k, temperature, lam)."""
    teacher_flops_per_token: float = 0.0
    """Teacher forward FLOPs each position a step runs costs (online distillation only)."""
    split: str = "student"
    """The token split the rows come from (a store's own), for its trained tokens per row."""


def trained_per_row(data: TokenData, split: str) -> float:
    """Mean trained target positions per row of `split` (seq_len for stream text)."""
    if split not in data.meta["splits"] or not data.rows(split):
        return float(data.seq_len)
    return data.trained_tokens(split) / data.rows(split)


@dataclass(frozen=True)
class Plan:
    """How long a run trains: its steps, from whichever budget was given."""

    steps: int
    tokens_per_step: int
    """Trained tokens a step takes on average (the budget's unit)."""
    rows: int
    """Rows in one pass over the data the run reads (the split, or the store)."""
    batch_size: int
    budget: str
    """What set the length, as the user would say it."""

    @property
    def passes(self) -> float:
        """Passes over the rows (an epoch is rows // batch_size global batches)."""
        return self.steps / max(1, self.rows // self.batch_size)


def plan_steps(cfg: TrainJobConfig, n_params: int, per_row: float, rows: int) -> Plan:
    """The run's steps from `--tokens` (trained tokens, rounded up to whole steps; `per_row` is the
    rows' mean of trained tokens, `trained_per_row`), `--epochs` (passes over the `rows` the run
    reads, an epoch being rows // batch_size global batches) or `--max-steps`; by default 20
    tokens per parameter from scratch and one epoch for a pretrained student."""
    loop = cfg.loop
    per_step = max(loop.batch_size * per_row, 1.0)
    epoch = max(1, rows // loop.batch_size)
    if loop.max_steps is not None:
        steps, budget = loop.max_steps, f"--max-steps {loop.max_steps}"
    elif loop.epochs is not None:
        steps, budget = math.ceil(loop.epochs * epoch), f"--epochs {loop.epochs:g}"
    elif loop.tokens is not None:
        steps, budget = math.ceil(loop.tokens / per_step), f"--tokens {loop.tokens:,}"
    elif cfg.student.pretrained:
        steps, budget = epoch, "one epoch (the default for a pretrained --student)"
    else:
        tokens = TOKENS_PER_PARAM * n_params
        steps, budget = math.ceil(tokens / per_step), f"{TOKENS_PER_PARAM} tokens per parameter ({tokens:,})"
    return Plan(max(1, steps), round(per_step), rows, loop.batch_size, budget)


@dataclass(frozen=True)
class BuiltStudent:
    student: Student
    shape: dict[str, int]
    """Runs-table shape columns: layers, d_model, n_heads."""
    rho: float
    """d_model / layers, for the FLOPs model."""
    fingerprint: str
    """What an HF student starts from (its weights, or its config file); "" for the family."""
    lora: dict[str, Any] | None = None
    """The LoRA adapters trained (`lora.LoraInfo.to_json()`), or None when every weight trains."""

    @property
    def params(self) -> int:
        """N, the non-embedding parameters of the model the run produces (LoRA adapters merge away)."""
        return self.student.non_embedding_params() - (self.lora["trainable"] if self.lora else 0)


def build_student(cfg: TrainJobConfig, data: TokenData) -> BuiltStudent:
    """The run's student: the family (`--layers`) or a Hugging Face model, over the data's ids."""
    s = cfg.student
    if s.layers is not None:
        model_cfg = ModelConfig(
            layers=s.layers, vocab_size=data.vocab_size, rho=s.rho, head_dim=s.head_dim,
            qk_norm=s.qk_norm, max_position=max(2048, data.seq_len + 1),
        )
        model = build_model(model_cfg, seed=cfg.loop.seed)
        shape = {"layers": s.layers, "d_model": model_cfg.d_model, "n_heads": model_cfg.n_heads}
        return BuiltStudent(FamilyStudent(model, data.vocab_size), shape, s.rho, "")
    lora = None
    if s.student is not None:
        student = load_hf_student(s.student, vocab=data.vocab_size, data=str(data.path))
        # What it starts from: its config and its weights (every rank checks a checkpoint's).
        fingerprint = _student_fingerprint(Path(s.student))
        if s.lora_rank is not None:
            from kdcache.train.lora import apply_lora  # peft loads only for LoRA runs

            lora = apply_lora(student, rank=s.lora_rank, alpha=s.lora_alpha or 2.0 * s.lora_rank,
                              targets=None if s.lora_targets is None else tuple(s.lora_targets),
                              seed=cfg.loop.seed).to_json()
    else:
        assert s.student_config is not None
        student = new_hf_student(s.student_config, vocab=data.vocab_size, data=str(data.path),
                                 seed=cfg.loop.seed)
        fingerprint = file_sha256(Path(s.student_config))
    hf = student.lm.config
    layers, d_model = int(hf.num_hidden_layers), int(hf.hidden_size)
    shape = {"layers": layers, "d_model": d_model, "n_heads": int(hf.num_attention_heads)}
    return BuiltStudent(student, shape, d_model / layers, fingerprint, lora)


def _objective(cfg: TrainJobConfig, data: TokenData, world: World) -> Objective:
    d, loop = cfg.distillation, cfg.loop
    if d.distill:
        return _offline(cfg, data, world)
    if d.online_teacher:
        return _online(cfg, data, world)
    data.rows(loop.split)  # fail early, naming a missing split
    return Objective(TokenBatches(data, loop.split, batch_size=loop.batch_size, seed=loop.seed,
                                  rank=world.rank, world=world.size),
                     NextTokenLoss(cfg.recipe.z_loss), split=loop.split)


def _offline(cfg: TrainJobConfig, data: TokenData, world: World) -> Objective:
    d, loop = cfg.distillation, cfg.loop
    assert d.distill is not None
    meta = read_meta(d.distill)
    check_store_matches(d.distill, meta, data)
    tau = meta.temperature if d.temperature is None else d.temperature
    try:  # the store's temperature or one of those it holds log-normalisers for
        meta.temperature_index(tau)
    except StoreError as exc:
        raise TrainError(f"{d.distill}: --temperature {tau}: {exc}") from exc
    loss = DistillLoss(kind=meta.kind, divergence=d.divergence, tail=d.tail, lam=d.lam,
                       tau=tau, z_loss=cfg.recipe.z_loss)
    # On CPU a prefetch thread competes with torch's threads for the cores (store_batches.py),
    # but a remote store's reads wait on the network, not the CPU: those are read ahead anywhere.
    prefetch = 2 if is_url(d.distill) or cfg.runtime.device != "cpu" else 0
    source = StoreBatches(d.distill, batch_size=loop.batch_size, seed=loop.seed, rank=world.rank,
                          world=world.size, prefetch=prefetch, temperature=tau)
    identity = json.dumps(meta.identity(), sort_keys=True)
    teacher = {"teacher_params": meta.teacher.nonembedding_params, "store": resolved(d.distill),
               "k": meta.k, "temperature": tau, "lam": d.lam}
    return Objective(source, loss, teacher_fingerprint=identity, teacher=teacher, split=meta.data.split)


def _online(cfg: TrainJobConfig, data: TokenData, world: World) -> Objective:
    d, loop = cfg.distillation, cfg.loop
    assert d.online_teacher is not None
    loaded = load_model_dir(d.online_teacher)
    check_teacher_matches(loaded, data)
    tau = 1.0 if d.temperature is None else d.temperature
    tokens = TokenBatches(data, loop.split, batch_size=loop.batch_size, seed=loop.seed,
                          rank=world.rank, world=world.size)
    source = OnlineTeacherBatches(tokens, loaded.model.to(world.device), temperature=tau,
                                  vocab=data.vocab_size)
    loss = DistillLoss(kind="full", divergence=d.divergence, tail=d.tail, lam=d.lam,
                       tau=tau, z_loss=cfg.recipe.z_loss)
    n_t = loaded.config.non_embedding_params()
    teacher = {"teacher_params": n_t, "k": data.vocab_size, "temperature": tau, "lam": d.lam}
    per_token = float(forward_flops(n_t, rho=loaded.config.rho, context=data.seq_len, vocab=data.vocab_size))
    return Objective(source, loss, teacher_fingerprint=loaded.fingerprint, teacher=teacher,
                     teacher_flops_per_token=per_token, split=loop.split)


def _teacher_columns(cfg: TrainJobConfig, objective: Objective, data: TokenData,
                     world: World) -> dict[str, Any]:
    """The row's teacher columns. `teacher_loss` is L_T, the teacher's cross-entropy on the valid
    split students are scored on: for an online run measured here, over the same rows as the
    student; for an offline run read from the store (at the end: it may have completed meanwhile)."""
    if objective.teacher is None:
        return {}
    source = objective.source
    if isinstance(source, OnlineTeacherBatches):
        metrics = evaluate(source.teacher, data, max_rows=cfg.runtime.eval_rows,
                           batch_size=cfg.loop.batch_size // world.size, world=world)
        return {**objective.teacher, "teacher_loss": metrics.loss}
    assert cfg.distillation.distill is not None
    meta = read_meta(cfg.distillation.distill)
    if meta.valid_loss is None:
        world.main_only(lambda: print(
            f"warning: {cfg.distillation.distill}: the store has no 'valid_loss' (it predates kdcache "
            "recording the teacher's validation loss), so this row's teacher_loss is empty; rerun "
            "`kdcache cache` with the same flags to measure it", file=sys.stderr))
    return {**objective.teacher, "teacher_loss": meta.valid_loss}


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


def _recorded_row(out: Path) -> RunRow | None:
    """The runs-table row a finished OUT keeps in kdcache.json, or None (e.g. a teacher made elsewhere)."""
    record = read_model_record(out)
    return record.run_row if record is not None else None


def _missing_row(cfg: TrainJobConfig, out: Path) -> RunRow:
    """The row of the finished OUT that --runs lacks; refuses a finished OUT with nothing to add."""
    runs = cfg.runtime.runs
    if runs:
        row = _recorded_row(out)
        if row is not None and not has_run(runs, row):
            return row
    raise TrainError(f"{out}: already holds a finished model (choose another --out)")


def _add_missing_row(cfg: TrainJobConfig, out: Path) -> TrainResult:
    """Finish a finished run's tail (row, then checkpoint removal); the caller holds OUT's lock."""
    row = _missing_row(cfg, out)  # again under the lock: another rerun may have added it
    assert cfg.runtime.runs is not None
    append_run(cfg.runtime.runs, row)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return TrainResult(out=out, row=row, added_row=True)


def check_launch(cfg: TrainJobConfig, world_size: int, *, distributed: bool, here: bool = True) -> None:
    """Refuse, before anything is read or written, a launch that cannot train this run.

    `here`: the ranks run in this process (a Ray Train driver only checks what it can:
    its cluster's nodes have the GPUs, not necessarily this machine).
    """
    rt = cfg.runtime
    if rt.fsdp and not distributed:
        raise TrainError("--fsdp needs a distributed launch (torchrun, or --workers N with N > 1)")
    if cfg.loop.batch_size % world_size:
        raise TrainError(f"--batch-size {cfg.loop.batch_size} is not divisible by the world size "
                         f"{world_size}")
    if cfg.loop.batch_size % (world_size * rt.grad_accum):
        raise TrainError(f"--batch-size {cfg.loop.batch_size} does not split into {world_size} ranks x "
                         f"--grad-accum {rt.grad_accum} equal micro-batches")
    if rt.fsdp and cfg.student.lora_rank is not None:
        raise TrainError("--lora-rank with --fsdp is not supported: LoRA students train data-parallel "
                         "(their frozen base weights are replicated)")
    if rt.log == "tensorboard":
        check_tensorboard()
    if here and rt.device != "cpu" and not torch.cuda.is_available():
        raise TrainError(f"--device {rt.device}: no CUDA device is available")
    if here and cfg.loop.precision == "bf16":
        check_bf16(rt.device)


def check_bf16(device: str, capability: tuple[int, int] | None = None) -> None:
    """Refuse `--precision bf16` where the device has no bf16 arithmetic: CUDA GPUs before Ampere
    (compute capability 8.0; `capability` is the device's, read from it when not given). CPUs run
    bf16 autocast in software where they lack the instructions (slower, not wrong)."""
    if device == "cpu":
        return
    major, minor = capability or torch.cuda.get_device_capability(torch.device(device))
    if major < 8:
        raise TrainError(f"--precision bf16: {device} (compute capability {major}.{minor}) has no bf16 "
                         "arithmetic (it needs 8.0, Ampere, or newer); use --precision fp32")


def run_training(cfg: TrainJobConfig) -> TrainResult:
    """Train, evaluate, save and record one run; resumes from `out/checkpoint`.

    On a finished OUT it only appends a runs-table row that is missing (see the module
    docstring), else refuses. With `--workers N > 1` it starts N Ray Train ranks; under
    torchrun (or inside those ranks) it is one rank of the group.
    """
    cfg = resolve_hub_ids(cfg).absolute()
    rt = cfg.runtime
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    launched = dist.is_initialized() or torchrun  # a Ray Train rank has its group already
    if rt.workers > 1 and torchrun:
        raise TrainError("--workers starts Ray Train ranks; under torchrun leave it at 1")
    if rt.workers > 1 and not launched:
        check_launch(cfg, rt.workers, distributed=True, here=False)
        _check_outputs(cfg)
        if has_model_record(cfg.out):  # finished: only a missing row to add, no ranks needed
            return _finished_out(cfg)
        return _on_ray_train(cfg)
    check_launch(cfg, int(os.environ.get("WORLD_SIZE", "1")), distributed=launched)
    started = not dist.is_initialized()
    world = World.start(rt.device, init_timeout=rt.init_timeout)
    try:
        return _run_rank(cfg, world)
    finally:
        if started and dist.is_initialized():
            # Free the run's DDP reducer first: one freed after its group is destroyed was
            # seen to block a gloo rank's exit (1 in 7 runs of the torchrun example).
            gc.collect()
            dist.destroy_process_group()


def resolve_hub_ids(cfg: TrainJobConfig) -> TrainJobConfig:
    """`--student` and `--online-teacher` as local directories: Hugging Face Hub ids become their
    snapshots in the local cache (`kdcache.hub`), fetched first where there is a network; a
    path that is neither is refused, naming the flag."""
    flags = {name: resolve_model(value, f"--{name.replace('_', '-')}")
             for name, value in (("student", cfg.student.student),
                                 ("online_teacher", cfg.distillation.online_teacher))
             if value is not None and not Path(value).exists()}
    return cfg.replace(**flags) if flags else cfg


def _ray_rank(settings: dict[str, Any]) -> None:
    """One Ray Train worker: its process group is up; run this rank."""
    run_training(TrainJobConfig.from_flat(**settings))


def _on_ray_train(cfg: TrainJobConfig) -> TrainResult:
    """The run's ranks as Ray Train workers; rank 0 wrote OUT, whose row the driver reads back."""
    run_on_ray_train(cfg, _ray_rank)
    out = Path(cfg.out)
    row = _recorded_row(out)
    if row is None:
        raise TrainError(f"{out}: the Ray Train ranks ended without writing {MODEL_RECORD}")
    return TrainResult(out=out, row=row)


def _inputs(cfg: TrainJobConfig) -> dict[str, str]:
    """What the ranks must agree on (`World.check_same`): the flags but the input paths, and what
    those inputs hold, as their fingerprints. The same path may name other files on another node."""
    flags = {k: v for k, v in cfg.flat().items() if k not in _INPUTS}
    s, d = cfg.student, cfg.distillation
    found = {"--data": open_token_data(cfg.data).fingerprint}
    if d.distill:
        found["--distill"] = json.dumps(read_meta(d.distill).identity(), sort_keys=True)
    if d.online_teacher:
        found["--online-teacher"] = _model_fingerprint(Path(d.online_teacher))
    if s.student:
        found["--student"] = _student_fingerprint(Path(s.student))
    if s.student_config:
        found["--student-config"] = file_sha256(Path(s.student_config))
    return {"the flags": json.dumps(flags, sort_keys=True),
            **{f"--{n.replace('_', '-')}": "" for n in _INPUTS}, **found}


_INPUTS = ("data", "distill", "online_teacher", "student", "student_config")
"""The flags that name what a run reads: ranks compare what they hold, not the paths."""


def _student_fingerprint(directory: Path) -> str:
    """A pretrained student's config and weights, as sha256 digests."""
    files = [directory / "config.json", *sorted(directory.glob("*.safetensors"))]  # never a pickle
    return "+".join(file_sha256(f) for f in files if f.is_file())


def _model_fingerprint(directory: Path) -> str:
    """A teacher's fingerprint as its kdcache.json records it, else its student-style digests."""
    record = read_model_record(directory)
    return record.fingerprint if record is not None else _student_fingerprint(directory)


def _check_outputs(cfg: TrainJobConfig) -> None:
    # Where the run's two outputs go is checked first: they are written only at the end.
    out = Path(cfg.out)
    check_writable(out, "--out")
    _check_apart(cfg)
    if out.is_dir() and not has_model_record(out):
        ours = {MODEL_RECORD, LOCK, CHECKPOINT_DIR, METRICS}
        if any(True for _ in out.iterdir()) and not any((out / name).exists() for name in ours):
            raise TrainError(f"{out}: --out holds files but is no kdcache train output (no {MODEL_RECORD}, "
                             f"{CHECKPOINT_DIR}/ or {METRICS}); training would overwrite them, choose "
                             "another --out")
    if cfg.runtime.runs:  # a run not finished yet must not find its run_id taken by another
        run_id = None if has_model_record(out) else cfg.runtime.run_id or out.name
        check_appendable(cfg.runtime.runs, "--runs", run_id)


def _check_apart(cfg: TrainJobConfig) -> None:
    """Refuse an --out that is, holds or lies inside an input: the run would write over what it reads."""
    out = Path(cfg.out).resolve()
    flat = cfg.flat()
    for name in _INPUTS:
        if not flat[name] or is_url(flat[name]) or not Path(flat[name]).exists():
            continue  # an object-store URL is never a local --out's folder
        given = Path(flat[name]).resolve()
        flag = f"--{name.replace('_', '-')}"
        where = ("is" if out == given else "lies inside" if out.is_relative_to(given)
                 else "holds" if given.is_relative_to(out) else "")
        if where:
            raise TrainError(f"{cfg.out}: --out {where} the {flag} {flat[name]} (training would write over "
                             "its input); choose another --out")


def _finished_out(cfg: TrainJobConfig) -> TrainResult:
    out = Path(cfg.out)
    _missing_row(cfg, out)  # refuses without taking the lock, so nothing on disk changes
    with _writer(out):
        return _add_missing_row(cfg, out)


def _run_rank(cfg: TrainJobConfig, world: World) -> TrainResult:
    """One rank's run (the only one alone): checks, then train under rank 0's lock.

    What only rank 0 does (take the lock, add a missing row, write) goes through
    `World.main_only`, and what it finds decides for every rank (`World.decide`).
    """
    rt, out = cfg.runtime, Path(cfg.out)
    error: BaseException | None = None
    inputs: dict[str, str] = {}
    try:
        inputs = _inputs(cfg) if world.distributed else {}
    except BaseException as exc:
        error = exc
    world.first_error(error)
    world.check_same(inputs)
    try:
        _check_outputs(cfg)
        finished = has_model_record(out)
    except BaseException as exc:
        error, finished = exc, False
    world.first_error(error)
    if world.decide(finished):
        return world.main_only(lambda: _finished_out(cfg)) or _follower_result(out)
    if rt.threads:
        torch.set_num_threads(rt.threads)
    tune_cpu_allocator()
    if rt.quiet:
        hf_logging.disable_progress_bar()
    objective: Objective | None = None
    try:
        data = open_token_data(cfg.data)
        data.rows("valid")
        objective = _objective(cfg, data, world)
        built = build_student(cfg, data)
    except BaseException as exc:
        error = exc
    try:
        world.first_error(error)
        assert objective is not None
        with ExitStack() as held:

            def lock() -> TrainResult | None:
                held.enter_context(_writer(out))
                # Another process may have finished OUT while this one checked its inputs.
                return _add_missing_row(cfg, out) if has_model_record(out) else None

            added = world.main_only(lock)
            if world.decide(added is not None):
                return added or _follower_result(out)
            return _train(cfg, out, data, objective, built, world)
    finally:
        close = getattr(objective.source, "close", None) if objective is not None else None
        if close is not None:
            close()


def _follower_result(out: Path) -> TrainResult:
    """What a rank other than 0 returns when rank 0 only added the finished OUT's row."""
    return TrainResult(out=out, row=_recorded_row(out), added_row=True)


class _StepHook:
    """The trainer's `on_step`: log every step (rank 0) and evaluate every `--eval-every` steps
    (every rank: evaluation is collective). The log opens at the first step, so a resumed run
    knows where it starts."""

    def __init__(self, cfg: TrainJobConfig, out: Path, data: TokenData, world: World, steps: int) -> None:
        self.cfg, self.out, self.data, self.world, self.steps = cfg, out, data, world, steps
        self.log: MetricsLog | None = None
        self.trainer: Trainer | None = None
        self.evals: list[dict[str, float]] = []

    def __call__(self, info: StepInfo) -> None:
        if self.world.main and self.log is None:
            self.log = MetricsLog(self.out, start_step=info.step - 1,
                                  tensorboard=self.cfg.runtime.log == "tensorboard")
        if self.log is not None:
            self.log.write({"step": info.step, "loss": info.loss, "lr": info.lr, "grad_norm": info.grad_norm,
                            "tokens": info.tokens, "tokens_per_s": round(info.tokens_per_s, 1),
                            **info.metrics}, "train")
        every = self.cfg.runtime.eval_every
        if every and info.step % every == 0 and info.step < self.steps:
            self.evaluate(info.step)

    def evaluate(self, step: int) -> EvalResult:
        assert self.trainer is not None
        result = evaluate(self.trainer.student, self.data, max_rows=self.cfg.runtime.eval_rows,
                          batch_size=micro_batch(self.cfg, self.world.size), world=self.world,
                          step_module=self.trainer.step_module)
        record = {"step": step, "eval_loss": result.loss, "eval_ece": result.ece,
                  "eval_tokens": result.tokens}
        self.evals.append(record)
        if self.log is not None:
            self.log.write(record, "eval")
        return result

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def micro_batch(cfg: TrainJobConfig, world_size: int) -> int:
    """Rows a rank runs at once: the global batch over the ranks and accumulated micro-batches."""
    return cfg.loop.batch_size // (world_size * cfg.runtime.grad_accum)


def _source_rows(source: BatchSource) -> int:
    """Rows in one pass over what `source` reads (its `RowOrder`)."""
    ordered = source.tokens if isinstance(source, OnlineTeacherBatches) else source
    assert isinstance(ordered, OrderedBatches)
    return ordered.order.n_rows


def _announce(cfg: TrainJobConfig, plan: Plan, loop: LoopConfig, objective: Objective, world: World,
              lora: dict[str, Any] | None) -> None:
    """Say at the start what the run will do: the optimiser settings in effect, the batch, the length
    (unless --quiet: then stderr holds nothing but an error's one line)."""
    if cfg.runtime.quiet:
        return
    r, rt = cfg.recipe, cfg.runtime
    kind = ("fine-tuning defaults (pretrained --student)" if cfg.student.pretrained
            else "from-scratch defaults")
    given = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(r)
             if getattr(cfg.loop, f.name) is not None and f.name != "grad_clip"]
    lines = [
        f"optimiser: AdamW, lr {r.lr:g}, warmup {r.warmup_frac:.0%} ({loop.warmup_steps} "
        f"steps), cosine to {r.final_lr_frac:g} x lr, weight decay {r.weight_decay:g}/step, z-loss "
        f"{r.z_loss:g}, grad clip {r.grad_clip:g}: {kind}"
        + (f", with {', '.join(given)} given" if given else ""),
        f"batch: {cfg.loop.batch_size} rows = {micro_batch(cfg, world.size)} x {rt.grad_accum} micro-batches "
        f"x {world.size} ranks; precision {cfg.loop.precision}"
        + ("; gradient checkpointing" if rt.gradient_checkpointing else "")
        + (f"; LoRA rank {cfg.student.lora_rank}: {lora['trainable']:,} trainable parameters, saved "
           f"{rt.lora_save}" if lora else ""),
        f"length: {plan.steps:,} steps from {plan.budget}, {plan.passes:.2f} passes over the {plan.rows:,} "
        f"rows of {'the store' if cfg.distillation.distill else f'split {objective.split!r}'}",
    ]
    if cfg.loop.precision == "bf16" and rt.device == "cpu":
        lines.append("note: --precision bf16 on a CPU without bf16 instructions (avx512_bf16, AMX) "
                     "is emulated: 20x slower than fp32 on a 2-core EPYC (benchmarks/finetune.py)")
    if plan.passes > 1:
        lines.append(f"note: the budget is more than one pass, so rows repeat ({plan.passes:.2f} times on "
                     "average)")
    world.main_only(lambda: print("\n".join(f"kdcache train: {line}" for line in lines), file=sys.stderr))


def _train(
    cfg: TrainJobConfig, out: Path, data: TokenData, objective: Objective, built: BuiltStudent, world: World
) -> TrainResult:
    """The run proper (rank 0 under OUT's lock): train, evaluate, save the model, append its row."""
    student, loop, rt = built.student, cfg.loop, cfg.runtime
    n_params = built.params
    plan = plan_steps(cfg, n_params, trained_per_row(data, objective.split), _source_rows(objective.source))
    loop_cfg = LoopConfig(steps=plan.steps, settings=loop, checkpoint_every=rt.checkpoint_every,
                          pretrained=cfg.student.pretrained, grad_accum=rt.grad_accum)
    _announce(cfg, plan, loop_cfg, objective, world, built.lora)
    if rt.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.to(world.device)
    hook = _StepHook(cfg, out, data, world, plan.steps)
    trainer = Trainer(
        student, objective.source, objective.loss, loop_cfg,
        checkpoint_dir=out / CHECKPOINT_DIR,
        run_fingerprint=cfg.fingerprint(data.fingerprint, objective.teacher_fingerprint, built.fingerprint),
        progress=not rt.quiet, world=world, fsdp=rt.fsdp, on_step=hook,
    )
    hook.trainer = trainer
    try:
        result = trainer.run()
        metrics = hook.evaluate(plan.steps)
    finally:
        hook.close()
    positions = plan.steps * loop.batch_size * data.seq_len  # run, trained or not
    flops = training_flops(n_params, positions, rho=built.rho, context=data.seq_len, vocab=data.vocab_size)
    row = RunRow(
        run_id=rt.run_id or out.name,
        kind=cfg.kind,
        params=n_params,
        tokens=result.tokens,
        loss=metrics.loss,
        **_teacher_columns(cfg, objective, data, world),
        ece=metrics.ece,
        flops=flops + objective.teacher_flops_per_token * positions,
        wall_s=result.wall_s,
        tokens_per_s=result.tokens / result.wall_s,
        **built.shape,
        vocab_size=data.vocab_size,
        seq_len=data.seq_len,
        seed=loop.seed,
    )
    state = trainer.full_state()  # every rank: FSDP gathers the shards
    world.main_only(lambda: _save(cfg, out, data, built, state, row, plan, result, metrics.tokens,
                                  hook.evals))
    return TrainResult(out=out, row=row)


def _save(cfg: TrainJobConfig, out: Path, data: TokenData, built: BuiltStudent, state: dict[str, Any],
          row: RunRow, plan: Plan, result: Any, eval_tokens: int, evals: list[dict[str, float]]) -> None:
    """Rank 0: kdcache.json first, holding the row (a kill before the append is healed by a
    rerun), then the row, then the checkpoint's removal."""
    training = {**row.to_json(), "train_loss": result.final_loss, "eval_tokens": eval_tokens,
                "steps": plan.steps, "passes": plan.passes, "split": cfg.loop.split,
                "batch_size": cfg.loop.batch_size, "grad_accum": cfg.runtime.grad_accum,
                "precision": cfg.loop.precision, "recipe": dataclasses.asdict(cfg.recipe),
                "lr": cfg.recipe.lr, "tokens_per_step": plan.tokens_per_step,
                "world": cfg.runtime.workers if not dist.is_initialized() else dist.get_world_size(),
                "loss_history": result.history, "evals": evals}
    if built.lora is not None:
        training["lora"] = {**built.lora, "save": cfg.runtime.lora_save}
    trained_on = {"path": resolved(cfg.data), "fingerprint": data.fingerprint,
                  "tokenizer_fingerprint": data.tokenizer_fingerprint, "seq_len": data.seq_len}
    student = built.student
    try:
        if isinstance(student, HFStudent):
            save_hf_student(student, state, out, tokenizer=data.tokenizer_path, training=training,
                            data=trained_on, eos_token_id=data.eos_token_id, params=row.params,
                            lora_save=cfg.runtime.lora_save if built.lora is not None else None)
        else:
            save_model_dir(student.lm, out, tokenizer=data.tokenizer_path, eos_token_id=data.eos_token_id,
                           training=training, data=trained_on, state=state)
    except (OSError, SafetensorError) as exc:
        for part in out.glob("*.tmp"):
            part.unlink(missing_ok=True)
        kept = ("rerun the command to resume from its checkpoint" if (out / CHECKPOINT_DIR / STATE).is_file()
                else "there is no checkpoint to resume from (--checkpoint-every)")
        raise TrainError(f"{out}: cannot write the trained model ({write_failure(exc)}); {kept}") from None
    if cfg.runtime.runs:
        append_run(cfg.runtime.runs, row)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
