"""`fit.scope`: which laws may answer which recipes, from what their fit JSON records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kdcache.fit import recipes
from kdcache.fit.errors import FitError
from kdcache.fit.flops import forward_flops
from kdcache.fit.presets import PAPER_DISTILLATION as PAPER
from kdcache.fit.scope import LawScope, load_distillation_scoped

# The paper's own design: students 1e8-1e10 on 10-500 tokens/param, teachers' losses 1.8-3.1.
DATA = {"params": [1e8, 1e10], "tokens": [1e9, 5e12], "teacher_loss": [1.8, 3.1], "loss": [3.0, 2.0]}


def fit_json(tmp_path: Path, **fields: Any) -> str:
    """A `kdcache fit --law distillation --json` file with the paper's coefficients."""
    doc = {"law": "distillation", "params": PAPER.to_dict(), "supervised": PAPER.supervised.to_dict(),
           "at_bounds": [], "data": DATA, **fields}
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(doc))
    return str(path)


def best() -> recipes.Recipe:
    # N_S 1e9, D_S 1.36e11, N_T 9.83e9, D_T 1.53e11, L_T 1.987: inside DATA.
    return recipes.distillation_optimal(PAPER, 1e9, 1e21, "best")


def test_the_paper_preset_is_trusted_as_published() -> None:
    law, scope = load_distillation_scoped("paper")
    assert law is PAPER and scope == LawScope(source="paper")
    far = recipes.distillation_optimal(PAPER, 1e9, 1e21, "inference")  # D_T = 1e17
    assert scope.problems(far) == []


def test_an_identified_law_inside_its_runs_has_no_problems(tmp_path: Path) -> None:
    law, scope = load_distillation_scoped(fit_json(tmp_path))
    assert law == PAPER and scope.at_bounds == ()
    assert scope.ranges == {"params": (1e8, 1e10), "tokens": (1e9, 5e12), "teacher_loss": (1.8, 3.1)}
    assert scope.problems(best()) == []


def test_coefficients_on_their_bounds_are_named(tmp_path: Path) -> None:
    _, scope = load_distillation_scoped(fit_json(tmp_path, at_bounds=["f1", "gamma"],
                                                 supervised_at_bounds=["E"]))
    assert scope.problems(best()) == [
        "f1 is on its search bound (the runs do not pin it)",
        "gamma is on its search bound (the runs do not pin it)",
        "supervised E is on its search bound (the runs do not pin it)",
    ]


def test_recipes_far_outside_the_runs_are_named(tmp_path: Path) -> None:
    small = {"params": [1e5, 9.8e8], "tokens": [1e7, 1.36e10], "teacher_loss": [2.2081, 4.0]}
    _, scope = load_distillation_scoped(fit_json(tmp_path, data=small))
    # N_S = 1e9 is within 10x of 9.8e8; N_T = 9.83e9 is 10.03x; D_S = 1.36e11 is 10.0x of 1.36e10 (not
    # over); D_T = 1.53e11 is 11x; L_T = 1.987 is 10.01% below 2.2081.
    r = best()
    assert r.student_tokens < 10 * 1.36e10 and r.teacher_params > 10 * 9.8e8
    assert scope.problems(r) == [
        "N_T = 9.83e9 is over 10x the largest fitted params (9.8e8)",
        "D_T = 1.53e11 is over 10x the largest fitted tokens (1.36e10)",
        "L_T = 1.987 is more than 10% below the lowest fitted teacher loss (2.208)",
    ]
    big = {"params": [1.1e10, 1e11], "tokens": [1e12, 1e13], "teacher_loss": [1.5, 2.0]}
    _, scope = load_distillation_scoped(fit_json(tmp_path, data=big))
    assert scope.problems(r) == ["N_S = 1e9 is under 1/10 of the smallest fitted params (1.1e10)"]


def test_a_given_teacher_is_checked_by_its_loss_and_its_students(tmp_path: Path) -> None:
    _, scope = load_distillation_scoped(fit_json(tmp_path))
    # A 1e12-param teacher outside every run: only its loss enters the law, and 1.9 is inside.
    p = recipes.fixed_teacher(PAPER, 1e21, 1e12, teacher_loss=1.9, student_params=1e9)
    assert scope.problems(p) == []
    # A 9e6 student on 1e10 tokens (3.6e9 with logits counted): under a tenth of 1e8 (1e7 is not).
    p = recipes.fixed_teacher(PAPER, 3 * forward_flops(9e6) * 1e10, 1e8, teacher_loss=1.6, student_params=9e6)
    assert scope.problems(p) == [
        "N_S = 9e6 is under 1/10 of the smallest fitted params (1e8)",
        "L_T = 1.6 is more than 10% below the lowest fitted teacher loss (1.8)",
    ]


def test_a_fit_without_its_runs_cannot_vouch_for_a_recipe(tmp_path: Path) -> None:
    _, scope = load_distillation_scoped(fit_json(tmp_path, data=None))
    assert scope.problems(best()) == [
        "the fit JSON records no fitted runs ('data'), so how far the recipe extrapolates is unknown"]
    _, scope = load_distillation_scoped(fit_json(tmp_path, data={k: DATA[k] for k in ("params", "tokens")}))
    assert scope.problems(best()) == [
        "the fit JSON records no 'data.teacher_loss', so how far the recipe extrapolates is unknown"]


@pytest.mark.parametrize(("fields", "message"), [
    ({"at_bounds": "f1"}, "field 'at_bounds' must be a list of coefficient names"),
    ({"supervised_at_bounds": [1]}, "field 'supervised_at_bounds' must be a list"),
    ({"data": [1, 2]}, "field 'data' must be an object"),
    ({"data": {"params": [1e8, "x"]}}, r"field 'data.params' must be a non-empty list of positive numbers"),
    ({"data": {"tokens": [0.0]}}, r"field 'data.tokens' must be a non-empty list"),
    ({"data": {"teacher_loss": []}}, r"field 'data.teacher_loss' must be a non-empty list"),
])
def test_malformed_scope_fields_are_refused(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    spec = fit_json(tmp_path, **fields)
    with pytest.raises(FitError, match=f"{spec}: {message}"):
        load_distillation_scoped(spec)
