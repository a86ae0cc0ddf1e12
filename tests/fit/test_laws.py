"""The laws against the paper's sanity values (Busbridge et al. 2025) and their limits."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.fit.errors import FitError
from kdcache.fit.laws import DistillationLaw, SupervisedLaw
from kdcache.fit.presets import PAPER_DISTILLATION, SUPERVISED_PRESETS

PAPER = SUPERVISED_PRESETS["paper"]


def test_paper_teacher_sanity_value() -> None:
    assert PAPER.loss(7.75e9, 20 * 7.75e9) == pytest.approx(2.004, abs=1e-3)


@pytest.mark.parametrize(("n", "student", "supervised"), [(1.82e9, 2.183, 2.251), (198e6, 2.544, 2.789)])
def test_paper_student_sanity_values(n: float, student: float, supervised: float) -> None:
    teacher = PAPER.loss(7.75e9, 20 * 7.75e9)
    assert PAPER_DISTILLATION.loss(n, 20 * n, teacher) == pytest.approx(student, abs=1e-3)
    assert PAPER.loss(n, 20 * n) == pytest.approx(supervised, abs=1e-3)


def test_chinchilla_form_is_gamma_one() -> None:
    law = SUPERVISED_PRESETS["epoch"]
    n, d = np.array([1e8, 1e10]), np.array([2e9, 2e11])
    expected = law.E + law.A / n**law.alpha + law.B / d**law.beta
    assert np.allclose(law.loss(n, d), expected, rtol=1e-12)


def test_student_approaches_teacher_when_teacher_is_weak_or_student_huge() -> None:
    weak = PAPER_DISTILLATION.loss(1e9, 2e10, 4.0)
    assert weak == pytest.approx(4.0, rel=1e-6)
    huge = PAPER_DISTILLATION.loss(1e15, 1e17, 2.0)
    assert huge == pytest.approx(2.0, rel=1e-3)


def test_capacity_gap_has_an_interior_best_teacher() -> None:
    lt = np.linspace(1.3, 4.0, 500)
    ls = PAPER_DISTILLATION.loss(1e8, 2e9, lt)
    best = int(np.argmin(ls))
    assert 0 < best < len(lt) - 1


def test_round_trip_and_validation() -> None:
    again = DistillationLaw.from_dict(PAPER_DISTILLATION.to_dict(), PAPER)
    assert again == PAPER_DISTILLATION
    with pytest.raises(FitError, match="missing"):
        SupervisedLaw.from_dict({"E": 1.0})
    with pytest.raises(FitError, match="positive"):
        SupervisedLaw(E=-1.0, A=1.0, B=1.0, alpha=0.3, beta=0.3)
