"""What `kdcache cost` reads from disk: a store's bytes per token, and a runs table's measured runs.

The cost model itself (`kdcache.fit.cost`) takes numbers; this module turns files into them.
A runs table gives the timed training runs (`wall_s`, the training loop's time); the stores
its offline rows name give their bytes per token and, from the store's cache-job log, the
measured cache job. `estimate_cost(CostQuery(...))` is the whole `kdcache cost` without the
CLI, for `kdcache run`'s cost tables.

`plan_and_cost(PlanQuery(...), students, CostSettings(...))` is the one path by which
`kdcache plan --students M` and `kdcache cost --compute C` answer: the recipe (refused
when the law is not identified for it, unless extrapolating), then the cost of M students
of it. Torch-free (storage and fit only), so the CLI imports it at module top.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from kdcache.fit import plots, recipes
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
from kdcache.fit.scope import load_distillation_scoped
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
    """A PNG of online and cache GPU-hours against the number of students M = 1..max_students."""
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
            notes.append(f"{store}: no measured cache job (no job log in the store)")
        else:
            cache.append(timing)
    return runs, cache, notes


def cache_timing(store: str, bytes_per_token: float, *, rho: float) -> CacheTiming | None:
    """The store's measured cache job, summed over the invocations that wrote shards; None if
    the store holds no measurement (no job log, or jobs that wrote no trained tokens).

    The job log (`jobs`, `kdcache.storage.read_jobs`) validates every entry, so a damaged
    log is refused naming its file and field rather than costed at a garbage time.
    """
    meta = read_meta(store)
    jobs = read_jobs(store)
    seconds = sum(j.seconds for j in jobs)
    tokens = sum(j.tokens for j in jobs)
    if not jobs or not tokens:
        return None
    return CacheTiming(label=store, teacher_params=float(meta.teacher.nonembedding_params),
                       tokens=float(tokens), seconds=float(seconds), bytes_per_token=bytes_per_token, rho=rho,
                       context=float(meta.seq_len), vocab=float(meta.vocab_size))


# --- Plan, then cost: one answer for `kdcache plan --students` and `kdcache cost --compute` ---


@dataclasses.dataclass(frozen=True, kw_only=True)
class CostSettings:
    """How a cost is counted, whatever the run: the store's size per token, the hardware, and
    the runs that calibrate the time model."""

    store: str | None = None
    bytes_per_token: float | None = None
    k: int = 64
    runs: str | None = None
    hardware: Hardware = dataclasses.field(default_factory=Hardware)

    def query(self, teacher_params: float, student_params: tuple[float, ...], tokens: float, *,
              rho: float, context: int, vocab: int) -> CostQuery:
        return CostQuery(teacher_params=teacher_params, student_params=student_params, tokens=tokens,
                         store=self.store, bytes_per_token=self.bytes_per_token, k=self.k, vocab=vocab,
                         runs=self.runs, rho=rho, context=context, hardware=self.hardware)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanQuery:
    """One planning question: a law and a budget, a student size, and a teacher the scenario
    chooses (no `teacher_params`) or the user has (`teacher_params` with its tokens or loss)."""

    law: str = "paper"
    compute: float
    student_params: float
    scenario: str | None = None
    """One of `recipes.SCENARIOS` (default best); not with a given teacher."""
    teacher_params: float | None = None
    teacher_tokens: float | None = None
    teacher_loss: float | None = None
    extrapolate: bool = False
    """Plan even where the law is not identified for the recipe (`fit.scope`)."""
    crossover: bool = True
    rho: float = 128
    context: int = 4096
    vocab: int = 32768

    def __post_init__(self) -> None:
        if self.scenario is not None and self.scenario not in recipes.SCENARIOS:
            raise FitError(f"--scenario must be one of {tuple(recipes.SCENARIOS)}, got {self.scenario!r}")
        named = {"--compute": self.compute, "--student-params": self.student_params,
                 "--teacher-params": self.teacher_params, "--teacher-tokens": self.teacher_tokens,
                 "--teacher-loss": self.teacher_loss}
        bad = [flag for flag, v in named.items() if v is not None and not (0 < v < math.inf)]
        if bad:
            raise FitError(f"{', '.join(bad)} must be positive and finite")
        given = [f for f in ("--teacher-tokens", "--teacher-loss") if named[f] is not None]
        if self.teacher_params is None:
            if given:
                raise FitError(f"{given[0]} describes a given teacher: add --teacher-params")
        else:
            if len(given) != 1:
                raise FitError("with --teacher-params give exactly one of --teacher-tokens D_T "
                               "(its loss from the law) or --teacher-loss L_T")
            if self.scenario is not None:
                raise FitError("--scenario chooses the teacher; with --teacher-params the plan shows its "
                               "logits both free and counted instead")

    def shape(self) -> dict[str, float]:
        return {"rho": self.rho, "context": self.context, "vocab": self.vocab}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlannedCost:
    """A plan, what the law could not vouch for, and the cost of M students of it where asked."""

    law: str
    plan: recipes.Plan | recipes.FixedTeacherPlan
    extrapolated: tuple[str, ...]
    """Why the law is not identified for this recipe (empty when it is)."""
    costs: dict[str, CostEstimate]
    """The scenario recipe's cost under "recipe"; a given teacher's under each accounting."""
    cost_note: str | None = None
    """Why a cost was asked for and not given."""

    def to_json(self) -> dict[str, Any]:
        out = {"law": self.law, **self.plan.to_json(), "extrapolated": list(self.extrapolated)}
        if isinstance(self.plan, recipes.FixedTeacherPlan):
            for name, cost in self.costs.items():
                out["accountings"][name]["cost"] = cost.to_json()
        elif self.costs or self.cost_note:
            out["cost"] = self.costs["recipe"].to_json() if self.costs else None
        if self.cost_note:
            out["cost_note"] = self.cost_note
        return out


def plan_and_cost(query: PlanQuery, students: int | None = None,
                  settings: CostSettings | None = None) -> PlannedCost:
    """The recipe for `query` and, with `students` M, the cost of M students of it on its tokens.

    Raises FitError when the law is not identified for the recipe (`fit.scope`), unless
    `query.extrapolate`; the reasons are then `extrapolated`.
    """
    if students is not None and students < 1:
        raise FitError(f"--students must be >= 1, got {students}")
    law, scope = load_distillation_scoped(query.law)
    shape = query.shape()
    plan: recipes.Plan | recipes.FixedTeacherPlan
    if query.teacher_params is None:
        # The crossover search (seconds) waits until the law is known to be identified for the recipe.
        plan = recipes.plan(law, query.student_params, query.compute, query.scenario or "best",
                            crossover=False, **shape)
    else:
        plan = recipes.fixed_teacher(law, query.compute, query.teacher_params,
                                     teacher_tokens=query.teacher_tokens, teacher_loss=query.teacher_loss,
                                     student_params=query.student_params, **shape)
    problems = scope.problems(plan.recipe if isinstance(plan, recipes.Plan) else plan)
    if problems and not query.extrapolate:
        raise FitError(f"{query.law}: no recipe: the law is not identified for it: {'; '.join(problems)}; "
                       "--extrapolate plans anyway")
    if isinstance(plan, recipes.Plan) and query.crossover:
        found = recipes.crossover_compute(law, plan.recipe.student_params, plan.recipe.scenario, **shape)
        plan = dataclasses.replace(plan, crossover_compute=found, crossover_searched=True)
    costs, note = {}, None
    if students is not None:
        settings = settings or CostSettings()

        def cost(n_t: float, n_s: float, tokens: float) -> CostEstimate:
            return estimate_cost(settings.query(n_t, (n_s,) * students, tokens, rho=query.rho,
                                                context=query.context, vocab=query.vocab))

        if isinstance(plan, recipes.FixedTeacherPlan):
            costs = {name: cost(plan.teacher_params, row.student_params, row.student_tokens)
                     for name, row in plan.accountings.items()}
        elif plan.recipe.teacher_params is None:
            note = (f"the cost needs a teacher size: no teacher of this law reaches L_T = "
                    f"{plan.recipe.teacher_loss:.4f} (below its E); give --teacher-params")
        else:
            r = plan.recipe
            assert r.teacher_params is not None
            costs = {"recipe": cost(r.teacher_params, r.student_params, r.student_tokens)}
    return PlannedCost(law=query.law, plan=plan, extrapolated=tuple(problems), costs=costs, cost_note=note)
