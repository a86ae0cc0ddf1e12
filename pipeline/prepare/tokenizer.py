"""The per-batch work of `kdcache prepare`: which split a document goes to, the tokenizer
(trained on a bounded sample or loaded), and turning a batch of documents into one token
stream per split. Pure functions of their inputs, so a serial run and Ray workers give
the same tokens whatever the batch boundaries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.chat import ChatTemplate, encode_documents

SPLITS = ("teacher", "student", "valid")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def split_of(name: str, seed: int, fractions: Sequence[float]) -> int:
    """The split (index into SPLITS) of the document called `name`: a keyed hash of the
    name mapped to [0, 1) and cut at the cumulative fractions (a fraction of 0 gets no
    document). No global list of documents is needed, and the fractions hold to within
    sampling error."""
    digest = hashlib.blake2b(name.encode(), key=str(seed).encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0**64
    edge = 0.0
    for i, frac in enumerate(fractions[:-1]):
        edge += frac
        if u < edge:
            return i
    return len(fractions) - 1


@dataclass(frozen=True)
class Encoding:
    """How a batch's documents become tokens (rebuilt in each Ray worker from its fields).
    `fmt` "text" with `documents` False is stream text: ids and an end-of-text id per
    document, no mask. Otherwise each document is (ids, per-token loss mask): text documents
    train every token, chat and completion documents what `chat.encode_documents` marks."""

    fmt: str = "text"
    documents: bool = False
    template: str | None = None
    """`chat.ChatTemplate.to_json()`, for chat and completion."""
    train_on: str = "all"
    column: str = "messages"
    """The messages column, named in errors."""


@dataclass
class TokenBatch:
    """One batch's tokens: per split, its documents' ids back to back (stream text: each
    followed by the end-of-text id); with documents, their loss masks and lengths too;
    plus what the batch accounts for."""

    tokens: list[np.ndarray]  # indexed like SPLITS, int32
    docs: int
    nbytes: int  # input bytes (for the progress bar)
    masks: list[np.ndarray] | None = None  # uint8, like tokens
    lengths: list[np.ndarray] | None = None  # int32, tokens per document

    def to_arrow(self) -> Any:
        def lists(parts: list[np.ndarray], kind: Any) -> Any:
            offsets = [pa.array([0, len(p)], pa.int32()) for p in parts]
            return pa.concat_arrays([pa.ListArray.from_arrays(o, pa.array(p, kind))
                                     for o, p in zip(offsets, parts, strict=True)])

        columns = {
            "split": pa.array(range(len(SPLITS)), pa.int8()),
            "tokens": lists(self.tokens, pa.int32()),
            "docs": pa.array([self.docs, 0, 0], pa.int64()),
            "nbytes": pa.array([self.nbytes, 0, 0], pa.int64()),
        }
        if self.masks is not None and self.lengths is not None:
            columns["masks"] = lists(self.masks, pa.uint8())
            columns["lengths"] = lists(self.lengths, pa.int32())
        return pa.table(columns)

    def pieces(self) -> list[Piece]:
        """(split index, tokens, mask, lengths, documents, input bytes): the counts ride on
        the first; mask and lengths are None for stream text."""
        return [(i, t, None if self.masks is None else self.masks[i],
                 None if self.lengths is None else self.lengths[i],
                 self.docs if i == 0 else 0, self.nbytes if i == 0 else 0)
                for i, t in enumerate(self.tokens)]


Piece = tuple[int, np.ndarray, "np.ndarray | None", "np.ndarray | None", int, int]


def tokenize_batch(tok: Any, eos: int | None, names: list[str], values: list[Any], nbytes: int,
                   seed: int, fractions: Sequence[float], encoding: Encoding = Encoding()) -> TokenBatch:
    """Split, then tokenize, a batch of documents (names and texts or records in document order)."""
    splits = [split_of(name, seed, fractions) for name in names]
    if not encoding.documents:
        return _stream_batch(tok, eos, splits, values, nbytes)
    docs = encode(tok, eos, encoding, names, values)
    per: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in SPLITS]
    for split, doc in zip(splits, docs, strict=True):
        per[split].append(doc)

    def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

    return TokenBatch(tokens=[cat([d[0] for d in p], np.int32) for p in per], docs=len(names), nbytes=nbytes,
                      masks=[cat([d[1] for d in p], np.uint8) for p in per],
                      lengths=[np.asarray([len(d[0]) for d in p], np.int32) for p in per])


def encode(tok: Any, eos: int | None, encoding: Encoding, names: list[str],
           values: list[Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, per-token loss mask) of each document."""
    template = None if encoding.template is None else ChatTemplate.from_json(encoding.template)
    return encode_documents(tok, template, encoding.fmt, values, names, train_on=encoding.train_on, eos=eos,
                            column=encoding.column)


def _stream_batch(tok: Any, eos: int | None, splits: list[int], texts: list[str], nbytes: int) -> TokenBatch:
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False)  # same ids, no offsets
    tail = np.asarray([] if eos is None else [eos], dtype=np.int32)
    pieces: list[list[np.ndarray]] = [[] for _ in SPLITS]
    for split, enc in zip(splits, encodings, strict=True):
        pieces[split].append(np.asarray(enc.ids, dtype=np.int32))
        pieces[split].append(tail)
    tokens = [np.concatenate(p) if p else np.zeros(0, np.int32) for p in pieces]
    return TokenBatch(tokens=tokens, docs=len(texts), nbytes=nbytes)


def eos_id(tok: Any) -> int | None:
    vocab = tok.get_vocab()
    return next((vocab[t] for t in EOS_CANDIDATES if t in vocab), None)


def load_tokenizer(path: str, vocab_size: int | None) -> Any:
    try:
        tok = Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception for bad JSON
        raise PipelineError(f"{path}: not a tokenizers tokenizer.json ({exc})") from exc
    if vocab_size is not None and tok.get_vocab_size() != vocab_size:
        raise PipelineError(
            f"{path}: tokenizer has {tok.get_vocab_size()} tokens but --vocab-size is {vocab_size}"
        )
    return tok


def teacher_sample(batches: Iterator[tuple[list[str], list[str], int]], seed: int,
                   fractions: Sequence[float], cap_bytes: int, split: int = 0) -> list[str]:
    """The first teacher-split documents, in document order, up to `cap_bytes` of UTF-8:
    what the BPE learns from. Only the teacher split, so the student's text is not seen,
    unless there is none (a teacher trained elsewhere): then `split`, the student's."""
    sample: list[str] = []
    size = 0
    for names, texts, _ in batches:
        for name, text in zip(names, texts, strict=True):
            if split_of(name, seed, fractions) != split:
                continue
            take = text.encode()[: cap_bytes - size].decode("utf-8", "ignore")
            sample.append(take)
            size += len(take.encode())
            if size >= cap_bytes:
                return sample
    return sample


def train_tokenizer(texts: list[str], vocab_size: int, progress: bool) -> Any:
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
