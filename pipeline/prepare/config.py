"""Settings and result of one `kdcache prepare` run (light: the CLI imports it to build its flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kdcache.hub import is_hub_id
from kdcache.pipeline.errors import PipelineError

MIN_VOCAB = 257  # 256 byte tokens + the end-of-text token
SAMPLE_BYTES = 32 << 20
# A record is tokenized whole: prepare's peak grew by 135 MB (8192-token BPE) to 158 MB (512-token)
# per MiB of one record (benchmarks/prepare_throughput.py --record-mb 1 4 16: 0.84-1.0 GB at 4 MiB,
# 2.5-2.8 GB at 16), so 4 MiB, a ~1M-token document, keeps a run near 1 GB.
MAX_RECORD_BYTES = 4 << 20


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """Settings of one `kdcache prepare` run."""

    out: str
    """Output DATA directory (must not exist unless --overwrite)."""
    source: str = "stdlib"
    """'stdlib' (the Python standard library's .py files), 'stdlib-chat' (conversations
    about its functions and classes, for --format chat), or a local path or Hugging Face
    Hub dataset id: a file, a directory, or a glob; .jsonl/.parquet/.arrow files give one
    document per record; a `datasets` save_to_disk directory is read whole; a Hub id
    (owner/name[@revision]) is its record files, fetched to the Hugging Face cache."""
    format: Literal["text", "chat", "completion"] = "text"
    """Records' shape: 'text' (a text column, or whole files), 'chat' (a messages column of
    {role, content}: only assistant turns are trained), 'completion' (prompt and completion
    columns: only the completion is trained). chat and completion need --tokenizer."""
    messages_column: str = "messages"
    """Column holding the conversation with --format chat."""
    prompt_column: str = "prompt"
    """Column holding the prompt with --format completion."""
    completion_column: str = "completion"
    """Column holding the completion with --format completion."""
    chat_template: str | None = None
    """A Jinja chat template file to use instead of the tokenizer's own."""
    train_on: Literal["all", "last"] = "all"
    """With --format chat: train on every assistant turn, or only the last."""
    packing: Literal["stream", "documents", "none"] | None = None
    """'stream' cuts documents back to back into rows (text only; the default for text);
    'documents' packs whole documents per row, each attending only to itself (the default
    for chat and completion); 'none' puts one document per row, padded."""
    overlong: Literal["drop", "truncate"] = "drop"
    """With documents packing, a document longer than seq_len + 1 tokens is dropped or cut
    to its first seq_len + 1 tokens (counted in the output either way); never split."""
    vocab_size: int | None = None
    """BPE vocabulary size to train (default 8192); with --tokenizer, checked against it."""
    seq_len: int = 256
    """Tokens per training sequence; rows hold seq_len + 1 tokens."""
    max_tokens: int | None = None
    """Cap on the total tokens over all splits, for quick runs."""
    tokenizer: str | None = None
    """Use this tokenizer instead of training one (e.g. the teacher's), a local path or
    Hugging Face Hub id: a tokenizer.json, a model directory holding one, or a Hub model id
    (owner/name[@revision]). Its tokenizer_config.json, special_tokens_map.json,
    chat_template.jinja and generation_config.json travel into the output beside it."""
    tokenizer_sample_bytes: int = SAMPLE_BYTES
    """Text the BPE is trained on, at most (default 32 MiB): the teacher split's, or the
    student split's when --teacher-frac is 0."""
    max_record_bytes: int = MAX_RECORD_BYTES
    """Largest record read, in stored bytes (a jsonl line, a Parquet or Arrow value's UTF-8, a
    text file): a record is tokenized whole, at ~135-160 MB of memory per MiB, so a longer one
    is refused naming it (default 4 MiB: a run peaks near 1 GB); raise it to read longer ones."""
    text_column: str = "text"
    """Column holding the text in .jsonl / .parquet / .arrow sources."""
    teacher_frac: float = 0.45
    """Fraction of the documents for the teacher split; 0 writes no teacher split (for a
    teacher trained elsewhere), e.g. with --student-frac 0.9 --valid-frac 0.1."""
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
        for name in ("workers", "tokenizer_sample_bytes", "max_record_bytes"):
            if getattr(self, name) < 1:
                raise PipelineError(f"--{name.replace('_', '-')} must be >= 1 (field '{name}')")
        fracs = (self.teacher_frac, self.student_frac, self.valid_frac)
        if self.teacher_frac < 0 or min(fracs[1:]) <= 0 or abs(sum(fracs) - 1.0) > 1e-6:
            raise PipelineError(f"split fractions {fracs} must be positive and sum to 1 (--teacher-frac "
                                "may be 0: no teacher split)")
        if self.tokenizer is not None:
            self._check_tokenizer(self.tokenizer)
        if self.format != "text" and self.tokenizer is None:
            raise PipelineError(f"--format {self.format} needs --tokenizer (the teacher's tokenizer.json, "
                                "its directory or Hub id; its chat template is read beside it)")
        if self.format != "text" and self.packing == "stream":
            raise PipelineError(f"--packing stream would cut {self.format} documents across rows; "
                                "use --packing documents or none")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise PipelineError(f"{self.chat_template}: no such chat template file (field 'chat_template')")

    @staticmethod
    def _check_tokenizer(ref: str) -> None:
        """A local tokenizer is checked here; a Hub id is fetched when the job starts."""
        path = Path(ref)
        if path.is_dir() and not (path / "tokenizer.json").is_file():
            raise PipelineError(f"{ref}: no tokenizer.json in the directory (field 'tokenizer')")
        if not path.exists() and not is_hub_id(ref):
            raise PipelineError(f"{ref}: no such tokenizer file, directory or Hugging Face Hub id "
                                "(field 'tokenizer')")

    @property
    def sample_split(self) -> str:
        """The split whose text the BPE is trained on: the teacher's, if there is one."""
        return "teacher" if self.teacher_frac > 0 else "student"

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits written: those with a positive fraction."""
        return tuple(name for name, frac in self.fractions.items() if frac > 0)

    @property
    def row_packing(self) -> str:
        """The packing in effect: --packing, or the format's default."""
        return self.packing or ("stream" if self.format == "text" else "documents")

    @property
    def columns(self) -> tuple[str, ...]:
        """The record columns the format reads."""
        return {"text": (self.text_column,), "chat": (self.messages_column,),
                "completion": (self.prompt_column, self.completion_column)}[self.format]

    @property
    def fractions(self) -> dict[str, float]:
        return {"teacher": self.teacher_frac, "student": self.student_frac, "valid": self.valid_frac}

    def cap(self, split: str) -> int | None:
        return None if self.max_tokens is None else int(self.max_tokens * self.fractions[split])


@dataclass(frozen=True)
class PrepareResult:
    out: str
    """The DATA directory or object-store URL written."""
    rows: dict[str, int]
    tokens: dict[str, int]
    vocab_size: int
    fingerprint: str
    documents: int
    input_bytes: int
    seconds: float
    trained_tokens: dict[str, int]
    """Trained target positions per split (all of them for stream-packed text)."""
    dropped: int = 0
    """Documents longer than a row, dropped (--overlong drop)."""
    truncated: int = 0
    """Documents longer than a row, cut to it (--overlong truncate)."""
