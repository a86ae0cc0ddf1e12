"""Catalogue cases: prepare's sources (issue 26): a `datasets` directory whose state.json
names files outside it, a record over the size bound, a null text in Parquet, and a file
the source lists but no one can read (with Ray workers)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.e2e.catalogue import Case, _parquet, _write

PREPARE = "prepare --out {w}/d2 --vocab-size 300 --quiet --source "


def _datasets_naming(filename: str) -> Callable[[Path], None]:
    """A save_to_disk directory whose state.json names `filename`, and a secret beside it."""
    def apply(w: Path) -> None:
        _write("secret.txt", "SECRET " * 50)(w)
        _write("ds/dataset_info.json", "{}")(w)
        _write("ds/state.json", json.dumps({"_data_files": [{"filename": filename}]}))(w)
    return apply


def _broken_link(w: Path) -> None:
    _write("src/a.jsonl", "".join(json.dumps({"text": f"doc {i} words"}) + "\n" for i in range(40)))(w)
    (w / "src" / "b.jsonl").symlink_to(w / "gone.jsonl")


def _text_files(w: Path) -> None:
    _write("txt/a.txt", "small")(w)
    _write("txt/b.txt", "y" * 1001)(w)


CASES: list[Case] = [
    Case("prepare-datasets-path-traversal", PREPARE + "{w}/ds",
         r"ds/state.json: field '_data_files\[0\].filename' is '../secret.txt', not the name of an .arrow",
         _datasets_naming("../secret.txt")),
    Case("prepare-datasets-outside-arrow", PREPARE + "{w}/ds",
         r"ds/state.json: field '_data_files\[0\].filename' is '../x.arrow': must be a relative path inside",
         _datasets_naming("../x.arrow")),
    Case("prepare-record-over-bound", PREPARE + "{w}/big.jsonl --max-record-bytes 1000",
         r"big.jsonl:2: record over --max-record-bytes 1,000 .*\(field 'max_record_bytes'\)",
         _write("big.jsonl", '{"text": "short"}\n{"text": "' + "x" * 5000 + '"}\n')),
    Case("prepare-text-file-over-bound", PREPARE + "{w}/txt --max-record-bytes 1000",
         r"txt/b.txt: a text file, one document, over --max-record-bytes 1,000 \(1,001 bytes\)",
         _text_files),
    Case("prepare-parquet-null-text", PREPARE + "{w}/n.parquet",
         r"n.parquet: row 1: column 'text' is null, not a string",
         _parquet("n.parquet", {"text": ["first", None, "third"]})),
    Case("prepare-workers-broken-link", "prepare --out {w}/d2 --vocab-size 300 --quiet --workers 2 "
         "--source {w}/src/*.jsonl", r"src/b.jsonl: cannot read the file \(No such file or directory\)",
         _broken_link),
    Case("prepare-workers-datasets-missing-file", "prepare --out {w}/d2 --vocab-size 300 --quiet --workers 2 "
         "--source {w}/ds", r"ds/state.json: field '_data_files\[0\].filename' is 'gone.arrow': no such file",
         _datasets_naming("gone.arrow")),
]
