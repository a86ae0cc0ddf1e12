"""The time model's calibration: known rates back from rows a known model generated, and the
runs table and stores it reads (real Parquet tables and real stores, no training)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from kdcache import storage
from kdcache.fit import cost
from kdcache.fit.errors import FitError
from kdcache.fit.flops import forward_flops
from kdcache.pipeline.study.cost import CostQuery, calibrate, estimate_cost, read_timings
from kdcache.storage.errors import StoreError
from kdcache.storage.runs import RunRow, append_run
from tests.storage.conftest import make_meta, make_rows, shard_of

SHAPE = {"rho": 32.0, "context": 64.0, "vocab": 1024.0}
TRUE = cost.TimeModel(startup_s=1.5, s_per_train_flop=1 / 2e10, s_per_teacher_flop=1 / 3e10,
                      s_per_read_byte=1 / 5e6, s_per_cache_flop=1 / 4e10, s_per_write_byte=1 / 2e7)
OVERHEAD = dataclasses.replace(TRUE, s_per_token=2e-4)
"""TRUE plus 0.2 ms a trained token whatever the size: at 4e5 parameters about as much as the FLOPs."""


def _runs(model: cost.TimeModel, noise: float = 0.0, seed: int = 0) -> list[cost.TimedRun]:
    """Supervised, offline and online runs at two sizes and two budgets, timed by `model`."""
    rng = np.random.default_rng(seed)
    runs = []
    for n in (4e5, 1.3e6):
        for tokens in (3e4, 9e4):
            for kind in ("supervised", "distill", "online"):
                run = cost.TimedRun(kind=kind, params=n, tokens=tokens, wall_s=1.0, teacher_params=3e6,
                                    bytes_per_token=150.0, **SHAPE)
                wall = model.run_s(run) * (1.0 + noise * rng.standard_normal())
                runs.append(dataclasses.replace(run, wall_s=wall))
    return runs


def _cache(model: cost.TimeModel) -> list[cost.CacheTiming]:
    """Cache jobs of two teachers and two store formats, so forward and write are separable."""
    jobs = []
    for teacher, bpt, tokens in ((3e6, 150.0, 3e4), (3e6, 150.0, 6e4), (1e7, 400.0, 5e4)):
        job = cost.CacheTiming(label=f"s{teacher}-{tokens}", teacher_params=teacher, tokens=tokens,
                               seconds=1.0, bytes_per_token=bpt, **SHAPE)
        jobs.append(dataclasses.replace(job, seconds=model.timing_s(job)))
    return jobs


def test_recovers_known_rates_exactly() -> None:
    fitted = cost.fit_time_model(_runs(TRUE), _cache(TRUE))
    assert fitted.calibrated == cost.TERMS
    for name in ("startup_s", "s_per_train_flop", "s_per_teacher_flop", "s_per_read_byte",
                 "s_per_cache_flop", "s_per_write_byte"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name
    assert fitted.rel_rms == pytest.approx(0.0, abs=1e-9)
    assert fitted.runs == 12 and fitted.cache_jobs == 3


def test_recovers_rates_through_two_percent_noise() -> None:
    fitted = cost.fit_time_model(_runs(TRUE, noise=0.02, seed=1), _cache(TRUE))
    assert fitted.s_per_train_flop == pytest.approx(TRUE.s_per_train_flop, rel=0.05)
    assert fitted.s_per_teacher_flop == pytest.approx(TRUE.s_per_teacher_flop, rel=0.05)
    assert fitted.s_per_read_byte == pytest.approx(TRUE.s_per_read_byte, rel=0.25)
    assert 0.005 < fitted.rel_rms < 0.04  # the fit sees the noise, no more
    # What matters is the time: a larger student's online run within 3%.
    args = (4e6, 3e6, 2e5)
    assert fitted.online_s(*args, **SHAPE) == pytest.approx(TRUE.online_s(*args, **SHAPE), rel=0.03)


def test_one_teacher_folds_the_write_into_the_forward() -> None:
    jobs = [j for j in _cache(TRUE) if j.teacher_params == 3e6]
    fitted = cost.fit_time_model(_runs(TRUE), jobs)
    assert "store_write" not in fitted.calibrated and "cache_teacher" in fitted.calibrated
    assert any("folded" in note for note in fitted.notes)
    # Per token: F(N_T) x s + 150 x s_write, all in the forward's rate.
    per_token = forward_flops(3e6, **SHAPE) * TRUE.s_per_cache_flop + 150.0 * TRUE.s_per_write_byte
    assert fitted.s_per_cache_flop * forward_flops(3e6, **SHAPE) == pytest.approx(per_token, rel=1e-6)
    assert fitted.cache_s(3e6, 1e6, 150.0, **SHAPE) == pytest.approx(TRUE.cache_s(3e6, 1e6, 150.0, **SHAPE))


def test_one_size_and_budget_leaves_start_up_at_zero() -> None:
    no_startup = dataclasses.replace(TRUE, startup_s=0.0)
    runs = [r for r in _runs(no_startup) if r.tokens == 3e4 and r.params == 4e5]
    fitted = cost.fit_time_model(runs)
    assert "startup" not in fitted.calibrated and fitted.startup_s == 0.0
    assert fitted.s_per_train_flop == pytest.approx(TRUE.s_per_train_flop, rel=1e-6)
    # No cache jobs: the cache forward falls back to the fitted teacher rate, writes to the read bandwidth.
    assert fitted.s_per_cache_flop == fitted.s_per_teacher_flop
    assert fitted.s_per_write_byte == pytest.approx(1 / cost.Hardware().read_bandwidth)


def test_uncalibrated_terms_fall_back() -> None:
    runs = [r for r in _runs(TRUE) if r.kind == "supervised"]
    fitted = cost.fit_time_model(runs, fallback=cost.Hardware(read_bandwidth=1e9))
    assert fitted.calibrated == ("startup", "token_overhead", "student_steps")
    assert fitted.s_per_token == pytest.approx(0.0, abs=1e-12)  # two sizes pin it, at its true 0
    assert fitted.s_per_teacher_flop == fitted.s_per_train_flop
    assert fitted.s_per_read_byte == pytest.approx(1e-9)
    assert len(fitted.notes) == 3  # teacher forward, store reads, cache job


def test_recovers_a_known_overhead_and_flop_rate_from_two_sizes() -> None:
    fitted = cost.fit_time_model(_runs(OVERHEAD), _cache(OVERHEAD))
    assert fitted.calibrated == cost.TERMS and fitted.rel_rms == pytest.approx(0.0, abs=1e-9)
    assert fitted.s_per_token == pytest.approx(2e-4, rel=1e-6)
    assert fitted.s_per_train_flop == pytest.approx(TRUE.s_per_train_flop, rel=1e-6)
    assert fitted.s_per_teacher_flop == pytest.approx(TRUE.s_per_teacher_flop, rel=1e-6)
    assert fitted.to_json()["overhead_s_per_token"] == pytest.approx(2e-4, rel=1e-6)
    # Through 2% noise the prediction for a 10x larger student stays within 3%.
    noisy = cost.fit_time_model(_runs(OVERHEAD, noise=0.02, seed=1))
    args = (4e6, 3e6, 2e5)
    assert noisy.online_s(*args, **SHAPE) == pytest.approx(OVERHEAD.online_s(*args, **SHAPE), rel=0.03)


def test_one_student_size_plus_its_teachers_training_run_pins_the_overhead() -> None:
    # What `kdcache run`'s table holds: one student size three ways, and the teacher's own run.
    student = [r for r in _runs(OVERHEAD) if r.params == 4e5]
    teacher = cost.TimedRun(kind="supervised", params=3e6, tokens=5e4, wall_s=1.0, **SHAPE)
    fitted = cost.fit_time_model([*student, dataclasses.replace(teacher, wall_s=OVERHEAD.run_s(teacher))])
    assert "token_overhead" in fitted.calibrated
    assert fitted.s_per_token == pytest.approx(2e-4, rel=1e-6)
    assert fitted.s_per_train_flop == pytest.approx(TRUE.s_per_train_flop, rel=1e-6)


def test_one_size_leaves_the_overhead_out_with_a_note() -> None:
    runs = [r for r in _runs(OVERHEAD) if r.params == 4e5]  # two budgets: start-up is still pinned
    fitted = cost.fit_time_model(runs)
    assert "token_overhead" not in fitted.calibrated and "startup" in fitted.calibrated
    assert fitted.s_per_token == 0.0
    assert any("per-token overhead not calibrated" in note for note in fitted.notes)
    assert fitted.startup_s == pytest.approx(TRUE.startup_s, rel=1e-6)
    # The training rate carries the overhead: right at the calibrated size, too slow for a larger one.
    assert fitted.supervised_s(4e5, 1e5, **SHAPE) == pytest.approx(OVERHEAD.supervised_s(4e5, 1e5, **SHAPE))
    assert fitted.supervised_s(4e6, 1e5, **SHAPE) > 1.5 * OVERHEAD.supervised_s(4e6, 1e5, **SHAPE)


def test_too_few_runs_name_the_term() -> None:
    online = [r for r in _runs(TRUE) if r.kind == "online" and r.params == 4e5]
    with pytest.raises(FitError, match="teacher_forward term: its 2 online run"):
        cost.fit_time_model(online, source="t.parquet")
    offline = [r for r in _runs(TRUE) if r.kind == "distill" and r.params == 4e5]
    with pytest.raises(FitError, match="store_read term"):
        cost.fit_time_model(offline)
    with pytest.raises(FitError, match="t.parquet: no timed runs"):
        cost.fit_time_model([], source="t.parquet")


# --- Reading real runs tables and stores -------------------------------------------------------


def _store(path: Path, *, rows: int = 8, jobs: tuple[tuple[float, int], ...] = ((2.0, 64),)) -> Path:
    meta = make_meta(rows=rows, seq_len=8, vocab=300, k=4, shard_rows=4)
    writer = storage.StoreWriter.open(path, meta)
    data = make_rows(meta)
    for shard in range(meta.num_shards):
        writer.write_shard(shard, shard_of(meta, data, shard))
    for seconds, tokens in jobs:
        storage.append_job(path, storage.CacheJob(seconds=seconds, tokens=tokens, shards=2, workers=1,
                                                  backend="native"))
    return path


def _table(path: Path, store: Path | None, model: cost.TimeModel, bpt: float) -> Path:
    """Rows as `kdcache train` appends them, timed by `model` (store bytes per token `bpt`)."""
    for i, (kind, n, tokens) in enumerate([("supervised", 4e5, 3e4), ("supervised", 1.3e6, 9e4),
                                           ("distill", 4e5, 3e4), ("distill", 1.3e6, 9e4),
                                           ("online", 4e5, 3e4), ("online", 1.3e6, 9e4)]):
        run = cost.TimedRun(kind=kind, params=n, tokens=tokens, wall_s=1.0, teacher_params=800,
                            bytes_per_token=bpt if kind == "distill" else 0.0, rho=32, context=64, vocab=1024)
        append_run(path, RunRow(run_id=f"r{i}", kind=kind, params=int(n), tokens=int(tokens), loss=3.0,
                                wall_s=model.run_s(run), teacher_params=800 if kind != "supervised" else None,
                                store=str(store) if kind == "distill" else None, layers=2, d_model=64,
                                seq_len=64, vocab_size=1024))
    return path


def test_reads_runs_and_the_stores_cache_jobs(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.zarr", jobs=((2.0, 32), (1.5, 32)))
    bpt = storage.summarize(store)["bytes_per_token"]
    table = _table(tmp_path / "runs.parquet", store, TRUE, bpt)
    runs, cache, notes = read_timings(str(table))
    assert [r.kind for r in runs].count("distill") == 2 and notes == []
    assert runs[2].bytes_per_token == pytest.approx(bpt) and runs[0].rho == 32.0
    assert len(cache) == 1 and cache[0].seconds == pytest.approx(3.5) and cache[0].tokens == 64
    assert cache[0].teacher_params == 800 and cache[0].context == 8 and cache[0].vocab == 300
    fitted = calibrate(str(table))
    assert fitted.s_per_train_flop == pytest.approx(TRUE.s_per_train_flop, rel=1e-6)
    assert fitted.s_per_teacher_flop == pytest.approx(TRUE.s_per_teacher_flop, rel=1e-6)
    assert fitted.s_per_read_byte == pytest.approx(TRUE.s_per_read_byte, rel=1e-6)
    assert fitted.startup_s == pytest.approx(TRUE.startup_s, rel=1e-6)
    # The cache job: 3.5 s for 64 tokens of an 800-parameter teacher (write folded in).
    per_token = 3.5 / 64
    assert fitted.cache_s(800, 640, bpt, rho=32, context=8, vocab=300) == pytest.approx(10 * per_token * 64)


def test_estimate_cost_predicts_by_hand(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.zarr")
    bpt = storage.summarize(store)["bytes_per_token"]
    table = _table(tmp_path / "runs.parquet", store, TRUE, bpt)
    shape = {"rho": 32.0, "context": 64, "vocab": 1024}
    out = estimate_cost(CostQuery(teacher_params=800, student_params=(1e6, 2e6), tokens=1e5, store=str(store),
                                  runs=str(table), **shape)).to_json()
    f = {n: forward_flops(n, **shape) for n in (800, 1e6, 2e6)}
    online = [1.5 + 1e5 * (3 * f[n] / 2e10 + f[800] / 3e10) for n in (1e6, 2e6)]
    offline = [1.5 + 1e5 * (3 * f[n] / 2e10 + bpt / 5e6) for n in (1e6, 2e6)]
    assert out["predicted_s"]["online_student"] == pytest.approx(online, rel=1e-6)
    assert out["predicted_s"]["offline_student"] == pytest.approx(offline, rel=1e-6)
    # One 64-token job of 2 s: the cache's own forward, F(800) at the job's shape... priced per token.
    assert out["predicted_s"]["cache"] == pytest.approx(
        2.0 / 64 * 1e5 * f[800] / forward_flops(800, rho=32, context=8, vocab=300), rel=1e-6)
    assert out["calibrated"] is True and out["flops_per_s"] == pytest.approx(2e10, rel=1e-6)
    assert out["time_model"]["calibrated"] == ["startup", "student_steps", "teacher_forward", "store_read",
                                               "cache_teacher"]


def test_a_store_that_is_gone_drops_its_runs_with_a_note(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.zarr")
    bpt = storage.summarize(store)["bytes_per_token"]
    table = _table(tmp_path / "runs.parquet", store, TRUE, bpt)
    append_run(table, RunRow(run_id="gone", kind="distill", params=10**6, tokens=10**5, loss=3.0, wall_s=99.0,
                             teacher_params=800, store=str(tmp_path / "gone.zarr")))
    runs, cache, notes = read_timings(str(table))
    assert len(runs) == 6 and len(cache) == 1
    assert len(notes) == 1 and "gone.zarr: store no longer exists" in notes[0]
    assert "gone.zarr" in " ".join(calibrate(str(table)).notes)


def test_every_store_gone_is_an_error(tmp_path: Path) -> None:
    table = _table(tmp_path / "runs.parquet", tmp_path / "gone.zarr", TRUE, 100.0)
    with pytest.raises(FitError, match=r"runs.parquet: field 'store': .*gone.zarr no longer exists"):
        read_timings(str(table))


def test_a_store_without_a_job_log_has_no_cache_measurement(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.zarr", jobs=())
    table = _table(tmp_path / "runs.parquet", store, TRUE, storage.summarize(store)["bytes_per_token"])
    _, cache, notes = read_timings(str(table))
    assert cache == [] and "no measured cache job" in notes[0]
    fitted = calibrate(str(table))
    assert "cache_teacher" not in fitted.calibrated
    assert fitted.s_per_cache_flop == fitted.s_per_teacher_flop


def test_bad_tables(tmp_path: Path) -> None:
    csv = tmp_path / "runs.csv"
    pacsv.write_csv(pa.table({"params": [10**8], "tokens": [10**9], "loss": [3.0]}), csv)
    with pytest.raises(FitError, match=r"runs.csv: missing column 'wall_s'"):
        read_timings(str(csv))
    untimed = tmp_path / "untimed.parquet"
    append_run(untimed, RunRow(run_id="a", kind="supervised", params=10**8, tokens=10**9, loss=3.0))
    with pytest.raises(FitError, match=r"untimed.parquet: row 0 \(a\): field 'wall_s' is missing"):
        read_timings(str(untimed))
    online = tmp_path / "online.parquet"
    append_run(online, RunRow(run_id="o", kind="online", params=10**8, tokens=10**9, loss=3.0, wall_s=10.0))
    with pytest.raises(FitError, match=r"online.parquet: row 0 \(o\): field 'teacher_params' is empty"):
        read_timings(str(online))
    with pytest.raises(StoreError, match="nope.parquet: no such runs table"):
        read_timings(str(tmp_path / "nope.parquet"))


def test_wall_s_is_derived_from_tokens_per_s(tmp_path: Path) -> None:
    table = tmp_path / "runs.parquet"
    append_run(table, RunRow(run_id="a", kind="supervised", params=10**8, tokens=10**9, loss=3.0,
                             tokens_per_s=1000.0))
    runs, _, _ = read_timings(str(table))
    assert runs[0].wall_s == pytest.approx(1e6)
