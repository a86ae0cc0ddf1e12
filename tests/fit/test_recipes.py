"""Compute-optimal recipes: constraints met, and the paper's qualitative findings under `paper`."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.fit import recipes
from kdcache.fit.errors import FitError
from kdcache.fit.flops import distillation_flops, forward_flops, training_flops
from kdcache.fit.presets import PAPER_DISTILLATION as PAPER

SUP = PAPER.supervised


def test_supervised_optimum_meets_budget_and_beats_neighbours() -> None:
    n, d, loss = recipes.supervised_optimal(SUP, 1e21)
    assert training_flops(n, d) == pytest.approx(1e21, rel=1e-6)
    for factor in (0.8, 1.25):
        m = n * factor
        assert SUP.loss(m, 1e21 / training_flops(m, 1.0)) > loss


@pytest.mark.parametrize("scenario", list(recipes.SCENARIOS))
@pytest.mark.parametrize("compute", [1e20, 1e23])
def test_budget_constraint_met_to_1e_6(scenario: str, compute: float) -> None:
    r = recipes.distillation_optimal(PAPER, 1e9, compute, scenario)
    lgt, pre = recipes.SCENARIOS[scenario]
    total = distillation_flops(
        r.student_params,
        r.student_tokens,
        r.teacher_params or 0.0,
        r.teacher_tokens or 0.0,
        logits=lgt,
        pretraining=pre,
    )
    assert abs(total / compute - 1) <= 1e-6
    assert sum(r.flops.values()) == pytest.approx(compute, rel=1e-6)
    for v in (r.student_tokens, r.teacher_params, r.teacher_tokens):
        assert v is None or 1e6 * (1 - 1e-9) <= v <= 1e17 * (1 + 1e-9)
    assert r.student_loss == pytest.approx(PAPER.loss(r.student_params, r.student_tokens, r.teacher_loss))


def test_best_case_teacher_is_optimal_and_reachable() -> None:
    r = recipes.distillation_optimal(PAPER, 1e9, 1e21, "best")
    for lt in (r.teacher_loss * 0.98, r.teacher_loss * 1.02):
        assert PAPER.loss(1e9, r.student_tokens, lt) > r.student_loss
    assert r.teacher_params is not None and r.teacher_tokens is not None
    assert SUP.loss(r.teacher_params, r.teacher_tokens) == pytest.approx(r.teacher_loss, rel=1e-6)


def test_supervised_catches_up_and_crossover_grows_with_student_size() -> None:
    # Finding 1: at enough compute supervised matches or beats best-case distillation,
    # and the crossover compute grows with student size.
    crossovers = [recipes.crossover_compute(PAPER, n, "best") for n in (1e9, 3e9, 1e10)]
    assert all(c is not None for c in crossovers)
    assert crossovers[0] < crossovers[1] < crossovers[2]  # type: ignore[operator]
    late = recipes.distillation_optimal(PAPER, 1e9, 1e26, "best")
    assert late.supervised_loss <= late.student_loss


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["pretraining", "pretraining+inference"])
def test_with_teacher_pretraining_supervised_wins(scenario: str) -> None:
    # Finding 2: counting the teacher's training, one student is better trained supervised,
    # over the paper's regime: budgets giving the student 20 to 2000 tokens per parameter.
    # (Far outside it, e.g. a 300M student on 10k tokens/param, the rounded published
    # coefficients put distillation ~0.1% ahead.)
    for n in (3e8, 1e9, 3e9, 1e10):
        for tokens_per_param in (20, 100, 500, 2000):
            compute = training_flops(n, tokens_per_param * n)
            r = recipes.distillation_optimal(PAPER, n, compute, scenario)
            assert r.supervised_loss <= r.student_loss, (n, tokens_per_param)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["inference", "pretraining+inference"])
def test_optimal_teacher_plateaus_slightly_above_student(scenario: str) -> None:
    # Finding 3: at large compute the optimal teacher stops growing, a little larger than the student.
    sizes = [recipes.distillation_optimal(PAPER, 1e9, c, scenario).teacher_params for c in (1e24, 1e25, 1e26)]
    assert all(s is not None and 1.0 < s / 1e9 < 5.0 for s in sizes), sizes
    assert max(sizes) / min(sizes) < 1.5  # type: ignore[type-var, operator]


def test_every_scenario_refuses_recipes_outside_the_bounds() -> None:
    for scenario in recipes.SCENARIOS:
        with pytest.raises(recipes.OutOfBounds, match=r"buys the student .* fewer than the bound D_S >= 1e6"):
            recipes.distillation_optimal(PAPER, 1e9, 1e10, scenario)
    with pytest.raises(recipes.OutOfBounds, match="compute 1e10 buys the student 1.36 tokens"):
        recipes.distillation_optimal(PAPER, 1e9, 1e10, "best")
    with pytest.raises(recipes.OutOfBounds, match=r"more than the bound D_S <= 1e17"):
        recipes.distillation_optimal(PAPER, 1e9, 1e28, "best")
    # A 1e12 student at 1e25 FLOPs wants a best-case teacher no budget below 1e35 trains.
    with pytest.raises(recipes.OutOfBounds, match="N_T or D_T is more than the bound 1e17"):
        recipes.distillation_optimal(PAPER, 1e12, 1e25, "best")
    assert recipes.recipe_or_none(PAPER, 1e9, 1e10, "best") is None


def test_supervised_optimum_on_its_search_bound_refused() -> None:
    with pytest.raises(recipes.OutOfBounds, match="on the search bound"):
        recipes.supervised_optimal(SUP, 1e10)  # the optimum would be below 1e3 params
    with pytest.raises(recipes.OutOfBounds, match="less than one token"):
        recipes.supervised_optimal(SUP, 1e5)
    n, d, _ = recipes.supervised_optimal(SUP, 1e14)
    assert 1e3 < n < 1e17 and d > 1


def test_crossover_searches_only_budgets_with_a_recipe() -> None:
    # Near 1e27 a 1e9 student gets more than 1e17 tokens; those budgets are skipped, not fatal.
    assert recipes.crossover_compute(PAPER, 1e9, "best", low=1e20, high=1e27) is not None
    assert recipes.crossover_compute(PAPER, 1e9, "best", low=1e27, high=1e29) is None


def test_bad_inputs() -> None:
    with pytest.raises(FitError, match="scenario"):
        recipes.distillation_optimal(PAPER, 1e9, 1e21, "cheap")
    with pytest.raises(FitError, match="fewer than"):
        recipes.distillation_optimal(PAPER, 1e9, 1e12, "inference")
    with pytest.raises(FitError, match="positive and finite"):
        recipes.distillation_optimal(PAPER, 1e9, float("inf"), "best")


# --- a given teacher ---------------------------------------------------------------------------


def test_fixed_teacher_with_a_given_student_by_hand() -> None:
    n_s, n_t, d_t, c = 1e9, 7e9, 2e12, 1e21
    p = recipes.fixed_teacher(PAPER, c, n_t, teacher_tokens=d_t, student_params=n_s)
    lt = SUP.loss(n_t, d_t)
    assert p.teacher_loss == lt
    d_sup = c / (3 * forward_flops(n_s))
    d_counted = c / (3 * forward_flops(n_s) + forward_flops(n_t))
    for name, d_s in (("logits_free", d_sup), ("logits_counted", d_counted)):
        row = p.accountings[name]
        assert row.student_tokens == pytest.approx(d_s, rel=1e-12)
        assert row.student_loss == pytest.approx(PAPER.loss(n_s, d_s, lt), rel=1e-12)
        assert row.supervised_tokens == pytest.approx(d_sup, rel=1e-12)
        assert row.supervised_loss == pytest.approx(SUP.loss(n_s, d_sup), rel=1e-12)
        assert row.distill is (row.student_loss < row.supervised_loss)
        assert sum(row.flops.values()) == pytest.approx(c, rel=1e-12)
        assert row.at_bounds == ()  # nothing searched
    # Free logits give the student 3.3x the tokens: distilling wins; paying for them, it loses.
    assert p.accountings["logits_free"].distill and not p.accountings["logits_counted"].distill
    # The same teacher given by its loss gives the same plan.
    by_loss = recipes.fixed_teacher(PAPER, c, n_t, teacher_loss=lt, student_params=n_s)
    assert by_loss.accountings == p.accountings and by_loss.teacher_tokens is None


def _eq8(n: np.ndarray, d: np.ndarray, lt: float) -> np.ndarray:
    """Eq. 8 and Eq. 1 written out in float64, directly (the library works in log space)."""
    lsup = SUP.E + (SUP.A / n**SUP.alpha + SUP.B / d**SUP.beta) ** SUP.gamma
    gap = (1 + (lt / (lsup * PAPER.d1)) ** (1 / PAPER.f1)) ** (-PAPER.c1 * PAPER.f1)
    return lt + lt ** (-PAPER.c0) * gap * (PAPER.A / n**PAPER.alpha + PAPER.B / d**PAPER.beta) ** PAPER.gamma


@pytest.mark.parametrize(("n_s", "n_t", "d_t", "compute"),
                         [(1e9, 7e9, 2e12, 1e21), (3e8, 7e9, 2e12, 1e19), (1e7, 1e8, 2e9, 1e17)])
def test_fixed_teacher_student_matches_an_independent_optimisation(
    n_s: float, n_t: float, d_t: float, compute: float
) -> None:
    """Eq. 8 at the given L_T minimised over every D_S the budget allows (3F(N_S) D_S plus, where
    counted, F(N_T) D_S within C) on a dense grid: the optimum spends the whole budget, and the
    plan's tokens and loss are the grid's best."""
    p = recipes.fixed_teacher(PAPER, compute, n_t, teacher_tokens=d_t, student_params=n_s)
    lt = float(SUP.E + (SUP.A / n_t**SUP.alpha + SUP.B / d_t**SUP.beta) ** SUP.gamma)
    assert p.teacher_loss == pytest.approx(lt, rel=1e-13)
    for name, logits in recipes.ACCOUNTINGS.items():
        row = p.accountings[name]
        d = np.geomspace(1e6, 1e17, 400_001)
        affordable = 3 * forward_flops(n_s) * d + logits * forward_flops(n_t) * d <= compute * (1 + 1e-12)
        losses = np.where(affordable, _eq8(np.full_like(d, n_s), d, lt), np.inf)
        i = int(np.argmin(losses))
        # The grid's step is 1e-4 in ln D: its best point is the last affordable one, within one step
        # of the plan's D_S, and Eq. 8 changes by less than |dL/dlnD| x 1e-4 < 1e-4 L over a step.
        assert i == int(np.flatnonzero(affordable)[-1])
        assert abs(np.log(d[i]) - np.log(row.student_tokens)) <= 1.0001e-4
        assert row.student_loss == pytest.approx(_eq8(np.array(n_s), np.array(row.student_tokens), lt),
                                                  rel=1e-12)
        assert 0 <= losses[i] - row.student_loss <= 1e-4 * row.student_loss
        assert sum(row.flops.values()) == pytest.approx(compute, rel=1e-12)


def test_fixed_teacher_refusals() -> None:
    with pytest.raises(FitError, match="exactly one"):
        recipes.fixed_teacher(PAPER, 1e21, 7e9, student_params=1e9)
    with pytest.raises(FitError, match="exactly one"):
        recipes.fixed_teacher(PAPER, 1e21, 7e9, teacher_tokens=2e12, teacher_loss=2.0, student_params=1e9)
    with pytest.raises(recipes.OutOfBounds, match="teacher has 1e18 params, more than the bound N_T <= 1e17"):
        recipes.fixed_teacher(PAPER, 1e21, 1e18, teacher_loss=2.0, student_params=1e9)
    with pytest.raises(recipes.OutOfBounds, match="trained on 1e5 tokens, fewer than the bound D_T >= 1e6"):
        recipes.fixed_teacher(PAPER, 1e21, 7e9, teacher_tokens=1e5, student_params=1e9)
    with pytest.raises(recipes.OutOfBounds, match="fewer than the bound D_S >= 1e6"):
        recipes.fixed_teacher(PAPER, 1e12, 7e9, teacher_tokens=2e12, student_params=1e9)
    with pytest.raises(FitError, match="teacher loss must be positive"):
        recipes.fixed_teacher(PAPER, 1e21, 7e9, teacher_loss=-1.0, student_params=1e9)


# --- recipes on a search bound ------------------------------------------------------------------


def test_a_recipe_on_a_search_bound_says_so() -> None:
    # Teacher training is free in `inference`: its tokens run to the bound, and the recipe says so.
    r = recipes.distillation_optimal(PAPER, 1e9, 1e21, "inference")
    assert r.teacher_tokens == pytest.approx(1e17, rel=1e-9)
    assert r.at_bounds == ("D_T = 1e17 (upper search bound)",)
    assert r.to_dict()["at_bounds"] == ["D_T = 1e17 (upper search bound)"]
    assert recipes.distillation_optimal(PAPER, 1e9, 1e21, "best").at_bounds == ()
    assert recipes.at_search_bounds(N_T=1.0009e6, D_S=1e10, D_T=None) == ("N_T = 1e6 (lower search bound)",)
    assert recipes.at_search_bounds(N_T=1.0011e6) == ()  # 0.11% away: off the bound
