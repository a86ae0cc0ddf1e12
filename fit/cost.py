"""Cache-versus-online cost model: FLOPs, GPU-hours and money for M students.

Online distillation runs the teacher forward on every student step; the cache runs it
once over the D tokens, stores the targets, and M students read them back. The FLOPs
are equal at M = 1; storage is what the cache pays extra, so the money break-even is
the smallest M whose saved teacher passes cover the storage bill. Wall time on G GPUs is
GPU-hours / G: a run spread over G GPUs is taken to scale perfectly (data parallel).

Wall time is modelled per run (`TimeModel`): start-up plus tokens times the seconds each
token costs (a fixed per-token overhead, student steps, the teacher's forward, store reads and
writes), calibrated on
measured runs (`fit_time_model`) or taken from the hardware's rates. `estimate` returns
both as one `CostEstimate`. Torch-free; reading runs tables and stores is
`kdcache.pipeline.study.cost`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import nnls

from kdcache.fit.errors import FitError
from kdcache.fit.flops import forward_flops


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hardware:
    """GPUs and their storage; defaults are one node of 8 H100s (dense bf16) at 40% utilisation."""

    peak_flops: float = 989e12  # per GPU
    utilisation: float = 0.4
    price_per_hour: float = 2.5  # GPU-hour, USD
    storage_per_tb_month: float = 20.0  # USD
    read_bandwidth: float = 2e9  # bytes/s one student can stream from the store
    months: float = 1.0  # how long the store is kept
    gpus: int = 8  # a run's GPUs: its wall time is its GPU-hours over these

    def __post_init__(self) -> None:
        if min(self.peak_flops, self.utilisation, self.read_bandwidth) <= 0 or self.utilisation > 1:
            raise FitError("hardware: peak FLOP/s and read bandwidth must be > 0, utilisation in (0, 1]")
        if self.gpus < 1:
            raise FitError(f"hardware: gpus must be >= 1, got {self.gpus}")

    @property
    def flops_per_s(self) -> float:
        return self.peak_flops * self.utilisation


def topk_bytes_per_token(k: int, vocab: int) -> float:
    """Uncompressed bytes per token of a top-k store (docs/store-format.md): ids, fp16 log-probs,
    float32 tail mass and target log-prob, int32 input token."""
    id_bytes = 2 if vocab <= 65536 else 4
    return float(k * (id_bytes + 2) + 4 + 4 + 4)


def _money(flops: float, hw: Hardware) -> tuple[float, float]:
    hours = flops / hw.flops_per_s / 3600.0
    return hours, hours * hw.price_per_hour


def compare(
    teacher_params: float,
    student_params: Sequence[float],
    tokens: float,
    *,
    bytes_per_token: float,
    hardware: Hardware = Hardware(),
    **shape: float,
) -> dict[str, Any]:
    """Online versus cache for students `student_params`, each distilled on `tokens` tokens."""
    if teacher_params <= 0 or tokens <= 0 or not student_params or min(student_params) <= 0:
        raise FitError("teacher params, student params and tokens must be positive")
    students = np.asarray(student_params, dtype=np.float64)
    teacher_pass = forward_flops(teacher_params, **shape) * tokens
    student_flops = float(np.sum(3.0 * forward_flops(students, **shape) * tokens))
    online = student_flops + len(students) * teacher_pass
    cache = student_flops + teacher_pass
    store_bytes = bytes_per_token * tokens
    storage_money = store_bytes / 1e12 * hw_months(hardware)
    online_hours, online_money = _money(online, hardware)
    cache_hours, cache_money = _money(cache, hardware)
    teacher_money = _money(teacher_pass, hardware)[1]
    # Slowest-to-fastest student: the fastest (smallest) one needs the most bandwidth.
    tokens_per_s = hardware.flops_per_s / (3.0 * forward_flops(students, **shape))
    needed = float(np.max(tokens_per_s) * bytes_per_token)
    return {
        "students": len(students),
        "online_flops": online,
        "cache_flops": cache,
        "online_gpu_hours": online_hours,
        "cache_gpu_hours": cache_hours,
        "gpus": hardware.gpus,
        "online_wall_hours": online_hours / hardware.gpus,
        "cache_wall_hours": cache_hours / hardware.gpus,
        "online_cost": online_money,
        "cache_cost": cache_money + storage_money,
        "storage_cost": storage_money,
        "store_bytes": store_bytes,
        "bytes_per_token": bytes_per_token,
        "read_bandwidth_needed": needed,
        "read_bandwidth_ok": needed <= hardware.read_bandwidth,
        "break_even_students": break_even(teacher_money, storage_money),
    }


def hw_months(hw: Hardware) -> float:
    """Storage price for the whole retention period, USD per TB."""
    return hw.storage_per_tb_month * hw.months


def break_even(teacher_pass_cost: float, storage_cost: float) -> int:
    """Smallest M with cache <= online: M teacher passes >= 1 pass + storage."""
    if teacher_pass_cost <= 0:
        raise FitError("the teacher pass must cost something")
    return max(1, math.ceil(1.0 + storage_cost / teacher_pass_cost - 1e-12))


def calibrated_flops_per_s(params: np.ndarray, tokens_per_s: np.ndarray, **shape: float) -> float:
    """Achieved training FLOP/s measured by runs: median of 3 F(N) x tokens/s."""
    ok = np.isfinite(tokens_per_s) & (tokens_per_s > 0) & (params > 0)
    if not ok.any():
        raise FitError("runs table has no positive tokens_per_s to calibrate from")
    return float(np.median(3.0 * forward_flops(params[ok], **shape) * tokens_per_s[ok]))


# --- Wall time: a time model per run, calibrated from measured runs --------------------------

TERMS = ("startup", "token_overhead", "student_steps", "teacher_forward", "store_read", "cache_teacher",
         "store_write")
"""The time model's terms, in the order the JSON lists those calibrated."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TimedRun:
    """One measured training run, as the runs table records it (`wall_s`: the training loop's time)."""

    kind: str
    """supervised | distill (offline, from a store) | online (teacher run every step)."""
    params: float
    tokens: float
    wall_s: float
    teacher_params: float = 0.0
    """N_T (online runs: their teacher forward is part of every step)."""
    bytes_per_token: float = 0.0
    """Store bytes each token reads (distill runs)."""
    rho: float = 128
    context: float = 4096
    vocab: float = 32768

    def shape(self) -> dict[str, float]:
        return {"rho": self.rho, "context": self.context, "vocab": self.vocab}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheTiming:
    """One store's measured cache job: shard-dispatch time (teacher forwards plus writes)."""

    label: str
    teacher_params: float
    tokens: float
    seconds: float
    bytes_per_token: float
    rho: float = 128
    context: float = 4096
    vocab: float = 32768

    def shape(self) -> dict[str, float]:
        return {"rho": self.rho, "context": self.context, "vocab": self.vocab}


def _rate(seconds_per_unit: float) -> float | None:
    """Units per second; None where the fit found the term free (JSON has no infinity)."""
    return 1.0 / seconds_per_unit if seconds_per_unit > 0 else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TimeModel:
    """wall_s = startup + tokens x per_token, per_token a sum of seconds-per-FLOP and -per-byte terms.

    Every trained token pays a fixed overhead that does not grow with the model (Python, the
    optimiser's per-tensor loop, kernel launches: at small sizes it dominates a step); student steps
    cost 3 F(N_S) FLOPs a token at the training rate; an online run adds the
    teacher's forward F(N_T) at the teacher rate, an offline run the store's bytes at the read
    rate. The cache job pays F(N_T) at its own rate (a no-grad forward in the cache worker's
    batches) plus the store write. Kept as seconds per unit so a term the fit finds free is 0,
    not an infinite rate.
    """

    startup_s: float = 0.0
    s_per_token: float = 0.0
    """Seconds each trained token costs whatever the student's size (0 where not calibrated)."""
    s_per_train_flop: float
    s_per_teacher_flop: float
    s_per_read_byte: float
    s_per_cache_flop: float
    s_per_write_byte: float
    calibrated: tuple[str, ...] = ()
    """The terms measured runs determined; the others come from the hardware (or a fitted rate)."""
    source: str = "hardware"
    """The runs table calibrated from, or "hardware" (peak x utilisation and read bandwidth)."""
    runs: int = 0
    cache_jobs: int = 0
    rel_rms: float | None = None
    """Root-mean-square relative error of the fitted training runs."""
    cache_rel_rms: float | None = None
    notes: tuple[str, ...] = ()

    def student_s(self, student_params: float, tokens: float, **shape: float) -> float:
        """The student's steps: the per-token overhead plus 3 F(N_S) FLOPs a token at the training rate."""
        flops = 3.0 * forward_flops(student_params, **shape) * tokens * self.s_per_train_flop
        return float(tokens * self.s_per_token + flops)

    def online_s(self, student_params: float, teacher_params: float, tokens: float, **shape: float) -> float:
        """Predicted wall_s of an online run: student steps plus the teacher's forward each step."""
        teacher = forward_flops(teacher_params, **shape) * tokens * self.s_per_teacher_flop
        return self.startup_s + self.student_s(student_params, tokens, **shape) + float(teacher)

    def offline_s(self, student_params: float, tokens: float, bytes_per_token: float,
                  **shape: float) -> float:
        """Predicted wall_s of an offline run: student steps plus reading the store."""
        read = bytes_per_token * tokens * self.s_per_read_byte
        return self.startup_s + self.student_s(student_params, tokens, **shape) + read

    def supervised_s(self, student_params: float, tokens: float, **shape: float) -> float:
        return self.startup_s + self.student_s(student_params, tokens, **shape)

    def cache_s(self, teacher_params: float, tokens: float, bytes_per_token: float, **shape: float) -> float:
        """Predicted shard-dispatch time of a cache job over `tokens`: teacher forwards plus writes
        (no start-up: the measured dispatch time excludes Ray, the actors and loading the teacher)."""
        forward = forward_flops(teacher_params, **shape) * tokens * self.s_per_cache_flop
        return float(forward) + bytes_per_token * tokens * self.s_per_write_byte

    def run_s(self, run: TimedRun) -> float:
        """The model's wall_s for a measured run (its own shape)."""
        if run.kind == "online":
            return self.online_s(run.params, run.teacher_params, run.tokens, **run.shape())
        if run.kind == "distill":
            return self.offline_s(run.params, run.tokens, run.bytes_per_token, **run.shape())
        return self.supervised_s(run.params, run.tokens, **run.shape())

    def timing_s(self, job: CacheTiming) -> float:
        return self.cache_s(job.teacher_params, job.tokens, job.bytes_per_token, **job.shape())

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "calibrated": list(self.calibrated),
            "startup_s": self.startup_s,
            "overhead_s_per_token": self.s_per_token,
            "student_flops_per_s": _rate(self.s_per_train_flop),
            "teacher_flops_per_s": _rate(self.s_per_teacher_flop),
            "read_bytes_per_s": _rate(self.s_per_read_byte),
            "cache_teacher_flops_per_s": _rate(self.s_per_cache_flop),
            "write_bytes_per_s": _rate(self.s_per_write_byte),
            "runs": self.runs,
            "cache_jobs": self.cache_jobs,
            "rel_rms": self.rel_rms,
            "cache_rel_rms": self.cache_rel_rms,
            "notes": list(self.notes),
        }


def hardware_time_model(hw: Hardware) -> TimeModel:
    """No measurements: every FLOP at peak x utilisation, store reads and writes at the read
    bandwidth, no start-up."""
    per_flop, per_byte = 1.0 / hw.flops_per_s, 1.0 / hw.read_bandwidth
    return TimeModel(s_per_train_flop=per_flop, s_per_teacher_flop=per_flop, s_per_read_byte=per_byte,
                     s_per_cache_flop=per_flop, s_per_write_byte=per_byte)


def _nnls_relative(columns: dict[str, np.ndarray], measured: np.ndarray) -> tuple[dict[str, float], float]:
    """Non-negative least squares on relative residuals (A x - t) / t; columns scaled to unit norm
    first, as FLOPs (1e12) and start-up (1) differ by orders of magnitude. Returns x and the rms."""
    a = np.column_stack([columns[name] for name in columns]) / measured[:, None]
    scale = np.linalg.norm(a, axis=0)
    x, _ = nnls(a / scale, np.ones(len(measured)))
    x = x / scale
    rel = a @ x - 1.0
    return dict(zip(columns, (float(v) for v in x), strict=True)), float(np.sqrt(np.mean(rel**2)))


def _full_rank(columns: dict[str, np.ndarray], measured: np.ndarray) -> bool:
    a = np.column_stack(list(columns.values())) / measured[:, None]
    a = a / np.linalg.norm(a, axis=0)
    return bool(np.linalg.matrix_rank(a, tol=1e-9) == a.shape[1])


_KIND_OF = {"teacher_forward": "online", "store_read": "distill"}


def fit_time_model(
    runs: Sequence[TimedRun],
    cache: Sequence[CacheTiming] = (),
    *,
    fallback: Hardware = Hardware(),
    source: str = "runs table",
    notes: Sequence[str] = (),
) -> TimeModel:
    """Fit start-up and rates to measured runs (NNLS on 1/wall_s-weighted residuals).

    The student-step rate needs runs; the teacher-forward rate needs online runs, the read rate
    offline ones, and each must be separable from the others (a table of online runs of one
    size cannot tell the student's steps from the teacher's forward): otherwise a FitError
    names the term. Start-up is fitted where runs of more than one size or budget pin it, else 0.
    The per-token overhead (seconds a trained token costs whatever the size) is fitted where the
    runs tell it from the student's steps and start-up (students of two sizes, or a student and
    its teacher's own training run), else 0: one size cannot tell a per-token cost that grows with
    FLOPs from one that does not, so its FLOP rate then carries both. Rates
    without runs fall back: a teacher forward to the fitted training rate, a cache job's forward
    to the teacher rate, store I/O to the hardware's read bandwidth.
    """
    if not runs:
        raise FitError(f"{source}: no timed runs (field 'wall_s') to calibrate the time model from")
    wall = np.array([r.wall_s for r in runs], dtype=np.float64)
    if not (np.isfinite(wall).all() and (wall > 0).all()):
        raise FitError(f"{source}: field 'wall_s' must be positive and finite in every timed run")
    kinds = [r.kind for r in runs]
    columns: dict[str, np.ndarray] = {
        "student_steps": np.array([3.0 * forward_flops(r.params, **r.shape()) * r.tokens for r in runs]),
    }
    if "online" in kinds:
        columns["teacher_forward"] = np.array(
            [forward_flops(r.teacher_params, **r.shape()) * r.tokens if r.kind == "online" else 0.0
             for r in runs])
    if "distill" in kinds:
        columns["store_read"] = np.array([r.bytes_per_token * r.tokens if r.kind == "distill" else 0.0
                                          for r in runs])
    if not _full_rank(columns, wall):
        # Name the term that cannot be told apart: the last-added one whose removal restores the rank.
        for term in reversed(list(columns)[1:]):
            if _full_rank({k: v for k, v in columns.items() if k != term}, wall):
                raise FitError(f"{source}: too few runs to calibrate the {term} term: its "
                               f"{kinds.count(_KIND_OF[term])} {_KIND_OF[term]} run(s) cannot be told apart "
                               "from the student's steps (add runs of other sizes or kinds)")
        raise FitError(f"{source}: too few runs to calibrate the student_steps term (field 'params')")
    notes = list(notes)
    with_startup = {"startup": np.ones(len(runs)), **columns}
    if _full_rank(with_startup, wall):
        columns = with_startup
    else:
        notes.append("start-up not calibrated (the runs, of one size and budget, cannot tell it from "
                     "the per-token terms): taken as 0")
    overhead = np.array([r.tokens for r in runs], dtype=np.float64)
    with_overhead = {**{k: v for k, v in columns.items() if k == "startup"}, "token_overhead": overhead,
                     **{k: v for k, v in columns.items() if k != "startup"}}
    if _full_rank(with_overhead, wall):
        columns = with_overhead
    else:
        notes.append("per-token overhead not calibrated (runs of one model size cannot tell it from the "
                     "student's FLOPs): taken as 0, the training FLOP/s carries it")
    x, rms = _nnls_relative(columns, wall)
    train = x["student_steps"]
    if train <= 0 and x.get("token_overhead", 0.0) <= 0:
        raise FitError(f"{source}: the runs give the student's steps no cost (fields 'wall_s', 'tokens')")
    teacher = x.get("teacher_forward", train)
    if "teacher_forward" not in x:
        notes.append("teacher forward not calibrated (no online runs): at the fitted training FLOP/s")
    read = x.get("store_read", 1.0 / fallback.read_bandwidth)
    if "store_read" not in x:
        notes.append("store reads not calibrated (no offline runs): at the read bandwidth")
    calibrated = [term for term in TERMS if term in x]
    cache_fit = _fit_cache(cache, source, notes) if cache else None
    if cache_fit is None:
        if not cache:
            notes.append("cache job not calibrated (no store with a measured cache job): its teacher "
                         "forward at the teacher FLOP/s, writes at the read bandwidth")
        cache_flop, write, cache_rms = teacher, 1.0 / fallback.read_bandwidth, None
    else:
        cache_flop, write, cache_rms, cache_terms = cache_fit
        calibrated += cache_terms
    return TimeModel(
        startup_s=x.get("startup", 0.0), s_per_token=x.get("token_overhead", 0.0), s_per_train_flop=train,
        s_per_teacher_flop=teacher,
        s_per_read_byte=read, s_per_cache_flop=cache_flop, s_per_write_byte=write,
        calibrated=tuple(t for t in TERMS if t in calibrated), source=source, runs=len(runs),
        cache_jobs=len(cache), rel_rms=rms, cache_rel_rms=cache_rms, notes=tuple(notes),
    )


def _fit_cache(
    cache: Sequence[CacheTiming], source: str, notes: list[str]
) -> tuple[float, float, float, list[str]]:
    """(s per teacher FLOP, s per written byte, rms, terms) from measured cache jobs.

    Stores of one teacher and one format cannot tell the forward from the write (both scale
    with tokens alike): the write is then folded into the forward's rate and said so.
    """
    seconds = np.array([c.seconds for c in cache], dtype=np.float64)
    if not (np.isfinite(seconds).all() and (seconds > 0).all()):
        raise FitError(f"{source}: a store's cache job has no positive 'seconds' (its jobs/zarr.json)")
    columns = {
        "cache_teacher": np.array([forward_flops(c.teacher_params, **c.shape()) * c.tokens for c in cache]),
        "store_write": np.array([c.bytes_per_token * c.tokens for c in cache]),
    }
    if not _full_rank(columns, seconds):
        del columns["store_write"]
        notes.append("store writes not separable from the cache job's teacher forward (one teacher and "
                     "store format): folded into its FLOP/s")
    x, rms = _nnls_relative(columns, seconds)
    if x["cache_teacher"] <= 0 and x.get("store_write", 0.0) <= 0:
        raise FitError(f"{source}: the cache jobs give their work no cost (field 'seconds', jobs/zarr.json)")
    return x["cache_teacher"], x.get("store_write", 0.0), rms, list(columns)


# --- The estimate: cost and predicted times, as one typed result ----------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class PredictedTimes:
    """Predicted wall time of one run, as the runs table's wall_s measures it (the cache: its
    shard-dispatch time)."""

    online_student: tuple[float, ...]
    offline_student: tuple[float, ...]
    cache: float

    def to_json(self) -> dict[str, Any]:
        return {"online_student": list(self.online_student), "offline_student": list(self.offline_student),
                "cache": self.cache}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CostEstimate:
    """Online distillation versus one cached teacher pass plus M offline students."""

    students: int
    online_flops: float
    cache_flops: float
    online_gpu_hours: float
    cache_gpu_hours: float
    gpus: int
    online_wall_hours: float
    """online_gpu_hours / gpus: wall time with the GPUs scaling perfectly."""
    cache_wall_hours: float
    online_cost: float
    cache_cost: float
    storage_cost: float
    store_bytes: float
    bytes_per_token: float
    read_bandwidth_needed: float
    read_bandwidth_ok: bool
    break_even_students: int
    flops_per_s: float
    """The FLOP/s per GPU hours are counted at: peak x utilisation, or the fitted training rate."""
    peak_flops: float
    utilisation: float
    price_per_gpu_hour: float
    calibrated: bool
    predicted_s: PredictedTimes
    time_model: TimeModel

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["predicted_s"] = self.predicted_s.to_json()
        out["time_model"] = self.time_model.to_json()
        return out


def estimate(
    teacher_params: float,
    student_params: Sequence[float],
    tokens: float,
    *,
    bytes_per_token: float,
    hardware: Hardware = Hardware(),
    time_model: TimeModel | None = None,
    **shape: float,
) -> CostEstimate:
    """`compare` plus predicted wall times. With a calibrated `time_model`, hours count FLOPs at
    its training rate (as `kdcache cost --runs` always did); without one, or where the fit gave the
    FLOPs no cost, at peak x utilisation. Predicted times include the model's per-token overhead."""
    calibrated = time_model is not None
    given = hardware
    if time_model is None:
        time_model = hardware_time_model(hardware)
    elif time_model.s_per_train_flop > 0:  # 0: the fit put all the steps' time in the per-token overhead
        hardware = dataclasses.replace(hardware, peak_flops=1.0 / time_model.s_per_train_flop,
                                       utilisation=1.0)
    out = compare(teacher_params, student_params, tokens, bytes_per_token=bytes_per_token,
                  hardware=hardware, **shape)
    predicted = PredictedTimes(
        online_student=tuple(time_model.online_s(n, teacher_params, tokens, **shape) for n in student_params),
        offline_student=tuple(time_model.offline_s(n, tokens, bytes_per_token, **shape)
                              for n in student_params),
        cache=time_model.cache_s(teacher_params, tokens, bytes_per_token, **shape),
    )
    return CostEstimate(**out, flops_per_s=hardware.flops_per_s, peak_flops=given.peak_flops,
                        utilisation=given.utilisation, price_per_gpu_hour=given.price_per_hour,
                        calibrated=calibrated, predicted_s=predicted, time_model=time_model)


def cost_curve(
    teacher_params: float,
    student_params: Sequence[float],
    tokens: float,
    *,
    bytes_per_token: float,
    hardware: Hardware,
    max_students: int,
    **shape: float,
) -> tuple[list[float], list[float]]:
    """(online, cache) GPU-hours for M = 1..max_students, cycling through the student sizes (the
    cache's storage, money not GPU time, is left out)."""
    online, cache = [], []
    for m in range(1, max_students + 1):
        r = compare(teacher_params, (list(student_params) * m)[:m], tokens, bytes_per_token=bytes_per_token,
                    hardware=hardware, **shape)
        online.append(r["online_gpu_hours"])
        cache.append(r["cache_gpu_hours"])
    return online, cache
