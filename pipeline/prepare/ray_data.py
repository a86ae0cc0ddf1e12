"""`kdcache prepare --workers N` on Ray Data: read units in parallel and tokenize with
`map_batches`; the driver packs the rows and its writer threads write the shards.

Ray Data runs with `preserve_order`, so the driver sees token batches in document order
and packs exactly what the serial path packs: the output bytes do not depend on the
number of workers. Token data is 4 bytes a token, so one machine writes it far faster
than a cluster tokenizes (shard writes as Ray tasks measured 4x slower than threads).
Memory is bounded by the blocks in flight (`BLOCK_BYTES` each, at
most `OBJECT_STORE_BUDGET` in the object store), never by the corpus. On a cluster
(`--ray-address`) the source and the output must lie on storage every node sees.

A worker's error reaches the user as the one line it raised: Ray wraps it in task and Ray
Data errors whose text is a coloured traceback, and Ray Data logs that traceback as an
ERROR too, so `domain_error` digs the worker's own error out and `quiet_ray_logs` keeps
Ray's loggers off stderr while the job runs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data import TaskPoolStrategy
from ray.exceptions import RayError
from tokenizers import Tokenizer

from kdcache.errors import KdcacheError
from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.corpus import Unit, read_unit
from kdcache.pipeline.prepare.records import Columns
from kdcache.pipeline.prepare.tokenizer import Encoding, Piece, tokenize_batch

BLOCK_BYTES = 1 << 20  # each read batch its own block, so one file feeds every worker
OBJECT_STORE_BUDGET = 64 << 20  # Ray Data's object store budget for blocks in flight
LOCAL_OBJECT_STORE = 512 << 20  # a local Ray's object store: bounded, whatever the host
_TOKENIZERS: dict[str, Any] = {}


def _read(table: Any, columns: list[str], text: bool, max_bytes: int, batch_bytes: int) -> Iterator[Any]:
    """Ray Data UDF: one read unit (a one-row batch) -> tables of documents. Records of a
    structured format travel as JSON text, so a malformed one reaches `chat.py`'s checks
    (and its one-line error) instead of failing Arrow's type inference."""
    for row in table.to_pylist():
        unit = Unit.from_row(row)
        for names, values, nbytes in read_unit(unit, Columns(tuple(columns), text, max_bytes), batch_bytes):
            texts = values if text else [json.dumps(v) for v in values]
            yield pa.table({"name": names, "text": texts,
                            "nbytes": pa.array([nbytes] + [0] * (len(names) - 1), pa.int64())})


def _tokenize(table: Any, tokenizer: str, eos: int | None, seed: int, fractions: Sequence[float],
              encoding: dict[str, Any]) -> Any:
    """Ray Data UDF: documents -> one row of tokens per split (the worker keeps its tokenizer)."""
    key = hashlib.sha256(tokenizer.encode()).hexdigest()
    if not _TOKENIZERS:
        # As many encoder threads as CPUs the task holds: tokenizers would otherwise start
        # one per core of the node in every worker. Read once, at the first encode.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, int(cpus))))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = Tokenizer.from_str(tokenizer)
    nbytes = int(np.asarray(table.column("nbytes")).sum())
    how = Encoding(**encoding)
    values = table.column("text").to_pylist()
    if how.fmt != "text":
        values = [json.loads(v) for v in values]
        values = [tuple(v) if how.fmt == "completion" and isinstance(v, list) and len(v) == 2 else v
                  for v in values]
    batch = tokenize_batch(_TOKENIZERS[key], eos, table.column("name").to_pylist(), values, nbytes, seed,
                           fractions, how)
    return batch.to_arrow()


def ray_pieces(units: list[Any], tok: Any, eos: int | None, *, workers: int, columns: Columns,
               seed: int, fractions: Sequence[float], batch_bytes: int,
               encoding: Encoding) -> Iterator[Piece]:
    """Token pieces in document order, computed by Ray Data (Ray must be initialised)."""
    # A small source has fewer blocks than workers: Ray Data's warning says nothing to a user.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options, ctx.enable_progress_bars, ctx.target_max_block_size)
    ctx.execution_options = copy.deepcopy(ctx.execution_options)
    ctx.execution_options.preserve_order = True
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=OBJECT_STORE_BUDGET)
    ctx.enable_progress_bars = False
    ctx.target_max_block_size = BLOCK_BYTES
    try:
        ds: Any = ray.data.from_items([u.to_row() for u in units], override_num_blocks=len(units))
        # Reading and tokenizing differ in CPUs, so Ray Data does not fuse them: one big
        # file is read by one task and still tokenized by every worker.
        ds = ds.map_batches(_read, batch_size=1, batch_format="pyarrow", num_cpus=0.5,
                            compute=TaskPoolStrategy(size=workers),
                            fn_kwargs={"columns": list(columns.names), "text": columns.text,
                                       "max_bytes": columns.max_bytes, "batch_bytes": batch_bytes})
        ds = ds.map_batches(_tokenize, batch_size=None, batch_format="pyarrow", num_cpus=1,
                            compute=TaskPoolStrategy(size=workers),
                            fn_kwargs={"tokenizer": tok.to_str(), "eos": eos, "seed": seed,
                                       "fractions": list(fractions), "encoding": asdict(encoding)})
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
            yield from _table_pieces(table)
    except Exception as exc:
        raise domain_error(exc) from None
    finally:
        ctx.execution_options, ctx.enable_progress_bars, ctx.target_max_block_size = saved


def _table_pieces(table: Any) -> Iterator[Piece]:
    def values(column: str, i: int, dtype: Any) -> np.ndarray:
        return np.asarray(table.column(column)[i].values.to_numpy(zero_copy_only=False), dtype=dtype)

    documents = "masks" in table.column_names  # stream text has no masks or lengths
    splits = table.column("split").to_numpy()
    docs, nbytes = table.column("docs").to_numpy(), table.column("nbytes").to_numpy()
    for i in range(len(table)):
        mask = values("masks", i, np.uint8) if documents else None
        lengths = values("lengths", i, np.int32) if documents else None
        yield int(splits[i]), values("tokens", i, np.int32), mask, lengths, int(docs[i]), int(nbytes[i])


@contextmanager
def quiet_ray_logs(quiet: bool) -> Iterator[None]:
    """Ray Data's loggers off while the job runs (a worker's error is re-raised as one line),
    and with `quiet` Ray's own warnings too (the notice about token authentication that
    every local start prints); the levels are restored after."""
    levels = {"ray.data": logging.CRITICAL} | ({"ray": logging.ERROR} if quiet else {})
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def domain_error(exc: BaseException) -> BaseException:
    """The KdcacheError (or OSError) a Ray worker raised, as one clear line, else `exc`: Ray
    wraps it in task and Ray Data errors whose text is a traceback."""
    seen: set[int] = set()
    todo: deque[BaseException] = deque([exc])
    while todo:
        e = todo.popleft()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (KdcacheError, OSError)) and not isinstance(e, RayError):
            lines = str(e).splitlines()  # Ray Data appends its retry advice to the message
            line = lines[0] if lines else ""
            return type(e)(line) if isinstance(e, KdcacheError) else PipelineError(line)
        todo.extend(x for x in (getattr(e, "cause", None), e.__cause__, e.__context__)
                    if isinstance(x, BaseException))
    return exc
