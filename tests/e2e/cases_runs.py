"""Catalogue cases: the runs table counts each run once, `cost` answers within bounds, one
`kdcache run` per output directory."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from tests.e2e.catalogue import _HELD, COST, TRAIN, Case


def _doubled_runs(drop_ids: bool = False) -> object:
    """`dup.parquet`: the world's runs table with its first row appended again."""
    def apply(w: Path) -> None:
        table = pq.read_table(w / "runs.parquet")
        if drop_ids:
            table = table.drop_columns(["run_id"])
        pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), w / "dup.parquet")
    return apply


def _hold_run_lock(w: Path) -> None:
    """Another `kdcache run` writing `o` (this process holds its lock for the test's duration)."""
    (w / "o").mkdir()
    lock = FileLock(str(w / "o" / ".kdcache-run.lock"), timeout=0)
    lock.acquire()
    _HELD.append(lock)


CASES: list[Case] = [
    Case("fit-duplicate-run-id", "fit --runs {w}/dup.parquet --law supervised",
         r"dup.parquet: run_id 'r0' appears twice, in rows 0 and 3", _doubled_runs()),
    Case("fit-duplicate-row", "fit --runs {w}/dup.parquet --law supervised",
         r"dup.parquet: the same run appears twice, in rows 0 and 3", _doubled_runs(drop_ids=True)),
    Case("train-run-id-taken", TRAIN + " --out {w}/r0 --runs {w}/runs.parquet",
         r"runs.parquet: --runs already holds a run with run_id 'r0'"),
    Case("cost-teacher-params-bound", "cost --teacher-params 1e40 --student-params 1e8 --tokens 1e10",
         r"--teacher-params 1e\+40 is outside \(0, 1e17\]"),
    Case("cost-student-params-bound", "cost --teacher-params 1e9 --student-params 1e8,1e30 --tokens 1e10",
         r"--student-params 1e\+30 is outside"),
    Case("cost-utilisation-bound", COST + " --utilisation 1.5", r"--utilisation 1.5 is outside \(0, 1\]"),
    Case("cost-price-negative", COST + " --price-per-hour -2", r"--price-per-hour -2 is outside \[0, 1e6\]"),
    Case("plan-gpus-bound", "plan --law paper --student-params 1e8 --compute 1e20 --gpus 100000000",
         r"--gpus 100000000 is outside \(0, 1e7\]"),
    Case("run-out-locked", "run --out {w}/o", r"o: another kdcache run is writing this --out",
         _hold_run_lock),
]
