"""`kdcache run`: the whole pipeline end to end, from the stdlib corpus to report.html.

prepare -> teachers (a sweep on the teacher split) -> caches (Ray, top-k; one full store)
-> students (a sweep: supervised baselines, distilled from every store, one online run)
-> fits of both laws -> plans and cost tables -> report.html. Every stage skips what is
already done (finished model directories, complete stores), so rerunning the same
command resumes an interrupted run. The output directory's layout is the report's
contract (see `report_html.py`).

Presets: `demo` runs in a few minutes on two CPU cores and is too small to fit the
laws, so it says so and plans with the paper's coefficients; `study` spans a decade of
student sizes and token budgets with several teachers per student, for fits that mean
something, and runs for hours.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.paths import check_writable
from kdcache.pipeline.errors import PipelineError


@dataclass(frozen=True, kw_only=True)
class Preset:
    vocab_size: int
    seq_len: int
    max_tokens: int
    rho: int
    teachers: dict[str, tuple[int, int]]
    """Teacher name -> (layers, training tokens)."""
    k: int
    full_store_rows: int
    """Rows of the first teacher's full-distribution store (0: none)."""
    student_layers: tuple[int, ...]
    student_tokens: tuple[int, ...]
    batch_size: int = 16
    min_runs_to_fit: tuple[int, int] = (10, 15)
    """Supervised and distillation runs needed before a law is fitted, not taken from the paper."""
    bootstrap: int = 64
    """Bootstrap resamples for the fits' 90% intervals."""


PRESETS = {
    "demo": Preset(
        vocab_size=1024, seq_len=64, max_tokens=600_000, rho=32,
        teachers={"teacher-L3": (3, 300_000), "teacher-L4": (4, 300_000)},
        k=32, full_store_rows=256, student_layers=(1, 2), student_tokens=(60_000,),
    ),
    "study": Preset(
        vocab_size=4096, seq_len=128, max_tokens=12_000_000, rho=32,
        teachers={f"teacher-L{n}": (n, 3_000_000) for n in (3, 4, 6, 8)},
        k=64, full_store_rows=1024, student_layers=(1, 2, 3, 4),
        student_tokens=(100_000, 300_000, 1_000_000, 3_000_000),
    ),
}


def _stage(name: str) -> None:
    print(f"== {name}", file=sys.stderr, flush=True)


def _verb_json(argv: list[str]) -> Any:
    """Run a kdcache verb in this process with --json and return what it printed."""
    from kdcache.pipeline.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([*argv, "--json"])
    if code != 0:
        raise PipelineError(f"kdcache {' '.join(argv[:1])} failed (exit {code}); see the error above")
    return json.loads(out.getvalue())


def _prepare(out: Path, p: Preset) -> Path:
    from kdcache.pipeline.prepare import PrepareConfig, prepare

    data = out / "data"
    if not (data / "zarr.json").is_file():
        _stage("prepare: tokenizer and splits from the standard library")
        prepare(PrepareConfig(out=str(data), vocab_size=p.vocab_size, seq_len=p.seq_len,
                              max_tokens=p.max_tokens))
    return data


def _sweep(out: Path, data: Path, target: str, grid: list[dict[str, Any]], p: Preset) -> dict[str, Any]:
    from kdcache.pipeline.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(data=str(data), runs=str(out / "runs.parquet"), out=str(out / target), grid=grid,
                      defaults={"rho": p.rho, "batch_size": p.batch_size, "checkpoint_every": 100})
    result = run_sweep(cfg)
    if result["failed"]:
        failed = ", ".join(f"{k}: {v}" for k, v in result["failed"].items())
        raise PipelineError(f"{target}: {len(result['failed'])} runs failed ({failed})")
    return result


def _caches(out: Path, data: Path, p: Preset) -> list[Path]:
    from kdcache.pipeline.cache import CacheConfig, run_cache
    from kdcache.storage import StoreError, read_meta

    jobs: list[tuple[str, str, int | None]] = [(name, "topk", None) for name in p.teachers]
    if p.full_store_rows:
        jobs.append((next(iter(p.teachers)), "full", p.full_store_rows))
    stores = []
    for name, kind, rows in jobs:
        store = out / "stores" / (f"{name}-full" if kind == "full" else name)
        stores.append(store)
        with contextlib.suppress(StoreError):
            if read_meta(store).complete:
                continue
        _stage(f"cache: {name} -> {store.name} ({kind})")
        run_cache(CacheConfig(teacher=str(out / "teachers" / name), data=str(data), out=str(store),
                              kind=kind, k=p.k, max_rows=rows))
    return stores


def _student_grid(out: Path, p: Preset, stores: list[Path]) -> list[dict[str, Any]]:
    """Supervised baselines; top-k students at lambda 1 and 0.7 (mixing next-token loss back
    in recovers what truncating the teacher loses, the paper finds); full-store students;
    one online run of the first teacher for the cost comparison."""
    layers, tokens = list(p.student_layers), list(p.student_tokens)
    topk, full = stores[: len(p.teachers)], stores[len(p.teachers):]
    first_teacher = out / "teachers" / next(iter(p.teachers))
    grid: list[dict[str, Any]] = [
        {"layers": layers, "tokens": tokens},
        {"layers": layers, "tokens": tokens, "distill": [str(s) for s in topk], "lambda": [1.0, 0.7]},
        {"layers": layers[0], "tokens": tokens[0], "online_teacher": str(first_teacher)},
    ]
    if full:
        grid.insert(2, {"layers": layers, "tokens": tokens, "distill": [str(s) for s in full]})
    return grid


def _fit(out: Path, p: Preset) -> dict[str, str]:
    """Fit each law with enough runs; otherwise say so (plans then use the paper's law).

    The distillation law describes pure distillation (lambda = 1), so runs that mix
    next-token loss back in are left out of the fitted table (`fits/runs.parquet`).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(out / "runs.parquet")
    pure = pc.or_(pc.equal(table["kind"], "supervised"), pc.equal(pc.fill_null(table["lambda"], 1.0), 1.0))
    fitted_runs = table.filter(pure)
    (out / "fits").mkdir(exist_ok=True)
    (out / "plots").mkdir(exist_ok=True)
    pq.write_table(fitted_runs, out / "fits" / "runs.parquet")
    kinds = fitted_runs.column("kind").to_pylist()
    counts = {"supervised": kinds.count("supervised"),
              "distillation": kinds.count("distill") + kinds.count("online")}
    notes: dict[str, str] = {}
    for law, needed in zip(("supervised", "distillation"), p.min_runs_to_fit, strict=True):
        path = out / "fits" / f"{law}.json"
        path.unlink(missing_ok=True)
        if counts[law] < needed:
            notes[law] = (f"{counts[law]} {law} runs, fewer than the {needed} this preset fits from: "
                          "not fitted; plans use the paper's published law")
            continue
        _stage(f"fit: {law} law on {counts[law]} runs")
        extra = ["--supervised", str(out / "fits" / "supervised.json")] if (
            law == "distillation" and (out / "fits" / "supervised.json").is_file()) else []
        fitted = _verb_json(["fit", "--runs", str(out / "fits" / "runs.parquet"), "--law", law,
                             "--bootstrap", str(p.bootstrap), "--plot", str(out / "plots" / f"fit-{law}.png"),
                             *extra])
        path.write_text(json.dumps(fitted, indent=2))
    if len(fitted_runs) < len(table):
        left_out = f"{len(table) - len(fitted_runs)} runs with lambda < 1 left out (the law is for lambda 1)"
        notes["distillation"] = "; ".join(filter(None, (notes.get("distillation"), left_out)))
    (out / "fits" / "notes.json").write_text(json.dumps(notes, indent=2))
    for note in notes.values():
        print(f"note: {note}", file=sys.stderr)
    return notes


def _plans_and_costs(out: Path, p: Preset, stores: list[Path]) -> None:
    import pyarrow.parquet as pq

    _stage("plan and cost")
    law = out / "fits" / "distillation.json"
    law_arg = str(law) if law.is_file() else "paper"
    plans = [_verb_json(["plan", "--law", law_arg, "--student-params", f"{n:g}", "--compute", f"{c:g}",
                         "--scenario", scenario, "--no-crossover"])
             for n, c in ((1e8, 1e20), (1e9, 1e21)) for scenario in ("best", "inference")]
    (out / "plans.json").write_text(json.dumps(plans, indent=2))
    rows = pq.read_table(out / "runs.parquet").to_pylist()
    costs = []
    for store in stores[: len(p.teachers)]:
        students = [r for r in rows if r["store"] == str(store.resolve())]
        if not students:
            continue
        n_t, n_s = students[0]["teacher_params"], sorted({r["params"] for r in students})
        tokens = max(r["tokens"] for r in students)
        result = _verb_json([
            "cost", "--teacher-params", str(n_t), "--student-params", ",".join(map(str, n_s)),
            "--tokens", str(tokens), "--store", str(store), "--runs", str(out / "runs.parquet"),
            "--context", str(p.seq_len), "--vocab", str(p.vocab_size), "--rho", str(p.rho),
            "--plot", str(out / "plots" / f"cost-{store.name}.png"),
        ])
        costs.append({"label": store.name, "teacher_params": n_t, "student_params": n_s, "tokens": tokens,
                      **result})
    (out / "costs.json").write_text(json.dumps(costs, indent=2))


def run_study(out_dir: str, preset: str, ray_address: str | None = None) -> Path:
    """Run (or resume) the whole pipeline into `out_dir`; returns the report's path."""
    from kdcache.pipeline.report_html import write_report
    from kdcache.ray_session import ray_session

    if preset not in PRESETS:
        raise PipelineError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    p, out = PRESETS[preset], Path(out_dir)
    check_writable(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    data = _prepare(out, p)
    with ray_session(ray_address):  # one Ray for every stage: the cache jobs and sweeps reuse it
        _stage(f"teachers: {', '.join(p.teachers)}")
        grid = [{"layers": layers, "tokens": tokens, "split": "teacher", "run_id": name}
                for name, (layers, tokens) in p.teachers.items()]
        _sweep(out, data, "teachers", grid, p)
        stores = _caches(out, data, p)
        _stage("students: supervised, distilled from each store, online")
        _sweep(out, data, "students", _student_grid(out, p, stores), p)
    _fit(out, p)
    _plans_and_costs(out, p, stores)
    return write_report(out)
