"""The paper's findings on hand-made runs: each comes out reproduced, not, or untestable, with its numbers."""

from __future__ import annotations

from kdcache.pipeline.study import findings as f
from kdcache.storage.runs import RunRow

GRID = ["/s/t1", "/s/t2"]
STORES = {"full": "/s/full", "topk": "/s/topk", "tau0.5": "/s/tau0.5", "tau2": "/s/tau2"}


def run(kind: str, n: int, d: int, loss: float, store: str | None = None, lt: float | None = None,
        lam: float | None = None, run_id: str = "r") -> RunRow:
    return RunRow(run_id=run_id, kind=kind, params=n, tokens=d, loss=loss, store=store, teacher_loss=lt,
                  lam=lam)


def test_distillation_wins_early_and_the_gap_closes() -> None:
    rows = [run("supervised", 10, 100, 5.0), run("supervised", 10, 400, 4.0),
            run("distill", 10, 100, 4.5, GRID[0], 3.0), run("distill", 10, 100, 4.7, GRID[1], 3.5),
            run("distill", 10, 400, 3.9, GRID[0], 3.0),
            run("supervised", 99, 100, 4.0, run_id="teacher-x")]  # a teacher's own row: not a student
    got = f.beats_supervised(rows, GRID)
    assert got.reproduced is True and "+0.500 at D=100" in got.numbers and "+0.100 at D=400" in got.numbers
    rows[-2] = run("distill", 10, 400, 3.2, GRID[0], 3.0)  # the gap grows: not reproduced
    assert f.beats_supervised(rows, GRID).reproduced is False
    assert f.beats_supervised(rows[:2], GRID).reproduced is None


def test_capacity_gap_needs_a_weaker_teachers_student_to_win() -> None:
    rows = [run("distill", 10, 400, 4.0, GRID[0], 3.0), run("distill", 10, 400, 3.9, GRID[1], 3.5),
            run("distill", 10, 100, 9.0, GRID[0], 3.0)]  # a smaller budget: ignored
    got = f.capacity_gap(rows, GRID)
    assert got.reproduced is True and "L_T 3.000 -> L_S 4.000" in got.numbers
    rows[1] = run("distill", 10, 400, 4.1, GRID[1], 3.5)
    assert f.capacity_gap(rows, GRID).reproduced is False
    assert f.capacity_gap(rows[:1], GRID).reproduced is None


def test_topk_costs_and_lambda_recovers() -> None:
    rows = [run("distill", 10, 100, 4.00, STORES["full"]), run("distill", 10, 100, 4.10, STORES["topk"]),
            run("distill", 10, 100, 4.02, STORES["topk"], lam=0.7)]
    got = f.topk_and_lambda(rows, STORES)
    assert got.reproduced is True and "+0.1000 nats" in got.numbers
    assert f.topk_and_lambda(rows[:2], STORES).reproduced is None


def test_temperature_one_is_best() -> None:
    rows = [run("distill", 10, 100, 4.1, STORES["topk"]), run("distill", 10, 100, 4.3, STORES["tau0.5"]),
            run("distill", 10, 100, 4.2, STORES["tau2"])]
    got = f.temperature_one(rows, STORES)
    assert got.reproduced is True and got.numbers == "tau 0.5: 4.3000, tau 1: 4.1000, tau 2: 4.2000"
    rows[2] = run("distill", 10, 100, 4.0, STORES["tau2"])
    assert f.temperature_one(rows, STORES).reproduced is False
    assert f.temperature_one(rows[1:2], STORES).reproduced is None
