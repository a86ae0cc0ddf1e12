"""One `kdcache prepare` build: token pieces in document order -> packed, checked splits in
a Zarr group, the tokenizer (and the files that travel with it) beside them, and the
group attribute that names it all.

The pieces come from this process or from Ray Data (`ray_data.py`); either way they
arrive in document order, so the bytes written do not depend on where they were made.
A split of fraction 0 (no teacher split, for a teacher trained elsewhere) gets no
writer and no array: its pieces, empty by the split rule, only carry their counts.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm import tqdm

from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.chat import ChatTemplate
from kdcache.pipeline.prepare.config import PrepareConfig, PrepareResult
from kdcache.pipeline.prepare.corpus import Unit
from kdcache.pipeline.prepare.tokenizer import SPLITS, eos_id
from kdcache.storage.tokens.format import sha256_parts
from kdcache.storage.tokens.writer import DocumentWriter, SplitWriter, ThreadWrites, finish_token_data

POSTFIX_EVERY_S = 0.5


def _feed(writer: SplitWriter, ids: np.ndarray, mask: np.ndarray | None, lengths: np.ndarray | None) -> None:
    """One piece into its split: a stream, or documents (cut back apart by their lengths)."""
    if lengths is None or mask is None or not isinstance(writer, DocumentWriter):
        writer.feed(ids)
        return
    edges = np.concatenate([[0], np.cumsum(lengths)])
    for lo, hi in itertools.pairwise(edges.tolist()):
        writer.feed_document(ids[lo:hi], mask[lo:hi])


def _consume(cfg: PrepareConfig, pieces: Iterator[Any], writers: dict[int, SplitWriter],
             total: int) -> tuple[int, int]:
    """Feed every piece to its split until the source ends or every split is full;
    returns (documents, tokens) seen. One bar over input bytes, with tokens/s."""
    docs = tokens = 0
    t0 = last = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=cfg.quiet) as bar:
        for split, ids, mask, lengths, ndocs, nbytes in pieces:
            if split in writers:
                _feed(writers[split], ids, mask, lengths)
            docs, tokens = docs + ndocs, tokens + len(ids)
            bar.update(nbytes)
            now = time.perf_counter()
            if now - last > POSTFIX_EVERY_S:
                bar.set_postfix(tok_s=f"{tokens / (now - t0):,.0f}", refresh=False)
                last = now
            if all(w.full for w in writers.values()):
                break
    return docs, tokens


def _writers(cfg: PrepareConfig, group: Any, tmp: Path, vocab_size: int, eos: int | None,
             writes: ThreadWrites) -> dict[int, SplitWriter]:
    """A writer per split written, keyed by the split's index in SPLITS (the pieces' key)."""
    def writer(name: str) -> SplitWriter:
        if cfg.row_packing == "stream":
            return SplitWriter(group, tmp, name, cfg.seq_len + 1, cfg.cap(name), vocab_size, writes)
        return DocumentWriter(group, tmp, name, cfg.seq_len + 1, cfg.cap(name), vocab_size, writes,
                              packing=cfg.row_packing, overlong=cfg.overlong,
                              pad_id=0 if eos is None else eos)

    return {SPLITS.index(name): writer(name) for name in cfg.splits}


def build(cfg: PrepareConfig, units: list[Unit], tok: Any, template: ChatTemplate | None, tmp: Path,
          pieces: Iterator[Any], files: dict[str, bytes]) -> PrepareResult:
    """Write the whole DATA directory into `tmp`; `files` (name -> bytes) go beside the
    tokenizer (`tokenizer_files.carried`)."""
    t0 = time.perf_counter()
    vocab_size, eos = int(tok.get_vocab_size()), eos_id(tok)
    group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
    writes = ThreadWrites()
    writers = _writers(cfg, group, tmp, vocab_size, eos, writes)
    total = sum(u.nbytes for u in units)
    try:
        try:
            docs, _ = _consume(cfg, pieces, writers, total)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # stops Ray Data when every split is full before the source ends
        if docs == 0:
            raise PipelineError(f"{cfg.source}: source is empty (no non-empty documents)")
        meta_splits = {w.name: w.close(cfg.source) for w in writers.values()}
    finally:
        writes.close()
    for name, body in files.items():
        (tmp / name).write_bytes(body)
    documents = cfg.row_packing != "stream"
    extra: dict[str, Any] = {}
    if documents:
        extra = {"overlong": cfg.overlong}
    if cfg.format == "chat":
        extra["train_on"] = cfg.train_on
    if template is not None:
        extra["chat_template"] = sha256_parts(template.text.encode())
    fingerprint = finish_token_data(
        group, tmp, tok.to_str().encode(), cfg.seq_len, meta_splits,
        source=cfg.source, seed=cfg.seed, fractions=cfg.fractions, max_tokens=cfg.max_tokens,
        vocab_size=vocab_size, eos_token_id=eos, split_rule="blake2b-keyed-name/1",
        input_format=cfg.format, packing=cfg.row_packing, **extra,
    )
    return PrepareResult(
        out=str(cfg.out), rows={n: m["rows"] for n, m in meta_splits.items()},
        tokens={n: m["tokens"] for n, m in meta_splits.items()}, vocab_size=vocab_size,
        fingerprint=fingerprint, documents=docs, input_bytes=total, seconds=time.perf_counter() - t0,
        trained_tokens={n: int(m.get("trained_tokens", m["rows"] * cfg.seq_len))
                        for n, m in meta_splits.items()},
        dropped=sum(int(m.get("dropped", 0)) for m in meta_splits.values()),
        truncated=sum(int(m.get("truncated", 0)) for m in meta_splits.values()),
    )
