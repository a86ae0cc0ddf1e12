"""Every path under the output directory of `kdcache run`, named once.

The layout is the contract between the run's stages (`run.py`, `findings.py`, `plots.py`)
and the page that summarises them (`report.py`); tests check it on disk:

    OUT/data/                  token data (`kdcache prepare`)
    OUT/teachers/<name>/       teacher MODEL directories
    OUT/stores/<name>/         logit stores
    OUT/students/<run_id>/     student MODEL directories
    OUT/runs.parquet           every run's row, teachers included
    OUT/fits/runs.parquet      the runs fitted (the law grid at lambda = 1)
    OUT/fits/<law>.json        supervised.json, distillation.json: the fits (`kdcache fit --json`)
    OUT/fits/notes.json        what was left out of a fit, or why a law was not fitted
    OUT/findings.json          the paper's findings checked against the runs
    OUT/plans.json             recipes (`kdcache plan --json` outputs)
    OUT/costs.json             cache-versus-online costs (`kdcache cost --json` outputs)
    OUT/plots/<figure>.png     the report's figures; cost-<store>.png; skipped.json (figures not drawn)
    OUT/report.html            the page
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True, kw_only=True)
class RunLayout:
    """The paths of one run directory `root`."""

    root: Path

    FIGURES: ClassVar[tuple[str, ...]] = ("loss-vs-tokens", "capacity-gap", "predicted-vs-observed",
                                          "allocations")
    """The figures `plots.py` draws from the run, by stem, in the report's order."""
    PNG: ClassVar[str] = ".png"
    """Suffix of every figure in plots/."""

    def rel(self, path: Path) -> str:
        """`path` as the report and the messages name it: relative to the run directory."""
        return path.relative_to(self.root).as_posix()

    @property
    def lock(self) -> Path:
        """Held by the one `kdcache run` writing this directory, for the whole run."""
        return self.root / ".kdcache-run.lock"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def teachers(self) -> Path:
        return self.root / "teachers"

    def teacher(self, name: str) -> Path:
        return self.teachers / name

    @property
    def stores(self) -> Path:
        return self.root / "stores"

    def store(self, name: str) -> Path:
        return self.stores / name

    @property
    def students(self) -> Path:
        return self.root / "students"

    @property
    def runs(self) -> Path:
        return self.root / "runs.parquet"

    @property
    def fits(self) -> Path:
        return self.root / "fits"

    @property
    def fit_runs(self) -> Path:
        return self.fits / "runs.parquet"

    def fit(self, law: str) -> Path:
        """The fit of `law` ('supervised' or 'distillation')."""
        return self.fits / f"{law}.json"

    @property
    def notes(self) -> Path:
        return self.fits / "notes.json"

    @property
    def findings(self) -> Path:
        return self.root / "findings.json"

    @property
    def plans(self) -> Path:
        return self.root / "plans.json"

    @property
    def costs(self) -> Path:
        return self.root / "costs.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def figure(self, stem: str) -> Path:
        return self.plots / f"{stem}{self.PNG}"

    def cost_plot(self, store: str) -> Path:
        """The cost-against-students figure of the store named `store`."""
        return self.figure(f"cost-{store}")

    @property
    def skipped(self) -> Path:
        """The figures not drawn, with the reason each."""
        return self.plots / "skipped.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def parts(self) -> tuple[tuple[Path, str, bool], ...]:
        """The report's overview: (path, what it is, whether to count its entries)."""
        return (
            (self.data, "token data", False),
            (self.teachers, "teacher models", True),
            (self.stores, "logit stores", True),
            (self.students, "student models", True),
            (self.runs, "runs table", False),
            (self.fit("supervised"), "supervised fit", False),
            (self.fit("distillation"), "distillation fit", False),
            (self.plans, "recipes", False),
            (self.costs, "cost estimates", False),
            (self.plots, "plots", True),
        )
