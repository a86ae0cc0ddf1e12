"""How far to trust a fit: bootstrap intervals over runs, and an extrapolation check.

Bootstrap refits start from the full fit's optimum (plus its jittered refinement), which
is what makes thousands of resamples affordable. The extrapolation check fits on the
high-loss runs only and reports the relative error on the held-out low-loss ones, the
paper's test (App. F).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.fit import fitting
from kdcache.fit.objective import Data, Parametrisation
from kdcache.fit.threads import single_threaded_blas

CI_LEVEL = 0.90  # the paper's intervals


def bootstrap(
    par: Parametrisation, d: Data, theta: np.ndarray, delta: float, samples: int, *, seed: int = 0
) -> dict[str, list[float]]:
    """90% percentile intervals per parameter from `samples` resamples of the runs."""
    rng = np.random.default_rng(seed)
    draws = []
    with single_threaded_blas():
        for _ in range(samples):
            idx = rng.integers(0, len(d.x), len(d.x))
            draws.append(par.to_params(fitting.lbfgsb(theta, par, d.subset(idx), delta)))
    tail = 100 * (1 - CI_LEVEL) / 2
    return {
        name: [float(np.percentile([p[name] for p in draws], q)) for q in (tail, 100 - tail)]
        for name in par.names
    }


def holdout_threshold(loss: np.ndarray, threshold: float | None) -> float:
    """The loss at or above which runs are fitted; default: hold out the lowest 20%."""
    return float(np.quantile(loss, 0.2)) if threshold is None else threshold


@dataclass(frozen=True, kw_only=True)
class Extrapolation:
    """The paper's extrapolation check (App. F): fit on runs with loss >= threshold, predict the rest."""

    threshold: float
    fitted_runs: int
    held_out_runs: int
    mean_relative_error: float | None
    max_relative_error: float | None
    predicted: tuple[float | None, ...]
    """Per run: the held-out fit's prediction for held-out runs, None for the fitted ones
    (all None when the check did not run)."""

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in
                ("threshold", "fitted_runs", "held_out_runs", "mean_relative_error", "max_relative_error")}


def extrapolation(
    loss: np.ndarray,
    threshold: float,
    fit_and_predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> Extrapolation:
    """Fit on runs with loss >= threshold, report relative error on the rest.

    `fit_and_predict(train_mask, test_mask)` fits on one subset, predicts the other. The check
    needs 9 fitted runs (the distillation law's coefficients) and one held out.
    """
    train = loss >= threshold
    test = ~train
    predicted: list[float | None] = [None] * len(loss)
    mean = worst = None
    if test.sum() and train.sum() >= 9:
        pred = np.asarray(fit_and_predict(train, test), dtype=np.float64)
        rel = np.abs(pred - loss[test]) / loss[test]
        mean, worst = float(rel.mean()), float(rel.max())
        for i, value in zip(np.flatnonzero(test), pred, strict=True):
            predicted[i] = float(value)
    return Extrapolation(threshold=float(threshold), fitted_runs=int(train.sum()),
                         held_out_runs=int(test.sum()), mean_relative_error=mean,
                         max_relative_error=worst, predicted=tuple(predicted))
