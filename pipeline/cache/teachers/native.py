"""`native`: a kdcache MODEL directory run by kdcache's own torch model."""

from __future__ import annotations

from pathlib import Path

import torch

from kdcache.pipeline.cache.teachers.torch_teacher import DTYPES, TorchTeacher, default_device, resolve_dtype
from kdcache.pipeline.errors import PipelineError
from kdcache.storage import StoreError, TeacherInfo
from kdcache.storage.model_record import has_model_record
from kdcache.train.errors import TrainError
from kdcache.train.model_dir import load_model_dir


class NativeTeacher(TorchTeacher):
    def __init__(self, path: str, *, batch_rows: int = 8, max_k: int = 64, max_len: int | None = None,
                 dtype: str = "auto", tensor_parallel: int = 1, vocab: int | None = None) -> None:
        if tensor_parallel != 1:
            raise PipelineError("--tensor-parallel needs --backend vllm")
        try:
            loaded = load_model_dir(path)
        except (TrainError, StoreError) as exc:
            hint = "" if has_model_record(path) else (
                "; not a kdcache model: --backend hf or vllm run any Hugging Face causal LM")
            raise PipelineError(f"{exc}{hint}") from exc
        self.device = default_device()
        self.dtype = resolve_dtype(dtype, "float32", self.device)  # our models are saved in float32
        self.model = loaded.model.to(self.device, DTYPES[self.dtype])
        self.batch_rows = batch_rows
        self.output_rows = loaded.config.vocab_size
        total = sum(p.numel() for p in self.model.parameters())
        self.info = TeacherInfo(
            name=Path(path).resolve().name,
            fingerprint=loaded.fingerprint,
            params=total,
            nonembedding_params=loaded.config.non_embedding_params(),
            output_rows=self.output_rows,
            dtype=self.dtype,
        )
        tok = Path(path) / "tokenizer.json"
        self.tokenizer_json = tok.read_bytes() if tok.is_file() else None

    def _hidden(self, ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        return self.model.model(ids, position_ids=positions)  # masks packed documents itself

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)
