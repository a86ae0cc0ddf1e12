"""Stream tokens and teacher targets from a logit store into training batches.

`StoreBatches` follows the same `RowOrder` as the token-split and online sources, so a
student distilled from a store sees the rows a supervised or online run of the same
seed sees. It reads one window of rows at a time (a few chunk reads per array, all
arrays concurrently), converts it to torch and serves its batches from memory; with
`prefetch` > 0 a background thread does this and queues up to `prefetch` windows,
otherwise the caller's thread reads each window when it needs it. Memory is bounded by
the windows held; nothing else of the store is ever loaded.

Which to use is measured, not assumed (benchmarks/distill_step.py): when training keeps
every CPU core busy, a background thread steals cycles from torch's threads, whose
parallel regions then wait for the slowest one (on 2 cores, k = 64 steps took 1.3x a
supervised step with the thread and 1.05x reading inline). With a GPU doing the math
the cores are idle and the thread hides the reads. `kdcache train` prefetches only off
CPU.

A store still being built is usable: the order covers every row of the finished
store, and a window whose shards are not committed yet waits for them (polling the
ledger), so a run started during caching trains on exactly what a run started after
it would. It gives up after `wait_timeout_s` seconds without a new commit.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kdcache.storage import StoreMeta, StoreReader, read_meta
from kdcache.train.batches import Batch, OrderedBatches
from kdcache.train.errors import TrainError
from kdcache.train.row_order import RowOrder
from kdcache.train.tokens import TokenData

TARGET_FIELDS = {
    "topk": ("ids", "logprobs", "tail_logmass"),
    "full": ("logprobs",),
    "sampled": ("ids", "logprobs", "counts"),
}
_TORCH_DTYPE = {"ids": torch.int64, "logprobs": torch.float32, "tail_logmass": torch.float32,
                "counts": torch.float32}


def check_store_matches(path: str, meta: StoreMeta, data: TokenData) -> None:
    """Refuse a store whose vocabulary, tokenizer or sequence length differ from the data's."""
    mismatches = [
        (name, ours, theirs)
        for name, ours, theirs in (
            ("vocab_size", meta.vocab_size, data.vocab_size),
            ("seq_len", meta.seq_len, data.seq_len),
            ("data.tokenizer", meta.data.tokenizer, data.tokenizer_fingerprint),
        )
        if ours != theirs
    ]
    if mismatches:
        name, ours, theirs = mismatches[0]
        raise TrainError(
            f"{path}: field '{name}' is {ours!r} but the student's data {data.path} has {theirs!r} "
            "(cache the teacher on this data, or train on the data the store was built from)"
        )


def window_to_batches(values: dict[str, np.ndarray], rows: np.ndarray, window: np.ndarray) -> list[Batch]:
    """Cut one window read (sorted unique `rows`) into its batches, in window order."""
    out = []
    for batch_rows in window:
        pos = np.searchsorted(rows, batch_rows)
        tokens = torch.from_numpy(values["tokens"][pos].astype(np.int64))
        extras = {
            name: torch.from_numpy(values[name][pos]).to(_TORCH_DTYPE[name])
            for name in values if name != "tokens"
        }
        out.append(Batch(inputs=tokens[:, :-1], targets=tokens[:, 1:], extras=extras))
    return out


class StoreBatches(OrderedBatches):
    """Endless batches from a store: `Batch.extras` holds the kind's target arrays."""

    def __init__(
        self,
        path: str,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        prefetch: int = 2,
        wait_timeout_s: float = 3600.0,
    ) -> None:
        self.path = path
        kind = read_meta(path).kind
        self.reader = StoreReader(path, ("tokens", *TARGET_FIELDS[kind]))
        self.reader.check_files()
        self.meta = self.reader.meta
        super().__init__(RowOrder(n_rows=self.meta.rows, batch_size=batch_size, seed=seed,
                                  rank=rank, world=world))
        self.prefetch, self.wait_timeout_s = prefetch, wait_timeout_s
        self._queue: queue.Queue[Batch | BaseException] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inline: Iterator[Batch] | None = None

    def next_batch(self) -> Batch:
        if self.prefetch == 0:
            if self._inline is None:
                self._inline = self._batches(self.epoch, self.batch, threading.Event())
            try:
                item = next(self._inline)
            except BaseException:
                self._inline = None
                raise
        else:
            if self._thread is None:
                self._start()
            assert self._queue is not None
            got = self._queue.get()
            if isinstance(got, BaseException):
                self.close()
                raise got
            item = got
        self._advance()
        return item

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        super().load_state_dict(state)

    def close(self) -> None:
        """Stop the prefetch thread; the next `next_batch` restarts reading at the position."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread, self._queue, self._inline = None, None, None

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch * self.order.window_batches)
        self._thread = threading.Thread(
            target=self._produce, args=(self._batches(self.epoch, self.batch, self._stop), self._queue,
                                        self._stop),
            name="kdcache-store-prefetch", daemon=True,
        )
        self._thread.start()

    def _batches(self, epoch: int, skip: int, stop: threading.Event) -> Iterator[Batch]:
        """Every batch from position (epoch, skip) on, reading one window at a time."""
        while True:
            for window in self.order.windows(epoch):
                if skip >= len(window):
                    skip -= len(window)
                    continue
                rows = np.unique(window[skip:])
                self._wait_for(rows, stop)
                values = self.reader.read_rows(rows)
                yield from window_to_batches(values, rows, window[skip:])
                skip = 0
            epoch += 1

    @staticmethod
    def _produce(batches: Iterator[Batch], out: queue.Queue, stop: threading.Event) -> None:
        def put(item: Batch | BaseException) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for batch in batches:
                if not put(batch):
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)

    def _wait_for(self, rows: np.ndarray, stop: threading.Event) -> None:
        shards = np.unique(rows // self.meta.shard_rows)
        committed = set(self.reader.committed_shards)
        last_progress, told = time.monotonic(), False
        while not committed.issuperset(shards.tolist()):
            if stop.is_set():
                return
            before = len(committed)
            self.reader.refresh()
            committed = set(self.reader.committed_shards)
            if len(committed) > before:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > self.wait_timeout_s:
                raise TrainError(
                    f"{self.path}: no shard committed for {self.wait_timeout_s:.0f} s while waiting for "
                    f"shards {sorted(set(shards.tolist()) - committed)} (is the cache job running?)"
                )
            if not told:
                print(f"waiting for {self.path} shards to be committed by the cache job", file=sys.stderr)
                told = True
            time.sleep(0.5)

