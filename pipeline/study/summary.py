"""What one `kdcache run` learned, in a few lines: the findings, the laws' extrapolation, the
headline recipe and its cost.

`kdcache run` prints these lines when it ends and the report opens with them, so the
command line and the page lead with the same answer. They are read from the run
directory's files (`layout.py`), so a partial run summarises what it has.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcache.pipeline.study.layout import RunLayout


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finding_lines(found: list[dict[str, Any]] | None) -> list[str]:
    if not found:
        return ["findings: not checked yet"]
    lines = []
    for f in found:
        effects = "; ".join(f"{e['what']} {e['mean']:+.3f} (seed spread {e['spread']:.3f}, "
                            f"{e['seeds']} seeds)" for e in f.get("effects", []))
        lines.append(f"  {f.get('verdict', '?'):<13} {f.get('claim')}" + (f": {effects}" if effects else ""))
    return ["findings (an effect counts only where it exceeds its spread across seeds):", *lines]


def law_lines(layout: RunLayout) -> list[str]:
    notes = _read(layout.notes) or {}
    lines = []
    for law in ("supervised", "distillation"):
        fit = _read(layout.fit(law))
        if not isinstance(fit, dict):
            lines.append(f"  {law}: not fitted ({notes.get(law, 'no fit')})")
            continue
        ex = fit.get("extrapolation") or {}
        bounds = [*fit.get("at_bounds", []),
                  *(f"{n} (supervised)" for n in fit.get("supervised_at_bounds", []))]
        error = (f"held-out runs predicted within {100 * ex['mean_relative_error']:.1f}% on average, "
                 f"{100 * ex['max_relative_error']:.1f}% at worst ({ex['held_out_runs']} runs)"
                 if ex.get("mean_relative_error") is not None else "no held-out runs")
        lines.append(f"  {law}: {fit.get('runs')} runs; {error}; "
                     + (f"coefficients on their bounds: {', '.join(bounds)} (not identified)" if bounds
                        else "every coefficient inside its bounds"))
    return ["laws (fitted on this run's small models):", *lines]


def recipe_lines(plans: list[dict[str, Any]] | None) -> list[str]:
    chosen = [p for p in plans or [] if p.get("headline")] or (plans or [])[:1]
    if not chosen:
        return ["recipe: none planned yet"]
    p = chosen[0]
    teacher = (f"a {p['teacher_params']:.3g}-param teacher on {p['teacher_tokens']:.3g} tokens"
               if p.get("teacher_params") else "no teacher reaches the loss this recipe wants")
    lines = [f"recipe ({p['scenario']}, {p['compute']:.3g} FLOPs, {p['student_params']:.3g}-param student, "
             f"law: {p.get('law', '?')}):",
             f"  {teacher}; student on {p['student_tokens']:.3g} tokens: loss {p['student_loss']:.3f} "
             f"distilled vs {p['supervised_loss']:.3f} supervised -> "
             f"{'distil' if p.get('distill') else 'train supervised'}"]
    if p.get("at_bounds"):
        lines.append(f"  at a search bound: {', '.join(map(str, p['at_bounds']))}")
    cost = p.get("cost")
    if isinstance(cost, dict) and cost.get("students"):
        lines.append(
            f"  cost for {cost['students']} students: cache {cost['cache_gpu_hours']:.3g} GPU-hours against "
            f"online {cost['online_gpu_hours']:.3g}; caching pays off from {cost['break_even_students']} "
            "students")
    return lines


def cost_lines(costs: list[dict[str, Any]] | None) -> list[str]:
    if not costs:
        return []
    parts = [f"{c.get('label')}: from {c.get('break_even_students')} students" for c in costs]
    return [f"caching paid off on this run's own teachers (measured times): {'; '.join(parts)}"]


def summary_lines(out: Path) -> list[str]:
    """The summary of run directory `out`, one string per line."""
    layout = RunLayout(root=Path(out))
    return [*finding_lines(_read(layout.findings)), *law_lines(layout), *recipe_lines(_read(layout.plans)),
            *cost_lines(_read(layout.costs))]
