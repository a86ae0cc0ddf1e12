"""`kdcache plan` and `kdcache cost --compute` through the command line: a given teacher, recipes
on a search bound, laws not identified for a recipe, and one answer from both verbs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kdcache.fit import recipes
from kdcache.fit.presets import PAPER_DISTILLATION as PAPER
from kdcache.pipeline.cli import main
from kdcache.pipeline.study.cost import CostQuery, estimate_cost

USER = ["--teacher-params", "7e9", "--teacher-tokens", "2e12", "--student-params", "1e9", "--compute", "1e21"]
"""The practitioner's question: a 7B teacher (2T tokens), a 1B student, 1e21 FLOPs."""


def run(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 0) -> tuple[str, str]:
    assert main(argv) == code
    out, err = capsys.readouterr()
    return out, err


def as_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    out, err = run(capsys, [*argv, "--json"])
    assert err == ""
    return json.loads(out)


def fit_json(tmp_path: Path, **fields: Any) -> str:
    data = {"params": [1e8, 1e10], "tokens": [1e9, 5e12], "teacher_loss": [1.8, 3.1]}
    doc = {"law": "distillation", "params": PAPER.to_dict(), "supervised": PAPER.supervised.to_dict(),
           "at_bounds": [], "data": data, **fields}
    path = tmp_path / "distill_fit.json"
    path.write_text(json.dumps(doc))
    return str(path)


# --- a given teacher ----------------------------------------------------------------------------


def test_a_given_teacher_shows_both_accountings(capsys: pytest.CaptureFixture[str]) -> None:
    out = as_json(capsys, ["plan", *USER])
    expected = recipes.fixed_teacher(PAPER, 1e21, 7e9, teacher_tokens=2e12, student_params=1e9).to_json()
    assert {k: v for k, v in out.items() if k not in ("law", "extrapolated")} == expected
    assert out["teacher"] == {"params": 7e9, "tokens": 2e12, "loss": PAPER.supervised.loss(7e9, 2e12)}
    assert set(out["accountings"]) == {"logits_free", "logits_counted"}
    assert out["extrapolated"] == [] and out["law"] == "paper"
    text, _ = run(capsys, ["plan", *USER])
    assert "teacher logits free (cached already): student 1.36e+11 tokens" in text
    assert "student loss 2.1970 distilled vs 2.2215 supervised on 1.36e+11 tokens -> distil" in text
    assert "teacher logits counted in the budget: student 4.39e+10 tokens" in text
    assert "student loss 2.2357 distilled vs 2.2215 supervised on 1.36e+11 tokens -> train supervised" in text


GIVEN = ["--teacher-params", "7e9", "--teacher-loss", "2", "--student-params", "1e9"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--teacher-params", "7e9", "--student-params", "1e9"], "exactly one of --teacher-tokens D_T"),
    ([*GIVEN, "--teacher-tokens", "2e12"], "exactly one of"),
    (["--teacher-tokens", "2e12", "--student-params", "1e9"], "--teacher-tokens describes a given teacher"),
    (["--teacher-params", "7e9", "--teacher-loss", "2"], "required: --student-params"),
    ([*GIVEN, "--scenario", "best"], "--scenario chooses the teacher"),
    (["--teacher-params", "7e9", "--teacher-loss", "-2", "--student-params", "1e9"],
     "--teacher-loss must be positive and finite"),
    ([*GIVEN, "--plot", "x.png"], "--plot draws the four scenarios"),
    (["--student-params", "1e9", "--students", "0"], "--students must be >= 1"),
    (["--teacher-params", "1e18", "--teacher-loss", "2", "--student-params", "1e9"],
     "more than the bound N_T"),
])
def test_plan_refusals_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    _, err = run(capsys, ["plan", "--compute", "1e21", *argv], code=1)
    assert err.count("\n") == 1 and err.startswith("kdcache plan: error: ") and message in err


# --- recipes on a search bound ------------------------------------------------------------------


def test_the_inference_recipe_says_its_teacher_tokens_sit_on_the_bound(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["plan", "--law", "paper", "--student-params", "1e9", "--compute", "1e21", "--no-crossover",
            "--scenario", "inference"]
    out = as_json(capsys, argv)
    assert out["teacher_tokens"] == pytest.approx(1e17, rel=1e-9)
    assert out["at_bounds"] == ["D_T = 1e17 (upper search bound)"]
    text, _ = run(capsys, argv)
    assert "  at a search bound: D_T = 1e17 (upper search bound); the optimum lies beyond it\n" in text
    assert as_json(capsys, [*argv[:-1], "best"])["at_bounds"] == []


# --- laws not identified for the recipe -----------------------------------------------------------


def test_a_law_with_a_coefficient_on_its_bound_gives_no_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    law = fit_json(tmp_path, at_bounds=["f1"])
    argv = ["plan", "--law", law, "--student-params", "1e9", "--compute", "1e21", "--no-crossover"]
    out, err = run(capsys, argv, code=1)
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"kdcache plan: error: {law}: no recipe: the law is not identified for it: "
                          "f1 is on its search bound (the runs do not pin it); --extrapolate plans anyway")
    out, err = run(capsys, [*argv, "--extrapolate"])
    assert out.startswith("scenario best, compute 1e+21 FLOPs")
    assert err.count("\n") == 1 and err.startswith(f"kdcache plan: warning: {law}: ")
    assert "f1 is on its search bound" in err
    planned = json.loads(run(capsys, [*argv, "--extrapolate", "--json"])[0])
    assert planned["extrapolated"] == ["f1 is on its search bound (the runs do not pin it)"]
    assert planned["student_loss"] == recipes.distillation_optimal(PAPER, 1e9, 1e21, "best").student_loss
    # The same law without the bound, planning inside its runs: a recipe, nothing extrapolated.
    assert as_json(capsys, [*argv[:2], fit_json(tmp_path), *argv[3:]])["extrapolated"] == []


def test_a_recipe_far_outside_the_fitted_runs_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    tiny = {"params": [1e5, 4e5], "tokens": [1e7, 1e8], "teacher_loss": [4.0, 5.0]}
    law = fit_json(tmp_path, data=tiny)
    argv = ["cost", "--law", law, "--student-params", "1e9", "--compute", "1e21", "--scenario", "inference"]
    _, err = run(capsys, argv, code=1)
    assert err.startswith(f"kdcache cost: error: {law}: no recipe") and err.count("\n") == 1
    assert "N_S = 1e9 is over 10x the largest fitted params (4e5)" in err
    assert "L_T = 2.036 is more than 10% below the lowest fitted teacher loss (4)" in err
    _, err = run(capsys, [*argv, "--extrapolate"])
    assert err.startswith("kdcache cost: warning: ")


# --- one answer from plan and cost --------------------------------------------------------------


@pytest.mark.parametrize("question", [
    ["--student-params", "1e9", "--compute", "1e21", "--scenario", "inference"],
    USER,
])
def test_plan_with_students_and_cost_with_compute_give_one_answer(
    capsys: pytest.CaptureFixture[str], question: list[str],
) -> None:
    planned = as_json(capsys, ["plan", *question, "--students", "4", "--no-crossover"])
    costed = as_json(capsys, ["cost", *question, "--students", "4"])
    assert planned == costed
    assert run(capsys, ["plan", *question, "--students", "4", "--no-crossover"]) == run(
        capsys, ["cost", *question, "--students", "4"])
    # Each cost is the cost model's for the plan's own teacher, M students and tokens.
    rows = planned["accountings"].values() if "accountings" in planned else [planned]
    for row in rows:
        n_t = planned["teacher"]["params"] if "teacher" in planned else planned["teacher_params"]
        by_hand = estimate_cost(CostQuery(teacher_params=n_t, student_params=(1e9,) * 4,
                                          tokens=row["student_tokens"]))
        assert row["cost"] == by_hand.to_json()


def test_gpus_scale_the_wall_time_not_the_gpu_hours(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", *USER, "--students", "4"]
    one, node = (as_json(capsys, [*argv, "--gpus", g])["accountings"]["logits_counted"]["cost"]
                 for g in ("1", "8"))
    for key in ("online_gpu_hours", "cache_gpu_hours", "online_cost", "cache_cost", "online_flops"):
        assert one[key] == node[key]
    assert (one["gpus"], node["gpus"]) == (1, 8)
    assert one["online_wall_hours"] == one["online_gpu_hours"]
    assert node["online_wall_hours"] == pytest.approx(one["online_wall_hours"] / 8, rel=1e-12)
    assert node["cache_wall_hours"] == pytest.approx(one["cache_wall_hours"] / 8, rel=1e-12)
    argv = ["cost", "--teacher-params", "7e9", "--student-params", "1e9", "--tokens", "1e10", "--gpus", "16"]
    out = as_json(capsys, argv)
    assert out["online_wall_hours"] == pytest.approx(out["online_gpu_hours"] / 16, rel=1e-12)
    hours = out["online_gpu_hours"]
    assert 16 < hours < 48 * 16  # printed in hours, without days
    assert f"{hours:.4g} GPU-hours ({hours / 16:.4g} h on 16 GPUs)" in run(capsys, argv)[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["--teacher-params", "7e9", "--student-params", "1e9"], "give one of --tokens D"),
    (["--student-params", "1e9", "--tokens", "1e11", "--compute", "1e21"], "give one of --tokens D"),
    (["--teacher-params", "7e9", "--student-params", "1e9", "--tokens", "1e11", "--law", "paper"],
     "--law plans the run: use it with --compute"),
    (["--teacher-params", "7e9", "--student-params", "1e9", "--tokens", "1e11", "--extrapolate"],
     "--extrapolate plans the run"),
    (["--student-params", "1e9", "--tokens", "1e11"], "--teacher-params is required with --tokens"),
    (["--student-params", "1e9,1e8", "--compute", "1e21"], "--compute plans one student size, got 2"),
    (["--student-params", "1e9", "--compute", "1e21", "--plot", "c.png"], "--plot draws the cost of"),
    (["--student-params", "1e9", "--compute", "1e21", "--gpus", "0"], "--gpus must be >= 1"),
])
def test_cost_refusals_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    _, err = run(capsys, ["cost", *argv], code=1)
    assert err.count("\n") == 1 and err.startswith("kdcache cost: error: ") and message in err
