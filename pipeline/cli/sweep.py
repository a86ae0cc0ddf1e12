"""`kdcache sweep`: a grid of training runs as Ray tasks, sharing stores and one runs table."""

from __future__ import annotations

import json

from kdcache.pipeline.study.config import SweepConfig as Config

HELP = "Run a grid of students (supervised, distilled from stores, online) as Ray tasks; --config SWEEP.yaml."

__all__ = ["HELP", "Config", "run"]


def run(cfg: Config) -> int:
    from kdcache.pipeline.study.sweep import run_sweep

    result = run_sweep(cfg)
    if cfg.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(f"{result.runs} runs: {result.done} trained, {result.skipped} already finished, "
              f"{len(result.failed)} failed")
        for run_id, reason in result.failed.items():
            print(f"  {run_id}: {reason}")
    return 1 if result.failed else 0
