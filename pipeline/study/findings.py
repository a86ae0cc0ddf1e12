"""The paper's findings, each checked against the runs of one `kdcache run` (`findings.json`).

Busbridge et al. (2025) report, among others:
1. distillation beats supervised training at small token budgets, and the gap closes as
   the student's tokens grow;
2. the capacity gap: a stronger teacher does not always make a better student;
3. a top-k teacher distribution at lambda = 1 costs loss against the full distribution,
   and mixing next-token loss back in (lambda = 0.7) recovers it;
4. temperature 1 is the best distillation temperature.

Each is tested on one student size, trained at several seeds (init and data order) under
every condition it compares. A finding rests on one or two *effects*, each a difference of
validation losses between two conditions taken seed by seed (runs with the same seed see
the same rows in the same order, so the pairing removes part of the noise). An effect is
shown when its mean over seeds has the claimed sign and exceeds its spread, the range
(max - min) of the per-seed differences: then every seed agrees, by a margin. The finding
is "reproduced" when all its effects are shown, "not shown" otherwise, and "not testable"
with fewer than `MIN_SEEDS` seeds under some condition. A single run cannot tell an effect
from seed noise, which on the demo's models is a few hundredths of a nat.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.pipeline.study.layout import RunLayout
from kdcache.pipeline.study.report import TEACHER_PREFIX
from kdcache.storage.runs import RunRow, read_run_rows

MIN_SEEDS = 3
REPRODUCED, NOT_SHOWN, NOT_TESTABLE = "reproduced", "not shown", "not testable"
Select = Callable[[RunRow], bool]


@dataclass(frozen=True)
class Condition:
    """One set of runs that differ only in seed: seed -> validation loss."""

    name: str
    losses: dict[int, float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.losses.values())

    @property
    def spread(self) -> float:
        return max(self.losses.values()) - min(self.losses.values())

    def to_json(self) -> dict[str, Any]:
        found = bool(self.losses)
        return {"name": self.name, "seeds": len(self.losses), "mean": self.mean if found else None,
                "spread": self.spread if found else None}

    def text(self) -> str:
        """'tau 1 5.3151 ± 0.2289 (3 seeds)': the mean and half the range."""
        n = len(self.losses)
        band = f" ± {self.spread / 2:.4f}" if n > 1 else ""
        return f"{self.name} {self.mean:.4f}{band} ({n} seed{'s' if n != 1 else ''})"


@dataclass(frozen=True)
class Effect:
    """A per-seed difference the claim says is positive, over the seeds every condition has."""

    what: str
    per_seed: dict[int, float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.per_seed.values())

    @property
    def spread(self) -> float:
        return max(self.per_seed.values()) - min(self.per_seed.values())

    @property
    def shown(self) -> bool:
        return self.mean > 0 and self.mean > self.spread

    def to_json(self) -> dict[str, Any]:
        return {"what": self.what, "seeds": len(self.per_seed), "mean": self.mean, "spread": self.spread,
                "shown": self.shown}

    def text(self) -> str:
        return (f"{self.what}: {self.mean:+.4f} nats, seed spread {self.spread:.4f} "
                f"({'shown' if self.shown else 'not shown'})")


@dataclass(frozen=True)
class Finding:
    claim: str
    verdict: str
    """reproduced, not shown, or not testable."""
    numbers: str
    """The comparison it rests on, in words and nats."""
    conditions: list[Condition] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)

    @property
    def reproduced(self) -> bool | None:
        return None if self.verdict == NOT_TESTABLE else self.verdict == REPRODUCED

    def to_json(self) -> dict[str, Any]:
        return {"claim": self.claim, "verdict": self.verdict, "reproduced": self.reproduced,
                "numbers": self.numbers, "conditions": [c.to_json() for c in self.conditions],
                "effects": [e.to_json() for e in self.effects]}


def _lam(row: RunRow) -> float:
    return 1.0 if row.lam is None else row.lam


def _tau(row: RunRow) -> float:
    return 1.0 if row.temperature is None else row.temperature


def _seed(row: RunRow) -> int:
    return 0 if row.seed is None else row.seed


def _students(rows: Sequence[RunRow]) -> list[RunRow]:
    return [r for r in rows if not r.run_id.startswith(TEACHER_PREFIX)]


def condition(rows: Sequence[RunRow], name: str, where: Select) -> Condition:
    """The runs `where` selects, by seed (a seed run twice keeps its first row)."""
    losses: dict[int, float] = {}
    for r in rows:
        if where(r):
            losses.setdefault(_seed(r), r.loss)
    return Condition(name, dict(sorted(losses.items())))


def _distilled(store: str | None, lam: float = 1.0, tokens: int | None = None) -> Select:
    return lambda r: (r.kind == "distill" and store is not None and r.store == store and _lam(r) == lam
                      and (tokens is None or r.tokens == tokens))


def _supervised(tokens: int) -> Select:
    return lambda r: r.kind == "supervised" and r.tokens == tokens


def effect(what: str, plus: Sequence[Condition], minus: Sequence[Condition]) -> Effect:
    """sum(plus) - sum(minus), seed by seed, over the seeds all of them have."""
    seeds = set.intersection(*(set(c.losses) for c in (*plus, *minus)))
    return Effect(what, {s: sum(c.losses[s] for c in plus) - sum(c.losses[s] for c in minus)
                         for s in sorted(seeds)})


def judge(claim: str, conditions: list[Condition], effects: list[Effect]) -> Finding:
    """Reproduced when every effect is shown over at least MIN_SEEDS seeds."""
    few = [c for c in conditions if len(c.losses) < MIN_SEEDS]
    parts = [c.text() for c in conditions if c.losses] + [e.text() for e in effects if e.per_seed]
    numbers = "; ".join(parts)
    if few or any(len(e.per_seed) < MIN_SEEDS for e in effects):
        names = ", ".join(f"{c.name} ({len(c.losses)})" for c in few) or "the conditions' common seeds"
        return Finding(claim, NOT_TESTABLE, f"fewer than {MIN_SEEDS} seeds: {names}. {numbers}".strip(),
                       conditions, effects)
    verdict = REPRODUCED if all(e.shown for e in effects) else NOT_SHOWN
    return Finding(claim, verdict, numbers, conditions, effects)


def beats_supervised(rows: Sequence[RunRow], store: str | None) -> Finding:
    """Supervised minus distilled (from `store`) at the smallest budget is positive, and larger
    than at the largest budget."""
    claim = "distillation beats supervised at small token budgets, and the gap closes as tokens grow"
    students = _students(rows)
    both = sorted({r.tokens for r in students if r.kind == "supervised"}
                  & {r.tokens for r in students if _distilled(store)(r)})
    if len(both) < 2:
        return Finding(claim, NOT_TESTABLE, "no supervised and distilled runs at two budgets")
    small, large = both[0], both[-1]
    sup = [condition(students, f"supervised D={d:,}", _supervised(d)) for d in (small, large)]
    dist = [condition(students, f"distilled D={d:,}", _distilled(store, tokens=d)) for d in (small, large)]
    effects = [effect(f"supervised - distilled at D={small:,}", [sup[0]], [dist[0]]),
               effect(f"that gap minus the gap at D={large:,}", [sup[0], dist[1]], [dist[0], sup[1]])]
    return judge(claim, [sup[0], dist[0], sup[1], dist[1]], effects)


def capacity_gap(rows: Sequence[RunRow], grid: Sequence[str]) -> Finding:
    """At the largest budget distilled from two teachers, the strongest teacher's (lowest L_T)
    student is worse than another teacher's."""
    claim = "capacity gap: a stronger teacher (lower L_T) does not always give a better student"
    runs = [r for r in rows if r.kind == "distill" and r.store in grid and _lam(r) == 1.0 and _tau(r) == 1.0
            and r.teacher_loss is not None]
    budgets = sorted({r.tokens for r in runs if len({x.store for x in runs if x.tokens == r.tokens}) >= 2})
    if not budgets:
        return Finding(claim, NOT_TESTABLE, "the student was not distilled from two teachers at one budget")
    d = budgets[-1]
    teacher_loss = {r.store: r.teacher_loss for r in runs if r.tokens == d}
    order = sorted(teacher_loss, key=lambda s: teacher_loss[s] or 0.0)
    conditions = [condition(runs, f"L_T {teacher_loss[s]:.3f} ({Path(s).name}) D={d:,}",
                            _distilled(s, tokens=d)) for s in order]
    strongest, others = conditions[0], conditions[1:]
    best_other = min(others, key=lambda c: c.mean)
    found = effect(f"strongest teacher's student - best other's ({best_other.name.split(' (')[0]})",
                   [strongest], [best_other])
    return judge(claim, conditions, [found])


def topk_and_lambda(rows: Sequence[RunRow], stores: dict[str, str]) -> Finding:
    claim = "top-k at lambda = 1 costs loss against the full distribution, and lambda = 0.7 recovers it"
    full = condition(rows, "full", _distilled(stores.get("full")))
    topk = condition(rows, "top-k lambda 1", _distilled(stores.get("topk")))
    mixed = condition(rows, "top-k lambda 0.7", _distilled(stores.get("topk"), 0.7))
    if not (full.losses and topk.losses and mixed.losses):
        return Finding(claim, NOT_TESTABLE, "the full-store, top-k and lambda = 0.7 runs are not all there")
    effects = [effect("top-k - full", [topk], [full]),
               effect("top-k lambda 1 - top-k lambda 0.7", [topk], [mixed])]
    return judge(claim, [full, topk, mixed], effects)


def temperature_one(rows: Sequence[RunRow], stores: dict[str, str]) -> Finding:
    claim = "temperature 1 is the best distillation temperature"
    one = condition(rows, "tau 1", _distilled(stores.get("topk")))
    others = [condition(rows, f"tau {float(name[3:]):g}", _distilled(store))
              for name, store in sorted(stores.items(), key=lambda kv: float(kv[0][3:]) if
                                        kv[0].startswith("tau") else 0.0) if name.startswith("tau")]
    others = [c for c in others if c.losses]
    if not one.losses or not others:
        return Finding(claim, NOT_TESTABLE, "runs at temperature 1 and another temperature are not all there")
    best_other = min(others, key=lambda c: c.mean)
    found = effect(f"best other temperature ({best_other.name}) - tau 1", [best_other], [one])
    return judge(claim, sorted([one, *others], key=lambda c: float(c.name[4:])), [found])


def findings(rows: Sequence[RunRow], stores: dict[str, str], grid: Sequence[str]) -> list[Finding]:
    """Every finding on `rows` (one student size): `grid` lists the teachers' top-k stores, the
    first being the findings' teacher; `stores` names its full, top-k and tau<T> stores."""
    return [beats_supervised(rows, grid[0] if grid else None), capacity_gap(rows, grid),
            topk_and_lambda(rows, stores), temperature_one(rows, stores)]


def write_findings(out: Path, stores: dict[str, str], grid: Sequence[str], layers: int) -> list[Finding]:
    """Check every finding against the runs of OUT's runs table whose student has `layers`
    layers, and write OUT's findings.json."""
    layout = RunLayout(root=Path(out))
    rows = [r for r in read_run_rows(layout.runs) if r.layers == layers]
    found = findings(rows, stores, grid)
    layout.findings.write_text(json.dumps([f.to_json() for f in found], indent=2))
    return found
