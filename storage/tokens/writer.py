"""Packing one split's token stream into rows and writing them as Zarr shards.

Stream-packed rows (`SplitWriter`) are cut from the split's tokens in document order;
rows packed by document (`DocumentWriter`) hold whole documents. Both are written a whole shard at a
time (`shard_rows` rows, one shard file), each shard by exactly one writer. The number
of rows is only known at the end, so the array's shape grows by doubling (a metadata
rewrite) and is cut to the final row count last. A writer opens the array from its
metadata, so the metadata is rewritten only while none of that split's writes is in
flight. The fingerprint is hashed here, row by row in order, exactly as
`kdcache.storage.tokens.format.split_fingerprint` defines it.
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tokenizers import Tokenizer

from kdcache.storage.errors import StoreError
from kdcache.storage.layout import compressors
from kdcache.storage.tokens.format import (
    ATTR,
    CHECKSUMS,
    DOCUMENT_ARRAYS,
    FORMAT,
    MASK,
    POSITIONS,
    TokenData,
    data_fingerprint,
    document_array,
    fingerprint_parts,
    open_token_data,
    sha256_parts,
    split_fingerprint,
)

CHUNK_TOKENS = 16384  # ~64 KB inner chunks: cheap random row reads
SHARD_CHUNKS = 16  # inner chunks per shard file: ~1 MB of int32, the unit of one write
WRITE_THREADS = 2


def write_shard(path: str, start: int, rows: np.ndarray) -> int:
    """Write `rows` at row `start` of the array at `path` (a whole shard, or the last one)."""
    zarr.open_array(store=path, mode="r+")[start : start + len(rows)] = rows
    return len(rows)


class ThreadWrites:
    """Shards written by a few threads (compression and crc32c release the GIL), at most
    `in_flight` at once, so encoding overlaps tokenizing and memory stays bounded."""

    def __init__(self, threads: int = WRITE_THREADS, in_flight: int = 2 * WRITE_THREADS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kdcache-shard")
        self._limit = in_flight
        self._futures: deque[tuple[str, Future[int]]] = deque()

    def submit(self, path: str, start: int, rows: np.ndarray) -> None:
        self._futures.append((path, self._pool.submit(write_shard, path, start, rows)))
        while len(self._futures) > self._limit:
            self._futures.popleft()[1].result()

    def drain(self, path: str) -> None:
        for p, future in self._futures:
            if p == path:
                future.result()

    def close(self) -> None:
        """Wait for every write (raising the first failure), then stop the threads."""
        try:
            for _, future in self._futures:
                future.result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _Column:
    """One array of a split (its tokens, or a document array): created sharded, grown by
    doubling, hashed row by row in order, written a whole shard at a time."""

    def __init__(self, group: Any, root: Path, name: str, width: int, dtype: np.dtype,
                 fill: int, writes: ThreadWrites) -> None:
        chunk_rows = max(1, CHUNK_TOKENS // width)
        self.shard_rows = chunk_rows * SHARD_CHUNKS
        self.dtype, self.width, self.writes = dtype, width, writes
        self.array = group.create_array(
            name, shape=(self.shard_rows, width), chunks=(chunk_rows, width),
            shards=(self.shard_rows, width), dtype=dtype, fill_value=fill, compressors=compressors(),
        )
        self.path = str(root / name)
        self.body = hashlib.sha256()

    def emit(self, start: int, rows: np.ndarray) -> None:
        end = start + len(rows)
        if end > self.array.shape[0]:
            self.writes.drain(self.path)  # no writer may read the metadata while it changes
            self.array.resize((max(end, 2 * self.array.shape[0]), self.width))
        rows = rows.astype(self.dtype, copy=False)
        self.body.update(rows.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self.writes.submit(self.path, start, rows)

    def close(self, rows: int, split: str) -> str:
        self.writes.drain(self.path)
        self.array.resize((rows, self.width))
        fp = split_fingerprint((rows, self.width), self.body.digest())
        self.array.attrs["kdcache"] = {"split": split, "rows": rows, "fingerprint": fp}
        return fp


class SplitWriter:
    """One split of stream-packed text: tokens in (document order, each document followed
    by the end-of-text id), cut into rows anywhere, checked whole shards out to `writes`."""

    def __init__(self, group: Any, root: Path, name: str, width: int, cap: int | None,
                 vocab_size: int, writes: ThreadWrites) -> None:
        self.name, self.width, self.cap, self.vocab_size = name, width, cap, vocab_size
        self.tokens = _Column(group, root, name, width, np.dtype(np.int32), -1, writes)
        self.shard_rows = self.tokens.shard_rows
        self.rows, self.taken = 0, 0
        self._pending: list[np.ndarray] = []
        self._buffered = 0

    @property
    def full(self) -> bool:
        return self.cap is not None and self.taken >= self.cap

    def feed(self, tokens: np.ndarray) -> None:
        if self.cap is not None:
            tokens = tokens[: self.cap - self.taken]
        if not len(tokens):
            return
        self.taken += len(tokens)
        self._pending.append(tokens)
        self._buffered += len(tokens)
        if self._buffered >= self.shard_rows * self.width:
            flat = np.concatenate(self._pending)
            whole = len(flat) // (self.shard_rows * self.width) * self.shard_rows * self.width
            for lo in range(0, whole, self.shard_rows * self.width):
                self._emit(flat[lo : lo + self.shard_rows * self.width].reshape(self.shard_rows, self.width))
            self._pending, self._buffered = [flat[whole:]], len(flat) - whole

    def close(self, source: str) -> dict[str, Any]:
        """Write the last rows, cut the array to its row count; the split's metadata."""
        flat = np.concatenate(self._pending) if self._pending else np.zeros(0, np.int32)
        if len(flat) >= self.width:
            self._emit(flat[: len(flat) // self.width * self.width].reshape(-1, self.width))
        self._pending = []
        self._check_rows(source)
        fp = self.tokens.close(self.rows, self.name)
        return {"rows": self.rows, "tokens": self.rows * self.width, "fingerprint": fp,
                "checksums": CHECKSUMS}

    def _check_rows(self, source: str) -> None:
        if self.rows == 0:
            raise StoreError(
                f"{source}: split {self.name!r} has fewer than seq_len + 1 = {self.width} tokens "
                "(use more data, a larger --max-tokens, or a smaller --seq-len)"
            )

    def _check_ids(self, rows: np.ndarray) -> None:
        bad = rows[(rows < 0) | (rows >= self.vocab_size)]
        if bad.size:
            raise StoreError(f"tokenizer produced id {int(bad[0])} outside 0..{self.vocab_size - 1} "
                             f"(split {self.name!r})")

    def _emit(self, rows: np.ndarray) -> None:
        self._check_ids(rows)
        self.tokens.emit(self.rows, rows)
        self.rows += len(rows)


class DocumentWriter(SplitWriter):
    """One split packed by document: whole documents per row (`documents`, greedily in
    document order, a row closed when the next document does not fit) or one per row
    (`none`), the rest of a row padded. Writes the tokens with their `loss_mask` and
    `position_ids` (see `kdcache.storage.tokens.format`). A document longer than a row is
    dropped or cut to the row (`overlong`), never split across rows."""

    def __init__(self, group: Any, root: Path, name: str, width: int, cap: int | None,
                 vocab_size: int, writes: ThreadWrites, *, packing: str, overlong: str,
                 pad_id: int) -> None:
        super().__init__(group, root, name, width, cap, vocab_size, writes)
        self.packing, self.overlong, self.pad_id = packing, overlong, pad_id
        self.columns = {n: _Column(group, root, document_array(name, n), width, dtype, 0 if n == MASK else -1,
                                   writes) for n, dtype in DOCUMENT_ARRAYS.items()}
        self.documents = self.dropped = self.truncated = self.trained = 0
        self._row: list[tuple[np.ndarray, np.ndarray]] = []
        self._row_len = 0
        self._done: list[np.ndarray] = []  # finished rows, [3, width] each: tokens, mask, positions

    def feed_document(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """Add one document: its token ids and per-token loss mask (mask[0] is ignored)."""
        if self.full:
            return
        if len(ids) > self.width:
            if self.overlong == "drop":
                self.dropped += 1
                return
            ids, mask = ids[: self.width], mask[: self.width]
            self.truncated += 1
        if not len(ids):
            return
        if self.packing == "none" or self._row_len + len(ids) > self.width:
            self._close_row()
        mask = np.asarray(mask, dtype=np.uint8).copy()
        mask[0] = 0  # a document's first token has no context within its document
        self._row.append((np.asarray(ids, dtype=np.int32), mask))
        self._row_len += len(ids)
        self.documents += 1
        self.trained += int(mask.sum())
        self.taken += len(ids)

    def _close_row(self) -> None:
        if not self._row:
            return
        row = np.zeros((3, self.width), dtype=np.int32)
        row[0].fill(self.pad_id)
        at = 0
        for ids, mask in self._row:
            row[0, at : at + len(ids)] = ids
            row[1, at : at + len(ids)] = mask
            row[2, at : at + len(ids)] = np.arange(len(ids))
            at += len(ids)
        row[2, at:] = np.arange(self.width - at)  # padding: a segment of its own, never trained
        self._row, self._row_len = [], 0
        self._done.append(row)
        if len(self._done) == self.shard_rows:
            self._emit_rows()

    def _emit_rows(self) -> None:
        if not self._done:
            return
        block = np.stack(self._done, axis=1)  # [3, rows, width]
        self._done = []
        self._check_ids(block[0])
        self.tokens.emit(self.rows, block[0])
        self.columns[MASK].emit(self.rows, block[1])
        self.columns[POSITIONS].emit(self.rows, block[2])
        self.rows += block.shape[1]

    def close(self, source: str) -> dict[str, Any]:
        self._close_row()
        self._emit_rows()
        if self.rows == 0 and self.dropped:
            raise StoreError(f"{source}: split {self.name!r} has no document of at most seq_len + 1 = "
                             f"{self.width} tokens ({self.dropped} longer ones dropped: raise --seq-len, "
                             "or pass --overlong truncate)")
        self._check_rows(source)
        info: dict[str, Any] = {
            "rows": self.rows, "tokens": self.rows * self.width,
            "fingerprint": self.tokens.close(self.rows, self.name), "checksums": CHECKSUMS,
        }
        info.update({n: {"fingerprint": c.close(self.rows, self.name)} for n, c in self.columns.items()})
        info.update(trained_tokens=self.trained, documents=self.documents, dropped=self.dropped,
                    truncated=self.truncated)
        return info


def finish_token_data(group: Any, root: Path, tokenizer_json: bytes, seq_len: int,
                      splits: dict[str, dict[str, Any]], **attrs: Any) -> str:
    """Write tokenizer.json and the group attribute of token data whose splits are written
    (`splits`: each writer's `close()`); returns the data's fingerprint. `attrs` are the
    other attributes (vocab_size, source, format, packing, ...)."""
    (root / "tokenizer.json").write_bytes(tokenizer_json)
    tok_fp = sha256_parts(tokenizer_json)
    fingerprint = data_fingerprint(tok_fp, seq_len, fingerprint_parts(splits))
    group.attrs[ATTR] = {"format": FORMAT, **attrs, "seq_len": seq_len, "tokenizer_fingerprint": tok_fp,
                         "fingerprint": fingerprint, "splits": splits}
    return fingerprint


def write_documents(out: str | Path, tokenizer_json: bytes, seq_len: int,
                    splits: dict[str, list[tuple[np.ndarray, np.ndarray]]], *,
                    packing: str = "documents", format: str = "chat", eos_token_id: int | None = None,
                    overlong: str = "drop") -> TokenData:
    """Token data from documents given as (token ids, per-token loss mask), packed exactly as
    `kdcache prepare` packs them: for tests, and for tools that tokenise their own data."""
    root = Path(out)
    vocab_size = Tokenizer.from_str(tokenizer_json.decode()).get_vocab_size()
    group = zarr.open_group(store=str(root), mode="w", zarr_format=3)
    writes = ThreadWrites()
    try:
        writers = {name: DocumentWriter(group, root, name, seq_len + 1, None, vocab_size, writes,
                                        packing=packing, overlong=overlong,
                                        pad_id=0 if eos_token_id is None else eos_token_id)
                   for name in splits}
        for name, docs in splits.items():
            for ids, mask in docs:
                writers[name].feed_document(np.asarray(ids), np.asarray(mask))
        meta = {name: w.close(str(root)) for name, w in writers.items()}
    finally:
        writes.close()
    finish_token_data(group, root, tokenizer_json, seq_len, meta, source="documents", vocab_size=vocab_size,
                      eos_token_id=eos_token_id, input_format=format, packing=packing, overlong=overlong)
    return open_token_data(root)
