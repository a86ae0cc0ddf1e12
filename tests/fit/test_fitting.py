"""Fits recover known laws from synthetic runs and Epoch's estimates from Chinchilla's data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest

from kdcache.fit import fitting
from kdcache.fit.errors import FitError
from kdcache.fit.flops import forward_flops, training_flops
from kdcache.fit.laws import DistillationLaw, SupervisedLaw
from kdcache.fit.presets import PAPER_DISTILLATION
from kdcache.fit.synthetic import distillation_runs, supervised_runs

CHINCHILLA = Path(__file__).parent / "data" / "chinchilla_svg_extracted.csv"
# Besiroglu et al. 2024 (arXiv 2404.10102): estimate and standard error.
EPOCH = {
    "E": (1.8172, 0.03),
    "A": (482.01, 124.58),
    "B": (2085.43, 1293.23),
    "alpha": (0.3478, 0.02),
    "beta": (0.3658, 0.02),
}


def chinchilla_runs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epoch's preprocessing: tokens = FLOP / 6N, the 5 highest losses dropped."""
    table = pacsv.read_csv(CHINCHILLA)
    n = np.asarray(table.column("Model Size"), dtype=np.float64)
    c = np.asarray(table.column("Training FLOP"), dtype=np.float64)
    loss = np.asarray(table.column("loss"), dtype=np.float64)
    keep = np.argsort(loss)[:-5]
    return n[keep], c[keep] / (6 * n[keep]), loss[keep]


def test_chinchilla_recovers_epoch_within_standard_errors() -> None:
    n, d, loss = chinchilla_runs()
    assert len(loss) == 240
    result = fitting.fit_supervised(n, d, loss, delta=1e-3, fixed={"gamma": 1.0})
    for name, (estimate, se) in EPOCH.items():
        assert abs(result.params[name] - estimate) <= se, (name, result.params[name])
    assert result.params["gamma"] == 1.0


@pytest.mark.slow
def test_supervised_recovers_parameters_and_extrapolates_10x() -> None:
    true = PAPER_DISTILLATION.supervised
    runs = supervised_runs(true, 120, compute=(1e18, 1e21), noise=0.003, seed=0)
    result = fitting.fit_supervised(runs["params"], runs["tokens"], runs["loss"])
    fitted = SupervisedLaw.from_dict(result.params)
    assert pytest.approx(true.E, rel=0.05) == fitted.E
    assert fitted.gamma == pytest.approx(true.gamma, rel=0.1)
    # 10x the largest fitted budget, at several sizes around the optimum.
    n = np.logspace(9.0, 10.5, 7)
    d = 1e22 / (6 * n)
    assert np.max(np.abs(fitted.loss(n, d) / true.loss(n, d) - 1)) < 0.01


def _extrapolation_points(runs: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Students at 10x the largest fitted training budget, teachers both sides of the gap."""
    c10 = 10 * float(np.max(training_flops(runs["params"], runs["tokens"])))
    n = np.repeat([3e9, 1e10, 2e10], 4)
    d = c10 / (3 * forward_flops(n))
    lt = np.tile([1.8, 2.0, 2.2, 2.6], 3)
    return n, d, lt


@pytest.mark.slow
def test_distillation_predictions_within_1_percent_at_10x_compute() -> None:
    runs = distillation_runs(PAPER_DISTILLATION, 300, noise=0.003, seed=3)
    sup = PAPER_DISTILLATION.supervised
    result = fitting.fit_distillation(runs["params"], runs["tokens"], runs["teacher_loss"], runs["loss"], sup)
    fitted = fitting.as_law(result, sup)
    assert isinstance(fitted, DistillationLaw)
    n, d, lt = _extrapolation_points(runs)
    ratio = fitted.loss(n, d, lt) / PAPER_DISTILLATION.loss(n, d, lt)
    assert np.max(np.abs(ratio - 1)) < 0.01
    # The fit is at least as good as the generating law on its own data.
    par, data = fitting.distillation_problem(
        runs["params"], runs["tokens"], runs["teacher_loss"], runs["loss"], sup
    )
    truth = fitting.objective_value(par.to_theta(PAPER_DISTILLATION.to_dict()), par, data, 1e-4) * 1e-4
    assert result.objective <= truth


def test_fixed_parameters_stay_fixed_and_bad_fixes_are_refused() -> None:
    runs = supervised_runs(PAPER_DISTILLATION.supervised, 40, seed=1)
    result = fitting.fit_supervised(
        runs["params"], runs["tokens"], runs["loss"], fixed={"gamma": 0.452, "alpha": 0.408}
    )
    assert result.params["gamma"] == pytest.approx(0.452)
    assert result.params["alpha"] == pytest.approx(0.408)
    with pytest.raises(FitError, match="needs gamma fixed"):
        fitting.fit_supervised(runs["params"], runs["tokens"], runs["loss"], fixed={"alpha": 0.4})
    with pytest.raises(FitError, match="cannot fix"):
        fitting.fit_supervised(runs["params"], runs["tokens"], runs["loss"], fixed={"zeta": 1.0})


def test_too_few_or_bad_runs_are_refused() -> None:
    with pytest.raises(FitError, match="at least"):
        fitting.fit_supervised([1e8] * 3, [1e9] * 3, [3.0] * 3)
    with pytest.raises(FitError, match="positive"):
        fitting.fit_supervised([1e8, -1] * 4, [1e9] * 8, [3.0] * 8)
