"""From a runs table to a fit report (`FitReport`, whose JSON `kdcache fit` prints): fit, intervals,
extrapolation, and the runs with their predictions.

Supervised fits use the `supervised` rows; distillation fits use `distill` and
`online` rows and take the supervised law from a preset, a fit JSON, or a fit of the
same table's supervised rows.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from kdcache.fit import fitting, uncertainty
from kdcache.fit.errors import FitError
from kdcache.fit.laws import DistillationLaw, SupervisedLaw
from kdcache.fit.presets import SUPERVISED_PRESETS, load_supervised, read_fit_json
from kdcache.fit.selection import DEFAULT_WHERE, select

DEFAULT_THRESHOLDS = {"supervised": 2.2, "distillation": 2.3}  # the paper's (App. F)


def rows(table: pa.Table, kinds: tuple[str, ...]) -> pa.Table:
    """Rows of the given kinds; a table without a `kind` column counts as all of them."""
    if "kind" not in table.column_names:
        return table
    kind = np.asarray(table.column("kind").to_pylist(), dtype=object)
    return table.filter(pa.array(np.isin(kind, kinds)))


def _arrays(table: pa.Table, names: tuple[str, ...], path: str) -> list[np.ndarray]:
    """Columns as float64; the table's reader has already checked that they hold numbers."""
    arrays = []
    for name in names:
        if name not in table.column_names:
            raise FitError(f"{path}: missing column '{name}'")
        values = np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise FitError(f"{path}: column '{name}' has {bad} missing or non-finite values")
        arrays.append(values)
    return arrays


def _threshold(loss: np.ndarray, law: str, threshold: float | None) -> float:
    """The paper's threshold if it holds out 5-50% of runs, else the lowest 20% (small-scale runs)."""
    if threshold is not None:
        return threshold
    paper = DEFAULT_THRESHOLDS[law]
    share = float(np.mean(loss < paper))
    return paper if 0.05 <= share <= 0.5 else uncertainty.holdout_threshold(loss, None)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FitReport:
    """A fitted law with how far to trust it, and the runs it was fitted to."""

    law: str
    params: dict[str, float]
    objective: float
    delta: float
    runs: int
    fixed: dict[str, float]
    extrapolation: uncertainty.Extrapolation
    bootstrap: dict[str, Any] | None
    """{samples, level, intervals: {name: [lo, hi]}}, or None without resamples."""
    supervised: dict[str, float] | None
    """Distillation: the supervised law used for Lsup_S."""
    data: dict[str, list[float]]
    """The fitted runs: params, tokens, loss (and teacher_loss), the full fit's `predicted` loss."""
    at_bounds: tuple[str, ...] = ()
    """Coefficients left on their search bound: not determined by these runs."""
    supervised_at_bounds: tuple[str, ...] = ()
    """Distillation: the supervised law's coefficients on their bound (from its fit)."""
    selection: dict[str, Any] | None = None
    """Which rows of the table were selected (`fit.selection.Selection.to_json`)."""

    def law_object(self) -> SupervisedLaw | DistillationLaw:
        if self.supervised is None:
            return SupervisedLaw.from_dict(self.params)
        return DistillationLaw.from_dict(self.params, SupervisedLaw.from_dict(self.supervised))

    def to_json(self) -> dict[str, Any]:
        """What `kdcache fit --json` prints; `data` adds per run `held_out` and `extrapolated`
        (the held-out fit's prediction, null for fitted runs)."""
        ex = self.extrapolation
        data = {**self.data, "held_out": [x < ex.threshold for x in self.data["loss"]],
                "extrapolated": list(ex.predicted)}
        out: dict[str, Any] = {
            "law": self.law, "params": self.params, "objective": self.objective, "delta": self.delta,
            "runs": self.runs, "fixed": self.fixed, "extrapolation": ex.to_json(),
            "bootstrap": self.bootstrap, "at_bounds": list(self.at_bounds),
        }
        if self.supervised is not None:
            out["supervised"] = self.supervised
            out["supervised_at_bounds"] = list(self.supervised_at_bounds)
        if self.selection is not None:
            out["selection"] = self.selection
        out["data"] = data
        return out


def fit_supervised_table(
    table: pa.Table,
    path: str | os.PathLike[str],
    *,
    delta: float,
    fixed: Mapping[str, float],
    bootstrap: int = 0,
    threshold: float | None = None,
) -> FitReport:
    """Fit Eq. 1 to the supervised rows of a runs table."""
    n, d, loss = _arrays(rows(table, ("supervised",)), ("params", "tokens", "loss"), str(path))
    result = fitting.fit_supervised(n, d, loss, delta=delta, fixed=fixed)

    def refit(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        sub = fitting.fit_supervised(n[train], d[train], loss[train], delta=delta, fixed=fixed)
        return np.asarray(SupervisedLaw.from_dict(sub.params).loss(n[test], d[test]))

    boot = None
    if bootstrap:
        par, problem = fitting.supervised_problem(n, d, loss, fixed)
        boot = _bootstrap(par, problem, result, bootstrap)
    predicted = np.asarray(SupervisedLaw.from_dict(result.params).loss(n, d))
    data = {"params": n.tolist(), "tokens": d.tolist(), "loss": loss.tolist(),
            "predicted": predicted.tolist()}
    return _report(result, loss, _threshold(loss, "supervised", threshold), refit, boot, None, data)


def fit_distillation_table(
    table: pa.Table,
    path: str | os.PathLike[str],
    *,
    delta: float,
    fixed: Mapping[str, float],
    supervised: str | None,
    bootstrap: int = 0,
    threshold: float | None = None,
) -> FitReport:
    """Fit Eq. 8 to the distill/online rows; the supervised law from `supervised` or the table."""
    sup, sup_bounds = _supervised_law(table, path, supervised, delta)
    names = ("params", "tokens", "teacher_loss", "loss")
    n, d, lt, loss = _arrays(rows(table, ("distill", "online")), names, str(path))
    result = fitting.fit_distillation(n, d, lt, loss, sup, delta=delta, fixed=fixed)

    def refit(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        sub = fitting.fit_distillation(
            n[train], d[train], lt[train], loss[train], sup, delta=delta, fixed=fixed
        )
        law = DistillationLaw.from_dict(sub.params, sup)
        return np.asarray(law.loss(n[test], d[test], lt[test]))

    boot = None
    if bootstrap:
        par, problem = fitting.distillation_problem(n, d, lt, loss, sup, fixed)
        boot = _bootstrap(par, problem, result, bootstrap)
    predicted = np.asarray(DistillationLaw.from_dict(result.params, sup).loss(n, d, lt))
    data = {"params": n.tolist(), "tokens": d.tolist(), "teacher_loss": lt.tolist(), "loss": loss.tolist(),
            "predicted": predicted.tolist()}
    limit = _threshold(loss, "distillation", threshold)
    report = _report(result, loss, limit, refit, boot, sup.to_dict(), data)
    return dataclasses.replace(report, supervised_at_bounds=sup_bounds)


def _supervised_law(
    table: pa.Table, path: str | os.PathLike[str], spec: str | None, delta: float
) -> tuple[SupervisedLaw, tuple[str, ...]]:
    """The law and its coefficients on their bounds (none for a published preset)."""
    if spec is not None:
        law = load_supervised(spec)
        if spec in SUPERVISED_PRESETS:
            return law, ()
        data = read_fit_json(spec)
        key = "supervised_at_bounds" if data.get("law") == "distillation" else "at_bounds"
        return law, tuple(data.get(key) or ())
    sup_rows = rows(table, ("supervised",))
    if sup_rows.num_rows < 6:
        raise FitError(
            f"{path}: a distillation fit needs a supervised law: the table has {sup_rows.num_rows} "
            "supervised rows (need 6); pass --supervised FIT.json or --supervised paper"
        )
    n, d, loss = _arrays(sup_rows, ("params", "tokens", "loss"), str(path))
    result = fitting.fit_supervised(n, d, loss, delta=delta)
    return SupervisedLaw.from_dict(result.params), result.at_bounds


def _report(result: fitting.FitResult, loss: np.ndarray, threshold: float, refit: Any,
            boot: dict[str, Any] | None, supervised: dict[str, float] | None,
            data: dict[str, list[float]]) -> FitReport:
    return FitReport(law=result.law, params=result.params, objective=result.objective, delta=result.delta,
                     runs=result.runs, fixed=dict(result.fixed),
                     extrapolation=uncertainty.extrapolation(loss, threshold, refit), bootstrap=boot,
                     supervised=supervised, data=data, at_bounds=result.at_bounds)


def _bootstrap(par: Any, data: Any, result: fitting.FitResult, samples: int) -> dict[str, Any]:
    ci = uncertainty.bootstrap(par, data, result.theta, result.delta, samples)
    return {"samples": samples, "level": uncertainty.CI_LEVEL, "intervals": ci}


def fit_runs(
    table: pa.Table,
    law: str,
    *,
    delta: float = 1e-4,
    fixed: Mapping[str, float] | None = None,
    supervised: str | None = None,
    bootstrap: int = 0,
    threshold: float | None = None,
    source: str | os.PathLike[str] = "runs table",
    where: str = DEFAULT_WHERE,
) -> FitReport:
    """Fit `law` (supervised | distillation) to the rows of a runs table (`storage.runs.read_runs`)
    that `where` selects (`fit.selection`: by default the law grid), read from `source`, which
    errors name."""
    chosen = select(table, where, source=str(source))
    if law == "supervised":
        report = fit_supervised_table(chosen.table, source, delta=delta, fixed=fixed or {},
                                      bootstrap=bootstrap, threshold=threshold)
    elif law == "distillation":
        report = fit_distillation_table(chosen.table, source, delta=delta, fixed=fixed or {},
                                        supervised=supervised, bootstrap=bootstrap, threshold=threshold)
    else:
        raise FitError(f"law must be supervised or distillation, got {law!r}")
    return dataclasses.replace(report, selection=chosen.to_json())
