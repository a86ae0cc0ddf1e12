"""The runs table: one row per training run, Parquet on disk, CSV accepted on input.

Training appends rows (`append_run`); fitting reads them (`read_runs`). Appends from
concurrent processes (a sweep's Ray tasks) are serialised with a lock file and land by
an atomic rename, so a killed writer never leaves a torn table.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from filelock import FileLock

from kdcache.fit.errors import FitError

RUN_KINDS = ("supervised", "distill", "online")

SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("kind", pa.string()),
        ("params", pa.int64()),  # non-embedding parameters N
        ("tokens", pa.int64()),  # training tokens D
        ("loss", pa.float64()),  # validation cross-entropy, nats/token
        ("teacher_loss", pa.float64()),  # L_T (distill/online)
        ("teacher_params", pa.int64()),
        ("store", pa.string()),
        ("k", pa.int64()),
        ("temperature", pa.float64()),
        ("lambda", pa.float64()),
        ("ece", pa.float64()),
        ("flops", pa.float64()),
        ("wall_s", pa.float64()),
        ("tokens_per_s", pa.float64()),
        ("layers", pa.int64()),
        ("d_model", pa.int64()),
        ("n_heads", pa.int64()),
        ("vocab_size", pa.int64()),
        ("seq_len", pa.int64()),
        ("seed", pa.int64()),
    ]
)

REQUIRED = ("params", "tokens", "loss")


def append_run(path: str | os.PathLike[str], row: Mapping[str, Any]) -> None:
    """Append one run to the Parquet table at `path`, creating it if needed."""
    unknown = set(row) - set(SCHEMA.names)
    if unknown:
        raise FitError(f"{path}: unknown runs-table columns {sorted(unknown)}")
    if row.get("kind") not in RUN_KINDS:
        raise FitError(f"{path}: field 'kind' must be one of {RUN_KINDS}, got {row.get('kind')!r}")
    path = Path(path)
    new = pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names}], schema=SCHEMA)
    with FileLock(str(path) + ".lock"):
        table = pa.concat_tables([pq.read_table(path), new]) if path.exists() else new
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)


def read_runs(path: str | os.PathLike[str], required: Iterable[str] = REQUIRED) -> pa.Table:
    """Read a runs table (Parquet, or CSV by suffix) and check the columns a caller needs."""
    path = Path(path)
    if not path.is_file():
        raise FitError(f"{path}: no such runs table")
    try:
        table = pacsv.read_csv(path) if path.suffix.lower() == ".csv" else pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FitError(f"{path}: not a readable runs table ({exc})") from exc
    for name in required:
        if name not in table.column_names:
            raise FitError(f"{path}: missing column '{name}'")
    return table


def column(table: pa.Table, name: str, path: str | os.PathLike[str] = "runs table") -> np.ndarray:
    """A numeric column as float64, refusing missing or non-finite values by name."""
    values = np.asarray(table.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise FitError(f"{path}: column '{name}' has {int(bad.sum())} missing or non-finite values")
    return values
