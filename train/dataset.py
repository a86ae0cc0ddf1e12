"""`StoreDataset`: a logit store as a PyTorch `IterableDataset` of distillation batches.

Iterating yields the rest of the current epoch as dicts of tensors:

- `input_ids`, `labels`: [b, T] int64, labels[:, t] the token after input_ids[:, t], or -100
  where that target is not trained (Hugging Face's convention; the store's `loss_mask`).
- `position_ids`: [b, T] int64, each input's position within its document (restarting at 0),
  when the store's rows pack documents (chat and completion data); a student keeps the
  documents apart with them (`kdcache.train.document_attention_mask`).
- The store's teacher targets, by kind (`batches.KIND_EXTRAS`, keyed `BATCH_KEYS`):
  `teacher_ids` (int64), `teacher_logprobs` (float16 as stored: log-probs at the store's
  temperature), `teacher_tail_logmass` (float32, top-k stores) and `teacher_counts`
  (float32, sampled stores), each [b, T, k] or [b, T]. The losses widen the log-probs
  on their own device, a chunk at a time (float16 -> float32 is exact); widening them
  here took twice the host memory and made the conversion 7-33x slower on a loaded
  2-core machine (benchmarks/store_dataset.py), for nothing.
- `teacher_temperature`: a 0-d float32 tensor, the store's temperature, so a loss cannot
  silently soften the student at another one.
- `vocab_size`: a 0-d int64 tensor, the tokenizer's ids, so `distill_loss` cuts a padded
  student's logits to them.

Rows follow `RowOrder`: `batch_size` is the global batch and rank r of `world` (taken
from `torch.distributed` when it is initialised) yields rows [r * b, (r + 1) * b),
b = batch_size // world, of each global batch and reads only those, so what a run sees
does not depend on its world size. Reads go one window at a time: this rank's rows of
a window, one `read_rows` call, then the window's batches from memory.

Inside, rows are read into the trainer's `Batch` (`read_batches`, which `StoreBatches`
serves from); iterating converts each to the dict above (`batches.batch_to_dict`), and
`batches.batch_from_dict` turns a dict back.

The position is (epoch, global batch), the same on every rank. Iterating advances it
batch by batch and leaves it at (epoch + 1, 0) after the epoch's last batch, so
`state_dict()` taken between batches and `load_state_dict()` on a fresh dataset give
exactly the batches an uninterrupted iteration would have; `set_epoch(e)` moves to the
start of epoch e. Iterate one iterator at a time: each moves the same position.

Under a `DataLoader(ds, batch_size=None, num_workers=n)`, worker i yields the batches
i, i + n, i + 2n, ... counted from the position at which iteration began; the loader
takes one batch from each worker in turn, so it yields exactly the sequence in-process
iteration would. But every worker then reads (and decodes) every window's chunks for its
share of the window's batches, n times the decoding of one process, and sends each batch
as 7 tensors, each its own shared-memory transfer (a third of `loader`'s speed with 2
workers on 2 cores, benchmarks/store_dataset.py). The workers also
iterate copies, so this object's position does not move. Iterate `ds.loader(num_workers=n)`
instead: its worker i reads whole windows i, i + n, ... (each window's chunks decoded
once), it hands batches out in the in-process order, and it advances this object's
position as each batch is handed out (or call `advance()` per batch yourself with a plain
`DataLoader`). Persistent workers keep stale copies across epochs; do not use them with
this dataset. `loader` starts its workers from a fork server (see `_worker_context`);
give a plain `DataLoader` `multiprocessing_context="forkserver"` too, since forking a
process that runs zarr's, torch's or Ray's threads can kill the worker.

A store still being built is usable: a window whose shards are not committed yet
waits for them (polling the ledger), so a run started during caching trains on exactly
what a run started after it would. It gives up after `wait_timeout_s` seconds without a
new commit.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdcache.storage import DOCUMENT_ARRAYS, StoreError, StoreMeta, StoreReader, read_meta
from kdcache.storage.layout import TEMPERATURE_ARRAYS, at_temperature
from kdcache.storage.tokens.format import Rows, document_problem
from kdcache.train.batches import KIND_EXTRAS, Batch, OrderedBatches, batch_to_dict, rows_to_batch
from kdcache.train.errors import TrainError
from kdcache.train.row_order import RowOrder

# numpy converts, on this thread alone: torch's copies split across its intra-op threads and
# wait for the slowest, up to 10x slower when another process holds a core.
_BATCH_DTYPE = {"ids": np.dtype(np.int64), "logprobs": np.dtype(np.float16),
                "tail_logmass": np.dtype(np.float32), "counts": np.dtype(np.float32)}


def _rank_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """Defaults from `torch.distributed` when a process group is initialised, else 0 of 1."""
    dist = torch.distributed
    on = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if on else 0
    if world is None:
        world = dist.get_world_size() if on else 1
    return rank, world


class StoreDataset(IterableDataset[dict[str, Tensor]], OrderedBatches):
    """One epoch at a time of this rank's batches from the logit store at `path`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world: int | None = None,
        wait_timeout_s: float = 3600.0,
        temperature: float | None = None,
    ) -> None:
        self.path = str(path)
        meta = read_meta(self.path)
        self._temperature = meta.temperature if temperature is None else float(temperature)
        try:  # one of the temperatures the store holds targets at, or a one-line error
            other = meta.temperature_index(self._temperature) is not None
        except StoreError as exc:
            raise TrainError(f"{self.path}: {exc}") from exc
        self._targets = KIND_EXTRAS[meta.kind]
        self._fields = ("tokens", *self._targets, *(TEMPERATURE_ARRAYS if other else ()),
                        *(DOCUMENT_ARRAYS if meta.documents else ()))
        self._reader: StoreReader | None = StoreReader(self.path, self._fields)
        self._reader.check_files()
        rank, world = _rank_world(rank, world)
        OrderedBatches.__init__(self, RowOrder(n_rows=self.meta.rows, batch_size=batch_size, seed=seed,
                                               rank=rank, world=world))
        self.wait_timeout_s = wait_timeout_s

    @property
    def reader(self) -> StoreReader:
        """The store's reader, opened again in a process that received a pickled copy."""
        if self._reader is None:
            self._reader = StoreReader(self.path, self._fields)
        return self._reader

    @property
    def meta(self) -> StoreMeta:
        return self.reader.meta

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def temperature(self) -> float:
        """The temperature batches carry targets at: the store's, or one of its `temperatures`."""
        return self._temperature

    @property
    def vocab_size(self) -> int:
        return self.meta.vocab_size

    @property
    def seq_len(self) -> int:
        return self.meta.seq_len

    @property
    def documents(self) -> bool:
        """Whether rows pack documents: batches carry `position_ids` and -100 labels."""
        return self.meta.documents

    @property
    def rank(self) -> int:
        return self.order.rank

    @property
    def world(self) -> int:
        return self.order.world

    @property
    def local_batch(self) -> int:
        """Sequences in each batch this rank yields: batch_size // world."""
        return self.order.local_batch

    def __len__(self) -> int:
        """Batches in a whole epoch (from any position)."""
        return self.order.batches_per_epoch()

    def __getstate__(self) -> dict[str, Any]:
        # Zarr handles are not sent to worker processes; each opens the store itself.
        return {**self.__dict__, "_reader": None}

    def set_epoch(self, epoch: int) -> None:
        """Move to the first batch of `epoch` (each epoch has its own shuffle)."""
        if epoch < 0:
            raise TrainError(f"epoch {epoch} must be at least 0")
        self.epoch, self.batch = epoch, 0

    def advance(self, batches: int = 1) -> None:
        """Move the position `batches` batches on, across epochs."""
        per_epoch = len(self)
        self.epoch, self.batch = divmod(self.epoch * per_epoch + self.batch + batches, per_epoch)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self._epoch(self.epoch, self.batch, worker, workers)

    def _epoch(self, epoch: int, start: int, worker: int, workers: int) -> Iterator[dict[str, Tensor]]:
        for index, batch in self.read_batches(epoch, start, worker=worker, workers=workers):
            # Moved before the batch is handed out: a state_dict taken while the caller
            # holds it resumes at the next one.
            self.epoch, self.batch = epoch, index + 1
            if self.batch == len(self):
                self.epoch, self.batch = epoch + 1, 0
            yield self._as_dict(batch)
        self.epoch, self.batch = epoch + 1, 0

    def loader(self, num_workers: int = 2, **kwargs: Any) -> Iterator[dict[str, Tensor]]:
        """The rest of the epoch, read by `num_workers` DataLoader worker processes (`kwargs`
        go to the `DataLoader`), in the in-process order, advancing this object's position
        as each batch is handed out; `state_dict()` stays exact however many workers read.

        Worker i reads whole windows i, i + n, ... and hands each over as its stored arrays,
        a few tensors per window; this process cuts the window's batches. Sending batches
        instead costs 2.5x the bytes and 7 tensors a batch, each its own shared-memory
        transfer (benchmarks/store_dataset.py).
        """
        if kwargs.get("persistent_workers"):
            raise TrainError("persistent_workers would keep each worker's position across epochs")
        if not num_workers:  # in-process, iterating moves the position itself
            yield from DataLoader(self, batch_size=None, num_workers=0, **kwargs)
            return
        # The batches are cut here, so pinned here (where the DataLoader would pin them).
        pin = bool(kwargs.pop("pin_memory", False)) and torch.accelerator.is_available()
        if "multiprocessing_context" not in kwargs:  # a caller's own context, fork included, wins
            kwargs["multiprocessing_context"] = _worker_context()
        shares = _WindowShares(self, self.epoch, self.batch)
        # Windows go round-robin to the workers, which the DataLoader reads round-robin:
        # they arrive in order.
        for window in DataLoader(shares, batch_size=None, num_workers=num_workers, **kwargs):
            values = {name: t.numpy() for name, t in window.values.items()}
            for index, pos in zip(window.index, window.pos, strict=True):
                batch = self._as_dict(self._to_batch(values, np.asarray(pos)))
                if index != self.batch:
                    raise TrainError(f"worker sent batch {index} where batch {self.batch} was due")
                self.advance()
                yield {k: v.pin_memory() for k, v in batch.items()} if pin else batch

    def read_batches(
        self, epoch: int, start: int = 0, *, worker: int = 0, workers: int = 1,
        stop: threading.Event | None = None,
    ) -> Iterator[tuple[int, Batch]]:
        """(global batch index, this rank's share of it) for batches start + worker,
        start + worker + workers, ... of `epoch`, reading one window at a time; the position
        is not touched. Ends without reading further once `stop` is set."""
        for index, batches in self._shares(epoch, start, worker, workers, whole_windows=False):
            needed = np.unique(batches)
            if not self._wait_for(needed, stop):
                return
            values = self._read(needed)
            for i, batch_rows in zip(index.tolist(), batches, strict=True):
                yield i, self._to_batch(values, np.searchsorted(needed, batch_rows))

    def read_windows(self, epoch: int, start: int = 0, *, worker: int = 0, workers: int = 1
                     ) -> Iterator[Window]:
        """Windows worker, worker + workers, ... of `epoch`, counted from the one holding batch
        `start`, each with its batches from `start` on; the position is not touched."""
        for index, batches in self._shares(epoch, start, worker, workers, whole_windows=True):
            needed = np.unique(batches)
            self._wait_for(needed, None)
            values = {name: torch.from_numpy(v) for name, v in self._read(needed).items()}
            yield Window(index=index.tolist(), pos=np.searchsorted(needed, batches).tolist(), values=values)

    def _shares(
        self, epoch: int, start: int, worker: int, workers: int, whole_windows: bool
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(global batch indices, their rows [n, local_batch]) of each window this worker
        reads: its batches of every window, or (`whole_windows`) every batch of its windows."""
        first, ordinal = 0, 0
        for window in self.order.windows(epoch):
            index = np.arange(first, first + len(window))
            index = index[index >= start]
            if index.size and whole_windows:
                ordinal += 1
                if (ordinal - 1) % workers != worker:
                    index = index[:0]
            elif index.size:
                index = index[(index - start) % workers == worker]
            if index.size:
                yield index, window[index - first]
            first += len(window)

    def _read(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The store's rows `rows`, their document arrays checked (a wrong mask would
        silently train on prompts, or attend across documents)."""
        values = self.reader.read_rows(rows)
        if self.documents:
            problem = document_problem(values["loss_mask"], values["position_ids"], self.seq_len + 1)
            if problem is not None:
                raise TrainError(f"{self.path}: rows {int(rows.min())}..{int(rows.max())}: {problem} "
                                 "(corrupt store); run kdcache verify")
        return values

    def _to_batch(self, values: dict[str, np.ndarray], pos: np.ndarray) -> Batch:
        """Rows `pos` of a read window as a `Batch`, its extras keyed by their arrays' names."""
        tokens = values["tokens"][pos].astype(np.int64)
        picked = {name: values[name][pos] for name in self._targets}
        if self._temperature != self.meta.temperature:  # float32 log-probs at another temperature
            picked["logprobs"], picked["tail_logmass"] = at_temperature(
                self.meta, self._temperature, picked["logprobs"], picked["tail_logmass"],
                values["tau_logz"][pos], values["tau_tail_logmass"][pos])
        extras = {name: torch.from_numpy(value if value.dtype == np.float32
                                         else value.astype(_BATCH_DTYPE[name], copy=False))
                  for name, value in picked.items()}
        rows = Rows(tokens)
        if self.documents:
            rows = Rows(tokens, values["loss_mask"][pos].astype(bool),
                        values["position_ids"][pos].astype(np.int64))
        batch = rows_to_batch(rows)
        return Batch(batch.inputs, batch.targets, extras, batch.positions)

    def _as_dict(self, batch: Batch) -> dict[str, Tensor]:
        """A batch of this store as the dict iterating yields (the public form)."""
        return batch_to_dict(batch, temperature=self.temperature, vocab_size=self.vocab_size)

    def _wait_for(self, rows: np.ndarray, stop: threading.Event | None) -> bool:
        """Wait until the shards holding `rows` are committed; False when `stop` was set."""
        reader = self.reader
        if reader.meta.complete:  # every shard committed: no per-window set of shard ids
            return stop is None or not stop.is_set()
        shards = np.unique(rows // self.meta.shard_rows)
        committed = set(reader.committed_shards)
        last_progress, told = time.monotonic(), False
        while not committed.issuperset(shards.tolist()):
            if stop is not None and stop.is_set():
                return False
            before = len(committed)
            reader.refresh()
            committed = set(reader.committed_shards)
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
        return stop is None or not stop.is_set()


@dataclass(frozen=True)
class Window:
    """A window's stored arrays as a worker hands them over: rows of `values` at `pos[j]`
    make batch `index[j]`. Plain lists, so the DataLoader sends no tensor but `values`."""

    index: list[int]
    pos: list[list[int]]
    values: dict[str, Tensor]


def _worker_context() -> multiprocessing.context.BaseContext:
    """Loader workers start from a fork server, not by forking this process: a fork copies
    a process whose other threads (zarr's event loop, its codec pool, Ray's and torch's
    threads) may hold locks or be mid-update, and a worker forked from a test process that
    had run Ray died in CI with `double free or corruption`. The server imports this module
    once when it starts (it has no threads then), so a worker starts in ~0.1 s, not the
    ~1.2 s of importing torch and zarr afresh. As with `spawn`, each worker re-imports the
    script that started it, so a script iterating `loader` needs a `__main__` guard, and
    workers see the environment variables of the server's start, not later changes. Pass
    `multiprocessing_context="fork"` to `loader` to fork anyway."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # read when the server starts, once a process
    return context


class _WindowShares(IterableDataset[Window]):
    """`StoreDataset.loader`'s worker side: worker i of n reads windows i, i + n, ..."""

    def __init__(self, dataset: StoreDataset, epoch: int, start: int) -> None:
        self.dataset, self.epoch, self.start = dataset, epoch, start

    def __iter__(self) -> Iterator[Window]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.dataset.read_windows(self.epoch, self.start, worker=worker, workers=workers)
