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

SPLITS = ("teacher", "student", "valid")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def split_of(name: str, seed: int, fractions: Sequence[float]) -> int:
    """The split (index into SPLITS) of the document called `name`: a keyed hash of the
    name mapped to [0, 1) and cut at the cumulative fractions. No global list of
    documents is needed, and the fractions hold to within sampling error."""
    digest = hashlib.blake2b(name.encode(), key=str(seed).encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0**64
    edge = 0.0
    for i, frac in enumerate(fractions[:-1]):
        edge += frac
        if u < edge:
            return i
    return len(fractions) - 1


@dataclass
class TokenBatch:
    """One batch's tokens: per split, its documents' ids back to back, each document
    followed by the end-of-text id; plus what the batch accounts for."""

    tokens: list[np.ndarray]  # indexed like SPLITS, int32
    docs: int
    nbytes: int  # input bytes (for the progress bar)

    def to_arrow(self) -> Any:
        lists = [pa.ListArray.from_arrays(pa.array([0, len(t)], pa.int32()), pa.array(t, pa.int32()))
                 for t in self.tokens]
        return pa.table({
            "split": pa.array(range(len(SPLITS)), pa.int8()),
            "tokens": pa.concat_arrays(lists),
            "docs": pa.array([self.docs, 0, 0], pa.int64()),
            "nbytes": pa.array([self.nbytes, 0, 0], pa.int64()),
        })

    def pieces(self) -> list[tuple[int, np.ndarray, int, int]]:
        """(split index, tokens, documents, input bytes): the counts ride on the first."""
        return [(i, t, self.docs if i == 0 else 0, self.nbytes if i == 0 else 0)
                for i, t in enumerate(self.tokens)]


def tokenize_batch(tok: Any, eos: int | None, names: list[str], texts: list[str], nbytes: int,
                   seed: int, fractions: Sequence[float]) -> TokenBatch:
    """Split, then tokenize, a batch of documents (names and texts in document order)."""
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False)  # same ids, no offsets
    tail = np.asarray([] if eos is None else [eos], dtype=np.int32)
    pieces: list[list[np.ndarray]] = [[] for _ in SPLITS]
    for name, enc in zip(names, encodings, strict=True):
        split = pieces[split_of(name, seed, fractions)]
        split.append(np.asarray(enc.ids, dtype=np.int32))
        split.append(tail)
    tokens = [np.concatenate(p) if p else np.zeros(0, np.int32) for p in pieces]
    return TokenBatch(tokens=tokens, docs=len(names), nbytes=nbytes)


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
                   fractions: Sequence[float], cap_bytes: int) -> list[str]:
    """The first teacher-split documents, in document order, up to `cap_bytes` of UTF-8:
    what the BPE learns from. Only the teacher split: the student must not be seen."""
    sample: list[str] = []
    size = 0
    for names, texts, _ in batches:
        for name, text in zip(names, texts, strict=True):
            if split_of(name, seed, fractions) != 0:
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
