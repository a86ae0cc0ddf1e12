"""Record files of a source, read streaming: jsonl lines, Parquet row groups, Arrow
IPC files (as `datasets`' `save_to_disk` writes them). Every bad record is one line
naming the file and the record (jsonl: its line number; Parquet and Arrow: the column).

Each reader yields (record number, value, input bytes consumed so far in its unit), so
memory holds one record batch, never a file. The value is the text column's string
(`--format text`), or the raw value of the column(s) a structured format reads: a
conversation's messages, or a (prompt, completion) pair, checked by `chat.py`.

A record is tokenized whole, so its size, not the batch's, sets the tokenizer's memory: a
record over `Columns.max_bytes` is refused before it is tokenized, and before it is read
where the format allows (a jsonl line is read up to the bound; Arrow measures a text
column's values without copying them). A null text is refused like a jsonl `null`: dropping
it would silently lose a record the source holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.config import MAX_RECORD_BYTES

ARROW_BATCH_ROWS = 1024
Record = tuple[int, Any, int]


@dataclass(frozen=True)
class Columns:
    """What a record is read as: one text column (`text`: its values must be strings), or
    the raw values of the columns a structured format reads (one value, or a tuple); and
    the largest record read, in stored bytes (`--max-record-bytes`)."""

    names: tuple[str, ...]
    text: bool = True
    max_bytes: int = MAX_RECORD_BYTES


def too_long(where: str, bound: int, size: int | None = None, what: str = "record") -> PipelineError:
    """The one line for a record over the bound; `size` when it is known (a jsonl line is
    not read past the bound)."""
    have = f"{size:,} bytes" if size is not None else "longer than that"
    return PipelineError(f"{where}: {what} over --max-record-bytes {bound:,} ({have}): a record is "
                         "tokenized whole, ~135-160 MB of memory per MiB; raise the bound to read it "
                         "(field 'max_record_bytes')")


def records(unit: Any, columns: Columns) -> Iterator[Record]:
    """The records of one unit (`corpus.Unit` of kind jsonl, parquet or arrow)."""
    path = Path(unit.paths[0])
    if unit.kind == "jsonl":
        return _jsonl(path, columns)
    if unit.kind == "parquet":
        return _parquet(path, unit.group, unit.first, unit.nbytes, columns)
    return _arrow(path, columns)


def _jsonl(path: Path, columns: Columns) -> Iterator[Record]:
    number, pos, line_no = 0, 0, 0
    with path.open("rb") as f:
        # A cap of bound + 2 holds a line of `bound` bytes and its "\r\n": a longer line
        # comes back cut, and is refused without reading the rest of it.
        while raw := f.readline(columns.max_bytes + 2):
            line_no += 1
            pos += len(raw)
            if len(raw.rstrip(b"\r\n")) > columns.max_bytes:
                raise too_long(f"{path}:{line_no}", columns.max_bytes)
            if not raw.strip():
                continue
            yield number, _jsonl_value(path, line_no, raw, columns), pos
            number += 1


def _jsonl_value(path: Path, line_no: int, raw: bytes, columns: Columns) -> Any:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}:{line_no}: record is not UTF-8 text (byte {exc.start})") from exc
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
    for column in columns.names:
        if not isinstance(record, dict) or column not in record:
            what = "text column" if columns.text else "column"
            raise PipelineError(f"{path}:{line_no}: missing {what} {column!r}")
    values = tuple(record[c] for c in columns.names)
    if columns.text and not isinstance(values[0], str):
        kind = "null" if values[0] is None else type(values[0]).__name__
        raise PipelineError(f"{path}:{line_no}: column {columns.names[0]!r} is {kind}, not a string")
    return values if len(values) > 1 else values[0]


def check_fields(path: Path, schema: Any, columns: Columns) -> None:
    """The columns exist (and a text column holds strings; a structured one does not), or
    one line naming the file and column."""
    view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    for column in columns.names:
        if column not in schema.names:
            what = "text column" if columns.text else "column"
            raise PipelineError(f"{path}: missing {what} {column!r} (has {schema.names})")
        kind = schema.field(column).type
        is_string = pa.types.is_string(kind) or pa.types.is_large_string(kind) or view(kind)
        if columns.text and not is_string:
            raise PipelineError(f"{path}: column {column!r} is {kind}, not a string column")
        if not columns.text and len(columns.names) == 1 and is_string:
            raise PipelineError(f"{path}: column {column!r} is {kind}, not a list of messages "
                                "(a text source: use --format text)")


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


def _values(path: Path, batch: Any, columns: Columns, first: int) -> list[Any]:
    """One record batch's values (a column's, or tuples of several columns'), once each is
    known to be within the size bound and, for text, not null; `first` numbers its first row."""
    if columns.text:
        _check_text(path, batch.column(batch.schema.get_field_index(columns.names[0])), columns, first)
    cols = [batch.column(batch.schema.get_field_index(c)).to_pylist() for c in columns.names]
    values = cols[0] if len(cols) == 1 else list(zip(*cols, strict=True))
    if not columns.text:
        for i, value in enumerate(values):
            size = _nbytes(value)
            if size > columns.max_bytes:
                raise too_long(f"{path}: row {first + i}", columns.max_bytes, size)
    return values


def _check_text(path: Path, column: Any, columns: Columns, first: int) -> None:
    """Nulls and over-long values of a text column, found by Arrow before any is copied."""
    if column.null_count:
        row = first + pc.index(pc.is_null(column), True).as_py()
        raise PipelineError(f"{path}: row {row}: column {columns.names[0]!r} is null, not a string")
    lengths = pc.binary_length(column)
    at = pc.index(pc.greater(lengths, columns.max_bytes), True).as_py()
    if at >= 0:
        raise too_long(f"{path}: row {first + at}", columns.max_bytes, lengths[at].as_py())


def _nbytes(value: Any) -> int:
    """A structured record's text, in UTF-8 bytes: what its rendering and tokens grow with."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _parquet(path: Path, group: int, first: int, nbytes: int, columns: Columns) -> Iterator[Record]:
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PipelineError(f"{path}: not a readable Parquet file ({exc})") from exc
    check_fields(path, f.schema_arrow, columns)
    if f.metadata.num_row_groups == 0:
        return
    rows, done = max(1, f.metadata.row_group(group).num_rows), 0
    for batch in f.iter_batches(row_groups=[group], columns=list(columns.names), batch_size=ARROW_BATCH_ROWS):
        for value in _values(path, batch, columns, first + done):
            done += 1
            yield first + done - 1, value, nbytes * done // rows


def _arrow(path: Path, columns: Columns) -> Iterator[Record]:
    number = 0
    with pa.OSFile(str(path)) as f:
        try:
            reader = pa.ipc.open_stream(f)
        except pa.ArrowInvalid as exc:
            raise PipelineError(f"{path}: not an Arrow IPC stream file ({exc})") from exc
        check_fields(path, reader.schema, columns)
        for batch in reader:
            values = _values(path, batch, columns, number)
            pos = f.tell()
            for value in values:
                yield number, value, pos
                number += 1
