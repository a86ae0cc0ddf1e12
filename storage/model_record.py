"""A MODEL directory's record, `kdcache.json`: what the model is and how it was trained.

A MODEL directory is Hugging Face format (`config.json`, `model.safetensors`, the
tokenizer), so `transformers` and vLLM load it unchanged; `kdcache.json` beside them is
kdcache's own. It is written last, atomically, so its presence marks a finished directory.
A plain Hugging Face directory has none. Reading and writing it needs no torch: the cache
job, sweeps and the run report read it without loading the weights.

The directory's other files are checked here too, as cheaply as that can be done and before
anything loads them, so a damaged or unsafe model is refused in one line naming the file:
`config.json` must parse and must not name custom code (`auto_map`: transformers would
offer to run the repository's Python, and kdcache never does); weights must be safetensors
(a `pytorch_model.bin` is a pickle, which can run code when read) whose headers parse and
whose tensors the file covers (safetensors' own reader checks both from the header alone).
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
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
"""Weight files torch reads with pickle: refused, never opened."""


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
    return ModelRecord.from_json(read_json_file(path), str(path))


def read_json_file(path: Path) -> Any:
    """A JSON file's value; a truncated or garbled one is refused naming it and where it breaks."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable JSON ({exc})") from exc


def read_model_config(path: Path) -> dict[str, Any]:
    """A transformers config file (config.json, or a --student-config file) as a dict,
    refusing one that names custom code."""
    value = read_json_file(path)
    if not isinstance(value, dict):
        raise StoreError(f"{path}: not a JSON object (not a transformers config)")
    refuse_remote_code(value, path)
    return value


def refuse_remote_code(config: dict[str, Any], path: Path) -> None:
    """`auto_map` points transformers at Python files in the repository (trust_remote_code)."""
    if "auto_map" in config:
        named = ", ".join(f"{k}={v}" for k, v in sorted(config["auto_map"].items())) if isinstance(
            config["auto_map"], dict) else repr(config["auto_map"])
        raise StoreError(f"{path}: field 'auto_map' names custom model code ({named}); kdcache never runs "
                         "a repository's code (trust_remote_code is off): use a model transformers "
                         "implements itself")


def weight_files(directory: Path) -> list[Path]:
    """The directory's safetensors files, each with a header that parses and a body that
    covers its tensors; a directory with only pickled weights is refused, unread."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise StoreError(
                f"{directory / pickles[0]}: kdcache reads safetensors weights only, never pickle; convert "
                "it where you trust the file: AutoModelForCausalLM.from_pretrained(DIR)"
                ".save_pretrained(OUT) writes OUT/model.safetensors")
        raise StoreError(f"{directory}: missing model.safetensors (no weights)")
    for file in files:
        check_safetensors(file)
    return files


def check_safetensors(path: Path) -> None:
    """Refuse a truncated or garbled safetensors file: reads the header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np"):
            pass
    except (SafetensorError, OSError) as exc:
        raise StoreError(f"{path}: unreadable safetensors weights, truncated or corrupt ({exc})") from exc


def check_model_files(directory: Path) -> dict[str, Any]:
    """A model directory's config.json (returned), kdcache.json when present and weight
    headers, checked without loading a tensor."""
    config = directory / "config.json"
    if not config.is_file():
        raise StoreError(f"{directory}: missing config.json (not a model directory)")
    values = read_model_config(config)
    read_model_record(directory)
    weight_files(directory)
    return values


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
