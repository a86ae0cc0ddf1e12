"""`kdcache verify DATA`: decode every chunk of token data and recompute its fingerprints.

Opening token data checks only what is cheap; this reads the whole corpus, so it finds
what opening cannot: a bad chunk no training run has touched yet, a deleted chunk of
data written before chunks carried checksums, or metadata whose fingerprints were
edited. Memory stays bounded: chunks are read a block at a time and hashed streaming.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from kdcache.storage.errors import StoreError
from kdcache.storage.location import Location, locate
from kdcache.storage.tokens.format import (
    ATTR,
    CHECKSUMS,
    MASK,
    POSITIONS,
    data_fingerprint,
    document_array,
    document_problem,
    fingerprint_parts,
    open_split,
    read_token_meta,
    split_fingerprint,
    tokenizer_problem,
)

BLOCK_TOKENS = 1 << 22  # ~16 MB of int32 per read: many chunks decoded concurrently


@dataclass(frozen=True)
class TokenProblem:
    split: str  # "" when the problem is the whole directory's (tokenizer, overall fingerprint)
    rows: tuple[int, int] | None  # first and last row of the bad chunk, None for the whole split
    reason: str

    def __str__(self) -> str:
        where = [f"split {self.split!r}"] if self.split else []
        if self.rows is not None:
            where.append(f"rows {self.rows[0]}..{self.rows[1]}")
        return ": ".join([" ".join(where), self.reason] if where else [self.reason])


def verify_token_data(path: str | os.PathLike[str] | Location) -> list[TokenProblem]:
    """Every problem of the DATA directory at `path`; empty when it is intact.

    Raises StoreError only when the group metadata itself is unreadable (nothing else
    can be checked then).
    """
    path = locate(path)
    meta = read_token_meta(path)
    problems = []
    tok = tokenizer_problem(path, meta)
    if tok is not None:
        problems.append(TokenProblem("", None, tok))
    recomputed: dict[str, str] = {}
    parts = fingerprint_parts(meta["splits"])
    for name in parts:
        split, _, doc = name.partition(".")
        try:
            arr = open_split(path, meta, name)
        except StoreError as exc:
            problems.append(TokenProblem(split, None, str(exc)))
            continue
        limit = int(meta["vocab_size"]) if not doc else (2 if doc == MASK else arr.shape[1])
        found, fp = _verify_split(path / name, arr, limit, doc or "token id")
        problems += [TokenProblem(split, rows, reason) for rows, reason in found]
        if fp is not None:
            recomputed[name] = fp
        if fp is not None and not found:  # a bad chunk changes the fingerprint too: say it once
            problems += _split_meta_problems(path, meta, name, fp)
        if doc == POSITIONS and not found and fp is not None:
            problems += _document_problems(path, meta, split)
    if not problems and len(recomputed) == len(parts):
        want = data_fingerprint(meta["tokenizer_fingerprint"], int(meta["seq_len"]), recomputed)
        if want != meta["fingerprint"]:
            problems.append(TokenProblem("", None, (
                f"{path}/zarr.json: '{ATTR}.fingerprint' {meta['fingerprint'][:12]}... does not match "
                f"the data (recomputed {want[:12]}...)"
            )))
    return problems


def _document_problems(path: Location, meta: dict[str, Any], split: str) -> list[TokenProblem]:
    """A split's loss mask and position ids, checked together block by block."""
    mask, positions = (open_split(path, meta, document_array(split, n)) for n in (MASK, POSITIONS))
    step = max(1, BLOCK_TOKENS // mask.shape[1])
    for lo in range(0, mask.shape[0], step):
        hi = min(lo + step, mask.shape[0])
        problem = document_problem(np.asarray(mask[lo:hi]), np.asarray(positions[lo:hi]), mask.shape[1])
        if problem is not None:
            return [TokenProblem(split, (lo, hi - 1), problem)]
    return []


def _split_meta_problems(path: Location, meta: dict[str, Any], name: str, fp: str) -> list[TokenProblem]:
    """Compare an array's recomputed fingerprint (and a split's token count) with zarr.json."""
    split, _, doc = name.partition(".")
    info, field = meta["splits"][split], f"'{ATTR}.splits.{split}"
    recorded = info[doc]["fingerprint"] if doc else info.get("fingerprint")
    out = []
    if doc and recorded != fp:
        out.append(TokenProblem(split, None, (
            f"{path}/zarr.json: {field}.{doc}.fingerprint' does not match the {doc} (recomputed {fp[:12]}...)"
        )))
    if doc:
        return out
    if recorded != fp:
        legacy = "" if info.get("checksums") == CHECKSUMS else (
            "; written before chunks had checksums, so the bad chunk cannot be named")
        out.append(TokenProblem(split, None, (
            f"{path}/zarr.json: {field}.fingerprint' does not match the tokens "
            f"(recomputed {fp[:12]}...){legacy}"
        )))
    if info.get("tokens") != info["rows"] * (int(meta["seq_len"]) + 1):
        why = f"{path}/zarr.json: {field}.tokens' is not rows * (seq_len + 1)"
        out.append(TokenProblem(split, None, why))
    return out


def _verify_split(
    root: Location, arr: zarr.Array, limit: int, what: str
) -> tuple[list[tuple[tuple[int, int], str]], str | None]:
    """(problems by chunk row range, fingerprint) of one array (a split's tokens, or its
    `what` = loss_mask or position_ids, each value below `limit`); the fingerprint is None
    when some chunk could not be decoded.

    Streams the array's bytes into `split_fingerprint`, chunk by chunk.
    """
    rows, step = arr.shape[0], arr.chunks[0]
    per_block = max(1, BLOCK_TOKENS // max(1, step * arr.shape[1])) * step
    body, problems, decoded = hashlib.sha256(), [], True
    files = set(root.objects())  # one listing, not a stat (or a HEAD) per chunk
    for start in range(0, rows, per_block):
        stop = min(start + per_block, rows)
        try:
            blocks = [(start, stop, np.asarray(arr[start:stop]))]
        except Exception:  # zarr raises several types for bad bytes: find the chunk(s)
            blocks = []
            for lo in range(start, stop, step):
                hi = min(lo + step, stop)
                try:
                    blocks.append((lo, hi, np.asarray(arr[lo:hi])))
                except Exception as exc:
                    problems.append(((lo, hi - 1), _unreadable(root, arr, lo // step, exc)))
                    decoded = False
        for lo, hi, block in blocks:
            problems += _id_problems(root, files, arr, lo, hi, block, limit, what)
            if decoded:
                body.update(block.astype(arr.dtype.newbyteorder("<")).tobytes())
    if not decoded:
        return problems, None
    return problems, split_fingerprint(tuple(arr.shape), body.digest())


def _chunk_key(arr: zarr.Array, chunk: int) -> str:
    """The key of the file holding inner chunk `chunk`: its shard file, or the chunk's own file
    when the array is not sharded (data written before shards)."""
    per_file = (arr.shards[0] if arr.shards else arr.chunks[0]) // arr.chunks[0]
    return str(arr.metadata.encode_chunk_key((chunk // per_file, 0)))


def _unreadable(root: Location, arr: zarr.Array, chunk: int, exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return f"chunk file {root}/{_chunk_key(arr, chunk)} fails its checksum or cannot be decoded ({text})"


def _id_problems(
    root: Location, files: set[str], arr: zarr.Array, lo: int, hi: int, block: np.ndarray, limit: int,
    what: str,
) -> list[tuple[tuple[int, int], str]]:
    """Per chunk of a decoded block: a missing chunk file, or ids outside the vocabulary.

    The file check also catches a deleted chunk of data written before the fill value
    was -1 (it reads as id 0 there).
    """
    step, out = arr.chunks[0], []
    for c_lo in range(lo, hi, step):
        c_hi = min(c_lo + step, hi)
        chunk, ids = c_lo // step, block[c_lo - lo : c_hi - lo]
        where = (c_lo, c_hi - 1)
        if _chunk_key(arr, chunk) not in files:
            out.append((where, f"missing data: chunk file {root}/{_chunk_key(arr, chunk)} does not exist"))
        elif ids.size and int(ids.min()) < 0:
            out.append((where, f"missing data: ids read as {int(ids.min())} (the fill value)"))
        elif ids.size and int(ids.max()) >= limit:
            bound = f"vocab_size {limit}" if what == "token id" else str(limit)
            out.append((where, f"{what} {int(ids.max())} >= {bound}"))
    return out
