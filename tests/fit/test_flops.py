"""F(N) against the paper's check value, and the Eq. 9 budget split."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.fit.flops import (
    distillation_flops,
    forward_flops,
    forward_flops_2n,
    training_flops,
    training_flops_6nd,
)


def test_forward_flops_matches_paper_check() -> None:
    assert forward_flops(143e6, context=4096, vocab=32768) == pytest.approx(0.446e9, rel=2e-3)


def test_two_n_rule_is_36_percent_low_at_143m() -> None:
    assert 1 - forward_flops_2n(143e6) / forward_flops(143e6) == pytest.approx(0.36, abs=0.005)


def test_vectorised_and_scalar_agree() -> None:
    n = np.array([1e7, 143e6, 7e9])
    assert np.allclose(forward_flops(n), [forward_flops(float(x)) for x in n])
    assert isinstance(forward_flops(1e9), float)


def test_large_models_approach_2n() -> None:
    assert forward_flops(1e13) / forward_flops_2n(1e13) == pytest.approx(1.0, abs=0.01)


def test_training_is_three_forwards_and_6nd_shortcut() -> None:
    assert training_flops(1e9, 2e10) == pytest.approx(3 * forward_flops(1e9) * 2e10)
    assert training_flops_6nd(1e9, 2e10) == pytest.approx(1.2e20)


def test_distillation_budget_terms() -> None:
    f_s, f_t = forward_flops(1e8), forward_flops(1e9)
    total = distillation_flops(1e8, 1e10, 1e9, 2e10, logits=1.0, pretraining=1.0)
    assert total == pytest.approx(3 * f_s * 1e10 + f_t * (1e10 + 3 * 2e10))
    best = distillation_flops(1e8, 1e10, 1e9, 2e10, logits=0.0, pretraining=0.0)
    assert best == pytest.approx(3 * f_s * 1e10)
