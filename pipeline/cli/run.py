"""`kdcache run`: the whole pipeline end to end (prepare, teachers, caches, students, fits, report)."""

from __future__ import annotations

from dataclasses import dataclass

HELP = "Run the whole pipeline end to end into one directory, ending with report.html; rerun to resume."


@dataclass(frozen=True, kw_only=True)
class Config:
    preset: str = "demo"
    """demo (minutes on 2 CPU cores) or study (about an hour on 2 CPU cores; more runs, larger models)."""
    out: str = "out"
    """Output directory: data, teachers, stores, students, runs table, fits, plots, report.html."""
    ray_address: str | None = None
    """Address of an existing Ray cluster; default starts a local one."""
    device: str = "cpu"
    """torch device the teachers and students train on (cpu, cuda)."""


def run(cfg: Config) -> int:
    from kdcache.pipeline.study.run import run_study
    from kdcache.pipeline.study.summary import summary_lines

    report = run_study(cfg.out, cfg.preset, cfg.ray_address, device=cfg.device)
    print("\n".join(summary_lines(report.parent)))
    print(f"wrote {report}")
    return 0
