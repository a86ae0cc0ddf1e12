"""Start grids for the multi-start fit (App. F of the paper, after Hoffmann et al.).

The paper runs L-BFGS-B from every point of these grids (~200k for distillation). We
only *evaluate* the objective on them, which is a few vectorised passes, and start
L-BFGS-B from the best few; `fitting.py` then refines around the winner.
"""

from __future__ import annotations

import itertools

import numpy as np

from kdcache.fit.objective import Parametrisation

SUPERVISED_GRID = {
    "E": np.exp(np.arange(-1.0, 1.51, 0.5)),
    "A": np.exp(np.arange(0.0, 20.1, 5.0)),
    "B": np.exp(np.arange(0.0, 20.1, 5.0)),
    "alpha": np.array([0.0, 0.5, 1.0, 1.5]),
    "beta": np.array([0.0, 0.5, 1.0, 1.5]),
    "gamma": np.array([0.0, 0.5, 1.0, 1.5]),
}

DISTILLATION_GRID = {
    "A": np.exp(np.arange(0.0, 20.1, 5.0)),
    "B": np.exp(np.arange(0.0, 20.1, 5.0)),
    "alpha": np.array([0.0, 0.5, 1.0]),
    "beta": np.array([0.0, 0.5, 1.0]),
    "gamma": np.array([0.0, 0.5, 1.0]),
    "c0": np.array([0.0, 0.5, 1.0, 1.5]),
    "c1": np.array([0.0, 0.5, 1.0, 1.5]),
    # f1 = 0 is a division by zero in Eq. 8: the smallest start is a small positive value.
    "f1": np.array([0.05, 0.5, 1.0, 1.5]),
    "d1": np.exp(np.arange(-1.0, 1.01, 0.5)),
}


def grid_thetas(par: Parametrisation) -> np.ndarray:
    """All grid starts in internal coordinates, shape (p, k); fixed parameters held."""
    grid = SUPERVISED_GRID if par.law == "supervised" else DISTILLATION_GRID
    axes = [np.array([par.fixed[n]]) if n in par.fixed else grid[n] for n in par.names]
    points = np.array(list(itertools.product(*axes))).T
    return par.to_theta(dict(zip(par.names, points, strict=True)))
