"""The shared half of the torch backends: micro-batched forward passes, then targets."""

from __future__ import annotations

import numpy as np
import torch

from kdcache.pipeline.targets import TargetSpec, targets_from_logits

# float32 logits of one forward pass, at most; targets take about as much again. A 49k
# vocabulary at seq_len 2048 is 400 MB a row, so large vocabularies run fewer rows a pass.
LOGITS_BUDGET = 1 << 30


class TorchTeacher:
    """Subclasses set `model`, `device`, `info`, `vocab_size`, `tokenizer_json` and `_logits`."""

    batch_rows: int
    vocab_size: int
    device: torch.device

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows_per_pass(self, seq_len: int) -> int:
        """--batch-rows, fewer when their logits would pass LOGITS_BUDGET."""
        return max(1, min(self.batch_rows, LOGITS_BUDGET // (4 * seq_len * self.vocab_size)))

    def targets(self, rows: np.ndarray, spec: TargetSpec, first_row: int) -> dict[str, np.ndarray]:
        # Fixed micro-batches (set by the config, the data and the model): a shard's bytes
        # must not depend on which worker ran it.
        step = self.rows_per_pass(rows.shape[1] - 1)
        parts = []
        with torch.inference_mode():
            for lo in range(0, len(rows), step):
                chunk = rows[lo : lo + step]
                ids = torch.from_numpy(chunk[:, :-1].astype(np.int64)).to(self.device)
                logits = self._logits(ids).to("cpu", torch.float32)
                parts.append(targets_from_logits(logits, chunk, spec, first_row + lo))
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
