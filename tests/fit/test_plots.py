"""The run report's figures (`kdcache.fit.plots`), drawn from synthetic runs of known laws.

Each figure must be a PNG that decodes at the size asked for and is not blank, say in its
legend which law it drew (the paper's, labelled so, when none was fitted), and the
relative errors it prints must be the extrapolation check's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest

from kdcache.fit import plots
from kdcache.fit.errors import FitError
from kdcache.fit.laws import DistillationLaw, SupervisedLaw
from kdcache.fit.presets import PAPER_DISTILLATION, SUPERVISED_PRESETS
from kdcache.fit.synthetic import distillation_runs, supervised_runs

# A law unlike the paper's, so a legend naming the fitted law is told from the fallback.
SUPERVISED = SupervisedLaw(E=1.5, A=800.0, B=3000.0, alpha=0.35, beta=0.36, gamma=0.6)
DISTILLATION = DistillationLaw(**{**PAPER_DISTILLATION.to_dict(), "A": 1800.0}, supervised=SUPERVISED)
DPI = 120  # plots._save


def runs_of(sup_law: SupervisedLaw, dist_law: DistillationLaw, *, sup: int = 8, dist: int = 10,
            seed: int = 0) -> dict[str, Any]:
    """Synthetic supervised and distilled runs as one mapping of columns, with one supervised
    twin (the law's loss at equal N and D) for each distilled run."""
    s = supervised_runs(sup_law, sup, seed=seed)
    d = distillation_runs(dist_law, dist, seed=seed + 1)
    twins = np.asarray(sup_law.loss(d["params"], d["tokens"]))
    return {
        "kind": ["supervised"] * (sup + dist) + ["distill"] * (dist - 1) + ["online"],
        "params": np.concatenate([s["params"], d["params"], d["params"]]),
        "tokens": np.concatenate([s["tokens"], d["tokens"], d["tokens"]]),
        "loss": np.concatenate([s["loss"], twins, d["loss"]]),
        "teacher_loss": np.concatenate([np.full(sup + dist, np.nan), d["teacher_loss"]]),
    }


def decoded(path: Path, size: tuple[float, float]) -> np.ndarray:
    """The PNG's pixels, checked to be the figure size at DPI and not one flat colour."""
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (round(size[1] * DPI), round(size[0] * DPI))
    assert float(pixels[..., :3].std()) > 0.05
    return pixels


@pytest.mark.parametrize("fitted", [True, False], ids=["fitted", "not-fitted"])
def test_loss_vs_tokens(tmp_path: Path, fitted: bool) -> None:
    runs = runs_of(SUPERVISED, DISTILLATION)
    laws: dict[str, Any] = {"supervised": SUPERVISED, "distillation": DISTILLATION} if fitted else {}
    teachers = {"small": 2.6, "large": 2.3}
    labels = plots.loss_vs_tokens(runs, tmp_path / "f.png", teachers=teachers, **laws)
    decoded(tmp_path / "f.png", (12.5, 5))
    assert (plots.PAPER_LABEL + " (Eq. 1)" in labels) is not fitted
    assert (f"{plots.PAPER_LABEL} (Eq. 8), large" in labels) is not fitted
    assert ("fitted distillation law (Eq. 8), small" in labels) is fitted
    assert {"supervised student", "distilled from a store", "distilled online"} <= set(labels)
    # 18 sizes: curves at 6 supervised and 6 distilled ones, 9 in all here; a colour bar
    # instead of a legend entry per size.
    assert "curves at 9 of 18 sizes" in labels and not any(label.startswith("N = ") for label in labels)


def test_loss_vs_tokens_names_few_sizes_and_thins_many_teachers(tmp_path: Path) -> None:
    runs = runs_of(SUPERVISED, DISTILLATION, sup=2, dist=2)  # 4 sizes, 2 teachers
    labels = plots.loss_vs_tokens(runs, tmp_path / "f.png")
    decoded(tmp_path / "f.png", (12.5, 5))
    names = sorted(label for label in labels if label.startswith("N = "))
    assert names == sorted(f"N = {n:.3g} params" for n in set(runs["params"].tolist()))
    lts = sorted(set(runs["teacher_loss"][np.isfinite(runs["teacher_loss"])].tolist()))
    assert sum(f"{plots.PAPER_LABEL} (Eq. 8), L_T " in label for label in labels) == len(lts) == 2
    many = runs_of(SUPERVISED, DISTILLATION, dist=9)
    labels = plots.loss_vs_tokens(many, tmp_path / "g.png")
    assert sum("(Eq. 8), L_T " in label for label in labels) == plots.MAX_TEACHERS
    assert f"curves at {plots.MAX_TEACHERS} of 9 teachers' L_T" in labels


@pytest.mark.parametrize("fitted", [True, False], ids=["fitted", "not-fitted"])
def test_capacity_gap_runs(tmp_path: Path, fitted: bool) -> None:
    runs = runs_of(SUPERVISED, DISTILLATION)
    laws: dict[str, Any] = {"supervised": SUPERVISED, "distillation": DISTILLATION} if fitted else {}
    labels = plots.capacity_gap_runs(runs, tmp_path / "f.png", **laws)
    decoded(tmp_path / "f.png", (8, 5.2))
    sizes = [label for label in labels if label.startswith("N = ")]
    assert len(sizes) == plots.MAX_SIZES and "curves at 6 of 10 sizes" in labels  # each run its own size
    law = "fitted distillation law" if fitted else plots.PAPER_LABEL
    assert f"solid: {law} (Eq. 8) at that N, D" in labels
    assert all(label.endswith("(dotted: supervised run)") for label in sizes)  # the twins are found
    # Without twins the reference is the supervised law's value, named as such.
    keep = np.asarray(runs["kind"]) != "supervised"
    alone = {k: np.asarray(v)[keep] for k, v in runs.items()}
    labels = plots.capacity_gap_runs(alone, tmp_path / "g.png", **laws)
    sup = "fitted supervised law" if fitted else plots.PAPER_LABEL
    assert all(label.endswith(f"(dotted: supervised, {sup})") for label in labels if label.startswith("N = "))


def agreement(law: SupervisedLaw, seed: int) -> tuple[plots.Agreement, dict[str, Any]]:
    """Observed: synthetic runs of `law`; predicted: the law itself; the lowest 20% held out,
    with an 'extrapolation' 3% high."""
    runs = supervised_runs(law, 30, seed=seed)
    pred = np.asarray(law.loss(runs["params"], runs["tokens"]))
    held = runs["loss"] < np.quantile(runs["loss"], 0.2)
    extrapolated = np.where(held, pred * 1.03, np.nan)
    return plots.Agreement(title="t", observed=runs["loss"], predicted=pred, held_out=held,
                           extrapolated=extrapolated, threshold=float(np.quantile(runs["loss"], 0.2))), runs


def test_agreement_errors_are_the_checks() -> None:
    a, runs = agreement(SUPERVISED, 5)
    rel = np.abs(a.predicted - a.observed) / a.observed
    errors = a.errors()
    assert errors["fitted"] == pytest.approx((rel[~a.held_out].mean(), rel[~a.held_out].max()), rel=1e-12)
    held = np.abs(a.extrapolated - a.observed)[a.held_out] / a.observed[a.held_out]
    assert errors["held_out"] == pytest.approx((held.mean(), held.max()), rel=1e-12)
    assert 0.02 < errors["held_out"][0] < 0.04  # 3% high, less the runs' 0.3% noise
    # A law's own predictions: nothing held out, errors at the noise level (0.3%).
    of_law = plots.Agreement.of_law("t", SUPERVISED, runs)
    assert not of_law.held_out.any() and of_law.errors()["held_out"] is None
    assert of_law.errors()["fitted"][0] < 0.005


def test_predicted_vs_observed(tmp_path: Path) -> None:
    sup, _ = agreement(SUPERVISED, 1)
    runs = runs_of(SUPERVISED, DISTILLATION)
    distilled = {k: np.asarray(v)[np.isfinite(runs["teacher_loss"])] for k, v in runs.items()}
    paper = plots.Agreement.of_law(f"Eq. 8: {plots.PAPER_LABEL}", PAPER_DISTILLATION, distilled)
    labels = plots.predicted_vs_observed([sup, paper], tmp_path / "f.png")
    decoded(tmp_path / "f.png", (12, 5.2))
    held = sup.errors()["held_out"]
    assert held is not None
    mean, worst = held
    assert any(label.startswith("held out (loss < ") and f"mean {100 * mean:.2f}%, max {100 * worst:.2f}%"
               in label for label in labels)
    assert labels.count("y = x (perfect prediction)") == 2
    # A check that did not run: held-out runs drawn at the full fit's prediction, said so.
    unchecked = plots.Agreement(title="t", observed=sup.observed, predicted=sup.predicted,
                                held_out=sup.held_out, extrapolated=np.full(len(sup.observed), np.nan))
    labels = plots.predicted_vs_observed([unchecked], tmp_path / "g.png")
    decoded(tmp_path / "g.png", (6, 5.2))
    assert any("check not run" in label for label in labels)


def test_predictions_far_off_are_counted_not_drawn(tmp_path: Path) -> None:
    runs = runs_of(SUPERVISED, DISTILLATION)
    far = plots.Agreement.of_law("t", SupervisedLaw(E=100.0, A=1.0, B=1.0, alpha=0.3, beta=0.3), runs)
    labels = plots.predicted_vs_observed([far], tmp_path / "f.png")
    assert f"{len(runs['loss'])} predictions off the axes" in labels


def test_missing_laws_and_empty_runs_raise_nothing(tmp_path: Path) -> None:
    empty: dict[str, Any] = {"kind": [], "params": [], "tokens": [], "loss": [], "teacher_loss": []}
    plots.loss_vs_tokens(empty, tmp_path / "a.png")
    plots.capacity_gap_runs(empty, tmp_path / "b.png")
    plots.predicted_vs_observed([plots.Agreement.of_law("t", SUPERVISED_PRESETS["paper"], empty)],
                                tmp_path / "c.png")
    supervised_only = supervised_runs(SUPERVISED, 5)
    plots.loss_vs_tokens(supervised_only, tmp_path / "d.png")  # no kind column: all supervised
    plots.capacity_gap_runs(supervised_only, tmp_path / "e.png")
    for name in "abcde":
        matplotlib.image.imread(tmp_path / f"{name}.png")


def test_bad_columns_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FitError, match="column 'tokens' has 2 values, 'loss' 3"):
        plots.loss_vs_tokens({"params": [1e8] * 3, "tokens": [1e9] * 2, "loss": [3.0] * 3},
                             tmp_path / "f.png")
    with pytest.raises(FitError, match="differ in length"):
        plots.Agreement(title="t", observed=np.ones(3), predicted=np.ones(3), held_out=np.zeros(2, bool),
                        extrapolated=np.ones(3))
