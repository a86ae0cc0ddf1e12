"""`kdcache plan`: the compute-optimal distillation recipe for a student size and a budget.

A recipe outside the paper's bounds [1e6, 1e17] on N_T, D_S, D_T is refused by
`kdcache.fit.recipes` (one line naming the bound); this module only prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.fit import plots, recipes
from kdcache.fit.errors import FitError
from kdcache.fit.presets import load_distillation

HELP = "Compute-optimal distillation (Eq. 10) for a student size and compute, in one of four scenarios."
SCENARIOS = ("best", "inference", "pretraining", "pretraining+inference")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    law: str = "paper"
    """Distillation law: the 'paper' preset or a `kdcache fit --law distillation --json` file."""
    student_params: float
    """Student non-embedding parameters N_S."""
    compute: float
    """Total budget in FLOPs (Eq. 9)."""
    scenario: str = "best"
    """best (teacher free), inference (pay its logits), pretraining (train it), pretraining+inference."""
    rho: float = 128
    """Aspect ratio d_model / n_layers used in F(N)."""
    context: int = 4096
    """Context length used in F(N)."""
    vocab: int = 32768
    """Vocabulary size used in F(N)."""
    no_crossover: bool = False
    """Skip the search for the compute where supervised catches up (saves seconds)."""
    json: bool = False
    """Print the result as JSON."""
    plot: str | None = None
    """PNG of allocations against compute per scenario (capacity gap in STEM-capacity-gap.png)."""

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise FitError(f"--scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if not (0 < self.student_params < math.inf and 0 < self.compute < math.inf):
            raise FitError("--student-params and --compute must be positive and finite")


def run(cfg: Config) -> int:
    law = load_distillation(cfg.law)
    shape = {"rho": cfg.rho, "context": cfg.context, "vocab": cfg.vocab}
    out = recipes.plan(law, cfg.student_params, cfg.compute, cfg.scenario, crossover=not cfg.no_crossover,
                       **shape).to_json()
    if cfg.plot:
        _plot(law, cfg, shape)
    print(json.dumps(out, indent=2) if cfg.json else _text(out))
    return 0


def _plot(law: Any, cfg: Config, shape: dict[str, float]) -> None:
    budgets = cfg.compute * np.logspace(-2, 2, 9)
    # Budgets whose recipe would leave the bounds are left out of the curves, not plotted.
    found = {s: [recipes.recipe_or_none(law, cfg.student_params, float(c), s, **shape) for c in budgets]
             for s in SCENARIOS}
    table = {s: [r.to_dict() for r in rs if r is not None] for s, rs in found.items()}
    plots.allocations(
        table, cfg.plot, f"Compute-optimal distillation of a {cfg.student_params:.3g}-param student"
    )
    path = Path(str(cfg.plot))
    sizes = [cfg.student_params / 4, cfg.student_params, cfg.student_params * 4]
    plots.capacity_gap(law, sizes, path.with_name(path.stem + "-capacity-gap.png"))


def _text(out: dict[str, Any]) -> str:
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
        f"  student loss {out['student_loss']:.4f} distilled vs {out['supervised_loss']:.4f} supervised"
        f" -> {'distil' if out['distill'] else 'train supervised'}",
        f"  FLOPs: student training {f['student_training']:.3g}, teacher logits {f['teacher_logits']:.3g}, "
        f"teacher training {f['teacher_training']:.3g}",
    ]
    if "crossover_compute" in out:
        c = out["crossover_compute"]
        lines.append(
            f"  supervised catches up at {c:.3g} FLOPs" if c else "  no crossover in 1e17-1e27 FLOPs"
        )
    return "\n".join(lines)
