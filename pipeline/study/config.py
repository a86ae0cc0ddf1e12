"""`kdcache sweep`'s settings, kept free of torch and Ray so the command line loads fast.

The sweep itself (`sweep.py`) imports the trainer and Ray; the CLI imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdcache.pipeline.errors import PipelineError


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """A grid of training runs sharing data, stores and one runs table."""

    data: str
    """DATA directory every run trains and evaluates on."""
    runs: str
    """Runs table (Parquet) every run appends its row to."""
    out: str
    """Directory of the runs' MODEL directories (OUT/<run_id>)."""
    grid: list[dict[str, Any]]
    """Groups of `kdcache train` settings; lists expand as a Cartesian product."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Train settings shared by every run (a group's own values win)."""
    threads: int = 1
    """torch threads (and Ray CPUs) per run."""
    ray_address: str | None = None
    """Address of an existing Ray cluster; default starts a local one."""
    json: bool = False
    """Print the summary as JSON."""

    def __post_init__(self) -> None:
        if not self.grid or not all(isinstance(g, dict) for g in self.grid):
            raise PipelineError("field 'grid' must be a non-empty list of mappings")
        if self.threads < 1:
            raise PipelineError(f"field 'threads' must be >= 1, got {self.threads}")
        if self.defaults is not None and not isinstance(self.defaults, dict):
            raise PipelineError("field 'defaults' must be a mapping of train settings")
