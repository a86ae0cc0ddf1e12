"""`kdcache sweep`: many training runs from one YAML file, a grid of students as Ray tasks, one runs table.

`kdcache sweep --config SWEEP.yaml` reads the file as the verb's flags (so `--threads 2`
overrides it; relative paths are relative to the working directory). It holds settings
shared by every run and a `grid` of groups; list values inside a
group expand as a Cartesian product, and every expanded run is a `kdcache train`
(supervised, `distill: STORE` or `online_teacher: MODEL`; a family `layers: L`, a
Hugging Face `student: DIR` or `student_config: FILE.json`; `workers: N` spreads one run
over N Ray Train ranks):

    data: out/data
    runs: out/runs.parquet
    out: out/students            # each run writes out/students/<run_id>
    threads: 1                   # torch threads per run; runs in parallel fill the CPUs
    defaults: {batch_size: 16}
    grid:
      - {layers: [1, 2], tokens: [200000, 400000]}
      - {layers: [1, 2], tokens: 400000, distill: [out/stores/t1, out/stores/t2]}

A group's `run_id_prefix: finding-` leads the id of every run it expands to (so a runs
table tells those runs apart, as `kdcache run` does its findings' runs from its law grid).

Runs read the stores concurrently (readers never write). A run whose model directory
is finished and whose row is in the runs table is skipped, so rerunning the same file
resumes the sweep (an interrupted run resumes from its checkpoint; a finished one whose
row was lost only appends it). A failed run is reported and the others go on. Every
setting is checked against `TrainJobConfig`'s field types before anything runs.

The settings (`SweepConfig`) are in `config.py`, which the command line imports; this
module imports the trainer and Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from kdcache.errors import KdcacheError
from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.study.config import SweepConfig
from kdcache.ray_session import ray_session
from kdcache.storage.errors import StoreError
from kdcache.storage.model_record import has_model_record, read_model_record
from kdcache.storage.runs import RunRow, has_run
from kdcache.train.errors import TrainError
from kdcache.train.job import GROUPS, TrainJobConfig
from kdcache.train.run import run_training

PREFIX_KEY = "run_id_prefix"  # a group key, not a train setting: leads the group's run ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepResult:
    """What a sweep did: every run of the grid is done, skipped or failed."""

    runs: int
    """Runs in the grid."""
    done: int
    """Runs trained now (or whose lost row was appended again)."""
    skipped: int
    """Runs found finished and recorded."""
    failed: dict[str, str]
    """run_id -> the reason, in one line."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def expand(cfg: SweepConfig, where: str = "") -> list[TrainJobConfig]:
    """Every run of the grid as a train config, in file order, ids unique.

    `where` (the sweep file) leads each error: "SWEEP.yaml: grid[1]: field 'layers' ...".
    The command line names the --config file itself when a message names one of its keys.
    """
    lead = f"{where}: " if where else ""
    defaults = cfg.defaults or {}  # the command line gives None when the file has none
    _check_settings(defaults, f"{lead}defaults")
    jobs: list[TrainJobConfig] = []
    for i, group in enumerate(cfg.grid):
        group = dict(group)
        prefix = group.pop(PREFIX_KEY, "")
        if not isinstance(prefix, str):
            raise PipelineError(f"{lead}grid[{i}]: field {PREFIX_KEY!r} must be str, got {prefix!r}")
        keys = list(group)
        values = [v if isinstance(v, list) else [v] for v in group.values()]
        for key, options in zip(keys, values, strict=True):
            for value in options:
                _check_settings({key: value}, f"{lead}grid[{i}]")
        for combo in itertools.product(*values):
            settings = {**defaults, **dict(zip(keys, combo, strict=True))}
            jobs.append(_job(cfg, settings, f"{lead}grid[{i}]", prefix))
    ids = [j.runtime.run_id for j in jobs]
    dup = next((r for r in ids if ids.count(r) > 1), None)
    if dup:
        raise PipelineError(f"{lead}two runs share run_id {dup!r}")
    return jobs


def _accepts(kind: Any, value: Any) -> bool:
    """Whether `value` (as YAML loads it) fits the annotation `kind`; bool is no int here."""
    if kind is type(None):
        return value is None
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(kind, type) and isinstance(value, kind)


def _check_settings(settings: dict[str, Any], where: str) -> None:
    """Refuse unknown names and values of the wrong type, naming the field, before any run.

    TrainJobConfig compares numbers in its checks; a string there would end as
    "'<' not supported between 'str' and 'int'", naming neither the group nor the field.
    """
    hints = {name: hint for cls in GROUPS.values() for name, hint in typing.get_type_hints(cls).items()}
    hints |= {"data": str, "out": str}
    for key, value in settings.items():
        name = "lam" if key == "lambda" else key
        if name not in hints:
            raise PipelineError(f"{where}: unknown train setting {key!r}")
        hint = hints[name]
        kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if not any(_accepts(k, value) for k in kinds):
            wanted = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise PipelineError(f"{where}: field {key!r} must be {wanted}, got {value!r}")


def _job(cfg: SweepConfig, settings: dict[str, Any], where: str, prefix: str = "") -> TrainJobConfig:
    """One run from settings `expand` has type-checked already (every value, once); `prefix`
    leads its run id."""
    base = {"data": cfg.data, "runs": cfg.runs, "out": "", "quiet": True, "threads": cfg.threads}
    try:
        job = TrainJobConfig.from_flat(**{**base, **settings})
    except TrainError as exc:  # a value out of range (layers: 0), or no student given
        raise PipelineError(f"{where}: {exc}") from exc
    run_id = prefix + (job.runtime.run_id or run_id_of(job))  # of the paths as written: ids stay put
    # Absolute here, where the file was read: a task's or a Ray Train rank's working directory is Ray's.
    return job.replace(run_id=run_id, out=str(Path(cfg.out) / run_id)).absolute()


def run_id_of(job: TrainJobConfig) -> str:
    """Readable and unique: kind, student, tokens, teacher name, seed (if not 0), and a hash of
    the identity.

    The hash covers the settings that identify a run (`TrainJobConfig.identity`), so two
    runs that differ only in where or how they run share an id (and are refused).
    """
    d, s = job.distillation, job.student
    teacher = Path(d.distill or d.online_teacher or "").name
    student = f"L{s.layers}" if s.family else Path(s.student or s.student_config or "").stem
    digest = hashlib.sha256(json.dumps(job.identity(), sort_keys=True).encode()).hexdigest()[:6]
    seed = f"s{job.loop.seed}" if job.loop.seed else ""
    parts = [job.kind, student, f"D{job.loop.tokens or 'auto'}", teacher, seed, digest]
    return "-".join(p for p in parts if p)


def _finished(job: TrainJobConfig) -> bool:
    """Finished and recorded; a finished run whose row is missing runs again, only to append it."""
    if not has_model_record(job.out):
        return False
    if not job.runtime.runs:
        return True
    try:
        row = _recorded_row(job.out)
    except StoreError:
        return False  # the run reports the unreadable file
    return row is None or has_run(job.runtime.runs, row)


def _recorded_row(out: str) -> RunRow | None:
    record = read_model_record(out)
    return record.run_row if record is not None else None


def _train(job: TrainJobConfig) -> RunRow | None:
    """One run, in a Ray worker: its config in (Ray pickles it), runs-table row out.

    Idempotent, as a task Ray may retry must be: an attempt whose worker died after the
    run recorded its row finds the run finished and returns that row.
    """
    if _finished(job):
        return _recorded_row(job.out)
    return run_training(job).row


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Run every unfinished run of the grid; failed runs are reported, not raised."""
    jobs = expand(cfg)
    todo = [j for j in jobs if not _finished(j)]
    skipped = len(jobs) - len(todo)
    failed: dict[str, str] = {}
    with ray_session(cfg.ray_address):
        # A killed worker's run is retried (it resumes from its checkpoint); errors are not.
        task = ray.remote(max_retries=2, retry_exceptions=False)(_train)
        # A run over several Ray Train workers asks for their CPUs itself; its driver task holds none.
        refs = {task.options(num_cpus=0 if j.runtime.workers > 1 else cfg.threads).remote(j):
                j.runtime.run_id for j in todo}
        bar = tqdm(total=len(jobs), initial=skipped, unit="run", desc="sweep", dynamic_ncols=True)
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            run_id = refs.pop(done[0])
            try:
                row = ray.get(done[0])
                bar.write(f"{run_id}: loss {row.loss:.4f}" if row else f"{run_id}: done", file=sys.stderr)
            except ray.exceptions.RayError as exc:
                failed[run_id] = _reason(exc)
                bar.write(f"{run_id}: FAILED: {failed[run_id]}", file=sys.stderr)
            bar.update(1)
        bar.close()
    return SweepResult(runs=len(jobs), done=len(todo) - len(failed), skipped=skipped, failed=failed)


def _reason(exc: Exception) -> str:
    """A failed run's reason in one line: kdcache's own error whole, else the last line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, KdcacheError):  # its message may wrap a library's multi-line one
        return " ".join(str(cause).split())
    text = str(cause if cause is not None else exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
