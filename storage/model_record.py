"""A MODEL directory's record, `kdcache.json`: what the model is and how it was trained.

A MODEL directory is Hugging Face format (`config.json`, `model.safetensors`, the
tokenizer), so `transformers` and vLLM load it unchanged; `kdcache.json` beside them is
kdcache's own. It is written last, atomically, so its presence marks a finished directory.
A plain Hugging Face directory has none. Reading and writing it needs no torch: the cache
job, sweeps and the run report read it without loading the weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdcache.storage.errors import StoreError
from kdcache.storage.runs import RunRow

MODEL_RECORD = "kdcache.json"
MODEL_FORMAT = "kdcache.model/1"


@dataclass(frozen=True, kw_only=True)
class ModelRecord:
    """The contents of `kdcache.json`."""

    fingerprint: str
    """sha256 of model.safetensors: identifies a teacher in a logit store."""
    nonembedding_params: int
    model: dict[str, Any] | None = None
    """The shape of a model of kdcache's family (`train.config.ModelConfig.to_dict`); None for
    a Hugging Face student, whose shape is its config.json."""
    embedding_params: int | None = None
    student: str | None = None
    """The transformers class of a Hugging Face student."""
    training: dict[str, Any] | None = None
    """How it was trained: the runs-table row's columns, plus the loop's own record
    (train_loss, steps, loss_history, ...)."""
    data: dict[str, Any] | None = None
    """The token data it was trained on: path, fingerprint, tokenizer_fingerprint, seq_len."""
    format: str = MODEL_FORMAT

    @property
    def run_row(self) -> RunRow | None:
        """The runs-table row this model's training wrote, or None (a model made elsewhere)."""
        if not self.training or "run_id" not in self.training:
            return None
        return RunRow.from_json(self.training, where=f"{MODEL_RECORD} field 'training'")

    @property
    def training_loss(self) -> float | None:
        """The validation loss its training recorded (nats/token), if any."""
        loss = (self.training or {}).get("loss")
        return None if loss is None else float(loss)

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return (self.data or {}).get("tokenizer_fingerprint")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, value: Any, where: str) -> ModelRecord:
        if not isinstance(value, dict):
            raise StoreError(f"{where}: not a JSON object")
        if value.get("format") != MODEL_FORMAT:
            raise StoreError(f"{where}: field 'format' is {value.get('format')!r}, not {MODEL_FORMAT}")
        known = {k: value[k] for k in cls.__dataclass_fields__ if k in value}
        try:
            return cls(**known)
        except TypeError as exc:
            raise StoreError(f"{where}: not a kdcache model record ({exc})") from exc


def has_model_record(directory: str | os.PathLike[str]) -> bool:
    """Whether `directory` is a finished kdcache MODEL directory."""
    return (Path(directory) / MODEL_RECORD).is_file()


def read_model_record(directory: str | os.PathLike[str]) -> ModelRecord | None:
    """The record of the MODEL directory, or None for a directory without one (a plain
    Hugging Face model, or one still being written)."""
    path = Path(directory) / MODEL_RECORD
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable ({exc})") from exc
    return ModelRecord.from_json(value, str(path))


def write_json(path: Path, value: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_model_record(directory: str | os.PathLike[str], record: ModelRecord) -> None:
    """Write the record, last: the directory counts as finished from here on."""
    write_json(Path(directory) / MODEL_RECORD, record.to_json())


def remove_model_record(directory: str | os.PathLike[str]) -> None:
    """Mark the directory unfinished before its files are rewritten."""
    (Path(directory) / MODEL_RECORD).unlink(missing_ok=True)
