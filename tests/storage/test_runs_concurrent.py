"""The runs table under concurrent appends: a reader in one process never sees a half-written file."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from kdcache.storage.runs import RunRow, append_run, check_appendable, has_run, read_run_rows

APPENDS = 150


def test_readers_never_see_a_half_replaced_table(tmp_path: Path) -> None:
    """Appends from another process replace the file while this one reads it, many times."""
    path = tmp_path / "runs.parquet"
    first = RunRow(run_id="r0", kind="supervised", params=1, tokens=1, loss=1.0)
    append_run(path, first)
    writer = multiprocessing.get_context("spawn").Process(target=_append_many, args=(str(path), APPENDS))
    writer.start()
    reads = 0
    while writer.is_alive() or reads == 0:
        check_appendable(path)
        assert has_run(path, first)
        reads += 1
    writer.join()
    assert writer.exitcode == 0 and reads > 10
    assert [r.tokens for r in read_run_rows(path)] == [1, *range(1, APPENDS + 1)]


def _append_many(path: str, n: int) -> None:
    """The writer: a process that appends and exits, as every training run does (an abort at its
    exit, once seen here, came from the Parquet reader's threads: `storage.runs._read_parquet`)."""
    for i in range(1, n + 1):
        append_run(path, RunRow(run_id=f"r{i}", kind="supervised", params=1, tokens=i, loss=1.0))
