"""`kdcache cost`: online distillation versus cache + M offline students, in FLOPs, hours, money and
wall time. A printer: flags -> `kdcache.pipeline.study.cost.estimate_cost` -> text or JSON."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from kdcache.fit.cost import Hardware
from kdcache.fit.errors import FitError
from kdcache.paths import check_writable
from kdcache.pipeline.study.cost import CostQuery, estimate_cost, write_cost_plot

HELP = "Cost of online distillation versus one cached teacher pass plus M offline students."


def parse_sizes(spec: str) -> list[float]:
    """'1e8,3e8' -> [1e8, 3e8]."""
    try:
        sizes = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError as exc:
        raise FitError(f"--student-params expects N[,N...], got {spec!r}") from exc
    if not sizes or min(sizes) <= 0:
        raise FitError(f"--student-params expects positive sizes, got {spec!r}")
    return sizes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    teacher_params: float
    """Teacher non-embedding parameters N_T."""
    student_params: str
    """Student size, or a comma-separated list of sizes (one student each)."""
    tokens: float
    """Distillation tokens per student D (the cache holds these once)."""
    students: int = 1
    """Number of students M when one size is given."""
    store: str | None = None
    """A kdcache logit store: take bytes per token from it instead of k and vocab."""
    bytes_per_token: float | None = None
    """Measured store bytes per token (e.g. from `kdcache inspect`), instead of k and vocab."""
    k: int = 64
    """Top-k stored per token (without --store or --bytes-per-token): uncompressed size."""
    vocab: int = 32768
    """Vocabulary size (ids are uint16 up to 65536) and F(N) vocabulary."""
    runs: str | None = None
    """Runs table with wall_s: calibrates the time model (start-up, training, teacher, read and
    cache-job rates, the cache job from the stores it names) instead of peak x utilisation."""
    peak_flops: float = 989e12
    """Accelerator peak FLOP/s (default: H100 dense bf16)."""
    utilisation: float = 0.4
    """Fraction of peak achieved."""
    price_per_hour: float = 2.5
    """Accelerator-hour price, USD."""
    storage_per_tb_month: float = 20.0
    """Storage price, USD per TB-month."""
    months: float = 1.0
    """How long the store is kept."""
    read_bandwidth: float = 2e9
    """Bytes/s one student can read from the store."""
    rho: float = 128
    """Aspect ratio d_model / n_layers used in F(N)."""
    context: int = 4096
    """Context length used in F(N)."""
    max_students: int = 16
    """Plot cost for M = 1..this."""
    json: bool = False
    """Print the result as JSON."""
    plot: str | None = None
    """Write a PNG of cost against the number of students."""

    def __post_init__(self) -> None:
        if self.students < 1 or self.k < 1 or self.teacher_params <= 0 or self.tokens <= 0:
            raise FitError("--students and --k must be >= 1; --teacher-params and --tokens > 0")


def run(cfg: Config) -> int:
    """Flags -> `estimate_cost` -> text or JSON (and the plot)."""
    if cfg.plot:
        check_writable(cfg.plot, "--plot", directory=False)
    query = query_of(cfg)
    result = estimate_cost(query)
    if cfg.plot:
        write_cost_plot(query, result, cfg.plot, cfg.max_students)
    print(json.dumps(result.to_json(), indent=2) if cfg.json else _text(result.to_json()))
    return 0


def query_of(cfg: Config) -> CostQuery:
    """The library's `CostQuery` for these flags."""
    sizes = parse_sizes(cfg.student_params)
    if len(sizes) > 1 and cfg.students not in (1, len(sizes)):
        raise FitError(f"--students {cfg.students} disagrees with {len(sizes)} listed student sizes")
    students = sizes * cfg.students if len(sizes) == 1 else sizes
    hardware = Hardware(
        peak_flops=cfg.peak_flops,
        utilisation=cfg.utilisation,
        price_per_hour=cfg.price_per_hour,
        storage_per_tb_month=cfg.storage_per_tb_month,
        read_bandwidth=cfg.read_bandwidth,
        months=cfg.months,
    )
    return CostQuery(
        teacher_params=cfg.teacher_params, student_params=tuple(students), tokens=cfg.tokens,
        store=cfg.store, bytes_per_token=cfg.bytes_per_token, k=cfg.k, vocab=cfg.vocab, runs=cfg.runs,
        rho=cfg.rho, context=cfg.context, hardware=hardware,
    )


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def _text(out: dict[str, Any]) -> str:
    predicted, model = out["predicted_s"], out["time_model"]
    basis = (f"calibrated on {model['source']} ({', '.join(model['calibrated'])})" if out["calibrated"]
             else "from peak x utilisation and the read bandwidth")
    return "\n".join(
        [
            f"{out['students']} students, store {out['store_bytes'] / 1e9:.3g} GB "
            f"({out['bytes_per_token']:.4g} bytes/token)",
            f"  online: {out['online_flops']:.3g} FLOPs, {out['online_hours']:.4g} accelerator-hours, "
            f"${out['online_cost']:.4g}",
            f"  cache:  {out['cache_flops']:.3g} FLOPs, {out['cache_hours']:.4g} accelerator-hours, "
            f"${out['cache_cost']:.4g} (storage ${out['storage_cost']:.4g})",
            f"  each student reads {out['read_bandwidth_needed'] / 1e6:.4g} MB/s from the store"
            f" ({'within' if out['read_bandwidth_ok'] else 'MORE than'} the read bandwidth)",
            f"  cache pays off from {out['break_even_students']} students",
            f"  predicted wall time per run, {basis}:",
            f"    online student(s) {_seconds(predicted['online_student'])} s; "
            f"offline student(s) {_seconds(predicted['offline_student'])} s; "
            f"cache job {predicted['cache']:.4g} s",
            *(f"  note: {note}" for note in model["notes"]),
        ]
    )
