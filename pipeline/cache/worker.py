"""One teacher replica of the cache job (run as a Ray actor by `kdcache.pipeline.cache.job`).

A replica is built from its `ReplicaSettings` (how to run the teacher); what to cache
(kind, k, temperature, draws, vocabulary) comes with each task as the store's `StoreMeta`,
which does not exist yet when the replica starts: it records the teacher the replica
describes. The teacher loads on first use rather than in `__init__`, so that a restarted
actor reloads it and a bad teacher surfaces as an ordinary task error with its message.
The actor runs two shards at once (`max_concurrency=2`): one shard's compression and
write overlap the next shard's forward pass (torch, Blosc and zstd release the GIL).
Each shard is still written whole by one thread, so the bytes do not change.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from kdcache.pipeline.cache.shard import cache_shard
from kdcache.pipeline.cache.teachers import Backend, TargetSpec, Teacher, load_teacher
from kdcache.storage import ShardEntry, StoreMeta, StoreWriter, TeacherInfo
from kdcache.storage.tokens.format import TokenData, open_token_data
from kdcache.storage.tokens.vocab import token_ids
from kdcache.train.runtime import tune_cpu_allocator


@dataclass(frozen=True, kw_only=True)
class ReplicaSettings:
    """How one replica runs its teacher: the parts of the cache job's settings it uses."""

    teacher: str
    backend: Backend
    data: str
    out: str
    batch_rows: int
    dtype: str
    tensor_parallel: int
    max_k: int
    """Most ids per position the teacher is asked for (vllm sizes its engine by it before the
    store's metadata exists; the targets themselves take k from the metadata)."""
    threads: int
    """Torch threads: the replica's share of its node's CPUs."""


@dataclass(frozen=True, kw_only=True)
class TeacherDescription:
    """What the store's metadata and the vocabulary check need to know of a loaded teacher."""

    info: TeacherInfo
    output_rows: int
    tokenizer: dict[str, str] | None
    """id -> token of its tokenizer.json (`storage.tokens.vocab.token_ids`), when it has one."""


class CacheWorker:
    def __init__(self, settings: ReplicaSettings) -> None:
        torch.set_num_threads(settings.threads)
        tune_cpu_allocator()  # logits-sized tensors every batch: keep freed pages (train/runtime.py)
        self.settings = settings
        self._teacher: tuple[Teacher, TokenData] | None = None
        self._writer: StoreWriter | None = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Teacher, TokenData]:
        """The teacher and the token data it reads."""
        with self._lock:
            if self._teacher is None:
                s = self.settings
                data = open_token_data(s.data)
                teacher = load_teacher(s.backend, s.teacher, max_len=data.seq_len + 1,
                                       batch_rows=s.batch_rows, max_k=s.max_k, dtype=s.dtype,
                                       tensor_parallel=s.tensor_parallel, vocab=data.vocab_size)
                self._teacher = teacher, data
            return self._teacher

    def describe(self) -> TeacherDescription:
        teacher, _ = self._load()
        tok = teacher.tokenizer_json
        return TeacherDescription(info=teacher.info, output_rows=teacher.output_rows,
                                  tokenizer=token_ids(tok) if tok is not None else None)

    def valid_nll(self, start: int, stop: int, meta: StoreMeta) -> tuple[float, int]:
        """The teacher's NLL sum and token count over the trained positions of rows
        [start, stop) of the valid split (every position where the data packs no documents)."""
        teacher, data = self._load()
        rows = data.read_rows("valid", slice(start, stop))
        spec = TargetSpec(kind="topk", k=1, temperature=1.0, vocab=meta.vocab_size, draws=0, seed=0)
        logprob = np.asarray(teacher.targets(rows, spec, start)["target_logprob"], dtype=np.float64)
        trained = rows.trained()
        return float(-logprob[trained].sum()), int(trained.sum())

    def process(self, shard: int, meta: StoreMeta) -> ShardEntry:
        teacher, data = self._load()
        with self._lock:
            if self._writer is None:
                self._writer = StoreWriter.open(self.settings.out, meta)
        return cache_shard(teacher, data, meta.data.split, self._writer, shard)
