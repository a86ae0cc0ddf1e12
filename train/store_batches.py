"""Stream tokens and teacher targets from a logit store into the trainer's batches.

`StoreBatches` is `StoreDataset` (dataset.py) as a `BatchSource`: it reads the
dataset's epochs endlessly as `Batch`es (never as the public batch dicts). So it follows the
same `RowOrder` as the token-split and online sources, and a student distilled from a
store sees the rows a supervised or online run of the same seed sees. It reads one
window of rows at a time (a few chunk reads per array, all arrays concurrently),
converts it to torch and serves its batches from memory; with `prefetch` > 0 a
background thread does this and queues up to `prefetch` windows, otherwise the
caller's thread reads each window when it needs it. Memory is bounded by the windows
held; nothing else of the store is ever loaded.

Which to use is measured, not assumed (benchmarks/distill_step.py): when training keeps
every CPU core busy, a background thread steals cycles from torch's threads, whose
parallel regions then wait for the slowest one (on 2 cores, k = 64 steps took 1.3x a
supervised step with the thread and 1.05x reading inline). With a GPU doing the math
the cores are idle and the thread hides the reads. `kdcache train` prefetches off CPU,
and from a store in object storage (`s3://...`) on CPU too: there a window's reads wait on
the network's latency, which the thread overlaps with the step, not on the cores.

A store still being built is usable: a window whose shards are not committed yet
waits for them (`StoreDataset`), giving up after `wait_timeout_s` seconds without a
new commit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from kdcache.storage import StoreMeta, StoreReader
from kdcache.storage.tokens.format import TokenData
from kdcache.train.batches import Batch, OrderedBatches
from kdcache.train.dataset import StoreDataset
from kdcache.train.errors import TrainError


def check_store_matches(path: str, meta: StoreMeta, data: TokenData) -> None:
    """Refuse a store whose vocabulary, tokenizer, sequence length or loss mask differ from the data's.

    The mask (which positions are trained, where documents start) is compared by its
    fingerprint for the split the store cached: a store of other masks would train the
    student on prompts, or on targets the teacher computed across documents.
    """
    split = meta.data.split
    mask = data.mask_fingerprint(split) if split in data.meta["splits"] else ""
    mismatches = [
        (name, ours, theirs)
        for name, ours, theirs in (
            ("vocab_size", meta.vocab_size, data.vocab_size),
            ("seq_len", meta.seq_len, data.seq_len),
            ("data.tokenizer", meta.data.tokenizer, data.tokenizer_fingerprint),
            ("data.mask_fingerprint", meta.data.mask_fingerprint, mask),
        )
        if ours != theirs
    ]
    if mismatches:
        name, ours, theirs = mismatches[0]
        raise TrainError(
            f"{path}: field '{name}' is {ours!r} but the student's data {data.path} has {theirs!r} "
            "(cache the teacher on this data, or train on the data the store was built from)"
        )


class StoreBatches(OrderedBatches):
    """Endless batches from a store: `Batch.extras` holds the kind's target arrays.

    Rank `rank` of `world` gets its batch_size // world rows of each global batch.
    """

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
        temperature: float | None = None,
    ) -> None:
        self.path = path
        self.dataset = StoreDataset(path, batch_size=batch_size, seed=seed, rank=rank, world=world,
                                    wait_timeout_s=wait_timeout_s, temperature=temperature)
        super().__init__(self.dataset.order)
        self.prefetch = prefetch
        self._queue: queue.Queue[Batch | BaseException] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inline: Iterator[Batch] | None = None

    @property
    def reader(self) -> StoreReader:
        return self.dataset.reader

    @property
    def meta(self) -> StoreMeta:
        return self.dataset.meta

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
        """Every batch from position (epoch, skip) on, until `stop` is set."""
        while not stop.is_set():
            for _, batch in self.dataset.read_batches(epoch, skip, stop=stop):
                yield batch
            epoch, skip = epoch + 1, 0

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
