"""Packing one split's token stream into rows and writing them as Zarr shards.

Rows are cut from the split's tokens in document order and written a whole shard at a
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

from kdcache.storage.errors import StoreError
from kdcache.storage.layout import compressors
from kdcache.storage.tokens.format import CHECKSUMS, split_fingerprint

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


class SplitWriter:
    """One split: tokens in (document order), checked whole shards out to `writes`."""

    def __init__(self, group: Any, root: Path, name: str, width: int, cap: int | None,
                 vocab_size: int, writes: ThreadWrites) -> None:
        self.name, self.width, self.cap, self.vocab_size = name, width, cap, vocab_size
        chunk_rows = max(1, CHUNK_TOKENS // width)
        self.shard_rows = chunk_rows * SHARD_CHUNKS
        self.array = group.create_array(
            name, shape=(self.shard_rows, width), chunks=(chunk_rows, width),
            shards=(self.shard_rows, width), dtype="int32", fill_value=-1, compressors=compressors(),
        )
        self.path = str(root / name)
        self.writes, self.rows, self.taken = writes, 0, 0
        self._pending: list[np.ndarray] = []
        self._buffered = 0
        self._body = hashlib.sha256()

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
        if self.rows == 0:
            raise StoreError(
                f"{source}: split {self.name!r} has fewer than seq_len + 1 = {self.width} tokens "
                "(use more data, a larger --max-tokens, or a smaller --seq-len)"
            )
        self.writes.drain(self.path)
        self.array.resize((self.rows, self.width))
        fp = split_fingerprint((self.rows, self.width), self._body.digest())
        self.array.attrs["kdcache"] = {"split": self.name, "rows": self.rows, "fingerprint": fp}
        return {"rows": self.rows, "tokens": self.rows * self.width, "fingerprint": fp,
                "checksums": CHECKSUMS}

    def _emit(self, rows: np.ndarray) -> None:
        bad = rows[(rows < 0) | (rows >= self.vocab_size)]
        if bad.size:
            raise StoreError(f"tokenizer produced id {int(bad[0])} outside 0..{self.vocab_size - 1} "
                                f"(split {self.name!r})")
        end = self.rows + len(rows)
        if end > self.array.shape[0]:
            self.writes.drain(self.path)  # no writer may read the metadata while it changes
            self.array.resize((max(end, 2 * self.array.shape[0]), self.width))
        self._body.update(rows.astype("<i4", copy=False).tobytes())
        self.writes.submit(self.path, self.rows, rows)
        self.rows = end
