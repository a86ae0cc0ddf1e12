"""`kdcache cost`: online distillation versus cache + M offline students, in FLOPs, hours and money."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from kdcache.fit.errors import FitError

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
    """Runs table with tokens_per_s: calibrates achieved FLOP/s instead of peak x utilisation."""
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
    from kdcache.fit import cost
    from kdcache.paths import check_writable

    if cfg.plot:
        check_writable(cfg.plot, "--plot", directory=False)
    sizes = parse_sizes(cfg.student_params)
    students = sizes * cfg.students if len(sizes) == 1 else sizes
    if len(sizes) > 1 and cfg.students not in (1, len(sizes)):
        raise FitError(f"--students {cfg.students} disagrees with {len(sizes)} listed student sizes")
    shape = {"rho": cfg.rho, "context": cfg.context, "vocab": cfg.vocab}
    hw = _hardware(cfg, shape)
    out = cost.compare(
        cfg.teacher_params, students, cfg.tokens, bytes_per_token=_bytes_per_token(cfg), hardware=hw, **shape
    )
    out["flops_per_s"] = hw.flops_per_s
    out["calibrated"] = cfg.runs is not None
    if cfg.plot:
        _plot(cfg, students, hw, out["bytes_per_token"], shape)
    print(json.dumps(out, indent=2) if cfg.json else _text(out))
    return 0


def _bytes_per_token(cfg: Config) -> float:
    from kdcache.fit.cost import topk_bytes_per_token

    if cfg.store is not None and cfg.bytes_per_token is not None:
        raise FitError("give --store or --bytes-per-token, not both")
    if cfg.bytes_per_token is not None:
        return cfg.bytes_per_token
    if cfg.store is None:
        return topk_bytes_per_token(cfg.k, cfg.vocab)
    from kdcache.storage import summarize

    summary = summarize(cfg.store)
    if not summary.get("tokens"):
        raise FitError(f"{cfg.store}: store has no committed tokens to measure bytes per token")
    return float(summary["bytes_per_token"])


def _hardware(cfg: Config, shape: dict[str, float]) -> Any:
    from kdcache.fit import cost

    peak, util = cfg.peak_flops, cfg.utilisation
    if cfg.runs is not None:
        from kdcache.fit.runs import column, read_runs

        table = read_runs(cfg.runs, required=("params", "tokens_per_s"))
        peak, util = (
            cost.calibrated_flops_per_s(
                column(table, "params", cfg.runs), column(table, "tokens_per_s", cfg.runs), **shape
            ),
            1.0,
        )
    return cost.Hardware(
        peak_flops=peak,
        utilisation=util,
        price_per_hour=cfg.price_per_hour,
        storage_per_tb_month=cfg.storage_per_tb_month,
        read_bandwidth=cfg.read_bandwidth,
        months=cfg.months,
    )


def _plot(cfg: Config, students: list[float], hw: Any, bpt: float, shape: dict[str, float]) -> None:
    from kdcache.fit import cost, plots

    online, cache = [], []
    for m in range(1, cfg.max_students + 1):
        r = cost.compare(
            cfg.teacher_params, (students * m)[:m], cfg.tokens, bytes_per_token=bpt, hardware=hw, **shape
        )
        online.append(r["online_cost"])
        cache.append(r["cache_cost"])
    plots.cost_vs_students(online, cache, str(cfg.plot))


def _text(out: dict[str, Any]) -> str:
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
        ]
    )
