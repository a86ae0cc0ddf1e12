"""Record files of a text source, read streaming: jsonl lines, Parquet row groups, Arrow
IPC files (as `datasets`' `save_to_disk` writes them). Every bad record is one line
naming the file and the record (jsonl: its line number; Parquet and Arrow: the column).

Each reader yields (record number, text, input bytes consumed so far in its unit), so
memory holds one record batch, never a file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kdcache.pipeline.errors import PipelineError

ARROW_BATCH_ROWS = 1024
Record = tuple[int, str | None, int]


def records(unit: Any, text_column: str) -> Iterator[Record]:
    """The records of one unit (`corpus.Unit` of kind jsonl, parquet or arrow)."""
    path = Path(unit.paths[0])
    if unit.kind == "jsonl":
        return _jsonl(path, text_column)
    if unit.kind == "parquet":
        return _parquet(path, unit.group, unit.first, unit.nbytes, text_column)
    return _arrow(path, text_column)


def _jsonl(path: Path, column: str) -> Iterator[Record]:
    number, pos = 0, 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            pos += len(raw)
            if not raw.strip():
                continue
            yield number, _jsonl_text(path, line_no, raw, column), pos
            number += 1


def _jsonl_text(path: Path, line_no: int, raw: bytes, column: str) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}:{line_no}: record is not UTF-8 text (byte {exc.start})") from exc
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
    if not isinstance(record, dict) or column not in record:
        raise PipelineError(f"{path}:{line_no}: missing text column {column!r}")
    text = record[column]
    if not isinstance(text, str):
        raise PipelineError(f"{path}:{line_no}: column {column!r} is {type(text).__name__}, not a string")
    return text


def check_text_field(path: Path, schema: Any, column: str) -> None:
    """The column exists and holds strings, or one line naming the file and column."""
    if column not in schema.names:
        raise PipelineError(f"{path}: missing text column {column!r} (has {schema.names})")
    kind = schema.field(column).type
    view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or view(kind)):
        raise PipelineError(f"{path}: column {column!r} is {kind}, not a string column")


def parquet_groups(path: Path) -> list[tuple[int, int, int]]:
    """(row group, its first row, its compressed bytes) for each row group of a Parquet file."""
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise PipelineError(f"{path}: not a readable Parquet file ({exc})") from exc
    out, first = [], 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        size = sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        out.append((g, first, size))
        first += group.num_rows
    return out or [(0, 0, path.stat().st_size)]


def _parquet(path: Path, group: int, first: int, nbytes: int, column: str) -> Iterator[Record]:
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PipelineError(f"{path}: not a readable Parquet file ({exc})") from exc
    check_text_field(path, f.schema_arrow, column)
    if f.metadata.num_row_groups == 0:
        return
    rows, done = max(1, f.metadata.row_group(group).num_rows), 0
    for batch in f.iter_batches(row_groups=[group], columns=[column], batch_size=ARROW_BATCH_ROWS):
        for text in batch.column(0).to_pylist():
            done += 1
            yield first + done - 1, text, nbytes * done // rows


def _arrow(path: Path, column: str) -> Iterator[Record]:
    number = 0
    with pa.OSFile(str(path)) as f:
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid as exc:
            raise PipelineError(f"{path}: not an Arrow IPC stream file ({exc})") from exc
        check_text_field(path, reader.schema, column)
        for batch in reader:
            values = batch.column(batch.schema.get_field_index(column)).to_pylist()
            pos = f.tell()
            for text in values:
                yield number, text, pos
                number += 1
