"""The catalogue's vocabulary: a case, the damage a case's setup does to its world, and
the commands the cases share. Each area's cases live in `cases_<area>.py`;
`test_bad_inputs.py` walks them all.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from filelock import FileLock

VOCAB, SEQ_LEN = 300, 16


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # "{w}" is the world's path; split on spaces
    match: str  # regex the stderr line must contain
    setup: Callable[[Path], None] | None = None

    @property
    def verb(self) -> str:
        return self.argv.split()[0]


# ---- damage --------------------------------------------------------------------------------------

def _flip(path: Path, offset: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_json(path: Path, key: str, value) -> None:
    """Set the dotted `key` of a group's `kdcache` attribute."""
    doc = json.loads(path.read_text())
    *parents, leaf = key.split(".")
    target = doc["attributes"]["kdcache"]
    for parent in parents:
        target = target[parent]
    target[leaf] = value
    path.write_text(json.dumps(doc))


def _edit_store(**changes) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        for key, value in changes.items():
            _edit_json(w / "store.zarr" / "zarr.json", key, value)
    return apply


def _store_shard_file(w: Path, name: str = "ids", shard: int = 1) -> Path:
    ndim = len(json.loads((w / "store.zarr" / name / "zarr.json").read_text())["shape"])
    return w / "store.zarr" / name / "c" / str(shard) / Path(*["0"] * (ndim - 1))


def _delete_shard_file(name: str) -> Callable[[Path], None]:
    return lambda w: _store_shard_file(w, name).unlink()


def _uncommit_but_complete(w: Path) -> None:
    shutil.rmtree(w / "store.zarr" / "ledger" / "shard-000001")


def _flip_token_chunk(w: Path) -> None:
    _flip(next(p for p in sorted((w / "data" / "student" / "c").rglob("*")) if p.is_file()))


def _break_split_json(w: Path) -> None:
    path = w / "data" / "student" / "zarr.json"
    path.write_text(path.read_text().replace(",", "", 1))


def _write(rel: str, text: str | bytes) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        path = w / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return apply


def _append(rel: str, text: str) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        (w / rel).write_text((w / rel).read_text() + text)
    return apply


def _parquet(rel: str, columns: dict) -> Callable[[Path], None]:
    return lambda w: pq.write_table(pa.table(columns), w / rel)


_HELD: list[FileLock] = []


def _hold_lock(w: Path) -> None:
    """Another `kdcache train` holding OUT (this process holds the lock for the test's duration)."""
    (w / "s").mkdir()
    lock = FileLock(str(w / "s" / ".kdcache-train.lock"), timeout=0)
    lock.acquire()
    _HELD.append(lock)


def _sweep(grid: list) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        doc = {"data": str(w / "data"), "runs": str(w / "sweep-runs.parquet"), "out": str(w / "students"),
               "grid": grid, "defaults": {"rho": 16, "tokens": 2000, "batch_size": 4, "quiet": True}}
        (w / "sweep.yaml").write_text(yaml.safe_dump(doc))
    return apply


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}")
CHAT = ("prepare --format chat --tokenizer {w}/chattok/tokenizer.json --out {w}/d2 --quiet "
        "--source {w}/chat.jsonl")


def _chat(*records: object) -> Callable[[Path], None]:
    return _write("chat.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def _bad_tokenizer_config(w: Path) -> None:
    (w / "badtok").mkdir()
    shutil.copyfile(w / "data" / "tokenizer.json", w / "badtok" / "tokenizer.json")
    (w / "badtok" / "tokenizer_config.json").write_text('{"eos_token": \n')


TRAIN = "train --data {w}/data --layers 1 --rho 32 --tokens 2000 --batch-size 4 --threads 1 --quiet"
HF = "train --data {w}/data --tokens 2000 --batch-size 4 --threads 1 --quiet"
CACHE = "cache --teacher {w}/teacher --data {w}/data --workers 1 --k 8 --shard-rows 16 --quiet"
LAW = "--law paper --student-params 1e8 --compute 1e20"
COST = "cost --teacher-params 1e9 --student-params 1e8 --tokens 1e10"
_FIT_AT_BOUND = json.dumps({  # the paper's coefficients, as a fit that left f1 on its bound
    "law": "distillation", "at_bounds": ["f1"],
    "params": {"A": 2243.0, "B": 24181.0, "alpha": 0.321, "beta": 0.637, "gamma": 0.764, "c0": 2.549,
               "c1": 522.6, "f1": 0.090, "d1": 1.315},
    "supervised": {"E": 1.220, "A": 3355.0, "B": 18186.0, "alpha": 0.408, "beta": 0.431, "gamma": 0.452},
    "data": {"params": [1e8, 1e10], "tokens": [1e9, 5e12], "teacher_loss": [1.8, 3.1]},
})

