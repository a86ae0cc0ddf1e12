"""Log-space predictions with analytic Jacobians, and the summed Huber objective the fitter minimises.

Internally a law is a vector `theta` in well-conditioned coordinates: log N and log D
are centred on the data (so log A and alpha are not almost collinear) and positive
scales enter by their logs. `Parametrisation` maps between that vector and the
published names, and holds parameters the user fixed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kdcache.fit.laws import DISTILLATION_NAMES, SUPERVISED_NAMES

C1_MIN = 1e-3  # c1 = 0 starts (the paper's grid) move here: c1 is fitted by its log
GAMMA_MIN = 0.1  # below this the published A, B overflow float64 for plausible fits


def huber(residuals: np.ndarray, delta: float) -> np.ndarray:
    """Huber_delta per residual (the paper's and Epoch's robust loss)."""
    a = np.abs(residuals)
    return np.where(a <= delta, 0.5 * residuals**2, delta * (a - 0.5 * delta))


def _softmax2(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log(e^u + e^v) and the two softmax weights."""
    s = np.logaddexp(u, v)
    return s, np.exp(u - s), np.exp(v - s)


def _power_sum(
    p: Any, q: Any, ae: Any, be: Any, g: Any, dx: np.ndarray, dy: np.ndarray
) -> tuple[Any, Any, Any, Any]:
    """gamma * log(A/N^alpha + B/D^beta) in effective coordinates, with its partials.

    With U = gamma (log A - alpha x) = p - ae dx and V likewise, the term is the soft
    maximum g LSE(U/g, V/g): the exponents gamma*alpha and gamma*beta that the data pin
    down are coordinates of their own and gamma only sets how sharp the corner is. In
    (log A, alpha, gamma) the same surface is a long curved valley L-BFGS-B crawls along.
    Returns the term, the softmax weights of U and V, and the partial in g.
    """
    big_u, big_v = p - ae * dx, q - be * dy
    s, wu, wv = _softmax2(big_u / g, big_v / g)
    return g * s, wu, wv, s - (wu * big_u + wv * big_v) / g


@dataclasses.dataclass(frozen=True)
class Data:
    """Runs in log space: x = log N, y = log D, lt = log L_T (distillation), target = log L."""

    x: np.ndarray
    y: np.ndarray
    target: np.ndarray
    lt: np.ndarray | None = None
    log_sup: np.ndarray | None = None  # log Lsup_S from the fixed supervised law

    def subset(self, idx: np.ndarray) -> Data:
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return Data(self.x[idx], self.y[idx], self.target[idx], pick(self.lt), pick(self.log_sup))


def supervised_log(theta: np.ndarray, d: Data, xm: float, ym: float) -> tuple[Any, Any]:
    """log L_hat and its Jacobian for theta = (log E, p, q, gamma alpha, gamma beta, gamma).

    Broadcasts: theta may be (p,) or (p, k, 1) for k starts at once (jacobian skipped).
    """
    log_e, p, q, ae, be, g = theta
    dx, dy = d.x - xm, d.y - ym
    t, wu, wv, dg = _power_sum(p, q, ae, be, g, dx, dy)
    out, pe, pt = _softmax2(log_e, t)
    if np.ndim(theta) > 1:
        return out, None
    jac = np.stack([pe, pt * wu, pt * wv, -pt * wu * dx, -pt * wv * dy, pt * dg], axis=1)
    return out, jac


def distillation_log(theta: np.ndarray, d: Data, xm: float, ym: float) -> tuple[Any, Any]:
    """log L_S hat and its Jacobian for theta = (p, q, ga, gb, gamma, c0, log c1, f1, log d1).

    c1 enters by its log: fits put it anywhere from ~1 to ~1e3 (the paper: 522.6).
    """
    p, q, ae, be, g, c0, log_c1, f1, log_d1 = theta
    c1 = np.exp(log_c1)
    assert d.lt is not None and d.log_sup is not None
    dx, dy = d.x - xm, d.y - ym
    t, wu, wv, dg = _power_sum(p, q, ae, be, g, dx, dy)
    z = (d.lt - d.log_sup - log_d1) / f1
    sp = np.logaddexp(0.0, z)
    gap = -c0 * d.lt - c1 * f1 * sp + t
    out, _, p2 = _softmax2(d.lt, gap)
    if np.ndim(theta) > 1:
        return out, None
    sig = np.exp(-np.logaddexp(0.0, -z))
    jac = np.stack(
        [
            p2 * wu,
            p2 * wv,
            -p2 * wu * dx,
            -p2 * wv * dy,
            p2 * dg,
            -p2 * d.lt,
            -p2 * c1 * f1 * sp,
            p2 * c1 * (sig * z - sp),
            p2 * c1 * sig,
        ],
        axis=1,
    )
    return out, jac


@dataclasses.dataclass(frozen=True)
class Parametrisation:
    """Maps published parameters <-> internal theta, with some parameters held fixed."""

    law: str  # "supervised" | "distillation"
    xm: float
    ym: float
    fixed: dict[str, float]

    @property
    def names(self) -> tuple[str, ...]:
        return SUPERVISED_NAMES if self.law == "supervised" else DISTILLATION_NAMES

    @property
    def free(self) -> np.ndarray:
        return np.array([n not in self.fixed for n in self.names])

    def to_theta(self, p: dict[str, Any]) -> np.ndarray:
        """Internal coordinates; works elementwise on arrays of starts too."""
        # gamma = 0 is degenerate (a constant law); starts there move to a small gamma.
        g = np.maximum(p["gamma"], GAMMA_MIN)
        pq = [g * (np.log(p["A"]) - p["alpha"] * self.xm), g * (np.log(p["B"]) - p["beta"] * self.ym)]
        eff = [g * p["alpha"], g * p["beta"], g]
        if self.law == "supervised":
            cols = [np.log(p["E"]), *pq, *eff]
        else:
            rest = [p["c0"], np.log(np.maximum(p["c1"], C1_MIN)), p["f1"], np.log(p["d1"])]
            cols = [*pq, *eff, *rest]
        return np.array(np.broadcast_arrays(*cols), dtype=np.float64)

    def to_params(self, theta: np.ndarray) -> dict[str, float]:
        t = [float(v) for v in theta]
        head, t = (t[:1], t[1:]) if self.law == "supervised" else ([], t)
        p, q, ae, be, g = t[:5]
        alpha, beta = ae / g, be / g
        out = {
            "A": float(np.exp(p / g + alpha * self.xm)),
            "B": float(np.exp(q / g + beta * self.ym)),
            "alpha": alpha,
            "beta": beta,
            "gamma": g,
        }
        if head:
            return {"E": float(np.exp(head[0])), **out}
        c0, log_c1, f1, log_d1 = t[5:]
        c1 = float(np.exp(log_c1))
        return {
            **out,
            "c0": c0,
            "c1": c1,
            "f1": f1,
            "d1": float(np.exp(log_d1)),
        }

    def predict_log(self, theta: np.ndarray, d: Data) -> tuple[Any, Any]:
        fn = supervised_log if self.law == "supervised" else distillation_log
        return fn(theta, d, self.xm, self.ym)


def objective(theta: np.ndarray, par: Parametrisation, d: Data, delta: float) -> tuple[float, Any]:
    """Summed Huber / delta and its gradient (scaled so L-BFGS-B sees O(1) numbers)."""
    pred, jac = par.predict_log(theta, d)
    r = pred - d.target
    value = float(huber(r, delta).sum() / delta)
    # A plain reduction, not jac.T @ w: BLAS threads on a (runs x 9) product only contend.
    return value, (jac * np.clip(r / delta, -1.0, 1.0)[:, None]).sum(axis=0)


def batch_objective(thetas: np.ndarray, par: Parametrisation, d: Data, delta: float) -> np.ndarray:
    """Objective (scaled as above) at many starts; thetas is (p, k)."""
    pred, _ = par.predict_log(thetas[:, :, None], d)
    with np.errstate(invalid="ignore"):
        values = huber(pred - d.target, delta).sum(axis=1) / delta
    return np.where(np.isfinite(values), values, np.inf)
