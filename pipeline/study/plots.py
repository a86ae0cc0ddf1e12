"""The run report's figures, drawn from what `kdcache run` left in OUT, with the fitted laws over it.

`write_plots(OUT)` reads the runs (`fits/runs.parquet`, the fitted subset, else
`runs.parquet`), the fits (`fits/{supervised,distillation}.json`, each with its runs'
predictions under `data`) and the recipes' budgets (`plans.json`), and writes

    plots/loss-vs-tokens.png         runs against tokens per size, the laws' curves through them
    plots/capacity-gap.png           distilled students against their teacher's L_T
    plots/predicted-vs-observed.png  both laws' predictions against the losses, held-out runs marked
    plots/allocations.png            compute-optimal recipes for one of the run's student sizes

A law not fitted is drawn as the paper's, labelled so. A figure whose inputs are missing
or unreadable is not drawn: `plots/skipped.json` says why (the report shows it), and
stale copies from an earlier run are removed, so the page never shows an old figure.
Torch-free, like `kdcache.fit`.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.fit import plots, recipes
from kdcache.fit.errors import FitError
from kdcache.fit.presets import PAPER_DISTILLATION, SUPERVISED_PRESETS, load_distillation, load_supervised
from kdcache.fit.scope import load_distillation_scoped
from kdcache.pipeline.study.layout import RunLayout
from kdcache.pipeline.study.report import TEACHER_PREFIX, read_list
from kdcache.storage.runs import read_runs as read_table

BUDGET_SPAN = np.logspace(-2, 2, 9)  # around the plans' compute, as `kdcache plan --plot` spans it


class Skip(Exception):
    """A figure that cannot be drawn from this run's files; the message says why."""


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def read_runs(out: Path) -> dict[str, np.ndarray]:
    """The runs the laws describe, as arrays; kind is 'teacher' for the teachers' own runs.

    `fits/runs.parquet` is the fitted subset (the law grid at lambda = 1); without it the
    whole table is used, less the runs at lambda != 1 (the law describes pure distillation).
    """
    layout = RunLayout(root=out)
    path = layout.fit_runs
    if not path.is_file():
        path = layout.runs
    if not path.is_file():
        raise Skip(f"no runs table ({layout.rel(layout.fit_runs)} or {layout.rel(layout.runs)})")
    rows = read_table(path, required=("params", "tokens", "loss")).to_pylist()
    keep = []
    for r in rows:
        kind = "teacher" if str(r.get("run_id") or "").startswith(TEACHER_PREFIX) else r.get("kind")
        lam = r.get("lambda")
        if kind not in ("supervised", "teacher", "distill", "online") or (lam is not None and lam != 1.0):
            continue
        row = {key: _number(r.get(key)) for key in ("params", "tokens", "loss", "teacher_loss")}
        if all(math.isfinite(row[k]) and row[k] > 0 for k in ("params", "tokens", "loss")):
            keep.append({**row, "kind": kind, "store": Path(r["store"]).name if r.get("store") else None})
    if not keep:
        raise Skip(f"{layout.rel(path)} has no run with finite params, tokens and loss")
    runs = {key: np.array([r[key] for r in keep], dtype=np.float64)
            for key in ("params", "tokens", "loss", "teacher_loss")}
    runs["kind"] = np.array([r["kind"] for r in keep], dtype=str)
    runs["store"] = np.array([r["store"] or "" for r in keep], dtype=str)
    return runs


def teachers_of(runs: dict[str, np.ndarray]) -> dict[str, float]:
    """Teacher name (its store's) -> L_T, one per distinct L_T among the distilled runs."""
    found: dict[str, tuple[float, str]] = {}  # L_T to 6 digits: an online row's may differ in the last
    distilled = np.isin(runs["kind"], ("distill", "online")) & np.isfinite(runs["teacher_loss"])
    for lt, store in sorted(zip(runs["teacher_loss"][distilled], runs["store"][distilled], strict=True)):
        key = f"{lt:.6g}"
        if not found.get(key, (0.0, ""))[1]:
            found[key] = (float(lt), str(store))
    return {f"{name or 'teacher'} (L_T {lt:.3f})": lt for lt, name in found.values()}


def read_fit(layout: RunLayout, law: str) -> dict[str, Any] | None:
    """The fit of `law` (None when the law was not fitted)."""
    path = layout.fit(law)
    if not path.is_file():
        return None
    fit = json.loads(path.read_text())
    if not isinstance(fit, dict) or not isinstance(fit.get("params"), dict):
        raise Skip(f"{layout.rel(path)}: no 'params' object")
    return fit


def laws(layout: RunLayout) -> tuple[Any, Any]:
    """(supervised, distillation) fitted laws, None for a law not fitted."""
    sup, dist = layout.fit("supervised"), layout.fit("distillation")
    return (load_supervised(str(sup)) if sup.is_file() else None,
            load_distillation(str(dist)) if dist.is_file() else None)


def agreement(out: Path, law: str, title: str, runs: dict[str, np.ndarray], fitted: Any) -> Any:
    """A panel of predicted-vs-observed: the fit's own `data` when it has it, else the law's
    (the fitted one, or the paper's) predictions for the runs."""
    fit = read_fit(RunLayout(root=out), law)
    data = (fit or {}).get("data")
    if fit is not None and isinstance(data, dict) and "predicted" in data:
        loss = np.asarray(data["loss"], dtype=np.float64)
        held = np.asarray(data.get("held_out") or [False] * len(loss), dtype=bool)
        extrapolated = np.array([_number(v) for v in data.get("extrapolated") or [None] * len(loss)])
        threshold = (fit.get("extrapolation") or {}).get("threshold")
        return plots.Agreement(title=f"{title}: fitted to {len(loss)} runs", observed=loss,
                         predicted=np.asarray(data["predicted"], dtype=np.float64), held_out=held,
                         extrapolated=extrapolated, threshold=threshold)
    kinds = ("supervised", "teacher") if law == "supervised" else ("distill", "online")
    mask = np.isin(runs["kind"], kinds)
    if law == "distillation":
        mask &= np.isfinite(runs["teacher_loss"])
    subset = {key: value[mask] for key, value in runs.items()}
    if fitted is None:
        paper = SUPERVISED_PRESETS["paper"] if law == "supervised" else PAPER_DISTILLATION
        return plots.Agreement.of_law(f"{title}: {plots.PAPER_LABEL}", paper, subset)
    return plots.Agreement.of_law(f"{title}: fitted law (fit JSON has no per-run data)", fitted, subset)


def _student_size(runs: dict[str, np.ndarray]) -> float:
    """The run's typical student: the middle one (the lower of two) of its distilled sizes,
    else of its supervised students'."""
    for kinds in (("distill", "online"), ("supervised",)):
        sizes = sorted(set(runs["params"][np.isin(runs["kind"], kinds)].tolist()))
        if sizes:
            return float(sizes[(len(sizes) - 1) // 2])
    raise Skip("no student runs to take a student size from")


def _budgets(layout: RunLayout) -> np.ndarray:
    path = layout.plans
    if not path.is_file():
        raise Skip(f"no {layout.rel(path)} to take the budgets from")
    compute = [float(p["compute"]) for p in read_list(path) if isinstance(p.get("compute"), int | float)]
    compute = [c for c in compute if math.isfinite(c) and c > 0]
    if not compute:
        raise Skip(f"{layout.rel(path)} holds no recipe with a compute")
    return float(np.exp(np.mean(np.log(compute)))) * BUDGET_SPAN


def draw_loss_vs_tokens(layout: RunLayout, path: Path) -> None:
    runs = read_runs(layout.root)
    sup, dist = laws(layout)
    plots.loss_vs_tokens(runs, path, supervised=sup, distillation=dist, teachers=teachers_of(runs))


def draw_capacity_gap(layout: RunLayout, path: Path) -> None:
    runs = read_runs(layout.root)
    if not (np.isin(runs["kind"], ("distill", "online")) & np.isfinite(runs["teacher_loss"])).any():
        raise Skip("no distilled run with a teacher loss")
    sup, dist = laws(layout)
    plots.capacity_gap_runs(runs, path, supervised=sup, distillation=dist)


def draw_predicted_vs_observed(layout: RunLayout, path: Path) -> None:
    runs = read_runs(layout.root)
    sup, dist = laws(layout)
    panels = [agreement(layout.root, "supervised", "Supervised law (Eq. 1)", runs, sup),
              agreement(layout.root, "distillation", "Distillation law (Eq. 8)", runs, dist)]
    panels = [p for p in panels if len(p.observed)]
    if not panels:
        raise Skip("no runs for either law")
    plots.predicted_vs_observed(panels, path)


def _plan_size(layout: RunLayout) -> float:
    """The student size of the plans' recipes (the first), the scale the recipes are for."""
    sizes = [float(p["student_params"]) for p in read_list(layout.plans)
             if isinstance(p.get("student_params"), int | float)]
    if not sizes:
        raise Skip(f"{layout.rel(layout.plans)} holds no recipe with a student size")
    return sizes[0]


def draw_allocations(layout: RunLayout, path: Path) -> None:
    """Recipes at the plans' scale: the fitted law where it is identified for every recipe drawn
    (`fit.scope`, the rule the recipes' table follows), else the paper's."""
    budgets = _budgets(layout)
    size = _plan_size(layout)
    law, name = PAPER_DISTILLATION, plots.PAPER_LABEL
    if laws(layout)[1] is not None:  # reads both fits: a broken one is named, not drawn around
        fitted, scope = load_distillation_scoped(str(layout.fit("distillation")))
        found = [recipes.recipe_or_none(fitted, size, float(c), s)
                 for c in budgets for s in recipes.SCENARIOS]
        problems = [q for r in found if r is not None for q in scope.problems(r)]
        if problems:
            name = f"paper's law (the fitted one is not identified here: {problems[0]})"
        else:
            law, name = fitted, "fitted distillation law"
    table = {s: [r.to_dict() for c in budgets if (r := recipes.recipe_or_none(law, size, float(c), s))]
             for s in recipes.SCENARIOS}
    table = {s: rs for s, rs in table.items() if rs}
    if not table:
        raise Skip(f"the {name} gives no recipe within the bounds for a {size:.3g}-param student "
                   f"at {budgets[0]:.3g}-{budgets[-1]:.3g} FLOPs")
    plots.allocations(table, path, f"Compute-optimal distillation of a {size:.3g}-param student "
                                   f"(as in {layout.rel(layout.plans)}), {name}")


DRAW: dict[str, Callable[[RunLayout, Path], None]] = dict(zip(RunLayout.FIGURES, (
    draw_loss_vs_tokens, draw_capacity_gap, draw_predicted_vs_observed, draw_allocations), strict=True))
"""Each figure's stem -> its drawing, in `RunLayout.FIGURES`' order."""


def write_plots(out: Path) -> list[Path]:
    """Draw the four figures into OUT/plots; return the paths written.

    Never raises for a run's missing or broken files: each figure not drawn is named with
    the reason in `plots/skipped.json` and on stderr.
    """
    layout = RunLayout(root=Path(out))
    layout.plots.mkdir(parents=True, exist_ok=True)
    written, skipped = [], {}
    for stem, draw in DRAW.items():
        path = layout.figure(stem)
        name = path.name
        path.unlink(missing_ok=True)
        try:
            draw(layout, path)
        except (Skip, FitError) as exc:  # their messages name the file and field
            skipped[name] = str(exc)
        except Exception as exc:  # a broken input must not sink the run: say which and why
            skipped[name] = f"{type(exc).__name__}: {exc}"
        else:
            written.append(path)
            continue
        path.unlink(missing_ok=True)
        print(f"note: {name} not drawn: {skipped[name]}", file=sys.stderr)
    layout.skipped.unlink(missing_ok=True)
    if skipped:
        layout.skipped.write_text(json.dumps(skipped, indent=2))
    return written
