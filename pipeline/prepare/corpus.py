"""Text sources for `kdcache prepare`: a source becomes a list of read units, each read as
bounded batches of (name, text) documents, in a stable order.

`stdlib` is the embedded default: the `.py` files of the running Python's standard
library (found through `sysconfig`, site-packages excluded), about 30 MB of real text
on every machine with no download. `stdlib-chat` is the same files as conversations
about their functions and classes (`stdlib_chat.py`), for `--format chat`.
Otherwise a file, a directory, or a glob. `.jsonl`,
`.parquet` and `.arrow` files give one document per record from a text column; every
other file is one UTF-8 document. A directory written by Hugging Face `datasets`'
`save_to_disk` (`dataset_info.json`, `state.json`, `data-*.arrow`) is read in its
`state.json` order; a directory holding record files (a `datasets` parquet export with
its README) reads only those. Hidden files are skipped.

A read unit is what one worker reads alone: a group of small text files, one jsonl or
Arrow file, or one Parquet row group. Names are paths relative to the source root plus
`#record`, so split assignment does not depend on where the data lives or on workers.

`state.json` is data, not a path list to trust: a `datasets` directory fetched from
elsewhere could name `../secret.txt` or `/etc/hostname` and have it tokenized into the
splits, so each of its file names must be an `.arrow` file that resolves inside the
directory. A text file is one document, tokenized whole, so it is held to the record bound
(`--max-record-bytes`) by its size, before it is read: cutting it into pieces would send
parts of one document to different splits. Every file is stat'ed when the source is
listed; a file that goes away after that is named in one line by whichever process reads it.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare import stdlib_chat
from kdcache.pipeline.prepare.records import Columns, parquet_groups, records, too_long

RECORD_SUFFIXES = (".jsonl", ".parquet", ".arrow")
STDLIB_KINDS = ("stdlib", "stdlib-chat")
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
UNIT_FILES = 64  # small text files read by one unit: fewer, larger tasks
UNIT_TEXT_BYTES = 4 << 20


@dataclass(frozen=True)
class Unit:
    """What one reader reads: `kind` is text, jsonl, parquet (one row group) or arrow."""

    kind: str
    paths: tuple[str, ...]
    names: tuple[str, ...]
    nbytes: int  # input bytes it accounts for on the progress bar
    group: int = 0  # the Parquet row group
    first: int = 0  # record number of its first record within the file

    def to_row(self) -> dict[str, Any]:
        return {"kind": self.kind, "paths": list(self.paths), "names": list(self.names),
                "nbytes": self.nbytes, "group": self.group, "first": self.first}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Unit:
        """The unit back from `to_row` (a row of the Ray dataset of units)."""
        return cls(kind=str(row["kind"]), paths=tuple(row["paths"]), names=tuple(row["names"]),
                   nbytes=int(row["nbytes"]), group=int(row["group"]), first=int(row["first"]))


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts) and p.is_file()
    ]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _visible(path: Path, root: Path) -> bool:
    rel = path.relative_to(root).parts if path.is_relative_to(root) else path.parts[-1:]
    return not any(part.startswith(".") for part in rel)


def _dir_files(d: Path) -> list[Path]:
    files = sorted(p for p in d.rglob("*") if p.is_file() and _visible(p, d))
    records = [p for p in files if p.suffix in RECORD_SUFFIXES]
    return records or files  # a parquet export's README is not a document


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
        files.extend(_dir_files(m) if m.is_dir() else [m])
    if not files:
        raise PipelineError(f"{source}: source has no files (field 'source')")
    return root, sorted(set(files), key=lambda p: p.as_posix())


def _saved_dataset_files(d: Path) -> list[Path] | None:
    """The Arrow files of a `save_to_disk` directory in `state.json` order; None when `d`
    is not one. A DatasetDict (`dataset_dict.json`) gives its splits in its own order."""
    if (d / "dataset_dict.json").is_file():
        out: list[Path] = []
        for i, split in enumerate(_json_field(d / "dataset_dict.json", "splits")):
            where = _inside(d, split, f"{d}/dataset_dict.json: field 'splits[{i}]'")
            out += _saved_dataset_files(where) or []
        return out
    if not (d / "state.json").is_file() and not any(d.glob("data-*.arrow")):
        return None
    if not (d / "dataset_info.json").is_file():
        raise PipelineError(f"{d}: a datasets save_to_disk directory without dataset_info.json "
                            "(copy it whole, or pass the .arrow files as a glob)")
    files = []
    for i, entry in enumerate(_json_field(d / "state.json", "_data_files")):
        field = f"{d}/state.json: field '_data_files[{i}].filename'"
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.endswith(".arrow"):
            raise PipelineError(f"{field} is {name!r}, not the name of an .arrow file")
        path = _inside(d, name, field)
        if not path.is_file():
            raise PipelineError(f"{field} is {name!r}: no such file in {d}")
        files.append(path)
    return files


def _json_field(path: Path, key: str) -> list[Any]:
    """The list `key` of a `datasets` JSON file, or one line naming the file."""
    try:
        value = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError) as exc:
        raise PipelineError(f"{path}: unreadable datasets metadata ({exc})") from exc
    if not isinstance(value, list):
        raise PipelineError(f"{path}: field '{key}' is {type(value).__name__}, not a list")
    return value


def _inside(d: Path, name: Any, field: str) -> Path:
    """`d / name` for a relative name that stays inside `d`, symlinks resolved."""
    rel = PurePosixPath(name) if isinstance(name, str) else None
    if rel is None or not name or rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise PipelineError(f"{field} is {name!r}: must be a relative path inside the directory")
    path = d / rel
    if not path.resolve().is_relative_to(d.resolve()):
        raise PipelineError(f"{field} is {name!r}: a symlink that leads out of the directory")
    return path


def _units_of_file(path: Path, name: str) -> list[Unit]:
    try:
        size = path.stat().st_size
    except OSError as exc:  # a broken symlink a glob matched, or a file gone since it was listed
        raise PipelineError(f"{path}: cannot read the file ({exc.strerror}) (field 'source')") from exc
    if path.suffix != ".parquet":
        kind = path.suffix[1:] if path.suffix in RECORD_SUFFIXES else "text"
        return [Unit(kind, (str(path),), (name,), size)]

    return [Unit("parquet", (str(path),), (name,), nbytes, group=g, first=first)
            for g, first, nbytes in parquet_groups(path)]


def _group_text(units: list[Unit]) -> list[Unit]:
    """Merge runs of single text-file units, so a tree of small files is not one task each."""
    out: list[Unit] = []
    for u in units:
        last = out[-1] if out else None
        if (u.kind in ("text", *STDLIB_KINDS) and last is not None and last.kind == u.kind
                and len(last.paths) < UNIT_FILES and last.nbytes + u.nbytes <= UNIT_TEXT_BYTES):
            out[-1] = Unit(u.kind, last.paths + u.paths, last.names + u.names, last.nbytes + u.nbytes)
        else:
            out.append(u)
    return out


def read_units(source: str) -> list[Unit]:
    """The source as read units, in document order; cheap (stats files and Parquet footers)."""
    if source in STDLIB_KINDS:
        root, files = _stdlib_files()
        return _group_text([Unit(source, (str(p),), (p.relative_to(root).as_posix(),), p.stat().st_size)
                            for p in files])
    saved = _saved_dataset_files(Path(source)) if Path(source).is_dir() else None
    root, files = (Path(source), saved) if saved is not None else _source_files(source)
    units: list[Unit] = []
    for path in files:
        path = path.resolve() if not path.is_absolute() else path
        rel = path.relative_to(root.resolve()) if path.is_relative_to(root.resolve()) else path
        units += _units_of_file(path, rel.as_posix())
    if not units:
        raise PipelineError(f"{source}: source has no files (field 'source')")
    return _group_text(units)


def read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data:
        raise PipelineError(f"{path}: not a text file (contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 text (byte {exc.start})") from exc


Batch = tuple[list[str], list[Any], int]  # names, texts (or records), input bytes they account for


def read_unit(unit: Unit, columns: Columns, batch_bytes: int) -> Iterator[Batch]:
    """The unit's documents as batches of about `batch_bytes` of input: non-empty texts, or
    the records (conversations, prompt/completion pairs) of a structured format."""
    try:
        yield from _read_unit(unit, columns, batch_bytes)
    except OSError as exc:  # in a Ray worker too: the file, not a traceback, names the fault
        where = exc.filename or unit.paths[0]
        raise PipelineError(f"{where}: cannot read the file ({exc.strerror or exc}); it was there when "
                            "the source was listed (field 'source')") from exc


def _read_unit(unit: Unit, columns: Columns, batch_bytes: int) -> Iterator[Batch]:
    _check_shape(unit, columns)
    if unit.kind in ("text", "stdlib"):
        yield from _text_batches(unit, batch_bytes, columns.max_bytes)
        return
    if unit.kind == "stdlib-chat":
        yield from _stdlib_chat_batches(unit, batch_bytes)
        return
    names: list[str] = []
    values: list[Any] = []
    size, done = 0, 0
    for number, value, pos in records(unit, columns):
        if value or not columns.text:
            names.append(f"{unit.names[0]}#{number}")
            values.append(value)
            size += len(value) if columns.text else 0
        if size >= batch_bytes or (not columns.text and pos - done >= batch_bytes):
            yield names, values, pos - done
            names, values, size, done = [], [], 0, pos
    if names:
        yield names, values, unit.nbytes - done


def _check_shape(unit: Unit, columns: Columns) -> None:
    """A text source read as records, or the chat corpus read as text: one line."""
    if not columns.text and unit.kind in ("text", "stdlib"):
        raise PipelineError(f"{unit.paths[0]}: a text file, but --format chat and completion read "
                            "records (.jsonl, .parquet, .arrow, a datasets directory, or stdlib-chat)")
    if columns.text and unit.kind == "stdlib-chat":
        raise PipelineError("stdlib-chat: a chat corpus; read it with --format chat")


def _stdlib_chat_batches(unit: Unit, batch_bytes: int) -> Iterator[Batch]:
    names: list[str] = []
    values: list[Any] = []
    nbytes = 0
    for path, name in zip(unit.paths, unit.names, strict=True):
        nbytes += Path(path).stat().st_size
        for doc, messages in stdlib_chat.conversations(Path(path), name):
            names.append(doc)
            values.append(messages)
        if nbytes >= batch_bytes:
            yield names, values, nbytes
            names, values, nbytes = [], [], 0
    if names or nbytes:
        yield names, values, nbytes


def _text_batches(unit: Unit, batch_bytes: int, max_bytes: int) -> Iterator[Batch]:
    names: list[str] = []
    texts: list[str] = []
    size, nbytes = 0, 0
    for path, name in zip(unit.paths, unit.names, strict=True):
        file_bytes = Path(path).stat().st_size
        if file_bytes > max_bytes:
            raise too_long(str(path), max_bytes, file_bytes, "a text file, one document,")
        if unit.kind == "stdlib":
            try:
                text = Path(path).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue  # the stdlib ships a few deliberately mis-encoded test files
        else:
            text = read_text(Path(path))
        nbytes += file_bytes
        if text:
            names.append(name)
            texts.append(text)
            size += len(text)
        if size >= batch_bytes:
            yield names, texts, nbytes
            names, texts, size, nbytes = [], [], 0, 0
    if names:
        yield names, texts, nbytes
