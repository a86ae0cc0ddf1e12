"""Text sources for `kdcache prepare`: documents as (name, text) pairs in a stable order.

`stdlib` is the embedded default: the `.py` files of the running Python's standard
library (found through `sysconfig`, site-packages excluded), about 30 MB of real text
on every machine with no download. Otherwise a file, a directory (every file under
it), or a glob; `.jsonl` and `.parquet` files contribute one document per record from
a text column, every other file is one UTF-8 document. Names are paths relative to
the source root, so splits do not depend on where the data lives.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from kdcache.pipeline.errors import PipelineError

RECORD_SUFFIXES = (".jsonl", ".parquet")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts) and p.is_file()
    ]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _source_files(source: str) -> tuple[Path, list[Path]]:
    if any(ch in source for ch in "*?["):
        matches = [Path(m) for m in sorted(glob.glob(source, recursive=True))]
        # Names are relative to the directory before the first wildcard.
        cut = min(i for i in (source.find(ch) for ch in "*?[") if i >= 0)
        prefix = Path(source[:cut] or ".")
        root = prefix if prefix.is_dir() else prefix.parent
    else:
        path = Path(source)
        if not path.exists():
            raise PipelineError(f"{source}: no such file or directory (field 'source')")
        matches, root = [path], path if path.is_dir() else path.parent
    files: list[Path] = []
    for m in matches:
        files.extend(sorted(p for p in m.rglob("*") if p.is_file()) if m.is_dir() else [m])
    if not files:
        raise PipelineError(f"{source}: source has no files (field 'source')")
    return root, sorted(set(files), key=lambda p: p.as_posix())


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data:
        raise PipelineError(f"{path}: not a text file (contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text (byte {exc.start})") from exc


def _records(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        for line_no, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or text_column not in record:
                raise PipelineError(f"{path}:{line_no}: missing text column {text_column!r}")
            if not isinstance(record[text_column], str):
                raise PipelineError(f"{path}:{line_no}: column {text_column!r} is not a string")
            yield record[text_column]
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PipelineError(f"{path}: not a readable Parquet file ({exc})") from exc
    if text_column not in schema.names:
        raise PipelineError(f"{path}: missing text column {text_column!r} (has {schema.names})")
    if not (pa.types.is_string(schema.field(text_column).type) or pa.types.is_large_string(
        schema.field(text_column).type
    )):
        raise PipelineError(f"{path}: column {text_column!r} is not a string column")
    for value in pq.read_table(path, columns=[text_column]).column(0).to_pylist():
        if value is not None:
            yield value


def iter_documents(source: str, *, text_column: str = "text") -> Iterator[tuple[str, str]]:
    """Every document of `source` as (stable name, text), in a deterministic order."""
    if source == "stdlib":
        root, files = _stdlib_files()
        for path in files:
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue  # the stdlib ships a few deliberately mis-encoded test files
            yield path.relative_to(root).as_posix(), text
        return
    root, files = _source_files(source)
    for path in files:
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        if path.suffix in RECORD_SUFFIXES:
            for i, text in enumerate(_records(path, text_column)):
                yield f"{name}#{i}", text
        else:
            yield name, _read_text(path)
