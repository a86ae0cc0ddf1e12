"""The cost model on cases computed by hand (context = vocab = 0 makes F(N) = 2N exactly)."""

from __future__ import annotations

import dataclasses

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
    assert out["online_gpu_hours"] == pytest.approx(1.04e20 / 5e14 / 3600)
    assert out["gpus"] == 8 and out["online_wall_hours"] == pytest.approx(out["online_gpu_hours"] / 8)
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
    with pytest.raises(FitError, match="gpus must be >= 1"):
        cost.Hardware(gpus=0)


def test_more_gpus_shorten_the_wall_time_not_the_gpu_hours() -> None:
    one, many = (cost.estimate(1e9, [1e8] * 4, 1e10, bytes_per_token=100.0,
                               hardware=dataclasses.replace(HW, gpus=g), **PLAIN) for g in (1, 16))
    assert many.online_gpu_hours == one.online_gpu_hours and many.cache_gpu_hours == one.cache_gpu_hours
    assert many.online_cost == one.online_cost and many.cache_cost == one.cache_cost
    assert one.online_wall_hours == one.online_gpu_hours == pytest.approx(1.04e20 / 5e14 / 3600)
    assert many.online_wall_hours == pytest.approx(one.online_wall_hours / 16)
    assert many.cache_wall_hours == pytest.approx(one.cache_wall_hours / 16)


def test_predicted_times_from_the_hardware_by_hand() -> None:
    # 5e14 FLOP/s, 1e8 B/s: online 1e10 x (6e8 + 2e9) / 5e14 = 52 s; offline 1e10 x 6e8 / 5e14
    # = 12 s plus 1e10 x 100 / 1e8 = 1e4 s of reads; the cache 2e19 / 5e14 = 4e4 s plus 1e4 s of writes.
    out = cost.estimate(1e9, [1e8, 4e8], 1e10, bytes_per_token=100.0, hardware=HW, **PLAIN)
    assert out.predicted_s.online_student == pytest.approx((5.2e4, 8.8e4))  # 4e8: 4.4e19 / 5e14
    assert out.predicted_s.offline_student == pytest.approx((1.2e4 + 1e4, 4.8e4 + 1e4))
    assert out.predicted_s.cache == pytest.approx(4e4 + 1e4)
    assert out.calibrated is False and out.flops_per_s == pytest.approx(5e14)
    assert out.time_model.calibrated == () and out.time_model.startup_s == 0.0


def test_estimate_json_keeps_the_compare_keys() -> None:
    legacy = cost.compare(1e9, [1e8], 1e10, bytes_per_token=100.0, hardware=HW, **PLAIN)
    out = cost.estimate(1e9, [1e8], 1e10, bytes_per_token=100.0, hardware=HW, **PLAIN).to_json()
    assert {k: out[k] for k in legacy} == legacy
    assert set(out["predicted_s"]) == {"online_student", "offline_student", "cache"}
    assert "online_hours" not in out  # GPU-hours, named so
    assert (out["peak_flops"], out["utilisation"], out["price_per_gpu_hour"]) == (1e15, 0.5, 2.0)
    assert out["time_model"]["source"] == "hardware"
    import json

    assert json.loads(json.dumps(out)) == out  # plain JSON types only


def test_a_calibrated_time_model_by_hand() -> None:
    model = cost.TimeModel(startup_s=3.0, s_per_train_flop=1e-12, s_per_teacher_flop=2e-12,
                           s_per_read_byte=1e-9, s_per_cache_flop=5e-13, s_per_write_byte=2e-9,
                           calibrated=("startup", "student_steps"))
    out = cost.estimate(1e9, [1e8], 1e10, bytes_per_token=100.0, hardware=HW, time_model=model, **PLAIN)
    # student 6e18 x 1e-12 = 6e6 s; teacher 2e19 x 2e-12 = 4e7 s; reads 1e12 x 1e-9 = 1e3 s.
    assert out.predicted_s.online_student == pytest.approx((3.0 + 6e6 + 4e7,))
    assert out.predicted_s.offline_student == pytest.approx((3.0 + 6e6 + 1e3,))
    assert out.predicted_s.cache == pytest.approx(2e19 * 5e-13 + 1e12 * 2e-9)
    # Hours count FLOPs at the calibrated training rate, 1e12 FLOP/s.
    assert out.flops_per_s == pytest.approx(1e12) and out.calibrated is True
    assert out.online_gpu_hours == pytest.approx(2.6e19 / 1e12 / 3600)
    free = dataclasses.replace(model, s_per_read_byte=0.0)
    assert free.to_json()["read_bytes_per_s"] is None  # a free term: no infinite rate in JSON


def test_the_per_token_overhead_adds_to_every_training_run_not_the_cache() -> None:
    model = cost.TimeModel(startup_s=3.0, s_per_token=1e-4, s_per_train_flop=1e-12, s_per_teacher_flop=2e-12,
                           s_per_read_byte=1e-9, s_per_cache_flop=5e-13, s_per_write_byte=2e-9)
    out = cost.estimate(1e9, [1e8], 1e10, bytes_per_token=100.0, hardware=HW, time_model=model, **PLAIN)
    # 1e10 tokens x 1e-4 s = 1e6 s on top of the by-hand times above; the cache job pays none.
    assert out.predicted_s.online_student == pytest.approx((3.0 + 1e6 + 6e6 + 4e7,))
    assert out.predicted_s.offline_student == pytest.approx((3.0 + 1e6 + 6e6 + 1e3,))
    assert model.supervised_s(1e8, 1e10, **PLAIN) == pytest.approx(3.0 + 1e6 + 6e6)
    assert out.predicted_s.cache == pytest.approx(2e19 * 5e-13 + 1e12 * 2e-9)
    assert out.to_json()["time_model"]["overhead_s_per_token"] == 1e-4
    # All the steps' time in the overhead: hours fall back to peak x utilisation, not 1 / 0.
    flopless = dataclasses.replace(model, s_per_train_flop=0.0)
    assert cost.estimate(1e9, [1e8], 1e10, bytes_per_token=100.0, hardware=HW, time_model=flopless,
                         **PLAIN).flops_per_s == pytest.approx(HW.flops_per_s)


def test_cli_json_has_predicted_times(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from kdcache.pipeline.cli import main

    assert main(["cost", "--teacher-params", "1e9", "--student-params", "1e8,4e8", "--tokens", "1e10",
                 "--peak-flops", "1e15", "--utilisation", "0.5", "--read-bandwidth", "1e8",
                 "--bytes-per-token", "100", "--context", "0", "--vocab", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predicted_s"]["offline_student"] == pytest.approx([2.2e4, 5.8e4])
    assert out["predicted_s"]["cache"] == pytest.approx(5e4)
    assert main(["cost", "--teacher-params", "1e9", "--student-params", "1e8", "--tokens", "1e10"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("1 student, store 2.68 TB") and "1 students" not in text
    assert "predicted time per run, from peak x utilisation" in text
    assert "assumed: 3.96e+14 FLOP/s per GPU (peak 9.89e+14 x utilisation 0.4), $2.5 per GPU-hour" in text
    # 1e10 tokens x (3 F(1e8) + F(1e9)) FLOPs at 3.956e14 FLOP/s: the GPU-hours, and an eighth of them.
    from kdcache.fit.flops import forward_flops

    flops = 1e10 * (3 * forward_flops(1e8) + forward_flops(1e9))
    gpu_hours = flops / (989e12 * 0.4) / 3600
    assert f"online: {flops:.3g} FLOPs, {gpu_hours:.4g} GPU-hours ({gpu_hours / 8:.4g} h on 8 GPUs)" in text
    assert " s;" not in text and "accelerator" not in text
