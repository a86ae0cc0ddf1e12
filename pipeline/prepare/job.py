"""`kdcache prepare`: text source -> tokenizer + document-disjoint token splits (Zarr).

Streaming: documents flow in bounded batches (read, assign to a split, tokenize, pack,
write) and nothing holds the corpus. A document's split is a keyed hash of its name and
the seed (`prepare_tokenize.split_of`), so the teacher never sees a student document
and no global list is needed. A byte-level BPE is trained on at most
`--tokenizer-sample-bytes` of teacher documents (or an existing tokenizer.json is used).
Each split is packed in document order into rows of seq_len + 1 tokens, documents
separated by the end-of-text token, and written as Zarr shards (`prepare_write`).

`--workers 1` runs in this process; `--workers N` runs on Ray Data (`prepare_ray`) and
writes the same bytes. Output is built in a hidden temporary directory and renamed into
place at the end: a row's position depends on every earlier document, so an
interrupted build cannot be resumed shard by shard; rerunning rebuilds it, byte for
byte the same.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.tokenizer import SPLITS, eos_id, load_tokenizer, split_of, train_tokenizer
from kdcache.storage.tokens.writer import CHUNK_TOKENS, SplitWriter

MIN_VOCAB = 257  # 256 byte tokens + the end-of-text token
BYTES_PER_TOKEN_CAP = 8  # with --max-tokens, the tokenizer sample is at most this many bytes per token
BATCH_BYTES = 1 << 20  # text per tokenize call: tokenizers' encodings take ~50x the text
SAMPLE_BYTES = 32 << 20

__all__ = ["CHUNK_TOKENS", "SPLITS", "PrepareConfig", "PrepareResult", "SplitWriter", "prepare",
           "split_of"]


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


def _tokenizer(cfg: PrepareConfig, units: list[Any]) -> Any:
    """The given tokenizer, or a BPE trained on a bounded sample of the teacher split."""
    from kdcache.pipeline.prepare.corpus import read_unit
    from kdcache.pipeline.prepare.tokenizer import teacher_sample

    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer, cfg.vocab_size)
    cap = cfg.tokenizer_sample_bytes
    if cfg.max_tokens is not None:
        cap = min(cap, max(1, int(cfg.max_tokens * BYTES_PER_TOKEN_CAP * cfg.teacher_frac)))
    batches = (b for u in units for b in read_unit(u, cfg.text_column, BATCH_BYTES))
    sample = teacher_sample(batches, cfg.seed, list(cfg.fractions.values()), cap)
    if not sample:
        raise PipelineError(f"{cfg.source}: source is empty (no non-empty documents in the teacher "
                            "split)")
    return train_tokenizer(sample, cfg.vocab_size or 8192, not cfg.quiet)


def _serial_pieces(cfg: PrepareConfig, units: list[Any], tok: Any, eos: int | None) -> Iterator[Any]:
    from kdcache.pipeline.prepare.corpus import read_unit
    from kdcache.pipeline.prepare.tokenizer import tokenize_batch

    fractions = list(cfg.fractions.values())
    for unit in units:
        for names, texts, nbytes in read_unit(unit, cfg.text_column, BATCH_BYTES):
            yield from tokenize_batch(tok, eos, names, texts, nbytes, cfg.seed, fractions).pieces()


def _remove_stale(out: Path) -> None:
    """Temporary directories of killed runs (their pid is gone) would never be removed."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Build the DATA directory `cfg.out`; see the module docstring."""
    from kdcache.pipeline.prepare.corpus import read_units

    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise PipelineError(f"{out}: output already exists (pass --overwrite to replace it)")
    units = read_units(cfg.source)
    tok = _tokenizer(cfg, units)
    if out.parent.is_dir():
        _remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = _build(cfg, units, tok, tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # the only moment the output appears: complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _build(cfg: PrepareConfig, units: list[Any], tok: Any, tmp: Path) -> PrepareResult:
    from kdcache.pipeline.prepare.build import build

    if cfg.workers == 1:
        return build(cfg, units, tok, tmp, _serial_pieces(cfg, units, tok, eos_id(tok)))
    from kdcache.pipeline.prepare.ray_data import LOCAL_OBJECT_STORE, ray_pieces
    from kdcache.ray_session import ray_session

    with ray_session(cfg.ray_address, object_store_memory=LOCAL_OBJECT_STORE):
        pieces = ray_pieces(units, tok, eos_id(tok), workers=cfg.workers, text_column=cfg.text_column,
                            seed=cfg.seed, fractions=list(cfg.fractions.values()),
                            batch_bytes=BATCH_BYTES)
        return build(cfg, units, tok, tmp, pieces)

