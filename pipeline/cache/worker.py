"""One teacher replica of the cache job (run as a Ray actor by `kdcache.pipeline.cache.job`).

The teacher loads on first use rather than in `__init__`, so that a restarted actor
reloads it and a bad teacher surfaces as an ordinary task error with its message.
The actor runs two shards at once (`max_concurrency=2`): one shard's compression and
write overlap the next shard's forward pass (torch, Blosc and zstd release the GIL).
Each shard is still written whole by one thread, so the bytes do not change.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any


class CacheWorker:
    def __init__(self, cfg: dict[str, Any], threads: int) -> None:
        import torch

        from kdcache.pipeline.cache.job import CacheConfig
        from kdcache.train.runtime import tune_cpu_allocator

        torch.set_num_threads(threads)
        tune_cpu_allocator()  # logits-sized tensors every batch: keep freed pages (train/runtime.py)
        self.cfg = CacheConfig(**cfg)
        self._teacher: Any = None
        self._writer: Any = None
        self._data: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._teacher is None:
                from kdcache.pipeline.cache.teachers import load_teacher
                from kdcache.storage.tokens.format import open_token_data

                self._data = open_token_data(self.cfg.data)
                rows = self._data.seq_len + 1
                self._teacher = load_teacher(self.cfg.backend, self.cfg.teacher, max_len=rows,
                                             batch_rows=self.cfg.batch_rows, max_k=self.cfg.k,
                                             dtype=self.cfg.dtype, tensor_parallel=self.cfg.tensor_parallel,
                                             vocab=self._data.vocab_size)
            return self._teacher

    def describe(self) -> dict[str, Any]:
        from dataclasses import asdict

        from kdcache.pipeline.cache.vocab import token_ids

        teacher = self._load()
        tok = teacher.tokenizer_json
        return {
            "info": asdict(teacher.info),
            "output_rows": teacher.output_rows,
            "tokenizer": token_ids(tok) if tok is not None else None,
        }

    def valid_nll(self, start: int, stop: int) -> dict[str, Any]:
        """The teacher's NLL sum and token count over rows [start, stop) of the valid split."""
        import numpy as np

        from kdcache.pipeline.cache.targets import TargetSpec

        teacher = self._load()
        rows = np.asarray(self._data.read("valid", slice(start, stop)), dtype=np.int32)
        spec = TargetSpec(kind="topk", k=1, temperature=1.0, vocab=self._data.vocab_size, draws=0, seed=0)
        logprob = np.asarray(teacher.targets(rows, spec, start)["target_logprob"], dtype=np.float64)
        return {"nll_sum": float(-logprob.sum()), "tokens": int(logprob.size)}

    def process(self, shard: int, meta_json: dict[str, Any]) -> dict[str, Any]:
        from kdcache.pipeline.cache.shard import cache_shard
        from kdcache.storage import StoreMeta, StoreWriter

        teacher = self._load()
        with self._lock:
            if self._writer is None:
                meta = StoreMeta.from_json(meta_json, self.cfg.out)
                self._writer = StoreWriter.open(Path(self.cfg.out), meta)
        entry = cache_shard(teacher, self._data, self.cfg.split, self._writer, shard)
        return {"shard": shard, "tokens": entry.tokens, "nll_sum": entry.nll_sum}
