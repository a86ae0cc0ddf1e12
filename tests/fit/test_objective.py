"""Analytic Jacobians against central differences, and the coordinate maps round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.fit import fitting
from kdcache.fit.objective import batch_objective, huber, objective
from kdcache.fit.presets import PAPER_DISTILLATION
from kdcache.fit.synthetic import distillation_runs, supervised_runs


def _problems() -> list[tuple[object, object, np.ndarray]]:
    s = supervised_runs(PAPER_DISTILLATION.supervised, 40, seed=2)
    sp, sd = fitting.supervised_problem(s["params"], s["tokens"], s["loss"])
    r = distillation_runs(PAPER_DISTILLATION, 40, seed=2)
    dp, dd = fitting.distillation_problem(
        r["params"], r["tokens"], r["teacher_loss"], r["loss"], PAPER_DISTILLATION.supervised
    )
    return [
        (sp, sd, sp.to_theta(PAPER_DISTILLATION.supervised.to_dict()) + 0.01),
        (dp, dd, dp.to_theta(PAPER_DISTILLATION.to_dict()) + 0.01),
    ]


@pytest.mark.parametrize("case", [0, 1], ids=["supervised", "distillation"])
def test_gradient_matches_finite_differences(case: int) -> None:
    par, d, theta = _problems()[case]
    delta = 0.05  # wide enough that most residuals are in the smooth quadratic part
    grad = objective(theta, par, d, delta)[1]
    h = 1e-6
    numeric = [
        (objective(theta + e, par, d, delta)[0] - objective(theta - e, par, d, delta)[0]) / (2 * h)
        for e in np.eye(len(theta)) * h
    ]
    assert np.allclose(grad, numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", [0, 1], ids=["supervised", "distillation"])
def test_theta_round_trip_and_batch(case: int) -> None:
    par, d, theta = _problems()[case]
    back = par.to_theta(par.to_params(theta))
    assert np.allclose(back, theta, rtol=1e-12, atol=1e-12)
    batch = batch_objective(np.stack([theta, theta + 0.1], axis=1), par, d, 1e-4)
    assert batch[0] == pytest.approx(objective(theta, par, d, 1e-4)[0], rel=1e-12)


def test_huber_pieces() -> None:
    r = np.array([0.0, 0.5e-4, -2e-4])
    assert np.allclose(huber(r, 1e-4), [0.0, 0.5 * 0.25e-8, 1e-4 * (2e-4 - 0.5e-4)])
