"""How far to trust a fit: bootstrap intervals over runs, and an extrapolation check.

Bootstrap refits start from the full fit's optimum (plus its jittered refinement), which
is what makes thousands of resamples affordable. The extrapolation check fits on the
high-loss runs only and reports the relative error on the held-out low-loss ones, the
paper's test (App. F).
"""

from __future__ import annotations

from collections.abc import Callable

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


def extrapolation(
    loss: np.ndarray,
    threshold: float,
    fit_and_predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> dict[str, float | int | None]:
    """Fit on runs with loss >= threshold, report relative error on the rest.

    `fit_and_predict(train_mask, test_mask)` fits on one subset, predicts the other.
    """
    train = loss >= threshold
    test = ~train
    report: dict[str, float | int | None] = {
        "threshold": threshold,
        "fitted_runs": int(train.sum()),
        "held_out_runs": int(test.sum()),
        "mean_relative_error": None,
        "max_relative_error": None,
    }
    if test.sum() == 0 or train.sum() < 9:
        return report
    pred = fit_and_predict(train, test)
    rel = np.abs(pred - loss[test]) / loss[test]
    report["mean_relative_error"] = float(rel.mean())
    report["max_relative_error"] = float(rel.max())
    return report
