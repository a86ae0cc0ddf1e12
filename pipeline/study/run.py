"""`kdcache run`: the whole pipeline end to end, from the stdlib corpus to report.html.

prepare -> teachers (a sweep on the teacher split) -> caches (Ray) -> students (a sweep)
-> fits of both laws with their extrapolation check -> the paper's findings -> plans and
cost tables -> plots -> report.html. Every stage skips what is already done (finished
model directories, complete stores), so rerunning the same command resumes an
interrupted run. The output directory's layout is the report's contract (`layout.py`).

The students come in two parts. The *law grid*, shaped like the paper's: supervised
students across sizes and token budgets, and students distilled at lambda = 1 from a top-k
store of each of several teachers (so the teacher loss L_T varies) at every budget, plus
one online run. The *findings*: on one teacher's first `finding_rows` rows, a full
store against a top-k one at lambda 1 and 0.7, and top-k stores at other temperatures.
Only the law grid is fitted (`fits/runs.parquet`); the findings are compared in
`findings.json` (`findings.py`).

Presets: `demo` fits both laws from its own runs in minutes on two CPU cores (tiny models:
the report says how well they extrapolate); `study` has larger models, more budgets and
four teachers.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from kdcache.fit.errors import FitError
from kdcache.fit.report import fit_runs
from kdcache.fit.selection import DEFAULT_WHERE, FINDING_PREFIX, Selection, select
from kdcache.paths import check_writable
from kdcache.pipeline.cache.config import CacheConfig
from kdcache.pipeline.cache.job import run_cache
from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.config import PrepareConfig
from kdcache.pipeline.prepare.job import prepare
from kdcache.pipeline.study.config import SweepConfig
from kdcache.pipeline.study.cost import CostQuery, PlanQuery, estimate_cost, plan_and_cost, write_cost_plot
from kdcache.pipeline.study.findings import write_findings
from kdcache.pipeline.study.layout import RunLayout
from kdcache.pipeline.study.plots import write_plots
from kdcache.pipeline.study.report import write_report
from kdcache.pipeline.study.sweep import PREFIX_KEY, run_sweep
from kdcache.ray_session import ray_session
from kdcache.storage import StoreError, read_meta
from kdcache.storage.runs import read_runs
from kdcache.storage.tokens.format import is_token_data


@dataclass(frozen=True, kw_only=True)
class Preset:
    vocab_size: int
    seq_len: int
    max_tokens: int
    rho: int
    teachers: dict[str, tuple[int, int]]
    """Teacher name -> (layers, training tokens). The first one also serves the findings."""
    k: int
    student_layers: tuple[int, ...]
    """Supervised students' sizes (family layers)."""
    student_tokens: tuple[int, ...]
    """Token budgets of every student of the law grid."""
    distill_layers: tuple[int, ...]
    """Sizes distilled from every teacher's top-k store at every budget (lambda = 1)."""
    finding_rows: int
    """Rows of the findings' stores (full, top-k, other temperatures); 0: no findings."""
    finding_tokens: int
    """Budget of the findings' students (at distill_layers[0]); at most finding_rows x seq_len."""
    valid_frac: float = 0.06
    """Share of the corpus in the valid split: every run is scored on all of it, and L_T too."""
    temperatures: tuple[float, ...] = (0.5, 2.0)
    """Temperatures other than 1 the findings cache and distil at."""
    batch_size: int = 8
    min_runs_to_fit: tuple[int, int] = (10, 15)
    """Supervised and distillation runs needed before a law is fitted, not taken from the paper."""
    bootstrap: int = 64
    """Bootstrap resamples for the fits' 90% intervals."""
    seeds: int = 3
    """Seeds of every condition the findings compare (`findings.MIN_SEEDS` at least to test them)."""


PRESETS = {
    "demo": Preset(
        vocab_size=1024, seq_len=64, max_tokens=1_000_000, rho=32,
        teachers={"teacher-L3": (3, 600_000), "teacher-L2": (2, 300_000), "teacher-L4": (4, 600_000)},
        k=32, student_layers=(1, 2, 3), student_tokens=(40_000, 80_000, 160_000, 320_000),
        distill_layers=(1, 2), finding_rows=1024, finding_tokens=40_000,
    ),
    "study": Preset(
        vocab_size=2048, seq_len=128, max_tokens=6_000_000, rho=32, valid_frac=0.04,
        teachers={"teacher-L4": (4, 3_000_000), "teacher-L2": (2, 1_000_000), "teacher-L3": (3, 2_000_000),
                  "teacher-L5": (5, 3_000_000)},
        k=32, student_layers=(1, 2, 3, 4), student_tokens=(100_000, 200_000, 400_000, 800_000),
        distill_layers=(1, 2, 3), finding_rows=1600, finding_tokens=200_000,
    ),
}


def _stage(name: str) -> None:
    print(f"== {name}", file=sys.stderr, flush=True)


def _prepare(layout: RunLayout, p: Preset) -> None:
    if not is_token_data(layout.data):  # `kdcache prepare` writes the directory whole or not at all
        _stage("prepare: tokenizer and splits from the standard library")
        half = (1.0 - p.valid_frac) / 2
        prepare(PrepareConfig(out=str(layout.data), vocab_size=p.vocab_size, seq_len=p.seq_len,
                              max_tokens=p.max_tokens, teacher_frac=half, student_frac=half,
                              valid_frac=p.valid_frac))


def _sweep(layout: RunLayout, target: Path, grid: list[dict[str, Any]], p: Preset, device: str) -> None:
    """Train the grid into `target` (teachers/ or students/); any failed run fails the stage."""
    cfg = SweepConfig(data=str(layout.data), runs=str(layout.runs), out=str(target), grid=grid,
                      defaults={"rho": p.rho, "batch_size": p.batch_size, "checkpoint_every": 100,
                                "device": device})
    result = run_sweep(cfg)
    if result.failed:
        failed = ", ".join(f"{k}: {v}" for k, v in result.failed.items())
        raise PipelineError(f"{target.name}: {len(result.failed)} runs failed ({failed})")


@dataclass(frozen=True)
class Stores:
    grid: list[Path]
    """One top-k store per teacher over the whole student split: the law grid's."""
    findings: dict[str, Path]
    """The findings' stores over the first teacher's first `finding_rows` rows: 'full', 'topk'
    and 'tau<T>' (top-k at temperature T)."""


def _store_jobs(layout: RunLayout, p: Preset) -> list[tuple[Path, str, dict[str, Any]]]:
    """(store, teacher, cache settings) for every store the preset needs."""
    # The law grid's stores hold the rows the largest budget reads once, not the whole split.
    grid_rows = -(-max(p.student_tokens) // p.seq_len)
    jobs: list[tuple[Path, str, dict[str, Any]]] = [
        (layout.store(name), name, {"kind": "topk", "max_rows": grid_rows}) for name in p.teachers]
    if p.finding_rows:
        first = next(iter(p.teachers))
        rows: dict[str, Any] = {"max_rows": p.finding_rows}
        jobs.append((layout.store(f"{first}-full"), first, {"kind": "full", **rows}))
        jobs.append((layout.store(f"{first}-topk"), first, {"kind": "topk", **rows}))
        jobs += [(layout.store(f"{first}-tau{t:g}"), first, {"kind": "topk", "temperature": t, **rows})
                 for t in p.temperatures]
    return jobs


def _caches(layout: RunLayout, p: Preset) -> Stores:
    jobs = _store_jobs(layout, p)
    for store, teacher, settings in jobs:
        with contextlib.suppress(StoreError):
            meta = read_meta(store)
            if meta.complete and meta.valid_loss is not None:
                continue
        _stage(f"cache: {teacher} -> {store.name} ({settings['kind']})")
        run_cache(CacheConfig(teacher=str(layout.teacher(teacher)), data=str(layout.data), out=str(store),
                              k=p.k, quiet=True, **settings))
    grid = [store for store, _, _ in jobs[: len(p.teachers)]]
    first = next(iter(p.teachers))
    findings = {store.name.removeprefix(f"{first}-"): store for store, _, _ in jobs[len(p.teachers):]}
    return Stores(grid=grid, findings=findings)


def _student_grid(layout: RunLayout, p: Preset, stores: Stores) -> list[dict[str, Any]]:
    """The law grid (seed 0: supervised; distilled at lambda 1 from each teacher; one online run)
    and the findings' runs (ids `finding-*`), every condition a finding compares at `p.seeds`
    seeds: supervised and distilled at the smallest and largest budget, every teacher's student
    at the largest (seed 0 of those is the law grid's run), and full against top-k at lambda 1
    and 0.7 and the other temperatures."""
    tokens = list(p.student_tokens)
    first_teacher = layout.teacher(next(iter(p.teachers)))
    size = p.distill_layers[0]
    grid: list[dict[str, Any]] = [
        {"layers": list(p.student_layers), "tokens": tokens},
        {"layers": list(p.distill_layers), "tokens": tokens, "distill": [str(s) for s in stores.grid]},
        {"layers": size, "tokens": p.finding_tokens, "online_teacher": str(first_teacher)},
    ]
    if stores.findings:
        f, more, every = stores.findings, list(range(1, p.seeds)), list(range(p.seeds))
        ends = sorted({min(tokens), max(tokens)})
        finding = {"layers": size, PREFIX_KEY: FINDING_PREFIX}
        grid += [
            {**finding, "tokens": ends, "seed": more},
            {**finding, "tokens": ends, "distill": str(stores.grid[0]), "seed": more},
            {**finding, "tokens": max(tokens), "distill": [str(s) for s in stores.grid[1:]], "seed": more},
            {**finding, "tokens": p.finding_tokens, "distill": [str(f["full"]), str(f["topk"])],
             "seed": every},
            {**finding, "tokens": p.finding_tokens, "distill": str(f["topk"]), "lambda": 0.7, "seed": every},
            {**finding, "tokens": p.finding_tokens, "seed": every,
             "distill": [str(path) for name, path in f.items() if name.startswith("tau")]},
        ]
    return grid


def _law_rows(layout: RunLayout) -> tuple[pa.Table, Selection]:
    """(all runs, the law grid): what `kdcache fit` selects by default (`fit.selection`)."""
    table = read_runs(layout.runs, required=())
    return table, select(table, DEFAULT_WHERE, source=str(layout.runs))


def _fit(out: Path, p: Preset) -> dict[str, str]:
    """Fit each law with enough runs; otherwise say so (plans then use the paper's law).

    Only the law grid is fitted (`fits/runs.parquet`): the distillation law describes pure
    distillation (lambda = 1) at temperature 1 over the whole split; the findings' runs are not.
    """
    layout = RunLayout(root=out)
    table, selection = _law_rows(layout)
    fitted_runs = selection.table
    layout.fits.mkdir(exist_ok=True)
    layout.plots.mkdir(exist_ok=True)
    pq.write_table(fitted_runs, layout.fit_runs)
    kinds = fitted_runs.column("kind").to_pylist()
    counts = {"supervised": kinds.count("supervised"),
              "distillation": kinds.count("distill") + kinds.count("online")}
    notes: dict[str, str] = {}
    for law, needed in zip(("supervised", "distillation"), p.min_runs_to_fit, strict=True):
        path = layout.fit(law)
        path.unlink(missing_ok=True)
        if counts[law] < needed:
            notes[law] = (f"{counts[law]} {law} runs, fewer than the {needed} this preset fits from: "
                          "not fitted; plans use the paper's published law")
            continue
        _stage(f"fit: {law} law on {counts[law]} runs")
        sup = layout.fit("supervised")
        report = fit_runs(table, law, source=layout.runs,
                          bootstrap=p.bootstrap,
                          supervised=str(sup) if law == "distillation" and sup.is_file() else None)
        path.write_text(json.dumps(report.to_json(), indent=2))
    if len(fitted_runs) < len(table):
        left_out = f"fitted the law grid: {selection.summary()}"
        notes["distillation"] = "; ".join(filter(None, (notes.get("distillation"), left_out)))
    layout.notes.write_text(json.dumps(notes, indent=2))
    for note in notes.values():
        print(f"note: {note}", file=sys.stderr)
    return notes


def _plans_and_costs(layout: RunLayout, p: Preset, stores: Stores) -> None:
    _stage("plan and cost")
    law_file = layout.fit("distillation")
    plans = []
    for n, c in ((1e8, 1e20), (1e9, 1e21)):
        for scenario in ("best", "inference"):
            headline = (n, c, scenario) == HEADLINE
            plan = _plan(law_file if law_file.is_file() else None, n, c, scenario,
                         HEADLINE_STUDENTS if headline else None)
            plans.append({**plan, "headline": headline})
    layout.plans.write_text(json.dumps(plans, indent=2))
    rows = read_runs(layout.runs, required=()).to_pylist()
    costs = []
    for store in stores.grid:
        students = [r for r in rows if r["store"] == str(store.resolve())]
        if not students:
            continue
        n_t, n_s = students[0]["teacher_params"], sorted({r["params"] for r in students})
        tokens = max(r["tokens"] for r in students)
        query = CostQuery(teacher_params=n_t, student_params=tuple(float(n) for n in n_s), tokens=tokens,
                          store=str(store), runs=str(layout.runs), rho=p.rho, context=p.seq_len,
                          vocab=p.vocab_size)
        try:
            result = estimate_cost(query)
        except FitError as exc:  # a runs table that cannot pin a term: say so, cost uncalibrated
            print(f"note: {store.name}: cost not calibrated ({exc})", file=sys.stderr)
            query = replace(query, runs=None)
            result = estimate_cost(query)
        write_cost_plot(query, result, str(layout.cost_plot(store.name)))
        costs.append({"label": store.name, "teacher_params": n_t, "student_params": n_s, "tokens": tokens,
                      **result.to_json()})
    layout.costs.write_text(json.dumps(costs, indent=2))


HEADLINE = (1e9, 1e21, "inference")
"""The recipe the summary leads with: a 1B student, 1e21 FLOPs, the teacher's logits paid."""
HEADLINE_STUDENTS = 4
"""Students the headline recipe's cost is for (one cache serving several is the point)."""


def _plan(law_file: Path | None, n: float, c: float, scenario: str, students: int | None) -> dict[str, Any]:
    """The fitted law's recipe where that law is identified for it (`fit.scope`: no coefficient on
    a bound, the recipe near the fitted runs), else the paper's, with "law" saying which and why;
    with `students`, the cost of that many students of it."""
    why = "paper (no fitted law)"
    if law_file is not None:
        # Planned once, extrapolating: `extrapolated` lists why the law may not answer, if it may not.
        query = PlanQuery(law=str(law_file), compute=c, student_params=n, scenario=scenario,
                          crossover=False, extrapolate=True)
        try:
            fitted = plan_and_cost(query, students)
            problems = list(fitted.extrapolated)
        except FitError as exc:
            problems = [f"no recipe within the bounds ({exc})"]
        if not problems:
            return {**fitted.to_json(), "law": "fitted"}
        more = f"; and {len(problems) - 2} more" if len(problems) > 2 else ""
        why = f"paper (the fitted law is not identified here: {'; '.join(problems[:2])}{more})"
    query = PlanQuery(law="paper", compute=c, student_params=n, scenario=scenario, crossover=False)
    return {**plan_and_cost(query, students).to_json(), "law": why}


def run_study(out_dir: str, preset: str, ray_address: str | None = None, *, device: str = "cpu") -> Path:
    """Run (or resume) the whole pipeline into `out_dir`; returns the report's path."""
    if preset not in PRESETS:
        raise PipelineError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    p, layout = PRESETS[preset], RunLayout(root=Path(out_dir))
    check_writable(layout.root, "--out")
    layout.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(layout.lock), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise PipelineError(f"{layout.root}: another kdcache run is writing this --out") from None
    try:
        return _study(layout, p, ray_address, device)
    finally:
        lock.release()


def _study(layout: RunLayout, p: Preset, ray_address: str | None, device: str) -> Path:
    """Every stage in order, each skipping what is already done."""
    _prepare(layout, p)
    with ray_session(ray_address):  # one Ray for every stage: the cache jobs and sweeps reuse it
        _stage(f"teachers: {', '.join(p.teachers)}")
        grid = [{"layers": layers, "tokens": tokens, "split": "teacher", "run_id": name}
                for name, (layers, tokens) in p.teachers.items()]
        _sweep(layout, layout.teachers, grid, p, device)
        stores = _caches(layout, p)
        _stage("students: the law grid (supervised, distilled from each teacher, online) and the findings")
        _sweep(layout, layout.students, _student_grid(layout, p, stores), p, device)
    _fit(layout.root, p)
    write_findings(layout.root, {name: str(path.resolve()) for name, path in stores.findings.items()},
                   [str(s.resolve()) for s in stores.grid], p.distill_layers[0])
    _plans_and_costs(layout, p, stores)
    write_plots(layout.root)
    return write_report(layout.root)
