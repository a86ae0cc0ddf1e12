"""Teacher backends behind one interface, chosen by name (`--backend native|hf|vllm`).

A teacher turns rows of token ids [B, T+1], with their loss mask and position ids when
they pack documents (`Rows`), into the target arrays of a logit store. `native`
runs a kdcache MODEL directory with our own torch model; `hf` runs any local Hugging
Face causal LM through `transformers`; `vllm` runs vLLM's offline engine with
prompt log-probs. Backends are imported only when chosen, so this module stays light
(the CLI's `--backend` flag is typed by `Backend`).

Whatever the backend, a teacher directory's files are checked before it loads
(`check_teacher_files`: config.json and kdcache.json parse, no custom code, safetensors
weights whose headers parse), so a damaged teacher is refused in one line naming the
file, from the driver before any worker starts as from each worker.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from kdcache.pipeline.errors import PipelineError
from kdcache.storage import Kind, StoreError, TeacherInfo
from kdcache.storage.model_record import check_model_files
from kdcache.storage.tokens.format import Rows

Backend = Literal["native", "hf", "vllm"]
"""A teacher backend's name; `BACKENDS` says which class runs each."""
BACKENDS: dict[Backend, str] = {
    "native": "kdcache.pipeline.cache.teachers.native:NativeTeacher",
    "hf": "kdcache.pipeline.cache.teachers.hf:HFTeacher",
    "vllm": "kdcache.pipeline.cache.teachers.vllm:VLLMTeacher",
}


@dataclass(frozen=True, kw_only=True)
class TargetSpec:
    """What to extract from the teacher at each position."""

    kind: Kind
    k: int
    temperature: float
    vocab: int
    """Token ids to keep: the tokenizer's size; output rows beyond it are padding."""
    draws: int = 0
    seed: int = 0
    temperatures: tuple[float, ...] = ()
    """Further temperatures whose log-normaliser and tail to keep (topk)."""


class Teacher(Protocol):
    info: TeacherInfo
    output_rows: int
    """Rows of the output layer: the tokenizer's vocabulary, or more when padded."""
    tokenizer_json: bytes | None
    """The teacher's tokenizer.json, when its directory has one."""

    def targets(self, rows: Rows, spec: TargetSpec, first_row: int) -> dict[str, np.ndarray]:
        """Target arrays [B, T, ...] for `rows` (tokens [B, T+1]) over the real ids `spec.vocab`,
        plus `padded_mass` [B, T] (or None when the backend cannot see it); `first_row` is the
        split's index of the first row (it seeds sampling).

        Each document of a row (`rows.position_ids` restart at 0) is run in its own context,
        as if it were alone at the start of a row; targets are computed at trained positions
        only (`rows.trained()`), the others hold the store's fill (`layout.untrained_fill`)."""
        ...


def load_teacher(backend: Backend, path: str, *, batch_rows: int = 8, max_k: int = 64,
                 max_len: int | None = None, dtype: str = "auto", tensor_parallel: int = 1,
                 vocab: int | None = None) -> Teacher:
    """The teacher at `path`; `max_len` is the longest row it will see (vllm sizes its engine by
    it, and its log-probs by `max_k`); `vocab` the tokenizer's size (vllm cuts its output layer
    there when it is padded)."""
    if backend not in BACKENDS:
        raise PipelineError(f"unknown backend {backend!r}; choose from {sorted(BACKENDS)}")
    check_teacher_files(path)
    module, name = BACKENDS[backend].split(":")
    cls = getattr(importlib.import_module(module), name)
    teacher: Teacher = cls(path, batch_rows=batch_rows, max_k=max_k, max_len=max_len, dtype=dtype,
                           tensor_parallel=tensor_parallel, vocab=vocab)
    return teacher


def check_teacher_files(path: str) -> dict[str, Any]:
    """The teacher directory's config.json, after checking its files without loading a tensor:
    cheap enough for the cache driver to call before it starts a worker."""
    try:
        return check_model_files(Path(path))
    except StoreError as exc:
        raise PipelineError(str(exc)) from exc
