"""The two laws of Busbridge et al. (2025) as frozen parameter sets with vectorised predictions.

Supervised (Eq. 1):   L(N, D) = E + (A / N^alpha + B / D^beta)^gamma
Distillation (Eq. 8): L_S = L_T + L_T^-c0 (1 + (L_T / (Lsup_S d1))^(1/f1))^(-c1 f1)
                            * (A' / N_S^alpha' + B' / D_S^beta')^gamma'
Both are evaluated in log space (log-sum-exp), which is what the fitter optimises and
keeps the large powers (c1 ~ 500 in the paper) from overflowing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from kdcache.fit.errors import FitError

SUPERVISED_NAMES = ("E", "A", "B", "alpha", "beta", "gamma")
DISTILLATION_NAMES = ("A", "B", "alpha", "beta", "gamma", "c0", "c1", "f1", "d1")


def _f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _out(value: np.ndarray) -> Any:
    return float(value) if np.ndim(value) == 0 else value


def _check(values: Mapping[str, float], names: tuple[str, ...], what: str) -> dict[str, float]:
    missing = [n for n in names if n not in values]
    if missing:
        raise FitError(f"{what} law: missing parameters {missing}")
    out = {n: float(values[n]) for n in names}
    bad = [n for n, v in out.items() if not np.isfinite(v)]
    if bad:
        raise FitError(f"{what} law: non-finite parameters {bad}")
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class SupervisedLaw:
    """Eq. 1 coefficients; gamma = 1 is the Chinchilla form."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if min(self.E, self.A, self.B) <= 0:
            raise FitError("supervised law: E, A and B must be positive")

    def log_loss(self, n_params: Any, tokens: Any) -> Any:
        """log L(N, D), stable for any magnitudes."""
        u = np.log(self.A) - self.alpha * np.log(_f64(n_params))
        v = np.log(self.B) - self.beta * np.log(_f64(tokens))
        return _out(np.logaddexp(np.log(self.E), self.gamma * np.logaddexp(u, v)))

    def loss(self, n_params: Any, tokens: Any) -> Any:
        """Validation cross-entropy L(N, D) in nats per token."""
        return _out(np.exp(self.log_loss(n_params, tokens)))

    def to_dict(self) -> dict[str, float]:
        return {n: float(getattr(self, n)) for n in SUPERVISED_NAMES}

    @classmethod
    def from_dict(cls, values: Mapping[str, float]) -> SupervisedLaw:
        return cls(**_check(values, SUPERVISED_NAMES, "supervised"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillationLaw:
    """Eq. 8 coefficients plus the supervised law that supplies Lsup_S."""

    A: float
    B: float
    alpha: float
    beta: float
    gamma: float
    c0: float
    c1: float
    f1: float
    d1: float
    supervised: SupervisedLaw

    def __post_init__(self) -> None:
        if min(self.A, self.B, self.f1, self.d1) <= 0:
            raise FitError("distillation law: A, B, f1 and d1 must be positive")

    def log_loss(self, n_params: Any, tokens: Any, teacher_loss: Any) -> Any:
        """log L_S(N_S, D_S, L_T)."""
        log_lt = np.log(_f64(teacher_loss))
        log_sup = self.supervised.log_loss(n_params, tokens)
        z = (log_lt - log_sup - np.log(self.d1)) / self.f1
        student = np.logaddexp(
            np.log(self.A) - self.alpha * np.log(_f64(n_params)),
            np.log(self.B) - self.beta * np.log(_f64(tokens)),
        )
        gap = -self.c0 * log_lt - self.c1 * self.f1 * np.logaddexp(0.0, z) + self.gamma * student
        return _out(np.logaddexp(log_lt, gap))

    def loss(self, n_params: Any, tokens: Any, teacher_loss: Any) -> Any:
        """Student cross-entropy L_S in nats per token."""
        return _out(np.exp(self.log_loss(n_params, tokens, teacher_loss)))

    def to_dict(self) -> dict[str, float]:
        return {n: float(getattr(self, n)) for n in DISTILLATION_NAMES}

    @classmethod
    def from_dict(cls, values: Mapping[str, float], supervised: SupervisedLaw) -> DistillationLaw:
        return cls(**_check(values, DISTILLATION_NAMES, "distillation"), supervised=supervised)
