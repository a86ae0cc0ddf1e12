"""`hf`: any local Hugging Face causal LM directory, run through `transformers`.

Local paths only (no hub downloads); safetensors weights only, and never the repository's
own code (`trust_remote_code=False`). The fingerprint is a sha256 over the weight files,
so a store records exactly which weights produced it. The base model's hidden states are
projected through the output layer in chunks (`torch_teacher.py`), with the logit scale
and soft-capping some architectures apply after it (Cohere's `logit_scale`, Gemma 2's
`final_logit_softcapping`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

from kdcache.pipeline.cache.teachers import check_teacher_files
from kdcache.pipeline.cache.teachers.torch_teacher import DTYPES, TorchTeacher, default_device, resolve_dtype
from kdcache.pipeline.errors import PipelineError
from kdcache.storage import TeacherInfo
from kdcache.train.attention import document_attention_mask, needs_mask, packs_documents

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def weights_fingerprint(path: Path) -> str:
    files = sorted(f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern))
    if not files:
        raise PipelineError(f"{path}: no weight files (*.safetensors) in the teacher directory")
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def checkpoint_dtype(config: dict) -> str | None:
    """The dtype a Hugging Face checkpoint was saved in (`torch_dtype`, `dtype` in newer files)."""
    value = config.get("torch_dtype") or config.get("dtype")
    return value if isinstance(value, str) else None


class HFTeacher(TorchTeacher):
    def __init__(self, path: str, *, batch_rows: int = 8, max_k: int = 64, max_len: int | None = None,
                 dtype: str = "auto", tensor_parallel: int = 1, vocab: int | None = None) -> None:
        if tensor_parallel != 1:
            raise PipelineError("--tensor-parallel needs --backend vllm")
        root = Path(path)
        config = check_teacher_files(path)
        fingerprint = weights_fingerprint(root)
        self.device = default_device()
        self.dtype = resolve_dtype(dtype, checkpoint_dtype(config), self.device)
        try:
            model = AutoModelForCausalLM.from_pretrained(root, local_files_only=True,
                                                         dtype=DTYPES[self.dtype], trust_remote_code=False,
                                                         use_safetensors=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, StrictDataclassError,
                SafetensorError) as exc:
            lines = " ".join(line.strip() for line in str(exc).splitlines())
            raise PipelineError(f"{root}: transformers cannot load it ({lines})") from exc
        self.model = model.to(self.device).eval()
        self.batch_rows = batch_rows
        lm: Any = model
        out = lm.get_output_embeddings().weight
        inp = lm.get_input_embeddings().weight
        self.output_rows = int(out.shape[0])
        self._scale = float(config.get("logit_scale") or 1.0)
        self._softcap = config.get("final_logit_softcapping")
        total = sum(p.numel() for p in model.parameters())
        embedding = inp.numel() + (0 if out is inp else out.numel())
        self.info = TeacherInfo(name=root.resolve().name, fingerprint=fingerprint, params=total,
                                nonembedding_params=total - embedding, output_rows=self.output_rows,
                                dtype=self.dtype)
        tok = root / "tokenizer.json"
        self.tokenizer_json = tok.read_bytes() if tok.is_file() else None

    def _hidden(self, ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        if positions is None or not packs_documents(positions):
            # use_cache=False: a one-pass capture has no use for a KV cache (transformers builds
            # one per call when the config asks for it, a few hundred MB at 1,024 tokens).
            return self.model.base_model(input_ids=ids, position_ids=positions,
                                         use_cache=False).last_hidden_state
        # Position ids alone do not keep documents apart under sdpa or eager attention: the
        # additive 4D mask does under both (flash attention reads the position ids instead).
        mask = (document_attention_mask(positions, DTYPES[self.dtype])
                if needs_mask(getattr(self.model.config, "_attn_implementation", None)) else None)
        return self.model.base_model(input_ids=ids, position_ids=positions, attention_mask=mask,
                                     use_cache=False).last_hidden_state

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden)
        if self._scale != 1.0:
            logits = logits * self._scale
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits
