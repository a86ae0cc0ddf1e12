"""`hf`: any local Hugging Face causal LM directory, run through `transformers`.

Local paths only (no hub downloads). The fingerprint is a sha256 over the weight files,
so a store records exactly which weights produced it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.teachers.torch_teacher import TorchTeacher, default_device
from kdcache.storage import TeacherInfo

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


class HFTeacher(TorchTeacher):
    def __init__(self, path: str, *, batch_rows: int = 8, max_k: int = 64,
                 max_len: int | None = None) -> None:
        from transformers import AutoModelForCausalLM

        root = Path(path)
        if not (root / "config.json").is_file():
            raise PipelineError(f"{root}: missing config.json (not a Hugging Face model directory)")
        fingerprint = weights_fingerprint(root)
        try:
            model = AutoModelForCausalLM.from_pretrained(root, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise PipelineError(f"{root}: transformers cannot load it ({exc})") from exc
        self.device = default_device()
        self.model = model.to(self.device).eval()
        self.batch_rows = batch_rows
        out = model.get_output_embeddings().weight
        inp = model.get_input_embeddings().weight
        self.vocab_size = int(out.shape[0])
        total = sum(p.numel() for p in model.parameters())
        embedding = inp.numel() + (0 if out is inp else out.numel())
        self.info = TeacherInfo(name=root.resolve().name, fingerprint=fingerprint, params=total,
                                nonembedding_params=total - embedding)
        tok = root / "tokenizer.json"
        self.tokenizer_json = tok.read_bytes() if tok.is_file() else None

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits
