"""The cost model on cases computed by hand (context = vocab = 0 makes F(N) = 2N exactly)."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.fit import cost
from kdcache.fit.errors import FitError

PLAIN = {"context": 0, "vocab": 0}  # F(N) = 2N
HW = cost.Hardware(
    peak_flops=1e15,
    utilisation=0.5,
    price_per_hour=2.0,
    storage_per_tb_month=10.0,
    read_bandwidth=1e8,
    months=1.0,
)


def test_four_students_by_hand() -> None:
    # teacher pass 2e9 * 1e10 = 2e19; each student 3 * 2e8 * 1e10 = 6e18; 5e14 FLOP/s.
    out = cost.compare(1e9, [1e8] * 4, 1e10, bytes_per_token=100.0, hardware=HW, **PLAIN)
    assert out["online_flops"] == pytest.approx(4 * (6e18 + 2e19))
    assert out["cache_flops"] == pytest.approx(4 * 6e18 + 2e19)
    assert out["online_hours"] == pytest.approx(1.04e20 / 5e14 / 3600)
    assert out["online_cost"] == pytest.approx(2.0 * 1.04e20 / 5e14 / 3600)
    assert out["store_bytes"] == pytest.approx(1e12)
    assert out["storage_cost"] == pytest.approx(10.0)  # 1 TB for 1 month
    assert out["cache_cost"] == pytest.approx(2.0 * 4.4e19 / 5e14 / 3600 + 10.0)
    # one teacher pass costs $22.22; storage $10: the second student pays for the cache.
    assert out["break_even_students"] == 2
    assert out["read_bandwidth_needed"] == pytest.approx(5e14 / 6e8 * 100.0)  # 83.3 MB/s
    assert out["read_bandwidth_ok"] is True


def test_expensive_storage_moves_break_even() -> None:
    hw = cost.Hardware(
        peak_flops=1e15,
        utilisation=0.5,
        price_per_hour=2.0,
        storage_per_tb_month=100.0,
        months=3.0,
        read_bandwidth=1e7,
    )
    out = cost.compare(1e9, [1e8], 1e10, bytes_per_token=100.0, hardware=hw, **PLAIN)
    assert out["storage_cost"] == pytest.approx(300.0)
    assert out["break_even_students"] == 15  # ceil(1 + 300 / 22.22)
    assert out["read_bandwidth_ok"] is False
    assert out["online_flops"] == pytest.approx(out["cache_flops"])  # equal at M = 1


def test_mixed_students_and_bandwidth_of_the_smallest() -> None:
    out = cost.compare(1e9, [1e8, 4e8], 1e10, bytes_per_token=50.0, hardware=HW, **PLAIN)
    assert out["cache_flops"] == pytest.approx(6e18 + 2.4e19 + 2e19)
    assert out["read_bandwidth_needed"] == pytest.approx(5e14 / 6e8 * 50.0)


def test_topk_bytes_per_token() -> None:
    assert cost.topk_bytes_per_token(64, 32768) == 64 * (2 + 2) + 12
    assert cost.topk_bytes_per_token(64, 100_000) == 64 * (4 + 2) + 12


def test_calibration_from_runs() -> None:
    flops = cost.calibrated_flops_per_s(
        np.array([1e8, 1e8, 2e8]), np.array([1000.0, 3000.0, np.nan]), **PLAIN
    )
    assert flops == pytest.approx(np.median([6e11, 1.8e12]))
    with pytest.raises(FitError, match="tokens_per_s"):
        cost.calibrated_flops_per_s(np.array([1e8]), np.array([0.0]))


def test_bad_inputs() -> None:
    with pytest.raises(FitError):
        cost.compare(1e9, [], 1e10, bytes_per_token=1.0)
    with pytest.raises(FitError):
        cost.Hardware(utilisation=1.5)
