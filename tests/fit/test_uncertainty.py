"""Bootstrap intervals cover the truth; the extrapolation report splits runs as documented."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.fit import fitting, uncertainty
from kdcache.fit.presets import PAPER_DISTILLATION
from kdcache.fit.synthetic import supervised_runs


def test_bootstrap_intervals_bracket_the_fit() -> None:
    runs = supervised_runs(PAPER_DISTILLATION.supervised, 60, seed=5)
    n, d, loss = runs["params"], runs["tokens"], runs["loss"]
    result = fitting.fit_supervised(n, d, loss, fixed={"gamma": 0.452})
    par, data = fitting.supervised_problem(n, d, loss, {"gamma": 0.452})
    ci = uncertainty.bootstrap(par, data, result.theta, 1e-4, 40, seed=0)
    assert set(ci) == {"E", "A", "B", "alpha", "beta", "gamma"}
    for name in ("E", "alpha", "beta"):
        lo, hi = ci[name]
        assert lo <= result.params[name] <= hi
    assert ci["gamma"] == [0.452, 0.452]


def test_extrapolation_report() -> None:
    loss = np.array([2.0, 2.1, *np.linspace(2.3, 3.0, 10)])
    calls = []

    def fit_and_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        calls.append((train.sum(), test.sum()))
        return loss[test] * 1.01

    report = uncertainty.extrapolation(loss, 2.2, fit_and_predict)
    assert calls == [(10, 2)]
    assert report.held_out_runs == 2 and report.to_json()["held_out_runs"] == 2
    assert abs(report.mean_relative_error - 0.01) < 1e-12  # type: ignore[operator]
    assert report.predicted[:2] == pytest.approx(tuple(loss[:2] * 1.01))
    assert set(report.predicted[2:]) == {None}
    empty = uncertainty.extrapolation(loss, 1.0, fit_and_predict)
    assert empty.mean_relative_error is None and set(empty.predicted) == {None}
