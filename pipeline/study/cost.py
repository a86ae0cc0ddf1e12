"""What `kdcache cost` reads from disk: a store's bytes per token, and a runs table's measured runs.

The cost model itself (`kdcache.fit.cost`) takes numbers; this module turns files into them.
A runs table gives the timed training runs (`wall_s`, the training loop's time); the stores
its offline rows name give their bytes per token and, from the store's cache-job log, the
measured cache job. `estimate_cost(CostQuery(...))` is the whole `kdcache cost` without the
CLI, for `kdcache run`'s cost tables. Torch-free (storage and fit only), so the CLI imports
it at module top.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from kdcache.fit import plots
from kdcache.fit.cost import (
    CacheTiming,
    CostEstimate,
    Hardware,
    TimedRun,
    TimeModel,
    cost_curve,
    estimate,
    fit_time_model,
    topk_bytes_per_token,
)
from kdcache.fit.errors import FitError
from kdcache.storage import read_jobs, read_meta, summarize
from kdcache.storage.runs import RUN_KINDS, read_runs


@dataclasses.dataclass(frozen=True, kw_only=True)
class CostQuery:
    """One cost question: a teacher, its students, their tokens, and where the measurements are."""

    teacher_params: float
    student_params: tuple[float, ...]
    """One entry per student (repeat a size for M students of it)."""
    tokens: float
    store: str | None = None
    """A logit store to take bytes per token from."""
    bytes_per_token: float | None = None
    """Measured bytes per token, instead of a store or k and vocab."""
    k: int = 64
    vocab: int = 32768
    runs: str | None = None
    """A runs table to calibrate the time model from (and the stores its offline rows name)."""
    rho: float = 128
    context: int = 4096
    hardware: Hardware = dataclasses.field(default_factory=Hardware)

    def shape(self) -> dict[str, float]:
        return {"rho": self.rho, "context": self.context, "vocab": self.vocab}


def estimate_cost(query: CostQuery) -> CostEstimate:
    """Cost and predicted wall times for `query`, calibrated on `query.runs` when given."""
    shape = query.shape()
    model = calibrate(query.runs, hardware=query.hardware, **shape) if query.runs is not None else None
    return estimate(query.teacher_params, query.student_params, query.tokens,
                    bytes_per_token=query_bytes_per_token(query), hardware=query.hardware,
                    time_model=model, **shape)


def write_cost_plot(query: CostQuery, result: CostEstimate, path: str, max_students: int = 16) -> None:
    """A PNG of online and cache money against the number of students M = 1..max_students."""
    hardware = dataclasses.replace(query.hardware, peak_flops=result.flops_per_s, utilisation=1.0)
    online, cache = cost_curve(query.teacher_params, query.student_params, query.tokens,
                               bytes_per_token=result.bytes_per_token, hardware=hardware,
                               max_students=max_students, **query.shape())
    plots.cost_vs_students(online, cache, path)


def query_bytes_per_token(query: CostQuery) -> float:
    """--bytes-per-token, else the store's measured size, else an uncompressed top-k store's."""
    if query.store is not None and query.bytes_per_token is not None:
        raise FitError("give --store or --bytes-per-token, not both")
    if query.bytes_per_token is not None:
        return query.bytes_per_token
    if query.store is None:
        return topk_bytes_per_token(query.k, query.vocab)
    return store_bytes_per_token(query.store)


def store_bytes_per_token(store: str) -> float:
    summary = summarize(store)
    if not summary.get("tokens"):
        raise FitError(f"{store}: store has no committed tokens to measure bytes per token")
    return float(summary["bytes_per_token"])


def calibrate(runs: str, *, hardware: Hardware | None = None, rho: float = 128, context: float = 4096,
              vocab: float = 32768) -> TimeModel:
    """The time model fitted to the runs table at `runs` and the cache jobs of the stores it names.

    rho, context and vocab stand in for a row that lacks layers/d_model, seq_len or vocab_size.
    """
    timed, cache, notes = read_timings(runs, rho=rho, context=context, vocab=vocab)
    return fit_time_model(timed, cache, fallback=hardware or Hardware(), source=str(runs), notes=notes)


def _number(value: Any) -> float | None:
    """A finite float, or None for a null / NaN cell."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_timings(
    path: str, *, rho: float = 128, context: float = 4096, vocab: float = 32768
) -> tuple[list[TimedRun], list[CacheTiming], list[str]]:
    """(timed runs, measured cache jobs, notes) from a runs table and the stores it names.

    A row's wall_s, where empty, is tokens / tokens_per_s (the trainer writes both from the
    same clock). An offline row whose store is gone is left out with a note, and so is that
    store's cache job; only when every offline row's store is gone is that an error, as the
    table then measures reads the model cannot see.
    """
    table = read_runs(path, required=("params", "tokens"))
    names = set(table.column_names)
    if "wall_s" not in names and "tokens_per_s" not in names:
        raise FitError(f"{path}: missing column 'wall_s' (the cost model calibrates on measured run times)")
    runs: list[TimedRun] = []
    notes: list[str] = []
    store_rows: dict[str, list[int]] = {}
    pending: list[tuple[dict[str, Any], float, str | None]] = []
    for i, row in enumerate(table.to_pylist()):
        label = f"{path}: row {i}" + (f" ({row['run_id']})" if row.get("run_id") else "")
        kind = row.get("kind") or "supervised"
        if kind not in RUN_KINDS:
            raise FitError(f"{label}: field 'kind' must be one of {RUN_KINDS}, got {kind!r}")
        params, tokens = _number(row.get("params")), _number(row.get("tokens"))
        if not params or params <= 0 or not tokens or tokens <= 0:
            raise FitError(f"{label}: fields 'params' and 'tokens' must be positive")
        wall = _number(row.get("wall_s"))
        if wall is None:
            rate = _number(row.get("tokens_per_s"))
            wall = tokens / rate if rate and rate > 0 else None
        if wall is None or wall <= 0:
            raise FitError(f"{label}: field 'wall_s' is missing or not positive (nor is there a "
                           "tokens_per_s to derive it)")
        store = row.get("store") if kind == "distill" else None
        if kind == "distill" and not store:
            raise FitError(f"{label}: field 'store' is empty (an offline run's reads are costed by "
                           "its store)")
        if kind == "online" and not (_number(row.get("teacher_params")) or 0) > 0:
            raise FitError(f"{label}: field 'teacher_params' is empty (an online run pays its "
                           "teacher's forward)")
        pending.append((row, wall, store))
        if store:
            store_rows.setdefault(store, []).append(i)
    gone = [s for s in store_rows if not Path(s).is_dir()]
    for store in gone:
        notes.append(f"{store}: store no longer exists; its {len(store_rows[store])} offline run(s) and its "
                     "cache job are left out")
    if store_rows and len(gone) == len(store_rows):
        raise FitError(f"{path}: field 'store': {gone[0]} no longer exists (nor does any other store the "
                       "offline runs name), so their store reads cannot be calibrated")
    sizes = {s: store_bytes_per_token(s) for s in store_rows if s not in gone}
    store_rho: dict[str, float] = {}
    for row, wall, store in pending:
        if store in gone:
            continue
        layers, width = _number(row.get("layers")), _number(row.get("d_model"))
        run = TimedRun(
            kind=row.get("kind") or "supervised", params=float(row["params"]), tokens=float(row["tokens"]),
            wall_s=wall, teacher_params=_number(row.get("teacher_params")) or 0.0,
            bytes_per_token=sizes[store] if store else 0.0,
            rho=width / layers if layers and width else rho,
            context=_number(row.get("seq_len")) or context, vocab=_number(row.get("vocab_size")) or vocab,
        )
        runs.append(run)
        if store:
            store_rho.setdefault(store, run.rho)  # the store's teacher has no rho of its own on record
    cache = []
    for store, size in sizes.items():
        timing = cache_timing(store, size, rho=store_rho[store])
        if timing is None:
            notes.append(f"{store}: no measured cache job (no job log or build_seconds in the store)")
        else:
            cache.append(timing)
    return runs, cache, notes


def cache_timing(store: str, bytes_per_token: float, *, rho: float) -> CacheTiming | None:
    """The store's measured cache job, summed over the invocations that wrote shards; None if
    the store holds no measurement.

    The store's job log (`jobs`, `kdcache.storage.read_jobs`) is read first; a store whose
    `kdcache` attribute carries `build_seconds` / `build_tokens` is read from those.
    """
    meta = read_meta(store)
    jobs = read_jobs(store)
    seconds: float | None = sum(j.seconds for j in jobs) if jobs else getattr(meta, "build_seconds", None)
    tokens: float | None = sum(j.tokens for j in jobs) if jobs else getattr(meta, "build_tokens", None)
    if not seconds or not tokens:
        return None
    return CacheTiming(label=store, teacher_params=float(meta.teacher.nonembedding_params),
                       tokens=float(tokens), seconds=float(seconds), bytes_per_token=bytes_per_token, rho=rho,
                       context=float(meta.seq_len), vocab=float(meta.vocab_size))
