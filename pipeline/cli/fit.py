"""`kdcache fit`: fit the supervised (Eq. 1) or distillation (Eq. 8) law to a runs table."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from kdcache.fit import plots
from kdcache.fit.errors import FitError
from kdcache.fit.report import fit_runs
from kdcache.fit.selection import DEFAULT_WHERE
from kdcache.paths import check_writable
from kdcache.storage.runs import read_runs

HELP = "Fit the supervised or distillation scaling law to a runs table (Parquet or CSV)."
LAWS = ("supervised", "distillation")


def parse_fixed(spec: str | None) -> dict[str, float]:
    """'gamma=1,c0=2.5' -> {'gamma': 1.0, 'c0': 2.5}."""
    fixed: dict[str, float] = {}
    for item in filter(None, (spec or "").split(",")):
        name, sep, value = item.partition("=")
        try:
            fixed[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise FitError(f"--fix expects NAME=VALUE[,NAME=VALUE], got {item!r}")
    return fixed


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    runs: str
    """Runs table: Parquet or CSV with params, tokens, loss (and teacher_loss, kind)."""
    law: str
    """Which law: supervised or distillation."""
    delta: float = 1e-4
    """Huber delta of the log-space objective (Chinchilla/Epoch used 1e-3)."""
    fix: str | None = None
    """Parameters held fixed, e.g. gamma=1 (the Chinchilla form)."""
    supervised: str | None = None
    """Distillation: the supervised law, FIT.json or paper/chinchilla/epoch (default: fit supervised rows)."""
    bootstrap: int = 0
    """Bootstrap resamples for 90% intervals (0: none)."""
    holdout_loss: float | None = None
    """Extrapolation check: fit runs with loss >= this, test the rest (default: 2.2/2.3 or lowest 20%)."""
    where: str = DEFAULT_WHERE
    """Rows to fit: COLUMN=VALUE[|VALUE] or COLUMN!=VALUE clauses joined by commas (kind, lambda,
    temperature, store, seed, run_id with wildcards), or 'all'. The default is the law grid
    `kdcache run` fits: lambda 1, temperature 1, no findings-only runs (finding-*)."""
    json: bool = False
    """Print the result as JSON."""
    plot: str | None = None
    """Write a PNG of fit versus data (held-out region shaded)."""

    def __post_init__(self) -> None:
        if self.law not in LAWS:
            raise FitError(f"--law must be one of {LAWS}, got {self.law!r}")
        if self.delta <= 0 or self.bootstrap < 0:
            raise FitError("--delta must be > 0 and --bootstrap >= 0")


def run(cfg: Config) -> int:
    if cfg.plot:
        check_writable(cfg.plot, "--plot", directory=False)
    report = fit_runs(read_runs(cfg.runs), cfg.law, source=cfg.runs, delta=cfg.delta,
                      fixed=parse_fixed(cfg.fix), supervised=cfg.supervised, bootstrap=cfg.bootstrap,
                      threshold=cfg.holdout_loss, where=cfg.where)
    out = report.to_json()
    if cfg.plot:
        plots.fit_vs_data(report.law_object(), report.data, report.extrapolation.threshold, cfg.plot)
    print(json.dumps(out, indent=2) if cfg.json else _text(out))
    return 0


def _text(out: dict[str, Any]) -> str:
    lines = [
        f"{out['law']} law fitted to {out['runs']} runs "
        f"(Huber delta {out['delta']:g}, objective {out['objective']:.6g})"
    ]
    chosen = out.get("selection")
    if chosen and chosen["left_out"]:
        left = "; ".join(f"{len(ids)} by {clause} ({_ids(ids)})"
                         for clause, ids in chosen["left_out"].items())
        lines.append(f"  selected {chosen['selected']} of {chosen['runs_in_table']} rows with --where "
                     f"'{chosen['where']}'" + (f"; left out {left}" if left else ""))
    intervals = (out.get("bootstrap") or {}).get("intervals", {})
    for name, value in out["params"].items():
        ci = intervals.get(name)
        fixed = " (fixed)" if name in out["fixed"] else ""
        band = f"  90% CI [{ci[0]:.4g}, {ci[1]:.4g}]" if ci and not fixed else ""
        lines.append(f"  {name:>6} = {value:.6g}{fixed}{band}")
    ex = out["extrapolation"]
    if ex["mean_relative_error"] is not None:
        lines.append(
            f"extrapolation: fit on {ex['fitted_runs']} runs with loss >= {ex['threshold']:.4g}, "
            f"{ex['held_out_runs']} held out: mean rel. error {100 * ex['mean_relative_error']:.2f}%, "
            f"max {100 * ex['max_relative_error']:.2f}%"
        )
    bounds = [*out["at_bounds"], *(f"{n} (supervised law)" for n in out.get("supervised_at_bounds", []))]
    lines.append(
        f"at_bounds: {', '.join(bounds)}: not determined by these runs; `kdcache plan` gives no recipe "
        "from this law without --extrapolate" if bounds
        else "at_bounds: none (every coefficient inside its bounds)"
    )
    return "\n".join(lines)


def _ids(ids: list[str], shown: int = 3) -> str:
    """'a, b, c and 9 more'."""
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more
