"""The paper's findings, each checked against the runs of one `kdcache run` (`findings.json`).

Busbridge et al. (2025) report, among others:
1. distillation beats supervised training at small token budgets, and the gap closes as
   the student's tokens grow;
2. the capacity gap: a stronger teacher does not always make a better student;
3. a top-k teacher distribution at lambda = 1 costs loss against the full distribution,
   and mixing next-token loss back in (lambda = 0.7) recovers it;
4. temperature 1 is the best distillation temperature.

Each is turned into a comparison of validation losses between runs of the same student
size and budget, and is reported as reproduced, not reproduced, or not testable (runs
missing), with the numbers it rests on. Differences are single runs, one seed each: the
report says so rather than calling small differences significant.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdcache.pipeline.study.layout import RunLayout
from kdcache.pipeline.study.report import TEACHER_PREFIX
from kdcache.storage.runs import RunRow, read_run_rows


@dataclass(frozen=True)
class Finding:
    claim: str
    reproduced: bool | None
    """None: the runs to test it are missing."""
    numbers: str
    """The comparison it rests on, in words and nats."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _lam(row: RunRow) -> float:
    return 1.0 if row.lam is None else row.lam


def _students(rows: Sequence[RunRow]) -> list[RunRow]:
    return [r for r in rows if not r.run_id.startswith(TEACHER_PREFIX)]


def beats_supervised(rows: Sequence[RunRow], grid: Sequence[str]) -> Finding:
    claim = "distillation beats supervised at small token budgets, and the gap closes as tokens grow"
    sup = {(r.params, r.tokens): r.loss for r in _students(rows) if r.kind == "supervised"}
    best: dict[tuple[int, int], float] = {}
    for r in rows:
        if r.kind == "distill" and r.store in grid and _lam(r) == 1.0:
            key = (r.params, r.tokens)
            best[key] = min(best.get(key, float("inf")), r.loss)
    by_size: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for (n, d), loss in sorted(best.items()):
        if (n, d) in sup:
            by_size[n].append((d, sup[(n, d)] - loss))
    sizes = {n: gaps for n, gaps in by_size.items() if len(gaps) >= 2}
    if not sizes:
        return Finding(claim, None, "no student size has distilled and supervised runs at two budgets")
    ok = all(gaps[0][1] > 0 and gaps[-1][1] < gaps[0][1] for gaps in sizes.values())
    parts = [f"N={n:,}: supervised - best distilled = "
             + ", ".join(f"{gap:+.3f} at D={d:,}" for d, gap in gaps) for n, gaps in sizes.items()]
    return Finding(claim, ok, "; ".join(parts))


def capacity_gap(rows: Sequence[RunRow], grid: Sequence[str]) -> Finding:
    claim = "capacity gap: a stronger teacher (lower L_T) does not always give a better student"
    runs = [r for r in rows if r.kind == "distill" and r.store in grid and _lam(r) == 1.0]
    largest: dict[int, int] = {}
    for r in runs:
        largest[r.params] = max(largest.get(r.params, 0), r.tokens)
    parts, seen = [], False
    for n in sorted(largest):
        pairs = sorted((r.teacher_loss, r.loss) for r in runs
                       if r.params == n and r.tokens == largest[n] and r.teacher_loss is not None)
        if len(pairs) < 2:
            continue
        strongest_wins = min(pairs, key=lambda p: p[1]) == pairs[0]
        seen = seen or not strongest_wins
        listed = ", ".join(f"L_T {t:.3f} -> L_S {s:.3f}" for t, s in pairs)
        parts.append(f"N={n:,} at D={largest[n]:,}: {listed}"
                     + ("" if strongest_wins else " (not the strongest teacher's student is best)"))
    if not parts:
        return Finding(claim, None, "no student size was distilled from two teachers")
    return Finding(claim, seen, "; ".join(parts))


def _single(rows: Sequence[RunRow], store: str | None, lam: float = 1.0) -> float | None:
    found = [r.loss for r in rows if store is not None and r.store == store and _lam(r) == lam]
    return found[0] if found else None


def topk_and_lambda(rows: Sequence[RunRow], stores: dict[str, str]) -> Finding:
    claim = "top-k at lambda = 1 costs loss against the full distribution, and lambda = 0.7 recovers it"
    full = _single(rows, stores.get("full"))
    topk, mixed = _single(rows, stores.get("topk")), _single(rows, stores.get("topk"), 0.7)
    if None in (full, topk, mixed):
        return Finding(claim, None, "the full-store, top-k and lambda = 0.7 runs are not all there")
    assert full is not None and topk is not None and mixed is not None
    ok = topk > full and mixed < topk
    return Finding(claim, ok, f"full {full:.4f}, top-k lambda 1 {topk:.4f} ({topk - full:+.4f} nats), "
                              f"top-k lambda 0.7 {mixed:.4f} ({mixed - full:+.4f} against full)")


def temperature_one(rows: Sequence[RunRow], stores: dict[str, str]) -> Finding:
    claim = "temperature 1 is the best distillation temperature"
    losses = {1.0: _single(rows, stores.get("topk"))}
    for name, store in stores.items():
        if name.startswith("tau"):
            losses[float(name[3:])] = _single(rows, store)
    known = {t: loss for t, loss in losses.items() if loss is not None}
    if len(known) < 2 or 1.0 not in known:
        return Finding(claim, None, "runs at temperature 1 and another temperature are not all there")
    ok = min(known, key=lambda t: known[t]) == 1.0
    return Finding(claim, ok, ", ".join(f"tau {t:g}: {loss:.4f}" for t, loss in sorted(known.items())))


def findings(rows: Sequence[RunRow], stores: dict[str, str], grid: Sequence[str]) -> list[Finding]:
    return [beats_supervised(rows, grid), capacity_gap(rows, grid), topk_and_lambda(rows, stores),
            temperature_one(rows, stores)]


def write_findings(out: Path, stores: dict[str, str], grid: Sequence[str]) -> list[Finding]:
    """Check every finding against OUT's runs table and write OUT's findings.json."""
    layout = RunLayout(root=Path(out))
    rows = read_run_rows(layout.runs)
    found = findings(rows, stores, grid)
    layout.findings.write_text(json.dumps([f.to_json() for f in found], indent=2))
    return found
