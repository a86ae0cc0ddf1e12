"""`kdcache prepare`: text source -> tokenizer + document-disjoint token splits (Zarr).

Documents are shuffled by seed and dealt to `teacher`, `student`, `valid` in proportion
to their size, so the teacher never sees a student document. A byte-level BPE is trained
on the teacher split only (or an existing tokenizer.json is used). Each split is packed
into rows of seq_len + 1 tokens, documents separated by the end-of-text token. Output is
built in a hidden temporary directory and renamed into place at the end, so a failed run
leaves nothing that looks like valid data; same inputs and seed give identical bytes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.pipeline.errors import PipelineError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
MIN_VOCAB = 257  # 256 byte tokens + the end-of-text token
BYTES_PER_TOKEN_CAP = 8  # with --max-tokens, read at most this many bytes per wanted token
CHUNK_TOKENS = 16384  # ~64 KB Zarr chunks: cheap random row reads


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """Settings of one `kdcache prepare` run."""

    out: str
    """Output DATA directory (must not exist unless --overwrite)."""
    source: str = "stdlib"
    """'stdlib' (the Python standard library's .py files), a file, a directory, or a glob;
    .jsonl/.parquet files give one document per record."""
    vocab_size: int | None = None
    """BPE vocabulary size to train (default 8192); with --tokenizer, checked against it."""
    seq_len: int = 256
    """Tokens per training sequence; rows hold seq_len + 1 tokens."""
    max_tokens: int | None = None
    """Cap on the total tokens over all splits, for quick runs."""
    tokenizer: str | None = None
    """Use this tokenizer.json instead of training one (e.g. a Hugging Face teacher's)."""
    text_column: str = "text"
    """Column holding the text in .jsonl / .parquet sources."""
    teacher_frac: float = 0.45
    """Fraction of the text (by size) for the teacher split."""
    student_frac: float = 0.45
    """Fraction of the text for the student split."""
    valid_frac: float = 0.1
    """Fraction of the text for the validation split."""
    seed: int = 0
    """Seed of the document shuffle that assigns splits."""
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
        fracs = (self.teacher_frac, self.student_frac, self.valid_frac)
        if min(fracs) <= 0 or abs(sum(fracs) - 1.0) > 1e-6:
            raise PipelineError(f"split fractions {fracs} must be positive and sum to 1")
        if self.tokenizer is not None and not Path(self.tokenizer).is_file():
            raise PipelineError(f"{self.tokenizer}: no such tokenizer file (field 'tokenizer')")

    @property
    def fractions(self) -> dict[str, float]:
        return {"teacher": self.teacher_frac, "student": self.student_frac, "valid": self.valid_frac}


@dataclass(frozen=True)
class PrepareResult:
    out: Path
    rows: dict[str, int]
    tokens: dict[str, int]
    vocab_size: int
    fingerprint: str


def assign_splits(
    sizes: list[int], fractions: dict[str, float], seed: int
) -> dict[str, list[int]]:
    """Deal documents (by index) to splits: seeded shuffle, then each document goes to the
    split furthest below its share of the text so far, so shares hold for any corpus size."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(sizes))
    names = list(fractions)
    filled = dict.fromkeys(names, 0)
    out: dict[str, list[int]] = {n: [] for n in names}
    for i in order.tolist():
        name = min(names, key=lambda n: filled[n] / fractions[n])
        out[name].append(i)
        filled[name] += max(sizes[i], 1)
    return out


def _train_tokenizer(texts: list[str], vocab_size: int, progress: bool) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_CANDIDATES[0]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _load_tokenizer(path: str, vocab_size: int | None) -> Any:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception for bad JSON
        raise PipelineError(f"{path}: not a tokenizers tokenizer.json ({exc})") from exc
    if vocab_size is not None and tok.get_vocab_size() != vocab_size:
        raise PipelineError(
            f"{path}: tokenizer has {tok.get_vocab_size()} tokens but --vocab-size is {vocab_size}"
        )
    return tok


def _pack(tok: Any, texts: list[str], eos: int | None, width: int, cap: int | None, bar: Any) -> Any:
    import numpy as np

    pieces, total = [], 0
    for start in range(0, len(texts), 64):
        for enc in tok.encode_batch(texts[start : start + 64], add_special_tokens=False):
            ids = enc.ids + ([eos] if eos is not None else [])
            pieces.append(np.asarray(ids, dtype=np.int32))
            total += len(ids)
            bar.update(len(ids))
        if cap is not None and total >= cap:
            break
    flat = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    if cap is not None:
        flat = flat[:cap]
    rows = len(flat) // width
    return flat[: rows * width].reshape(rows, width)


def _read_documents(cfg: PrepareConfig) -> list[str]:
    from kdcache.pipeline.corpus import iter_documents

    texts, size = [], 0
    budget = None if cfg.max_tokens is None else cfg.max_tokens * BYTES_PER_TOKEN_CAP
    for _name, text in iter_documents(cfg.source, text_column=cfg.text_column):
        if not text:
            continue
        texts.append(text)
        size += len(text)
        if budget is not None and size >= budget:
            break
    if not texts:
        raise PipelineError(f"{cfg.source}: source is empty (no non-empty documents)")
    if len(texts) < 3:
        raise PipelineError(f"{cfg.source}: needs at least 3 documents for 3 splits, got {len(texts)}")
    return texts


def _write_split(group: Any, name: str, rows: Any, vocab_size: int, source: str) -> dict[str, Any]:
    """Store one split's rows as a Zarr array; returns its metadata.

    Chunks carry a crc32c (after the store's compressor) so a reader detects a flipped
    byte, and the fill value is -1 so a deleted chunk reads as ids no vocabulary has.
    """
    from kdcache.storage.layout import compressors
    from kdcache.train.tokens import CHECKSUMS, sha256_parts

    width = rows.shape[1]
    if len(rows) == 0:
        raise PipelineError(
            f"{source}: split {name!r} has fewer than seq_len + 1 = {width} tokens "
            "(use more data, a larger --max-tokens, or a smaller --seq-len)"
        )
    if int(rows.max()) >= vocab_size:
        raise PipelineError(f"{source}: tokenizer produced id {int(rows.max())} >= its vocab size")
    arr = group.create_array(
        name, shape=rows.shape, chunks=(max(1, CHUNK_TOKENS // width), width), dtype="int32",
        fill_value=-1, compressors=compressors(),
    )
    arr[:] = rows
    fp = sha256_parts(str(rows.shape).encode(), rows.astype("<i4").tobytes())
    arr.attrs["kdcache"] = {"split": name, "rows": len(rows), "fingerprint": fp}
    return {"rows": len(rows), "tokens": int(rows.size), "fingerprint": fp, "checksums": CHECKSUMS}


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Build the DATA directory `cfg.out`; see the module docstring."""
    import zarr
    from tqdm import tqdm

    from kdcache.train.tokens import ATTR, FORMAT, data_fingerprint, sha256_parts

    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise PipelineError(f"{out}: output already exists (pass --overwrite to replace it)")
    texts = _read_documents(cfg)
    splits = assign_splits([len(t) for t in texts], cfg.fractions, cfg.seed)
    if cfg.tokenizer is not None:
        tok = _load_tokenizer(cfg.tokenizer, cfg.vocab_size)
    else:
        teacher_texts = [texts[i] for i in splits["teacher"]]
        tok = _train_tokenizer(teacher_texts, cfg.vocab_size or 8192, not cfg.quiet)
    vocab, vocab_size = tok.get_vocab(), int(tok.get_vocab_size())
    eos = next((vocab[t] for t in EOS_CANDIDATES if t in vocab), None)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
        meta_splits: dict[str, dict[str, Any]] = {}
        estimate = cfg.max_tokens or sum(map(len, texts)) // 4  # ~4 characters per token
        with tqdm(total=estimate, unit="tok", unit_scale=True, desc="tokenize", disable=cfg.quiet) as bar:
            for name, idx in splits.items():
                cap = None if cfg.max_tokens is None else int(cfg.max_tokens * cfg.fractions[name])
                rows = _pack(tok, [texts[i] for i in idx], eos, cfg.seq_len + 1, cap, bar)
                meta_splits[name] = _write_split(group, name, rows, vocab_size, cfg.source)
        tok_json = tok.to_str().encode()
        (tmp / "tokenizer.json").write_bytes(tok_json)
        tok_fp = sha256_parts(tok_json)
        split_fps = {n: m["fingerprint"] for n, m in meta_splits.items()}
        fingerprint = data_fingerprint(tok_fp, cfg.seq_len, split_fps)
        group.attrs[ATTR] = {
            "format": FORMAT, "source": cfg.source, "seed": cfg.seed, "fractions": cfg.fractions,
            "max_tokens": cfg.max_tokens, "vocab_size": vocab_size, "seq_len": cfg.seq_len,
            "eos_token_id": eos, "tokenizer_fingerprint": tok_fp, "fingerprint": fingerprint,
            "splits": meta_splits,
        }
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # the only moment the output appears: complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PrepareResult(
        out=out,
        rows={n: m["rows"] for n, m in meta_splits.items()},
        tokens={n: m["tokens"] for n, m in meta_splits.items()},
        vocab_size=vocab_size,
        fingerprint=fingerprint,
    )
