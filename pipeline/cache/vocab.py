"""Does a teacher's vocabulary fit the student's data? Output rows and token ids compared.

A teacher may have more output rows than the tokenizer has ids: real checkpoints pad
their output layer (Qwen2.5: 151,665 ids over 151,936 or 152,064 rows; Phi-3: 32,011
over 32,064; OLMo: 50,280 over 50,304). Those rows are dropped when targets are made,
so what must agree is the ids the data uses: each of the data's ids must mean the same
token to the teacher's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from kdcache.pipeline.errors import PipelineError
from kdcache.storage.tokens.vocab import first_difference, token_ids


def check_teacher_vocab(teacher: str, output_rows: int, teacher_ids: dict[str, str] | None,
                        data_tokenizer: Path, vocab: int) -> None:
    """Refuse a teacher with fewer output rows than the data's ids, or whose tokenizer maps
    one of those ids to another token."""
    if output_rows < vocab:
        raise PipelineError(
            f"{teacher}: teacher output layer has {output_rows} rows, fewer than the data's tokenizer "
            f"vocabulary {vocab} ({data_tokenizer})"
        )
    if teacher_ids is None:
        return
    differs = first_difference(teacher_ids, token_ids(data_tokenizer.read_bytes()), vocab)
    if differs:
        raise PipelineError(f"{teacher}/tokenizer.json: differs from the data's tokenizer ({data_tokenizer}) "
                            f"{differs}")
