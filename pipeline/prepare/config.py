"""Settings and result of one `kdcache prepare` run (light: the CLI imports it to build its flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdcache.pipeline.errors import PipelineError

MIN_VOCAB = 257  # 256 byte tokens + the end-of-text token
SAMPLE_BYTES = 32 << 20


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """Settings of one `kdcache prepare` run."""

    out: str
    """Output DATA directory (must not exist unless --overwrite)."""
    source: str = "stdlib"
    """'stdlib' (the Python standard library's .py files), a file, a directory, or a glob;
    .jsonl/.parquet/.arrow files give one document per record; a `datasets` save_to_disk
    directory is read whole."""
    vocab_size: int | None = None
    """BPE vocabulary size to train (default 8192); with --tokenizer, checked against it."""
    seq_len: int = 256
    """Tokens per training sequence; rows hold seq_len + 1 tokens."""
    max_tokens: int | None = None
    """Cap on the total tokens over all splits, for quick runs."""
    tokenizer: str | None = None
    """Use this tokenizer.json instead of training one (e.g. a Hugging Face teacher's)."""
    tokenizer_sample_bytes: int = SAMPLE_BYTES
    """Text of the teacher split the BPE is trained on, at most (default 32 MiB)."""
    text_column: str = "text"
    """Column holding the text in .jsonl / .parquet / .arrow sources."""
    teacher_frac: float = 0.45
    """Fraction of the documents for the teacher split."""
    student_frac: float = 0.45
    """Fraction of the documents for the student split."""
    valid_frac: float = 0.1
    """Fraction of the documents for the validation split."""
    seed: int = 0
    """Seed of the keyed hash that assigns documents to splits."""
    workers: int = 1
    """Tokenizer workers: 1 runs in this process, more run on Ray Data (same bytes)."""
    ray_address: str | None = None
    """Address of an existing Ray cluster (with --workers > 1); default starts a local one."""
    overwrite: bool = False
    """Replace an existing output directory."""
    quiet: bool = False
    """Hide progress bars."""
    json: bool = False
    """Print the result as JSON."""

    def __post_init__(self) -> None:
        if self.vocab_size is not None and self.vocab_size < MIN_VOCAB:
            raise PipelineError(
                f"--vocab-size {self.vocab_size} is too small: byte-level BPE needs at least "
                f"{MIN_VOCAB} (256 bytes + end-of-text) (field 'vocab_size')"
            )
        if self.seq_len < 2:
            raise PipelineError(f"--seq-len {self.seq_len} must be at least 2 (field 'seq_len')")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise PipelineError(f"--max-tokens {self.max_tokens} must be positive")
        for name in ("workers", "tokenizer_sample_bytes"):
            if getattr(self, name) < 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be >= 1 (field '{name}')")
        fracs = (self.teacher_frac, self.student_frac, self.valid_frac)
        if min(fracs) <= 0 or abs(sum(fracs) - 1.0) > 1e-6:
            raise PipelineError(f"split fractions {fracs} must be positive and sum to 1")
        if self.tokenizer is not None and not Path(self.tokenizer).is_file():
            raise PipelineError(f"{self.tokenizer}: no such tokenizer file (field 'tokenizer')")

    @property
    def fractions(self) -> dict[str, float]:
        return {"teacher": self.teacher_frac, "student": self.student_frac, "valid": self.valid_frac}

    def cap(self, split: str) -> int | None:
        return None if self.max_tokens is None else int(self.max_tokens * self.fractions[split])


@dataclass(frozen=True)
class PrepareResult:
    out: Path
    rows: dict[str, int]
    tokens: dict[str, int]
    vocab_size: int
    fingerprint: str
    documents: int
    input_bytes: int
    seconds: float
