"""Compute-optimal recipes: supervised (N*, D*) for a budget, and distillation (Eq. 10) per scenario.

Budgets are Eq. 9 FLOPs with the App. H.1 F(N). The distillation problem is solved as
the paper did, with SLSQP under the budget as an equality constraint and bounds
[1e6, 1e17] on N_T, D_S, D_T, but in log coordinates (so one step size suits values
twelve decades apart) and from a few starts. `best` needs no constrained solver: the
budget fixes D_S and L_T is a free scalar.

Every scenario refuses (`OutOfBounds`) a recipe outside those bounds, naming the bound:
below them the laws say nothing (1e10 FLOPs buy a 1e9-param student 1.36 tokens), and a
number printed there would read as a plan. A recipe that sits on a bound is returned but
says so (`at_bounds`): the optimum lies beyond it (a free teacher's tokens run to 1e17).

`fixed_teacher` is the paper's other setting: a teacher the user already has (its
training sunk), whose logits are either free (cached already) or paid inside the budget;
it reports both for the student the user names.
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
LO, HI = 1e6, 1e17  # the paper's bounds on N_T, D_S, D_T
LOG_LO, LOG_HI = np.log(LO), np.log(HI)
N_FLOOR = 1e3  # the smallest model the supervised optimum is searched over
C_LOW, C_HIGH = 1e10, 1e35  # budgets searched for a supervised teacher of a given loss
AT_BOUND = 1e-3  # |ln value - ln bound| within which a value counts as on the bound (0.1%)


class OutOfBounds(FitError):
    """No recipe within the bounds [1e6, 1e17] on N_T, D_S, D_T (the message names the bound)."""


def sci(x: float) -> str:
    """3 significant digits with a bare exponent (1e10, 1.36e-05 -> 1.36e-5) for messages."""
    mantissa, e, exponent = f"{x:.3g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if e else mantissa


def _bounded(value: float, name: str, says: str) -> None:
    """Refuse `value` outside [LO, HI]; `says` describes it with a {} for the number."""
    if value < LO * (1 - 1e-6):
        raise OutOfBounds(f"{says.format(sci(value))}, fewer than the bound {name} >= {sci(LO)}")
    if value > HI * (1 + 1e-6):
        raise OutOfBounds(f"{says.format(sci(value))}, more than the bound {name} <= {sci(HI)}")


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
    at_bounds: tuple[str, ...] = ()
    """Values on a search bound, e.g. "D_T = 1e17 (upper search bound)": the optimum lies beyond."""

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "at_bounds": list(self.at_bounds)}


def at_search_bounds(**values: float | None) -> tuple[str, ...]:
    """'NAME = 1e17 (upper search bound)' for each value within 0.1% of LO or HI (None: skipped)."""
    found = []
    for name, value in values.items():
        for bound, side in ((LO, "lower"), (HI, "upper")):
            if value is not None and abs(np.log(value) - np.log(bound)) <= AT_BOUND:
                found.append(f"{name} = {sci(bound)} ({side} search bound)")
    return tuple(found)


def _supervised_optimum(
    law: SupervisedLaw, compute: float, **shape: float
) -> tuple[float, float, float, bool]:
    """(N*, D*, L*, pinned): the optimum over N in [N_FLOOR, 1e17] with D >= 1 token.

    `pinned` says N* sits on a search bound, so the true optimum lies outside it.
    """
    if compute < 3.0 * forward_flops(N_FLOOR, **shape):
        raise OutOfBounds(f"compute {sci(compute)} buys a {sci(N_FLOOR)}-param model less than one token")

    def loss(log_n: float) -> float:
        n = np.exp(log_n)
        return float(law.log_loss(n, compute / (3.0 * forward_flops(n, **shape))))

    # D = C / 3F(N) must stay >= 1 token: cap N where the budget buys one token per param.
    lo = np.log(N_FLOOR)
    cap = brentq(lambda x: np.log(3 * forward_flops(np.exp(x), **shape)) - np.log(compute), lo, 80)
    hi = min(LOG_HI, cap)
    res = minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    n = float(np.exp(res.x))
    d = compute / (3.0 * forward_flops(n, **shape))
    pinned = bool(res.x - lo < 1e-4 or hi - res.x < 1e-4)
    return n, d, float(law.loss(n, d)), pinned


def supervised_optimal(law: SupervisedLaw, compute: float, **shape: float) -> tuple[float, float, float]:
    """(N*, D*, L*) minimising L(N, D) subject to 3 F(N) D = compute.

    Refuses (`OutOfBounds`) a budget whose optimum lies on the search bounds: the value
    there (a 1e3-param model on 22 tokens at 1e8 FLOPs) is no optimum.
    """
    n, d, loss, pinned = _supervised_optimum(law, compute, **shape)
    if pinned:
        raise OutOfBounds(
            f"compute {sci(compute)}: the supervised optimum lies on the search bound "
            f"(N = {sci(n)} params, D = {sci(d)} tokens; N is searched in [{sci(N_FLOOR)}, {sci(HI)}])"
        )
    return n, d, loss


def supervised_teacher_for(
    law: SupervisedLaw, target_loss: float, **shape: float
) -> tuple[float, float] | None:
    """The supervised-compute-optimal (N, D) whose loss is `target_loss`; None if below E.

    A loss reached with under 1e10 FLOPs (N D < 2e9) or only beyond 1e35 is refused
    (`OutOfBounds`): such a teacher lies outside the bounds on N_T, D_T.
    """
    if target_loss <= law.E * (1 + 1e-9):
        return None

    def gap(log_c: float) -> float:
        return _supervised_optimum(law, float(np.exp(log_c)), **shape)[2] - target_loss

    lo, hi = np.log(C_LOW), np.log(C_HIGH)
    if gap(lo) < 0:
        raise OutOfBounds(
            f"a teacher of loss {target_loss:.4g} needs under {sci(C_LOW)} FLOPs of training, "
            f"so N_T or D_T is fewer than the bound {sci(LO)}"
        )
    if gap(hi) > 0:
        raise OutOfBounds(
            f"a teacher of loss {target_loss:.4g} needs over {sci(C_HIGH)} FLOPs of training, "
            f"so N_T or D_T is more than the bound {sci(HI)}"
        )
    log_c = brentq(gap, lo, hi, xtol=1e-10)
    n, d, _, _ = _supervised_optimum(law, float(np.exp(log_c)), **shape)
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
    _bounded(d_s, "D_S", f"compute {sci(compute)} buys the student {{}} tokens")
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
    n_t, d_t = teacher if teacher else (None, None)  # bounds: checked on the recipe by the caller
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
    if d_max < LO:
        _bounded(d_max, "D_S", f"compute {sci(compute)} buys the student at most {{}} tokens")
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
        raise OutOfBounds(f"no {scenario} recipe for N_S = {sci(n_s)} at compute {sci(compute)} "
                          f"within the bounds [{sci(LO)}, {sci(HI)}] on N_T, D_S, D_T")
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


def _check_recipe(r: Recipe) -> Recipe:
    """The bounds, once more on the answer: no scenario may return what they exclude; those
    it sits on are named."""
    at = f"at compute {sci(r.compute)} the"
    _bounded(r.student_tokens, "D_S", at + " student gets {} tokens")
    if r.teacher_params is not None:
        _bounded(r.teacher_params, "N_T", at + " teacher has {} params")
    if r.teacher_tokens is not None:
        _bounded(r.teacher_tokens, "D_T", at + " teacher is trained on {} tokens")
    bounds = at_search_bounds(N_T=r.teacher_params, D_S=r.student_tokens, D_T=r.teacher_tokens)
    return dataclasses.replace(r, at_bounds=bounds)


def _check_inputs(student_params: float, compute: float, scenario: str) -> None:
    if scenario not in SCENARIOS:
        raise FitError(f"scenario must be one of {list(SCENARIOS)}, got {scenario!r}")
    if not (np.isfinite(student_params) and np.isfinite(compute) and student_params > 0 and compute > 0):
        raise FitError("student params and compute must be positive and finite")


def distillation_optimal(
    law: DistillationLaw, student_params: float, compute: float, scenario: str, **shape: float
) -> Recipe:
    """Eq. 10: the lowest student loss for N_S within `compute` FLOPs in one scenario.

    Raises `OutOfBounds` when no recipe within the bounds exists (the message names the bound).
    """
    _check_inputs(student_params, compute, scenario)
    if scenario == "best":
        return _check_recipe(_best(law, student_params, compute, **shape))
    return _check_recipe(_constrained(law, student_params, compute, scenario, **shape))


def recipe_or_none(
    law: DistillationLaw, student_params: float, compute: float, scenario: str, **shape: float
) -> Recipe | None:
    """`distillation_optimal`, or None where the bounds leave no recipe (for scans over budgets)."""
    try:
        return distillation_optimal(law, student_params, compute, scenario, **shape)
    except OutOfBounds:
        return None


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
    pretraining counted, supervised usually wins everywhere). Budgets without a recipe
    inside the bounds (D_S > 1e17 near 1e27 for a 1e9 student) are left out of the
    search, so the answer is always a budget with a recipe.
    """
    _check_inputs(student_params, low, scenario)

    def advantage(log_c: float) -> float | None:
        r = recipe_or_none(law, student_params, float(np.exp(log_c)), scenario, **shape)
        return None if r is None else r.supervised_loss - r.student_loss  # > 0 while distilling wins

    def strict(log_c: float) -> float:
        value = advantage(log_c)
        if value is None:
            raise OutOfBounds(f"compute {sci(float(np.exp(log_c)))}: no recipe inside the bounds")
        return value

    grid = np.linspace(np.log(low), np.log(high), 11)
    values = [advantage(x) for x in grid]
    for a, b, va, vb in zip(grid, grid[1:], values, values[1:], strict=False):
        if va is not None and vb is not None and va > 0 >= vb:
            return float(np.exp(brentq(strict, a, b, xtol=1e-6)))
    return None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `kdcache plan` reports: the distillation recipe, the supervised optimum at the same
    budget, whether distilling wins, and (when searched) where supervised catches up."""

    recipe: Recipe
    supervised_optimal: dict[str, float]
    """{params, tokens, loss} of the compute-optimal supervised model (Eq. 1 at C = 6ND)."""
    distill: bool
    crossover_compute: float | None = None
    crossover_searched: bool = False

    def to_json(self) -> dict[str, Any]:
        out = {**self.recipe.to_dict(), "supervised_optimal": self.supervised_optimal,
               "distill": self.distill}
        if self.crossover_searched:
            out["crossover_compute"] = self.crossover_compute
        return out


def plan(
    law: DistillationLaw, student_params: float, compute: float, scenario: str = "best", *,
    crossover: bool = True, **shape: float,
) -> Plan:
    """The recipe for N_S within `compute` in `scenario`, with the supervised comparison."""
    recipe = distillation_optimal(law, student_params, compute, scenario, **shape)
    n, d, loss = supervised_optimal(law.supervised, compute, **shape)
    found = crossover_compute(law, student_params, scenario, **shape) if crossover else None
    return Plan(recipe=recipe, supervised_optimal={"params": n, "tokens": d, "loss": loss},
                distill=recipe.student_loss < recipe.supervised_loss, crossover_compute=found,
                crossover_searched=crossover)


# --- A given teacher: the student's tokens and losses under both accountings ------------------

ACCOUNTINGS = {"logits_free": 0.0, "logits_counted": 1.0}
"""How the teacher's forward over D_S is charged: free (its logits are cached already, or paid
by someone else: D_S = C / 3F(N_S)), or counted in the budget (D_S = C / (3F(N_S) + F(N_T)))."""


@dataclasses.dataclass(frozen=True)
class StudentPlan:
    """One accounting of a given teacher's plan: the student's tokens and losses."""

    accounting: str
    student_params: float
    student_tokens: float
    student_loss: float
    """Eq. 8 at (N_S, D_S, L_T)."""
    supervised_tokens: float
    """C / 3F(N_S): the same student trained supervised on the whole budget."""
    supervised_loss: float
    distill: bool
    flops: dict[str, float]
    """{student_training, teacher_logits}; the teacher's own training is sunk."""
    at_bounds: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "at_bounds": list(self.at_bounds)}


@dataclasses.dataclass(frozen=True)
class FixedTeacherPlan:
    """What `kdcache plan --teacher-params` reports: a given teacher, and the given student under
    both accountings of the teacher's logits."""

    compute: float
    teacher_params: float
    teacher_tokens: float | None
    """D_T when the teacher was given by its tokens (L_T from Eq. 1), None when by its loss."""
    teacher_loss: float
    accountings: dict[str, StudentPlan]
    supervised_optimal: dict[str, float]
    """{params, tokens, loss} of the compute-optimal supervised model at the same budget."""

    def to_json(self) -> dict[str, Any]:
        teacher = {"params": self.teacher_params, "tokens": self.teacher_tokens, "loss": self.teacher_loss}
        return {"compute": self.compute, "teacher": teacher,
                "accountings": {name: row.to_dict() for name, row in self.accountings.items()},
                "supervised_optimal": self.supervised_optimal}


def _positive(value: float | None, what: str) -> None:
    if value is not None and not (np.isfinite(value) and value > 0):
        raise FitError(f"{what} must be positive and finite, got {value}")


def fixed_teacher(
    law: DistillationLaw,
    compute: float,
    teacher_params: float,
    *,
    student_params: float,
    teacher_tokens: float | None = None,
    teacher_loss: float | None = None,
    **shape: float,
) -> FixedTeacherPlan:
    """The given student of a given teacher within `compute` FLOPs, its logits free and counted.

    The teacher is N_T with D_T tokens (L_T from the supervised law) or with loss L_T: exactly
    one. With N_S, N_T and L_T fixed, Eq. 8 falls as D_S grows, so the student spends the whole
    budget on tokens; what the accounting changes is how many. The student's size is the
    user's, as in the paper's Eq. 10: Eq. 8 alone would pick the largest student it may (at
    fixed compute the published law rewards a bigger student on fewer tokens all the way to the
    teacher's size), so a size search would answer a question the law does not. Raises
    `OutOfBounds` for N_T, D_T or D_S outside [1e6, 1e17].
    """
    if (teacher_tokens is None) == (teacher_loss is None):
        raise FitError("a given teacher needs its tokens D_T or its loss L_T, exactly one")
    for value, what in ((compute, "compute"), (teacher_params, "teacher params"),
                        (teacher_tokens, "teacher tokens"), (teacher_loss, "teacher loss"),
                        (student_params, "student params")):
        _positive(value, what)
    _bounded(teacher_params, "N_T", "the teacher has {} params")
    if teacher_tokens is not None:
        _bounded(teacher_tokens, "D_T", "the teacher is trained on {} tokens")
        teacher_loss = float(law.supervised.loss(teacher_params, teacher_tokens))
    assert teacher_loss is not None
    rows = {name: _student_of(law, compute, teacher_params, teacher_loss, name, student_params, **shape)
            for name in ACCOUNTINGS}
    n, d, loss = supervised_optimal(law.supervised, compute, **shape)
    return FixedTeacherPlan(compute, teacher_params, teacher_tokens, teacher_loss, rows,
                            {"params": n, "tokens": d, "loss": loss})


def _student_of(law: DistillationLaw, compute: float, n_t: float, lt: float, accounting: str,
                n: float, **shape: float) -> StudentPlan:
    f_s, f_t, logits = forward_flops(n, **shape), forward_flops(n_t, **shape), ACCOUNTINGS[accounting]
    d_s = compute / (3.0 * f_s + logits * f_t)
    _bounded(d_s, "D_S", f"compute {sci(compute)} buys the {sci(n)}-param student {{}} tokens")
    d_sup = compute / (3.0 * f_s)
    loss, sup = float(law.loss(n, d_s, lt)), float(law.supervised.loss(n, d_sup))
    flops = {"student_training": 3.0 * f_s * d_s, "teacher_logits": logits * f_t * d_s}
    return StudentPlan(accounting, n, d_s, loss, d_sup, sup, loss < sup, flops, at_search_bounds(D_S=d_s))
