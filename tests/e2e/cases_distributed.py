"""Catalogue cases: distributed launches and train's output (--out apart from every input)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.e2e.catalogue import HF, TRAIN, Case, _write


def _plain_hf_copy(w: Path) -> None:
    """A Hugging Face model directory without kdcache.json (as one from the Hub is)."""
    shutil.copytree(w / "teacher", w / "plain")
    (w / "plain" / "kdcache.json").unlink()


CASES: list[Case] = [
    Case("train-out-is-student", HF + " --student {w}/plain --out {w}/plain",
         r"plain: --out is the --student .*plain \(training would write over its input\)", _plain_hf_copy),
    Case("train-out-inside-data", TRAIN + " --out {w}/data/m", r"data/m: --out lies inside the --data"),
    Case("train-out-holds-data", TRAIN + " --out {w}", r"--out holds the --data"),
    Case("train-out-is-store", TRAIN + " --distill {w}/store.zarr --out {w}/store.zarr",
         r"store.zarr: --out is the --distill"),
    Case("train-out-is-online-teacher", TRAIN + " --online-teacher {w}/teacher --out {w}/teacher",
         r"teacher: --out is the --online-teacher"),
    Case("train-out-foreign-files", TRAIN + " --out {w}/mine",
         r"mine: --out holds files but is no kdcache train output", _write("mine/notes.txt", "keep me")),
    Case("train-init-timeout", TRAIN + " --out {w}/s --init-timeout 0", r"--init-timeout must be >= 1"),
]
