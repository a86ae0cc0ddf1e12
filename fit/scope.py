"""Whether a distillation law may answer a planning question: identified, and not far from its runs.

A fitted law gives a recipe wherever it is evaluated, but two things make that number
unfounded. (a) A coefficient left on its search bound: the runs do not pin it, so other
values fit them as well and predict differently away from them (the fit JSON's
`at_bounds`, and `supervised_at_bounds` for the supervised law that gives Lsup_S and the
teacher's loss). (b) A recipe far outside the fitted runs (the fit JSON's `data`):

- N_S or D_S, and N_T or D_T where the plan chooses the teacher, more than 10x beyond the
  largest fitted `params` / `tokens`, or below 1/10 of the smallest: a decade is about as
  far as a law fitted on two decades extrapolates to within its held-out error;
- L_T more than 10% below the lowest fitted `teacher_loss`. The capacity gap makes L_S
  most sensitive to L_T, and 10% is less than a decade of teacher: 10x the parameters and
  the tokens lower the paper's supervised loss by 16-21% between 1e8 and 1e11 params.

The teacher's size is compared with the runs' `params` (the students' sizes), the only
sizes a fit records. A fit whose runs are not recorded cannot be checked, and says so.
The `paper` preset is trusted as published (no ranges): its own bounds are `recipes`'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from kdcache.fit.errors import FitError
from kdcache.fit.laws import DistillationLaw
from kdcache.fit.presets import load_distillation, read_fit_json
from kdcache.fit.recipes import FixedTeacherPlan, Recipe, sci

FAR = 10.0
"""How many times beyond the fitted params/tokens (either way) a recipe may reach."""
LOSS_MARGIN = 0.10
"""How far (as a fraction) below the lowest fitted teacher loss L_T may go."""
RANGED = ("params", "tokens", "teacher_loss")


@dataclasses.dataclass(frozen=True)
class LawScope:
    """Where a distillation law came from and what it was fitted on."""

    source: str
    """The law's spec: a preset name or the fit JSON's path."""
    at_bounds: tuple[str, ...] = ()
    """Coefficients on their search bound ("f1"; "supervised E" for the supervised law's)."""
    ranges: dict[str, tuple[float, float]] | None = None
    """(smallest, largest) fitted value per `data` column ({} when the fit recorded no runs);
    None: a preset, trusted as published."""

    def problems(self, recipe: Recipe | FixedTeacherPlan) -> list[str]:
        """One short reason per way the law is not identified for `recipe`; [] when it is."""
        found = [f"{name} is on its search bound (the runs do not pin it)" for name in self.at_bounds]
        if self.ranges is None:
            return found
        if not self.ranges:
            return [*found, "the fit JSON records no fitted runs ('data'), so how far the recipe "
                            "extrapolates is unknown"]
        for symbol, column, value in _used(recipe):
            reason = self._outside(symbol, column, value)
            if reason and reason not in found:
                found.append(reason)
        return found

    def _outside(self, symbol: str, column: str, value: float) -> str | None:
        assert self.ranges is not None
        if column not in self.ranges:
            return f"the fit JSON records no 'data.{column}', so how far the recipe extrapolates is unknown"
        lo, hi = self.ranges[column]
        if column == "teacher_loss":
            if value < (1.0 - LOSS_MARGIN) * lo:
                return (f"L_T = {value:.4g} is more than {LOSS_MARGIN:.0%} below the lowest fitted teacher "
                        f"loss ({lo:.4g})")
            return None
        if value > FAR * hi:
            return f"{symbol} = {sci(value)} is over {FAR:g}x the largest fitted {column} ({sci(hi)})"
        if value < lo / FAR:
            return f"{symbol} = {sci(value)} is under 1/{FAR:g} of the smallest fitted {column} ({sci(lo)})"
        return None


def _used(recipe: Recipe | FixedTeacherPlan) -> Iterator[tuple[str, str, float]]:
    """(symbol, data column, value) for each quantity the recipe evaluates the law at."""
    if isinstance(recipe, FixedTeacherPlan):  # the teacher is given: only its loss enters the law
        for row in recipe.accountings.values():
            yield "N_S", "params", row.student_params
            yield "D_S", "tokens", row.student_tokens
        yield "L_T", "teacher_loss", recipe.teacher_loss
        return
    yield "N_S", "params", recipe.student_params
    yield "D_S", "tokens", recipe.student_tokens
    if recipe.teacher_params is not None:
        yield "N_T", "params", recipe.teacher_params
    if recipe.teacher_tokens is not None:
        yield "D_T", "tokens", recipe.teacher_tokens
    yield "L_T", "teacher_loss", recipe.teacher_loss


def load_distillation_scoped(spec: str) -> tuple[DistillationLaw, LawScope]:
    """`presets.load_distillation(spec)` with the scope its fit JSON records."""
    law = load_distillation(spec)
    if spec == "paper":
        return law, LawScope(source=spec)
    doc = read_fit_json(spec)
    names = _names(doc, "at_bounds", spec) + tuple(
        f"supervised {name}" for name in _names(doc, "supervised_at_bounds", spec))
    return law, LawScope(source=spec, at_bounds=names, ranges=_ranges(doc.get("data"), spec))


def _names(doc: Mapping[str, Any], key: str, spec: str) -> tuple[str, ...]:
    names = doc.get(key) or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FitError(f"{spec}: field '{key}' must be a list of coefficient names")
    return tuple(names)


def _ranges(data: Any, spec: str) -> dict[str, tuple[float, float]]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FitError(f"{spec}: field 'data' must be an object of per-run columns")
    out = {}
    for column in RANGED:
        if column not in data:
            continue
        values = data[column]
        ok = isinstance(values, list) and values and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        array = np.asarray(values if ok else [], dtype=np.float64)
        if not ok or not (np.isfinite(array).all() and (array > 0).all()):
            raise FitError(f"{spec}: field 'data.{column}' must be a non-empty list of positive numbers")
        out[column] = (float(array.min()), float(array.max()))
    return out
