"""`kdcache cost`: online distillation versus cache + M offline students, in FLOPs, GPU-hours, money
and wall time. A printer: flags -> `kdcache.pipeline.study.cost.estimate_cost` -> text or JSON.

With `--compute` instead of `--tokens` it plans first, through the same
`plan_and_cost` as `kdcache plan --students M`, and prints the same answer. The hardware
and store flags (`CostFlags`) and the text of a cost are shared with `kdcache plan`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any

from kdcache.fit.cost import Hardware
from kdcache.fit.errors import FitError
from kdcache.fit.recipes import HI, sci
from kdcache.paths import check_writable
from kdcache.pipeline.study.cost import (
    CostQuery,
    CostSettings,
    PlanQuery,
    estimate_cost,
    plan_and_cost,
    write_cost_plot,
)

HELP = "Cost of online distillation versus one cached teacher pass plus M offline students."

SIZE_CEILING = HI
"""Parameters and tokens above the plans' bound (1e17) are refused: past it the FLOPs model's
answers ($1e62 for a 1e40-param teacher) are arithmetic, not estimates."""


def within(flag: str, value: float | None, hi: float, *, lo: float = 0.0, lo_closed: bool = False) -> None:
    """Refuse a flag's value that is not finite or lies outside (lo, hi] ([lo, hi] if `lo_closed`)."""
    if value is None:
        return
    low_ok = value >= lo if lo_closed else value > lo
    if not (math.isfinite(value) and low_ok and value <= hi):
        interval = f"{'[' if lo_closed else '('}{sci(lo) if lo else 0}, {sci(hi)}]"
        shown = value if isinstance(value, int) else f"{value:g}"
        raise FitError(f"{flag} {shown} is outside {interval}")


def parse_sizes(spec: str) -> list[float]:
    """'1e8,3e8' -> [1e8, 3e8]."""
    try:
        sizes = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError as exc:
        raise FitError(f"--student-params expects N[,N...], got {spec!r}") from exc
    if not sizes:
        raise FitError(f"--student-params expects N[,N...], got {spec!r}")
    for size in sizes:
        within("--student-params", size, SIZE_CEILING)
    return sizes


@dataclasses.dataclass(frozen=True, kw_only=True)
class CostFlags:
    """How a cost is counted: the store's size per token, the GPUs, and the runs that calibrate."""

    store: str | None = None
    """A kdcache logit store: take bytes per token from it instead of k and vocab."""
    bytes_per_token: float | None = None
    """Measured store bytes per token (e.g. from `kdcache inspect`), instead of k and vocab."""
    k: int = 64
    """Top-k stored per token (without --store or --bytes-per-token): uncompressed size."""
    runs: str | None = None
    """Runs table with wall_s: calibrates the time model (start-up, training, teacher, read and
    cache-job rates, the cache job from the stores it names) instead of peak x utilisation."""
    peak_flops: float = 989e12
    """Peak FLOP/s of one GPU (default: H100 dense bf16)."""
    utilisation: float = 0.4
    """Fraction of peak achieved."""
    price_per_hour: float = 2.5
    """Price of one GPU-hour, USD."""
    storage_per_tb_month: float = 20.0
    """Storage price, USD per TB-month."""
    months: float = 1.0
    """How long the store is kept."""
    read_bandwidth: float = 2e9
    """Bytes/s one student can read from the store."""
    gpus: int = 8
    """GPUs the work is spread over (default: one node): wall time is GPU-hours / GPUs."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.gpus < 1:
            raise FitError(f"--k and --gpus must be >= 1, got {self.k} and {self.gpus}")
        within("--gpus", self.gpus, 1e7)
        within("--k", self.k, 1e8)
        within("--bytes-per-token", self.bytes_per_token, 1e12)
        within("--peak-flops", self.peak_flops, 1e18)
        within("--utilisation", self.utilisation, 1.0)
        within("--price-per-hour", self.price_per_hour, 1e6, lo_closed=True)
        within("--storage-per-tb-month", self.storage_per_tb_month, 1e6, lo_closed=True)
        within("--months", self.months, 1200)
        within("--read-bandwidth", self.read_bandwidth, 1e15)

    def settings(self) -> CostSettings:
        hardware = Hardware(peak_flops=self.peak_flops, utilisation=self.utilisation,
                            price_per_hour=self.price_per_hour,
                            storage_per_tb_month=self.storage_per_tb_month,
                            read_bandwidth=self.read_bandwidth, months=self.months, gpus=self.gpus)
        return CostSettings(store=self.store, bytes_per_token=self.bytes_per_token, k=self.k,
                            runs=self.runs, hardware=hardware)


def with_cost_flags(cls: Any, flags: dict[str, Any]) -> Any:
    """`cls(...)` from flat flags, the `CostFlags` ones gathered into its `cost` group."""
    names = {f.name for f in dataclasses.fields(CostFlags)}
    group = CostFlags(**{k: v for k, v in flags.items() if k in names})
    return cls(**{k: v for k, v in flags.items() if k not in names}, cost=group)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    teacher_params: float | None = None
    """Teacher non-embedding parameters N_T (with --compute, leave it out for the scenario's teacher)."""
    student_params: str
    """Student size, or a comma-separated list of sizes (one student each); with --compute one size."""
    tokens: float | None = None
    """Distillation tokens per student D (the cache holds these once); or --compute."""
    compute: float | None = None
    """Plan first, as `kdcache plan` does: the budget in FLOPs (Eq. 9); the recipe's tokens are costed."""
    students: int = 1
    """Number of students M when one size is given."""
    law: str | None = None
    """With --compute: the distillation law (default 'paper', or a fit JSON)."""
    scenario: str | None = None
    """With --compute and no --teacher-params: best (default), inference, pretraining,
    pretraining+inference."""
    teacher_tokens: float | None = None
    """With --compute and --teacher-params: the teacher's training tokens D_T."""
    teacher_loss: float | None = None
    """With --compute and --teacher-params: the teacher's loss L_T, instead of --teacher-tokens."""
    extrapolate: bool = False
    """With --compute: plan even where the law is not identified for the recipe (warns)."""
    vocab: int = 32768
    """Vocabulary size (ids are uint16 up to 65536) and F(N) vocabulary."""
    rho: float = 128
    """Aspect ratio d_model / n_layers used in F(N)."""
    context: int = 4096
    """Context length used in F(N)."""
    cost: CostFlags = dataclasses.field(default_factory=CostFlags)
    max_students: int = 16
    """Plot cost for M = 1..this."""
    json: bool = False
    """Print the result as JSON."""
    plot: str | None = None
    """Write a PNG of cost against the number of students (with --tokens)."""

    def __post_init__(self) -> None:
        if self.students < 1:
            raise FitError(f"--students must be >= 1, got {self.students}")
        within("--students", self.students, 1e6)
        for flag, value in (("--teacher-params", self.teacher_params), ("--tokens", self.tokens),
                            ("--teacher-tokens", self.teacher_tokens)):
            within(flag, value, SIZE_CEILING)
        within("--compute", self.compute, 1e40)
        within("--rho", self.rho, 1e6)
        within("--context", self.context, 1e9, lo_closed=True)  # 0 and 0: F(N) = 2N, no attention or vocab
        within("--vocab", self.vocab, 1e8, lo_closed=True)
        if (self.tokens is None) == (self.compute is None):
            raise FitError("give one of --tokens D (cost runs of D tokens) or --compute C (plan, then cost)")
        if self.compute is None:
            planning = {"--law": self.law, "--scenario": self.scenario,
                        "--teacher-tokens": self.teacher_tokens, "--teacher-loss": self.teacher_loss,
                        "--extrapolate": self.extrapolate or None}
            given = [flag for flag, v in planning.items() if v is not None]
            if given:
                raise FitError(f"{given[0]} plans the run: use it with --compute, not --tokens")
            if self.teacher_params is None:
                raise FitError("--teacher-params is required with --tokens")
            if self.teacher_params <= 0 or self.tokens is None or self.tokens <= 0:
                raise FitError("--teacher-params and --tokens must be > 0")
        elif self.plot:
            raise FitError("--plot draws the cost of --tokens; with --compute it is not drawn")

    @classmethod
    def from_flat(cls, **flags: Any) -> Config:
        return with_cost_flags(cls, flags)


def run(cfg: Config) -> int:
    """Flags -> `estimate_cost` (or, with --compute, `plan_and_cost`) -> text or JSON (and the plot)."""
    if cfg.compute is not None:
        return print_planned(plan_query(cfg), cfg.students, cfg.cost, cfg.json, "cost")
    if cfg.plot:
        check_writable(cfg.plot, "--plot", directory=False)
    query = query_of(cfg)
    result = estimate_cost(query)
    if cfg.plot:
        write_cost_plot(query, result, cfg.plot, cfg.max_students)
    print(json.dumps(result.to_json(), indent=2) if cfg.json else "\n".join(cost_lines(result.to_json())))
    return 0


def plan_query(cfg: Config) -> PlanQuery:
    assert cfg.compute is not None
    sizes = parse_sizes(cfg.student_params)
    if len(sizes) > 1:
        raise FitError(f"--compute plans one student size, got {len(sizes)} in --student-params")
    return PlanQuery(law=cfg.law or "paper", compute=cfg.compute, student_params=sizes[0],
                     scenario=cfg.scenario, teacher_params=cfg.teacher_params,
                     teacher_tokens=cfg.teacher_tokens, teacher_loss=cfg.teacher_loss,
                     extrapolate=cfg.extrapolate, crossover=False, rho=cfg.rho, context=cfg.context,
                     vocab=cfg.vocab)


def query_of(cfg: Config) -> CostQuery:
    """The library's `CostQuery` for these flags (with --tokens)."""
    assert cfg.teacher_params is not None and cfg.tokens is not None
    sizes = parse_sizes(cfg.student_params)
    if len(sizes) > 1 and cfg.students not in (1, len(sizes)):
        raise FitError(f"--students {cfg.students} disagrees with {len(sizes)} listed student sizes")
    students = sizes * cfg.students if len(sizes) == 1 else sizes
    return cfg.cost.settings().query(cfg.teacher_params, tuple(students), cfg.tokens, rho=cfg.rho,
                                     context=cfg.context, vocab=cfg.vocab)


def print_planned(query: PlanQuery, students: int | None, flags: CostFlags, as_json: bool, verb: str) -> int:
    """`plan_and_cost`, printed: what `kdcache plan` and `kdcache cost --compute` both show."""
    result = plan_and_cost(query, students, flags.settings())
    if result.extrapolated:
        print(f"kdcache {verb}: warning: {query.law}: the law is not identified for this recipe, planned "
              f"anyway (--extrapolate): {'; '.join(result.extrapolated)}", file=sys.stderr)
    out = result.to_json()
    print(json.dumps(out, indent=2) if as_json else "\n".join(planned_lines(out)))
    return 0


# --- Text -----------------------------------------------------------------------------------------


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _size(n_bytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes:.3g} bytes"


def _wall(hours: float) -> str:
    if hours >= 48:
        return f"{hours:.4g} h = {hours / 24:.3g} days"
    if hours >= 1:
        return f"{hours:.4g} h"
    return f"{hours * 60:.3g} min" if hours * 60 >= 1 else f"{hours * 3600:.3g} s"


def _gpu_time(gpu_hours: float, gpus: int) -> str:
    return f"{gpu_hours:.4g} GPU-hours ({_wall(gpu_hours / gpus)} on {_count(gpus, 'GPU')})"


def _per_run(label: str, seconds: list[float], gpus: int) -> str:
    if max(seconds) - min(seconds) <= 1e-12 * max(seconds):
        each = " each" if len(seconds) > 1 else ""
        return f"{label} {_gpu_time(seconds[0] / 3600, gpus)}{each}"
    hours = [s / 3600 for s in seconds]
    return (f"{label}s {', '.join(f'{h:.4g}' for h in hours)} GPU-hours "
            f"({', '.join(_wall(h / gpus) for h in hours)} on {_count(gpus, 'GPU')})")


def _assumed(out: dict[str, Any]) -> str:
    rate = f"{out['flops_per_s']:.3g} FLOP/s per GPU"
    rate += (f" (calibrated on {out['time_model']['source']})" if out["calibrated"]
             else f" (peak {out['peak_flops']:.3g} x utilisation {out['utilisation']:.3g})")
    return f"assumed: {rate}, ${out['price_per_gpu_hour']:.4g} per GPU-hour, {_count(out['gpus'], 'GPU')}"


def _money_lines(out: dict[str, Any]) -> list[str]:
    gpus = out["gpus"]
    return [
        f"  online: {out['online_flops']:.3g} FLOPs, {_gpu_time(out['online_gpu_hours'], gpus)}, "
        f"${out['online_cost']:.4g}",
        f"  cache:  {out['cache_flops']:.3g} FLOPs, {_gpu_time(out['cache_gpu_hours'], gpus)}, "
        f"${out['cache_cost']:.4g} (storage ${out['storage_cost']:.4g})",
    ]


def _bandwidth(out: dict[str, Any]) -> str:
    return (f"each student reads {out['read_bandwidth_needed'] / 1e6:.4g} MB/s from the store"
            f" ({'within' if out['read_bandwidth_ok'] else 'MORE than'} the read bandwidth)")


def _store(out: dict[str, Any]) -> str:
    return (f"{_count(out['students'], 'student')}, store {_size(out['store_bytes'])} "
            f"({out['bytes_per_token']:.4g} bytes/token)")


def cost_lines(out: dict[str, Any]) -> list[str]:
    """The text of a `CostEstimate.to_json()`."""
    predicted, model, gpus = out["predicted_s"], out["time_model"], out["gpus"]
    basis = (f"calibrated on {model['source']} ({', '.join(model['calibrated'])})" if out["calibrated"]
             else "from peak x utilisation and the read bandwidth")
    return [
        _store(out),
        f"  {_assumed(out)}",
        *_money_lines(out),
        f"  {_bandwidth(out)}",
        f"  cache pays off from {_count(out['break_even_students'], 'student')}",
        f"  predicted time per run, {basis}:",
        f"    {_per_run('online student', predicted['online_student'], gpus)}",
        f"    {_per_run('offline student', predicted['offline_student'], gpus)}",
        f"    {_per_run('cache job', [predicted['cache']], gpus)}",
        *(f"  note: {note}" for note in model["notes"]),
    ]


BOUND_LINE = "at a search bound: {}; the optimum lies beyond it"
ACCOUNTING_TEXT = {"logits_free": "teacher logits free (cached already)",
                   "logits_counted": "teacher logits counted in the budget"}


def _verdict(row: dict[str, Any], on: str = "") -> str:
    return (f"student loss {row['student_loss']:.4f} distilled vs {row['supervised_loss']:.4f} supervised"
            f"{on} -> {'distil' if row['distill'] else 'train supervised'}")


def _cost_block(cost: dict[str, Any], indent: str) -> list[str]:
    """A plan's cost in brief: what the students cost online and cached; `kdcache cost` has the rest."""
    lines = [f"cost of {_store(cost)}:", *_money_lines(cost),
             f"  cache pays off from {_count(cost['break_even_students'], 'student')}"]
    if not cost["read_bandwidth_ok"]:
        lines.append(f"  {_bandwidth(cost)}")
    return [indent + line for line in lines]


def planned_lines(out: dict[str, Any]) -> list[str]:
    """The text of a `PlannedCost.to_json()`: a scenario recipe or a given teacher's plan, and the cost."""
    fixed = "accountings" in out
    lines = _fixed_lines(out) if fixed else _recipe_lines(out)
    costs = [row["cost"] for row in out["accountings"].values() if "cost" in row] if fixed else (
        [out["cost"]] if out.get("cost") else [])
    if costs:
        lines.append(_assumed(costs[0]))
    if out.get("cost_note"):
        lines.append(f"cost: {out['cost_note']}")
    return lines


def _recipe_lines(out: dict[str, Any]) -> list[str]:
    f = out["flops"]
    teacher = (
        f"teacher {out['teacher_params']:.3g} params x {out['teacher_tokens']:.3g} tokens"
        if out["teacher_params"]
        else "teacher: none reaches L_T (below the law's E)"
    )
    lines = [
        f"scenario {out['scenario']}, compute {out['compute']:.3g} FLOPs, "
        f"student {out['student_params']:.3g} params",
        f"  student tokens {out['student_tokens']:.3g}; {teacher}; teacher loss {out['teacher_loss']:.4f}",
        f"  {_verdict(out)}",
        f"  FLOPs: student training {f['student_training']:.3g}, teacher logits {f['teacher_logits']:.3g}, "
        f"teacher training {f['teacher_training']:.3g}",
    ]
    if out["at_bounds"]:
        lines.append("  " + BOUND_LINE.format(", ".join(out["at_bounds"])))
    if "crossover_compute" in out:
        c = out["crossover_compute"]
        lines.append(
            f"  supervised catches up at {c:.3g} FLOPs" if c else "  no crossover in 1e17-1e27 FLOPs"
        )
    if out.get("cost"):
        lines += _cost_block(out["cost"], "")
    return lines


def _fixed_lines(out: dict[str, Any]) -> list[str]:
    t, sup = out["teacher"], out["supervised_optimal"]
    trained = f" x {t['tokens']:.3g} tokens" if t["tokens"] is not None else ""
    rows = list(out["accountings"].values())
    lines = [
        f"given teacher {t['params']:.3g} params{trained} (its training sunk), loss {t['loss']:.4f}; "
        f"compute {out['compute']:.3g} FLOPs",
        f"student {rows[0]['student_params']:.3g} params",
    ]
    for row in rows:
        f, on = row["flops"], f" on {row['supervised_tokens']:.3g} tokens"
        lines += [
            f"  {ACCOUNTING_TEXT[row['accounting']]}: student {row['student_tokens']:.3g} tokens "
            f"(FLOPs: student {f['student_training']:.3g}, teacher logits {f['teacher_logits']:.3g})",
            f"    {_verdict(row, on)}",
        ]
        if row["at_bounds"]:
            lines.append("    " + BOUND_LINE.format(", ".join(row["at_bounds"])))
        if row.get("cost"):
            lines += _cost_block(row["cost"], "    ")
    lines.append(f"  compute-optimal supervised: {sup['params']:.3g} params x {sup['tokens']:.3g} tokens, "
                 f"loss {sup['loss']:.4f}")
    return lines

