"""The runs table: one row per training run, Parquet on disk, CSV accepted on input.

Training appends rows (`append_run`); fitting reads them (`read_runs`). Appends from
concurrent processes (a sweep's Ray tasks) are serialised with a lock file and land by
an atomic rename, so a killed writer never leaves a torn table. `check_appendable`
lets a run refuse, before it trains, a table it could not append to at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from filelock import FileLock

from kdcache.paths import check_writable
from kdcache.storage.errors import StoreError

RunKind = Literal["supervised", "distill", "online"]
RUN_KINDS: tuple[RunKind, ...] = typing.get_args(RunKind)


@dataclass(frozen=True, kw_only=True)
class RunRow:
    """One training run, as a row of the table; the Parquet schema is derived from these fields.

    Only `params`, `tokens` and `loss` (and `teacher_loss` for the distillation law) are
    needed to fit; tables users bring from elsewhere may hold just those columns.
    """

    run_id: str
    kind: RunKind
    params: int
    """Non-embedding parameters N."""
    tokens: int
    """Training tokens D."""
    loss: float
    """Validation cross-entropy, nats/token."""
    teacher_loss: float | None = None
    """L_T, the teacher's cross-entropy on the data's valid split (distill and online)."""
    teacher_params: int | None = None
    store: str | None = None
    k: int | None = None
    temperature: float | None = None
    lam: float | None = field(default=None, metadata={"column": "lambda"})
    ece: float | None = None
    flops: float | None = None
    wall_s: float | None = None
    tokens_per_s: float | None = None
    layers: int | None = None
    d_model: int | None = None
    n_heads: int | None = None
    vocab_size: int | None = None
    seq_len: int | None = None
    seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The row keyed by column name (`lambda`, not `lam`)."""
        return {_COLUMN[f.name]: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, values: Mapping[str, Any], where: str = "runs-table row") -> RunRow:
        """A row from column names; other keys are ignored (kdcache.json keeps more beside the row)."""
        kwargs = {f: values[c] for f, c in _COLUMN.items() if c in values}
        if kwargs.get("kind") not in RUN_KINDS:
            raise StoreError(f"{where}: field 'kind' must be one of {RUN_KINDS}, got {kwargs.get('kind')!r}")
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a required column missing
            raise StoreError(f"{where}: not a runs-table row ({exc})") from exc


_COLUMN = {f.name: f.metadata.get("column", f.name) for f in dataclasses.fields(RunRow)}
_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64()}


def _arrow_type(hint: Any) -> pa.DataType:
    """The column type of a field's hint: str, int, float, a Literal of strings, or one of them | None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is Literal or (args and typing.get_origin(args[0]) is Literal):
        return pa.string()
    return _ARROW[args[0] if args else hint]


SCHEMA = pa.schema([(_COLUMN[name], _arrow_type(hint))
                    for name, hint in typing.get_type_hints(RunRow).items()])

REQUIRED = ("params", "tokens", "loss")
IDENTITY = ("run_id", "tokens", "loss")
"""The columns that identify a run's row: all stored exactly (a string, an int, a float64)."""


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)


def _textual(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)


def _not_numeric(table: pa.Table, name: str, path: str | os.PathLike[str]) -> StoreError:
    """The error for a numeric column of another type, quoting a value that is no number."""
    values = [v for v in table.column(name).to_pylist() if v is not None]

    def number(v: Any) -> bool:
        try:
            float(v)
        except (TypeError, ValueError):
            return False
        return not isinstance(v, bool)

    example = next((v for v in values if not number(v)), values[0] if values else None)
    kind = table.schema.field(name).type
    return StoreError(
        f"{path}: column '{name}' must hold numbers, but holds {kind} values such as {example!r}")


def _check_unique(table: pa.Table, path: str | os.PathLike[str]) -> None:
    names = table.column_names
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise StoreError(f"{path}: column '{dup}' appears twice")


def _conform(table: pa.Table, path: str | os.PathLike[str]) -> pa.Table:
    """`table` in SCHEMA (absent columns as nulls), or a StoreError naming the first column that won't fit.

    A table another tool wrote (columns in another order, int32, some left out) still takes
    appends; a column of the wrong kind is refused rather than silently converted.
    """
    _check_unique(table, path)
    names = table.column_names
    unknown = [n for n in names if n not in SCHEMA.names]
    if unknown:
        known = ", ".join(SCHEMA.names)
        raise StoreError(f"{path}: unknown runs-table column '{unknown[0]}' (known: {known})")
    columns = []
    for want in SCHEMA:
        if want.name not in names:
            columns.append(pa.nulls(len(table), want.type))
            continue
        have = table.schema.field(want.name).type
        fits = _textual(have) if pa.types.is_string(want.type) else _numeric(have)
        if not fits:
            if not pa.types.is_string(want.type):
                raise _not_numeric(table, want.name, path)
            raise StoreError(f"{path}: column '{want.name}' must hold text, but holds {have} values")
        try:
            columns.append(table.column(want.name).cast(want.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise StoreError(f"{path}: column '{want.name}' holds {have} values that are not {want.type} "
                           f"({exc})") from exc
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _read_parquet(path: Path) -> pa.Table:
    """Read a whole table through one open file.

    Appends replace the file atomically (`os.replace`), but `pq.read_table(path)` stats
    the path and opens it separately: a replace in between gave it the new file with the
    old one's size ("Couldn't deserialize thrift"), which is how a sweep's concurrent
    runs once failed. An open handle pins one version of the file.

    It is read on this thread (`use_threads=False`, through `ParquetFile`, not the dataset
    scanner `pq.read_table` uses): a runs table is small, and the scanner's thread pool, still
    alive at interpreter exit, aborted processes after their work was done ("terminate called
    without an active exception", SIGABRT; 11 of 172 processes that appended 39 rows each on
    a loaded 2-core machine, none of 120 read this way).
    """
    try:
        with open(path, "rb") as fh:
            return pq.ParquetFile(pa.BufferReader(fh.read())).read(use_threads=False)
    except (pa.ArrowException, OSError) as exc:
        raise StoreError(f"{path}: not a readable Parquet runs table ({exc})") from exc


def check_appendable(path: str | os.PathLike[str], flag: str = "--runs", run_id: str | None = None) -> None:
    """Refuse a runs table `append_run` could not extend, before a run spends hours training.

    The row is a run's last act; a table that is corrupt, holds columns of the wrong kind,
    or lies where nothing can be written would otherwise fail only after the training.
    A table that does not exist yet is fine where it can be created (parents included).
    A `run_id` the table already holds is refused: the new row would count one run twice.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        raise StoreError(f"{path}: {flag} tables are appended as Parquet, but a .csv one is read back as CSV "
                       "(name it .parquet)")
    check_writable(path, flag, directory=False)
    if path.exists():
        table = _conform(_read_parquet(path), path)
        if run_id is not None and run_id in table.column("run_id").to_pylist():
            raise StoreError(f"{path}: {flag} already holds a run with run_id {run_id!r} (another run whose "
                             "--out has the same name?): give this one --run-id")


def append_run(path: str | os.PathLike[str], row: RunRow) -> None:
    """Append one run to the Parquet table at `path`, creating it if needed."""
    path = Path(path)
    new = pa.Table.from_pylist([row.to_json()], schema=SCHEMA)
    with FileLock(str(path) + ".lock"):
        table = pa.concat_tables([_conform(_read_parquet(path), path), new]) if path.exists() else new
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        pq.write_table(table, tmp)
        os.replace(tmp, path)


def _same(a: Any, b: Any) -> bool:
    """Equality, with NaN equal to NaN: a diverged run's row must still be found, not re-added."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def has_run(path: str | os.PathLike[str], row: RunRow) -> bool:
    """Whether the table at `path` (absent: none) holds `row`, matched on IDENTITY.

    Lets a rerun tell a finished model whose row was lost from one already recorded, so
    the row is appended exactly once.
    """
    path = Path(path)
    if not path.exists():
        return False
    table = _conform(_read_parquet(path), path)
    key = [row.to_json()[name] for name in IDENTITY]
    stored = zip(*(table.column(name).to_pylist() for name in IDENTITY), strict=True)
    return any(all(_same(a, b) for a, b in zip(key, other, strict=True)) for other in stored)


def read_runs(path: str | os.PathLike[str], required: Iterable[str] = REQUIRED) -> pa.Table:
    """Read a runs table (Parquet, or CSV by suffix) and check the columns a caller needs.

    Known numeric columns must hold numbers: a CSV with "abc" in `loss` is refused here,
    naming the column, rather than deep in a fit.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such runs table")
    try:
        csv = path.suffix.lower() == ".csv"
        table = pacsv.read_csv(path, pacsv.ReadOptions(use_threads=False)) if csv else _read_parquet(path)
    except (pa.ArrowException, OSError) as exc:
        raise StoreError(f"{path}: not a readable runs table ({exc})") from exc
    for name in required:
        if name not in table.column_names:
            raise StoreError(f"{path}: missing column '{name}'")
    _check_unique(table, path)
    for want in SCHEMA:
        known = want.name in table.column_names and not pa.types.is_string(want.type)
        if known and not _numeric(table.schema.field(want.name).type):
            raise _not_numeric(table, want.name, path)
    _check_one_row_per_run(table, path)
    return table


def _check_one_row_per_run(table: pa.Table, path: str | os.PathLike[str]) -> None:
    """Refuse a run counted twice: a repeated run_id, or (for rows without one) a repeated row.

    A fit takes each row as one run; a table concatenated twice, or two runs whose --out
    shared a name, would pass the fit's minimum number of runs and misreport its count.
    """
    ids = table.column("run_id").to_pylist() if "run_id" in table.column_names else [None] * len(table)
    first: dict[Any, int] = {}
    for i, (run_id, row) in enumerate(zip(ids, table.to_pylist(), strict=True)):
        key = ("run_id", run_id) if run_id is not None else ("row", tuple(sorted(row.items(), key=str)))
        if key in first:
            what = f"run_id {run_id!r} appears" if run_id is not None else "the same run appears"
            raise StoreError(f"{path}: {what} twice, in rows {first[key]} and {i}: a run is one row "
                             "(remove the duplicate, or give one of them another run_id)")
        first[key] = i


def read_run_rows(path: str | os.PathLike[str]) -> list[RunRow]:
    """The rows of a table kdcache wrote (every row has its run_id and kind), typed."""
    table = read_runs(path, required=("run_id", "kind", "params", "tokens", "loss"))
    return [RunRow.from_json(row, where=f"{path}: row {i}") for i, row in enumerate(table.to_pylist())]
