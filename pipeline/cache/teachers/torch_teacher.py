"""The shared half of the torch backends: micro-batched forward passes, chunked logits, targets.

Rows that pack documents are run with their position ids and a block-diagonal causal
mask, so each document sees only itself and its positions restart at 0, exactly as if
it were alone (the backend's `_hidden` passes both the way its model takes them).

Only trained positions reach the output layer: a micro-batch's last hidden states
(small: [B, T, d_model]) are gathered at the positions the loss mask trains, then
projected a chunk at a time. Logits are never materialised whole either: a 4,096-token
row over a 152k-row output layer is 2.5 GB of float32, so each chunk is reduced to its
targets on the model's device, and only [N, k]-sized results reach the host. A chunk's
float32 logits take at most `LOGITS_BUDGET` bytes; the reduction holds about three
times that (the logits, the scaled copy, the top-k or log-softmax output), so a
replica's peak memory is the model, its activations for one micro-batch, and ~4x the
budget, whatever the context length and the vocabulary.
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.pipeline.cache.targets import place_trained, targets_from_logits
from kdcache.pipeline.cache.teachers import TargetSpec
from kdcache.pipeline.errors import PipelineError
from kdcache.storage.tokens.format import Rows

LOGITS_BUDGET = 256 << 20  # float32 logits of one projected chunk, at most
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchTeacher:
    """Subclasses set `model`, `device`, `dtype`, `info`, `output_rows`, `tokenizer_json`,
    and implement `_hidden` (the base model's last hidden states) and `_head` (output layer)."""

    batch_rows: int
    output_rows: int
    device: torch.device

    def _hidden(self, ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """[B, T, d] for input ids [B, T]; `positions` [B, T] restart at 0 per document (None:
        one stream per row), and then no position may attend outside its document."""
        raise NotImplementedError

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def positions_per_chunk(self) -> int:
        """Positions whose float32 logits fit LOGITS_BUDGET (at least one)."""
        return max(1, LOGITS_BUDGET // (4 * self.output_rows))

    def targets(self, rows: Rows, spec: TargetSpec, first_row: int) -> dict[str, np.ndarray]:
        # Fixed micro-batches and chunks (set by the config, the data and the model): a
        # shard's bytes must not depend on which worker ran it.
        tokens, trained, positions = rows.tokens, rows.trained(), rows.input_positions()
        span = self.positions_per_chunk()
        # A shard with no trained position still yields arrays of the right shapes and dtypes.
        parts = [targets_from_logits(torch.zeros(0, self.output_rows), np.zeros(0, np.int64), spec,
                                     np.zeros(0, np.int64), np.zeros(0, np.int64))]
        with torch.inference_mode():
            for lo in range(0, len(tokens), self.batch_rows):
                hi = min(lo + self.batch_rows, len(tokens))
                row, at = np.nonzero(trained[lo:hi])  # row-major: the order `place_trained` expects
                if not row.size:
                    continue  # nothing trained: no forward pass at all
                ids = torch.from_numpy(tokens[lo:hi, :-1].astype(np.int64)).to(self.device)
                pos = (None if positions is None
                       else torch.from_numpy(np.ascontiguousarray(positions[lo:hi])).to(self.device))
                where = (torch.from_numpy(row).to(self.device), torch.from_numpy(at).to(self.device))
                picked = self._hidden(ids, pos)[where]
                nxt = tokens[lo + row, at + 1]
                parts += [targets_from_logits(self._head(picked[a : a + span]), nxt[a : a + span], spec,
                                              first_row + lo + row[a : a + span], at[a : a + span])
                          for a in range(0, len(row), span)]
        flat = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        return place_trained(flat, trained, spec.draws)


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
