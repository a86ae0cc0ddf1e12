"""One `kdcache prepare` build: token pieces in document order -> packed, checked splits in
a Zarr group, the tokenizer beside them, and the group attribute that names it all.

The pieces come from this process or from Ray Data (`ray_data.py`); either way they
arrive in document order, so the bytes written do not depend on where they were made.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zarr
from tqdm import tqdm

from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.config import PrepareConfig, PrepareResult
from kdcache.pipeline.prepare.corpus import Unit
from kdcache.pipeline.prepare.tokenizer import SPLITS, eos_id
from kdcache.storage.tokens.format import ATTR, FORMAT, data_fingerprint, sha256_parts
from kdcache.storage.tokens.writer import SplitWriter, ThreadWrites

POSTFIX_EVERY_S = 0.5


def _consume(cfg: PrepareConfig, pieces: Iterator[Any], writers: list[SplitWriter],
             total: int) -> tuple[int, int]:
    """Feed every piece to its split until the source ends or every split is full;
    returns (documents, tokens) seen. One bar over input bytes, with tokens/s."""
    docs = tokens = 0
    t0 = last = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=cfg.quiet) as bar:
        for split, ids, ndocs, nbytes in pieces:
            writers[split].feed(ids)
            docs, tokens = docs + ndocs, tokens + len(ids)
            bar.update(nbytes)
            now = time.perf_counter()
            if now - last > POSTFIX_EVERY_S:
                bar.set_postfix(tok_s=f"{tokens / (now - t0):,.0f}", refresh=False)
                last = now
            if all(w.full for w in writers):
                break
    return docs, tokens


def build(cfg: PrepareConfig, units: list[Unit], tok: Any, tmp: Path, pieces: Iterator[Any]) -> PrepareResult:
    """Write the whole DATA directory into `tmp`."""
    t0 = time.perf_counter()
    vocab_size, eos = int(tok.get_vocab_size()), eos_id(tok)
    group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
    writes = ThreadWrites()
    writers = [SplitWriter(group, tmp, name, cfg.seq_len + 1, cfg.cap(name), vocab_size, writes)
               for name in SPLITS]
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
        meta_splits = {w.name: w.close(cfg.source) for w in writers}
    finally:
        writes.close()
    tok_json = tok.to_str().encode()
    (tmp / "tokenizer.json").write_bytes(tok_json)
    tok_fp = sha256_parts(tok_json)
    fingerprint = data_fingerprint(tok_fp, cfg.seq_len, {n: m["fingerprint"] for n, m in meta_splits.items()})
    group.attrs[ATTR] = {
        "format": FORMAT, "source": cfg.source, "seed": cfg.seed, "fractions": cfg.fractions,
        "max_tokens": cfg.max_tokens, "vocab_size": vocab_size, "seq_len": cfg.seq_len,
        "eos_token_id": eos, "tokenizer_fingerprint": tok_fp, "fingerprint": fingerprint,
        "split_rule": "blake2b-keyed-name/1", "splits": meta_splits,
    }
    return PrepareResult(
        out=Path(cfg.out), rows={n: m["rows"] for n, m in meta_splits.items()},
        tokens={n: m["tokens"] for n, m in meta_splits.items()}, vocab_size=vocab_size,
        fingerprint=fingerprint, documents=docs, input_bytes=total, seconds=time.perf_counter() - t0,
    )
