"""Online distillation: the teacher runs in the training process on every batch.

This is what a cache replaces, kept for comparison and for the cost model: the same
rows in the same order as `StoreBatches`, with the teacher's full distribution at
temperature `tau` computed each step in float32 instead of read from a store. Rows that
pack documents run each document in its own context (the teacher gets the position ids,
so RoPE restarts and attention stays within the document), as a cache's teacher does.
"""

from __future__ import annotations

from typing import Any

import torch

from kdcache.storage.tokens.format import TokenData
from kdcache.train.batches import Batch, TokenBatches
from kdcache.train.errors import TrainError
from kdcache.train.model_dir import LoadedModel


def check_teacher_matches(teacher: LoadedModel, data: TokenData) -> None:
    """Refuse a teacher with fewer output rows than the data's vocabulary, or trained with
    another tokenizer. More rows are padding: its logits are cut to the data's ids."""
    if teacher.config.vocab_size < data.vocab_size:
        raise TrainError(
            f"{teacher.path}/config.json: field 'vocab_size' is {teacher.config.vocab_size}, fewer output "
            f"rows than the data's vocabulary {data.vocab_size} ({data.path})"
        )
    trained_on = teacher.record.tokenizer_fingerprint if teacher.record is not None else None
    if trained_on is not None and trained_on != data.tokenizer_fingerprint:
        raise TrainError(
            f"{teacher.path}: the teacher was trained with another tokenizer than {data.tokenizer_path}"
        )


class OnlineTeacherBatches:
    """Token batches plus the live teacher's log-probs under `extras["logprobs"]`.

    The run's L_T is not taken from these batches: it is the teacher's cross-entropy on the
    valid split, as for an offline run (`run._teacher_columns`).
    """

    def __init__(self, tokens: TokenBatches, teacher: torch.nn.Module, *, temperature: float,
                 vocab: int) -> None:
        self.tokens, self.teacher, self.temperature = tokens, teacher.eval(), temperature
        self.vocab = vocab  # the data's ids; a padded teacher's extra rows are dropped
        self.device = next(teacher.parameters()).device

    @torch.no_grad()
    def next_batch(self) -> Batch:
        batch = self.tokens.next_batch().to(self.device)
        logits = self.teacher(batch.inputs, batch.positions)[..., : self.vocab]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float32 at least
        logprobs = torch.log_softmax(logits / self.temperature, dim=-1)
        return Batch(batch.inputs, batch.targets, {"logprobs": logprobs}, batch.positions)

    def state_dict(self) -> dict[str, Any]:
        return self.tokens.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens.load_state_dict(state)  # older checkpoints' NLL sums are ignored
