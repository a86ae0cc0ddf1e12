"""The shared half of the torch backends: micro-batched forward passes, then targets."""

from __future__ import annotations

import numpy as np
import torch

from kdcache.pipeline.targets import TargetSpec, targets_from_logits


class TorchTeacher:
    """Subclasses set `model`, `device`, `info`, `vocab_size`, `tokenizer_json` and `_logits`."""

    batch_rows: int
    device: torch.device

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def targets(self, rows: np.ndarray, spec: TargetSpec, first_row: int) -> dict[str, np.ndarray]:
        # Fixed micro-batches: a shard's bytes must not depend on which worker ran it.
        parts = []
        with torch.inference_mode():
            for lo in range(0, len(rows), self.batch_rows):
                chunk = rows[lo : lo + self.batch_rows]
                ids = torch.from_numpy(chunk[:, :-1].astype(np.int64)).to(self.device)
                logits = self._logits(ids).to("cpu", torch.float32)
                parts.append(targets_from_logits(logits, chunk, spec, first_row + lo))
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
