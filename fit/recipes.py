"""Compute-optimal recipes: supervised (N*, D*) for a budget, and distillation (Eq. 10) per scenario.

Budgets are Eq. 9 FLOPs with the App. H.1 F(N). The distillation problem is solved as
the paper did, with SLSQP under the budget as an equality constraint and bounds
[1e6, 1e17] on N_T, D_S, D_T, but in log coordinates (so one step size suits values
twelve decades apart) and from a few starts. `best` needs no constrained solver: the
budget fixes D_S and L_T is a free scalar.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy.optimize import brentq, minimize, minimize_scalar

from kdcache.fit.errors import FitError
from kdcache.fit.flops import forward_flops
from kdcache.fit.laws import DistillationLaw, SupervisedLaw

# scenario -> (delta_lgt, delta_pre), Table 2
SCENARIOS = {
    "best": (0.0, 0.0),
    "inference": (1.0, 0.0),
    "pretraining": (0.0, 1.0),
    "pretraining+inference": (1.0, 1.0),
}
LOG_LO, LOG_HI = np.log(1e6), np.log(1e17)  # the paper's bounds on N_T, D_S, D_T


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One compute-optimal distillation plan; flops split as in Eq. 9."""

    scenario: str
    compute: float
    student_params: float
    student_tokens: float
    teacher_params: float | None
    teacher_tokens: float | None
    teacher_loss: float
    student_loss: float
    supervised_loss: float  # the same student trained supervised on the whole budget
    flops: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def supervised_optimal(law: SupervisedLaw, compute: float, **shape: float) -> tuple[float, float, float]:
    """(N*, D*, L*) minimising L(N, D) subject to 3 F(N) D = compute."""

    def loss(log_n: float) -> float:
        n = np.exp(log_n)
        return float(law.log_loss(n, compute / (3.0 * forward_flops(n, **shape))))

    # D = C / 3F(N) must stay >= 1 token: cap N where the budget buys one token per param.
    hi = min(LOG_HI, brentq(lambda x: np.log(3 * forward_flops(np.exp(x), **shape)) - np.log(compute), 0, 80))
    res = minimize_scalar(loss, bounds=(np.log(1e3), hi), method="bounded", options={"xatol": 1e-10})
    n = float(np.exp(res.x))
    d = compute / (3.0 * forward_flops(n, **shape))
    return n, d, float(law.loss(n, d))


def supervised_teacher_for(
    law: SupervisedLaw, target_loss: float, **shape: float
) -> tuple[float, float] | None:
    """The supervised-compute-optimal (N, D) whose loss is `target_loss`; None if below E."""
    if target_loss <= law.E * (1 + 1e-9):
        return None

    def gap(log_c: float) -> float:
        return supervised_optimal(law, float(np.exp(log_c)), **shape)[2] - target_loss

    lo, hi = np.log(1e10), np.log(1e35)
    if gap(lo) < 0 or gap(hi) > 0:
        return None
    log_c = brentq(gap, lo, hi, xtol=1e-10)
    n, d, _ = supervised_optimal(law, float(np.exp(log_c)), **shape)
    return n, d


def _flops(n_s: float, d_s: float, n_t: float, d_t: float, scenario: str, **shape: float) -> dict[str, float]:
    lgt, pre = SCENARIOS[scenario]
    f_t = forward_flops(n_t, **shape) if n_t else 0.0
    return {
        "student_training": 3.0 * forward_flops(n_s, **shape) * d_s,
        "teacher_logits": lgt * f_t * d_s,
        "teacher_training": pre * 3.0 * f_t * (d_t or 0.0),
    }


def _best(law: DistillationLaw, n_s: float, compute: float, **shape: float) -> Recipe:
    d_s = compute / (3.0 * forward_flops(n_s, **shape))
    # L_S is minimised over L_T in (E, ~E + 10): the capacity gap gives an interior minimum.
    e = law.supervised.E
    res = minimize_scalar(
        lambda lt: float(law.log_loss(n_s, d_s, lt)),
        bounds=(e * (1 + 1e-6), e + 10.0),
        method="bounded",
        options={"xatol": 1e-10},
    )
    lt = float(res.x)
    teacher = supervised_teacher_for(law.supervised, lt, **shape)
    n_t, d_t = teacher if teacher else (None, None)
    flops = _flops(n_s, d_s, 0.0, 0.0, "best", **shape)
    return Recipe(
        "best",
        compute,
        n_s,
        d_s,
        n_t,
        d_t,
        lt,
        float(law.loss(n_s, d_s, lt)),
        float(law.supervised.loss(n_s, d_s)),
        flops,
    )


def _constrained(law: DistillationLaw, n_s: float, compute: float, scenario: str, **shape: float) -> Recipe:
    """Eq. 10 by SLSQP over x = (log D_S, log N_T, log D_T) with log FLOPs(x) = log C."""
    lgt, pre = SCENARIOS[scenario]
    sup = law.supervised
    log_c = np.log(compute)

    def log_flops(x: np.ndarray) -> float:
        d_s, n_t, d_t = np.exp(x)
        f = 3.0 * forward_flops(n_s, **shape) * d_s + forward_flops(n_t, **shape) * (
            lgt * d_s + pre * 3.0 * d_t
        )
        return float(np.log(f))

    def objective(x: np.ndarray) -> float:
        d_s, n_t, d_t = np.exp(x)
        return float(law.log_loss(n_s, d_s, sup.loss(n_t, d_t)))

    d_max = compute / (3.0 * forward_flops(n_s, **shape))
    if d_max < 1e6:
        raise FitError(f"compute {compute:.3g} buys the student fewer than 1e6 tokens")
    best = None
    for share in (0.9, 0.5, 0.1):  # fraction of the budget on the student
        for ratio in (1.0, 4.0):  # teacher size relative to student
            n_t = np.clip(ratio * n_s, 1e6, 1e17)
            d_s = share * d_max
            rest = max(
                compute - 3.0 * forward_flops(n_s, **shape) * d_s - lgt * forward_flops(n_t, **shape) * d_s,
                1.0,
            )
            d_t = np.clip(rest / (3.0 * forward_flops(n_t, **shape)) if pre else 1e17, 1e6, 1e17)
            x0 = np.log([d_s, n_t, d_t])
            res = minimize(
                objective,
                x0,
                method="SLSQP",
                bounds=[(LOG_LO, LOG_HI)] * 3,
                constraints=[{"type": "eq", "fun": lambda x: log_flops(x) - log_c}],
                options={"maxiter": 500, "ftol": 1e-14},
            )
            feasible = abs(log_flops(res.x) - log_c) < 1e-7
            if feasible and (best is None or res.fun < best.fun):
                best = res
    if best is None:
        raise FitError(f"no feasible {scenario} recipe for N_S={n_s:.3g} at compute {compute:.3g}")
    d_s, n_t, d_t = (float(v) for v in np.exp(best.x))
    lt = float(sup.loss(n_t, d_t))
    return Recipe(
        scenario,
        compute,
        n_s,
        d_s,
        n_t,
        d_t,
        lt,
        float(law.loss(n_s, d_s, lt)),
        float(sup.loss(n_s, d_max)),
        _flops(n_s, d_s, n_t, d_t, scenario, **shape),
    )


def distillation_optimal(
    law: DistillationLaw, student_params: float, compute: float, scenario: str, **shape: float
) -> Recipe:
    """Eq. 10: the lowest student loss for N_S within `compute` FLOPs in one scenario."""
    if scenario not in SCENARIOS:
        raise FitError(f"scenario must be one of {list(SCENARIOS)}, got {scenario!r}")
    if student_params <= 0 or compute <= 0:
        raise FitError("student params and compute must be positive")
    if scenario == "best":
        return _best(law, student_params, compute, **shape)
    return _constrained(law, student_params, compute, scenario, **shape)


def crossover_compute(
    law: DistillationLaw,
    student_params: float,
    scenario: str = "best",
    *,
    low: float = 1e17,
    high: float = 1e27,
    **shape: float,
) -> float | None:
    """The compute at which supervised training catches up with distillation for N_S.

    None when one of the two wins over the whole range [low, high] (with teacher
    pretraining counted, supervised usually wins everywhere).
    """

    def advantage(log_c: float) -> float:
        r = distillation_optimal(law, student_params, float(np.exp(log_c)), scenario, **shape)
        return r.supervised_loss - r.student_loss  # > 0 while distilling wins

    grid = np.linspace(np.log(low), np.log(high), 11)
    values = [advantage(x) for x in grid]
    for a, b, va, vb in zip(grid, grid[1:], values, values[1:], strict=False):
        if va > 0 >= vb:
            return float(np.exp(brentq(advantage, a, b, xtol=1e-6)))
    return None
