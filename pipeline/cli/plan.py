"""`kdcache plan`: the compute-optimal distillation recipe for a student size and a budget, or the
student of a teacher you already have; with `--students M`, what M students of it cost.

A recipe outside the paper's bounds [1e6, 1e17] on N_T, D_S, D_T is refused by
`kdcache.fit.recipes` (one line naming the bound), and one from a law not identified for
it by `kdcache.fit.scope` unless `--extrapolate`; `plan_and_cost` does the work and this
module only prints (the same text as `kdcache cost --compute`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.fit import plots, recipes
from kdcache.fit.errors import FitError
from kdcache.fit.presets import load_distillation
from kdcache.pipeline.cli.cost import CostFlags, print_planned, with_cost_flags
from kdcache.pipeline.study.cost import PlanQuery

HELP = ("Compute-optimal distillation (Eq. 10) for a student size and compute, in one of four scenarios, "
        "or for a teacher you have; optionally what M students cost.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    law: str = "paper"
    """Distillation law: the 'paper' preset or a `kdcache fit --law distillation --json` file."""
    student_params: float
    """Student non-embedding parameters N_S."""
    compute: float
    """Total budget in FLOPs (Eq. 9)."""
    scenario: str | None = None
    """best (default: teacher free), inference (pay its logits), pretraining (train it),
    pretraining+inference; the scenario chooses the teacher, so not with --teacher-params."""
    teacher_params: float | None = None
    """A teacher you have, N_T (its training is sunk): plan its student with its logits free and counted."""
    teacher_tokens: float | None = None
    """The given teacher's training tokens D_T (its loss L_T from the law's supervised part)."""
    teacher_loss: float | None = None
    """The given teacher's loss L_T in nats/token, instead of --teacher-tokens."""
    extrapolate: bool = False
    """Plan even where the law is not identified for the recipe (a coefficient on its search bound,
    or far outside the fitted runs): a warning instead of an error."""
    students: int | None = None
    """Add the cost of M students of the recipe, cache versus online (default: no cost)."""
    rho: float = 128
    """Aspect ratio d_model / n_layers used in F(N)."""
    context: int = 4096
    """Context length used in F(N)."""
    vocab: int = 32768
    """Vocabulary size used in F(N) (and for the store's ids in the cost)."""
    cost: CostFlags = dataclasses.field(default_factory=CostFlags)
    no_crossover: bool = False
    """Skip the search for the compute where supervised catches up (saves seconds)."""
    json: bool = False
    """Print the result as JSON."""
    plot: str | None = None
    """PNG of allocations against compute per scenario (capacity gap in STEM-capacity-gap.png)."""

    def __post_init__(self) -> None:
        # The scenario, the numbers and --students are checked once, by `PlanQuery` and `plan_and_cost`.
        if self.plot and self.teacher_params is not None:
            raise FitError("--plot draws the four scenarios' recipes for --student-params, "
                           "not a given teacher's")

    @classmethod
    def from_flat(cls, **flags: Any) -> Config:
        return with_cost_flags(cls, flags)

    def query(self) -> PlanQuery:
        return PlanQuery(law=self.law, compute=self.compute, student_params=self.student_params,
                         scenario=self.scenario, teacher_params=self.teacher_params,
                         teacher_tokens=self.teacher_tokens, teacher_loss=self.teacher_loss,
                         extrapolate=self.extrapolate, crossover=not self.no_crossover, rho=self.rho,
                         context=self.context, vocab=self.vocab)


def run(cfg: Config) -> int:
    code = print_planned(cfg.query(), cfg.students, cfg.cost, cfg.json, "plan")
    if cfg.plot:
        _plot(load_distillation(cfg.law), cfg, {"rho": cfg.rho, "context": cfg.context, "vocab": cfg.vocab})
    return code


def _plot(law: Any, cfg: Config, shape: dict[str, float]) -> None:
    assert cfg.plot is not None
    n_s = cfg.student_params
    budgets = cfg.compute * np.logspace(-2, 2, 9)
    # Budgets whose recipe would leave the bounds are left out of the curves, not plotted.
    found = {s: [recipes.recipe_or_none(law, n_s, float(c), s, **shape) for c in budgets]
             for s in recipes.SCENARIOS}
    table = {s: [r.to_dict() for r in rs if r is not None] for s, rs in found.items()}
    plots.allocations(table, cfg.plot, f"Compute-optimal distillation of a {n_s:.3g}-param student")
    path = Path(cfg.plot)
    plots.capacity_gap(law, [n_s / 4, n_s, n_s * 4], path.with_name(path.stem + "-capacity-gap.png"))
