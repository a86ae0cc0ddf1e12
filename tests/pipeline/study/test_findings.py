"""The paper's findings on hand-made runs at three seeds: each effect is judged against its spread
across seeds, and a finding is reproduced, not shown, or not testable."""

from __future__ import annotations

from collections.abc import Sequence

from kdcache.pipeline.study import findings as f
from kdcache.storage.runs import RunRow

GRID = ["/s/t1", "/s/t2"]
STORES = {"full": "/s/full", "topk": "/s/topk", "tau0.5": "/s/tau0.5", "tau2": "/s/tau2"}
NOISE = (0.0, 0.02, -0.01)  # per-seed offsets shared by every condition (same seed, same data order)


def runs(kind: str, d: int, loss: float, store: str | None = None, lt: float | None = None,
         lam: float | None = None, temperature: float | None = None, jitter: Sequence[float] = (0, 0, 0),
         run_id: str = "r") -> list[RunRow]:
    """One condition at seeds 0, 1, 2: loss + the shared noise + this condition's own jitter."""
    return [RunRow(run_id=f"{run_id}{s}", kind=kind, params=10, tokens=d, loss=loss + NOISE[s] + jitter[s],
                   store=store, teacher_loss=lt, lam=lam, temperature=temperature, seed=s) for s in range(3)]


def test_distillation_wins_early_and_the_gap_closes() -> None:
    rows = [*runs("supervised", 100, 5.0), *runs("supervised", 400, 4.0),
            *runs("distill", 100, 4.5, GRID[0], 3.0), *runs("distill", 400, 3.9, GRID[0], 3.0),
            *runs("distill", 100, 4.0, GRID[1], 3.5),  # another teacher: not this finding's
            *runs("supervised", 100, 1.0, run_id="teacher-x")]  # a teacher's own row: not a student
    got = f.beats_supervised(rows, GRID[0])
    assert got.verdict == f.REPRODUCED and got.reproduced is True
    first, closing = got.effects
    assert abs(first.mean - 0.5) < 1e-12 and abs(closing.mean - 0.4) < 1e-12 and first.spread < 1e-12
    rows[9:12] = runs("distill", 400, 3.2, GRID[0], 3.0)  # the gap grows: not shown
    assert f.beats_supervised(rows, GRID[0]).verdict == f.NOT_SHOWN
    assert f.beats_supervised(rows[:6], GRID[0]).verdict == f.NOT_TESTABLE


def test_an_effect_inside_the_seed_spread_is_not_shown() -> None:
    """Top-k is worse than full by 0.047 on average, but one seed says the opposite: not shown."""
    rows = [*runs("distill", 100, 4.00, STORES["full"]),
            *runs("distill", 100, 4.03, STORES["topk"], jitter=(0.04, 0.06, -0.05)),
            *runs("distill", 100, 3.90, STORES["topk"], lam=0.7)]
    got = f.topk_and_lambda(rows, STORES)
    costs = got.effects[0]
    assert costs.per_seed[2] < 0 < costs.mean and costs.mean < costs.spread and not costs.shown
    assert got.verdict == f.NOT_SHOWN and got.reproduced is False
    rows[3:6] = runs("distill", 100, 4.10, STORES["topk"], jitter=(0.0, 0.01, -0.01))  # now beyond it
    assert f.topk_and_lambda(rows, STORES).verdict == f.REPRODUCED
    two_seeds = [r for r in rows if r.seed != 2]
    got = f.topk_and_lambda(two_seeds, STORES)
    assert got.verdict == f.NOT_TESTABLE and "fewer than 3 seeds" in got.numbers


def test_capacity_gap_needs_a_weaker_teachers_student_to_win() -> None:
    rows = [*runs("distill", 400, 4.0, GRID[0], 3.0), *runs("distill", 400, 3.9, GRID[1], 3.5),
            *runs("distill", 100, 9.0, GRID[0], 3.0)]  # a smaller budget: ignored
    got = f.capacity_gap(rows, GRID)
    assert got.verdict == f.REPRODUCED and abs(got.effects[0].mean - 0.1) < 1e-12
    assert "L_T 3.000" in got.numbers
    rows[3:6] = runs("distill", 400, 4.1, GRID[1], 3.5)
    assert f.capacity_gap(rows, GRID).verdict == f.NOT_SHOWN
    assert f.capacity_gap(rows[:3], GRID).verdict == f.NOT_TESTABLE


def test_temperature_one_is_best() -> None:
    rows = [*runs("distill", 100, 4.1, STORES["topk"]),
            *runs("distill", 100, 4.3, STORES["tau0.5"], temperature=0.5),
            *runs("distill", 100, 4.2, STORES["tau2"], temperature=2.0)]
    got = f.temperature_one(rows, STORES)
    assert got.verdict == f.REPRODUCED and "tau 2" in got.effects[0].what
    assert [c.name for c in got.conditions] == ["tau 0.5", "tau 1", "tau 2"]
    rows[6:9] = runs("distill", 100, 4.0, STORES["tau2"], temperature=2.0)
    assert f.temperature_one(rows, STORES).verdict == f.NOT_SHOWN
    assert f.temperature_one(rows[3:6], STORES).verdict == f.NOT_TESTABLE
