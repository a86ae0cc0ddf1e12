"""The shared half of the torch backends: micro-batched forward passes, chunked logits, targets.

Logits are never materialised whole. A 4,096-token row over a 152k-row output layer is
2.5 GB of float32, so the base model's hidden states (small: [B, T, d_model]) are
projected through the output layer a chunk of positions at a time, on the model's
device, and each chunk is reduced to its targets there: only [B, T, k]-sized results
reach the host. A chunk's float32 logits take at most `LOGITS_BUDGET` bytes; the
reduction holds about three times that (the logits, the scaled copy, the top-k or
log-softmax output), so a replica's peak memory is the model, its activations for one
micro-batch, and ~4x the budget, whatever the context length and the vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.pipeline.cache.targets import targets_from_logits
from kdcache.pipeline.cache.teachers import TargetSpec
from kdcache.pipeline.errors import PipelineError

LOGITS_BUDGET = 256 << 20  # float32 logits of one projected chunk, at most
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchTeacher:
    """Subclasses set `model`, `device`, `dtype`, `info`, `output_rows`, `tokenizer_json`,
    and implement `_hidden` (the base model's last hidden states) and `_head` (output layer)."""

    batch_rows: int
    output_rows: int
    device: torch.device

    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def positions_per_chunk(self, rows: int) -> int:
        """Positions of `rows` rows whose float32 logits fit LOGITS_BUDGET (at least one)."""
        return max(1, LOGITS_BUDGET // (4 * rows * self.output_rows))

    def targets(self, rows: np.ndarray, spec: TargetSpec, first_row: int) -> dict[str, np.ndarray]:
        # Fixed micro-batches and chunks (set by the config, the data and the model): a
        # shard's bytes must not depend on which worker ran it.
        seq_len = rows.shape[1] - 1
        parts = []
        with torch.inference_mode():
            for lo in range(0, len(rows), self.batch_rows):
                batch = rows[lo : lo + self.batch_rows]
                ids = torch.from_numpy(batch[:, :-1].astype(np.int64)).to(self.device)
                hidden = self._hidden(ids)
                span = self.positions_per_chunk(len(batch))
                pieces = [
                    targets_from_logits(self._head(hidden[:, t0 : t0 + span]), batch[:, t0 : t0 + span + 1],
                                        spec, first_row + lo, position=t0)
                    for t0 in range(0, seq_len, span)
                ]
                # A position chunk's `tokens` overlap the next chunk's by one: keep the rows' own.
                parts.append({**_join(pieces, axis=1, skip="tokens"), "tokens": batch.astype(np.int32)})
        return _join(parts, axis=0)


def _join(parts: list[dict[str, np.ndarray]], axis: int, skip: str = "") -> dict[str, np.ndarray]:
    """Concatenate per-chunk arrays along positions (axis 1) or rows (axis 0)."""
    return {name: np.concatenate([p[name] for p in parts], axis=axis) for name in parts[0] if name != skip}


def resolve_dtype(name: str, checkpoint: str | None, device: torch.device) -> str:
    """`auto`: float32 on CPU (no fast half-precision matmuls there), the checkpoint's own
    dtype (`torch_dtype` in config.json) on GPU."""
    if name == "auto":
        if device.type == "cpu" or checkpoint not in DTYPES:
            return "float32"
        return str(checkpoint)
    if name not in DTYPES:
        raise PipelineError(f"--dtype must be auto or one of {sorted(DTYPES)}, got {name!r}")
    return name


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
