"""The cache job: run a teacher once over a token split and write its targets to a store.

The unit of work is one store shard. Teacher replicas are Ray actors (`--workers`, one
GPU each when the cluster has GPUs); each reads its shard's rows straight from the token
data, runs the teacher and writes and commits the shard itself, so only small summaries
travel through Ray. Actors restart and their tasks retry when a worker or node dies;
rerunning the same command skips committed shards. Shards are computed in fixed
micro-batches, so the store's bytes do not depend on the number of workers.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from kdcache.errors import KdcacheError
from kdcache.hub import resolve_model
from kdcache.pipeline.cache.config import CacheConfig, CacheResult
from kdcache.pipeline.cache.placement import check_tensor_parallel, replica_options
from kdcache.pipeline.cache.teachers import check_teacher_files
from kdcache.pipeline.cache.vocab import check_teacher_vocab
from kdcache.pipeline.cache.worker import CacheWorker, ReplicaSettings, TeacherDescription
from kdcache.pipeline.errors import PipelineError
from kdcache.ray_session import ray_session
from kdcache.storage import (
    CacheJob,
    DataInfo,
    StoreError,
    StoreMeta,
    StoreWriter,
    append_job,
    read_meta,
    suggest_chunk_rows,
)
from kdcache.storage.ledger import committed
from kdcache.storage.location import check_output, locate
from kdcache.storage.model_record import read_model_record
from kdcache.storage.tokens.format import TokenData, open_token_data

RECORDED_RTOL = 1e-4
"""A teacher's recorded validation loss against the cache job's own measurement: float32
forwards in other batch shapes agree to ~1e-6; wrong weights differ by far more."""


def run_cache(cfg: CacheConfig) -> CacheResult:
    """Build (or finish) the store; returns a summary with teacher_loss and throughput.
    A Hub id `--teacher` is its snapshot in the Hugging Face cache from here on (on a
    cluster, every node must see that cache)."""
    cfg = dataclasses.replace(cfg, teacher=resolve_model(cfg.teacher, "--teacher"))
    data = _check_paths(cfg)
    started = time.perf_counter()
    with ray_session(cfg.ray_address):
        created = not locate(cfg.out).exists()
        actors: list[Any] = []
        groups: list[Any] = []
        try:
            actors = _start_actors(cfg, groups)
            described = _get(actors[0].describe.remote())
            meta = _store_meta(cfg, described, data)
            writer = StoreWriter.open(cfg.out, meta)
            pending = writer.pending_shards()
            # L_T first: a teacher that disagrees with its own record fails in seconds, not at the end.
            measure = bool(pending) or writer.meta.valid_loss is None
            valid = _valid_loss(cfg, actors, data, writer.meta) if measure else None
            if valid is not None:  # before any shard: a resumed store must not mix two teachers
                writer.record_valid_loss(*valid)
            t0 = time.perf_counter()
            tokens = _dispatch(cfg, actors, pending, writer.meta)
            seconds = time.perf_counter() - t0
            writer.finalize(valid=valid)
            if pending:
                _log_job(cfg.out, CacheJob(seconds=seconds, tokens=tokens, shards=len(pending),
                                           workers=cfg.workers, backend=cfg.backend,
                                           startup_seconds=t0 - started))
        except BaseException:
            _roll_back(cfg.out, created)
            raise
        finally:
            # Explicitly: a failed job's traceback keeps the handles alive, and live actors
            # would hold their CPUs/GPUs on a shared cluster.
            for actor in actors:
                ray.kill(actor)
            for group in groups:
                ray.util.remove_placement_group(group)
    return CacheResult(
        store=cfg.out, shards=writer.meta.num_shards, shards_written=len(pending), tokens_written=tokens,
        seconds=seconds, tokens_per_s=tokens / seconds if seconds > 0 else 0.0, complete=writer.meta.complete,
        valid_loss=writer.meta.valid_loss, valid_tokens=writer.meta.valid_tokens,
        teacher_loss=writer.meta.teacher_loss,
    )


def _valid_loss(cfg: CacheConfig, actors: list[Any], data: TokenData,
                meta: StoreMeta) -> tuple[float, int] | None:
    """L_T: the teacher's cross-entropy on the data's valid split (its trained positions), in
    `shard_rows` pieces over the actors, summed in row order (so it does not depend on the
    number of workers).

    A kdcache teacher records the validation loss it reached in training; when that was
    measured on the same rows it must agree, or the weights are not the ones that were scored.
    """
    rows = int(data.rows("valid")) if "valid" in data.meta["splits"] else 0
    rows = min(rows, cfg.valid_rows) if cfg.valid_rows else rows
    if rows == 0:
        return None
    refs = [actors[i % len(actors)].valid_nll.remote(start, min(start + cfg.shard_rows, rows), meta)
            for i, start in enumerate(range(0, rows, cfg.shard_rows))]
    sums: list[tuple[float, int]] = [_get(ref) for ref in refs]
    nll, tokens = sum(s[0] for s in sums), sum(s[1] for s in sums)
    if tokens == 0:
        return None  # the valid rows train nothing: no loss to measure
    _check_recorded_loss(cfg.teacher, data, nll / tokens, tokens)
    return nll / tokens, tokens


def _check_recorded_loss(teacher: str, data: TokenData, loss: float, tokens: int) -> None:
    try:
        record = read_model_record(teacher)
    except StoreError:
        return  # unreadable: the native backend refuses it when loading; hf and vllm ignore it
    if record is None:
        return  # not a kdcache teacher (a Hugging Face one): nothing recorded to compare
    recorded = record.training_loss
    same_rows = ((record.data or {}).get("fingerprint") == data.fingerprint
                 and (record.training or {}).get("eval_tokens") == tokens)
    if same_rows and recorded is not None and not math.isclose(recorded, loss, rel_tol=RECORDED_RTOL):
        raise PipelineError(
            f"{teacher}/kdcache.json: field 'training.loss' is {recorded:.6f} but the teacher measures "
            f"{loss:.6f} on the same {tokens:,} valid tokens: these are not the weights that were scored")


def _log_job(out: str, job: CacheJob) -> None:
    """Append the job's timing. The log is a measurement: the store is finished by now, and
    a log that cannot be written or read must not fail it (nor vanish unsaid)."""
    try:
        aside = append_job(out, job)
    except (OSError, StoreError) as exc:
        print(f"kdcache cache: warning: {out}: this job's timing was not logged ({exc})", file=sys.stderr)
        return
    if aside is not None:
        print(f"kdcache cache: warning: {aside.rsplit('.unreadable-', 1)[0]} was unreadable: kept as "
              f"{aside.rsplit('/', 1)[-1]}, and a new log started with this job", file=sys.stderr)


def _roll_back(out: str, created: bool) -> None:
    """A store this run created and never committed to is removed: bad input changes nothing.

    Best effort: it runs while the job's own error propagates, and where the store cannot be
    reached (an object store gone away) that error, not the roll-back's, is the one to report;
    the leftover store holds no committed shard, and the same command resumes it."""
    if not created:
        return
    path = locate(out)
    try:
        # The ledger alone decides: a reader's integrity checks must never get committed work deleted.
        if path.exists() and not committed(path):
            path.remove()
    except (OSError, StoreError):
        pass


def _check_paths(cfg: CacheConfig) -> TokenData:
    """Cheap checks before any worker starts, so bad paths fail in a second; the token data."""
    check_teacher_files(cfg.teacher)
    check_output(cfg.out, "--out")
    if locate(cfg.out).exists():
        read_meta(cfg.out)  # an existing store must at least parse before workers start
    data = open_token_data(cfg.data)
    _split_rows(data, cfg)
    return data


def _split_rows(data: TokenData, cfg: CacheConfig) -> int:
    rows = int(data.rows(cfg.split))
    return min(rows, cfg.max_rows) if cfg.max_rows else rows


def _store_meta(cfg: CacheConfig, described: TeacherDescription, data: TokenData) -> StoreMeta:
    vocab = data.vocab_size  # the store's ids are the tokenizer's; padded output rows are dropped
    check_teacher_vocab(cfg.teacher, described.output_rows, described.tokenizer, Path(data.tokenizer_path),
                        vocab)
    k = {"topk": cfg.k, "full": vocab, "sampled": cfg.draws}[cfg.kind]
    if k > vocab:
        raise PipelineError(f"cache config: field 'k' ({k}) exceeds the vocabulary ({vocab})")
    return StoreMeta(
        kind=cfg.kind, k=k, vocab_size=vocab, seq_len=data.seq_len, temperature=cfg.temperature,
        teacher=described.info,
        data=DataInfo(fingerprint=data.split_fingerprint(cfg.split), split=cfg.split,
                      rows=_split_rows(data, cfg), tokenizer=data.tokenizer_fingerprint,
                      mask_fingerprint=data.mask_fingerprint(cfg.split)),
        shard_rows=cfg.shard_rows,
        chunk_rows=suggest_chunk_rows(data.seq_len, k, cfg.shard_rows),
        draws=cfg.draws if cfg.kind == "sampled" else None,
        seed=cfg.seed if cfg.kind == "sampled" else 0,
        values=cfg.values,
        temperatures=list(cfg.temperatures),
    )


def _start_actors(cfg: CacheConfig, groups: list[Any]) -> list[Any]:
    """One actor per replica; placement groups it reserves are appended to `groups`."""
    check_tensor_parallel(cfg.tensor_parallel, ray.nodes())
    resources = ray.cluster_resources()
    cpus = max(1, int(resources.get("CPU", 1)) // cfg.workers)
    actors = []
    for _ in range(cfg.workers):
        options, group = replica_options(cfg.tensor_parallel, cpus, resources.get("GPU", 0))
        if group is not None:
            groups.append(group)
        actor = ray.remote(CacheWorker).options(**options, max_restarts=-1, max_task_retries=-1,
                                                max_concurrency=2)
        settings = ReplicaSettings(teacher=cfg.teacher, backend=cfg.backend, data=cfg.data, out=cfg.out,
                                   batch_rows=cfg.batch_rows, dtype=cfg.dtype, max_k=cfg.k,
                                   tensor_parallel=cfg.tensor_parallel, threads=options["num_cpus"])
        actors.append(actor.remote(settings))
    return actors


def _dispatch(cfg: CacheConfig, actors: list[Any], pending: list[int], meta: StoreMeta) -> int:
    """Keep every actor busy with two shards until none are left; returns tokens written."""
    queue = deque(pending)
    in_flight: dict[Any, int] = {}

    def submit(worker: int) -> None:
        if queue:
            in_flight[actors[worker].process.remote(queue.popleft(), meta)] = worker

    for worker in range(len(actors)):
        submit(worker)
        submit(worker)
    tokens, t0 = 0, time.perf_counter()
    with tqdm(total=meta.num_shards, initial=meta.num_shards - len(pending), unit="shard",
              desc="cache", disable=cfg.quiet) as bar:
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            worker = in_flight.pop(done[0])
            tokens += _get(done[0]).tokens
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):,.0f}")
            submit(worker)
    return tokens


def _get(ref: Any) -> Any:
    """ray.get, turning a worker's domain error back into that error (one clear line)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, KdcacheError):
            raise type(cause)(str(cause)) from None
        raise PipelineError(f"cache worker failed: {cause or exc}") from exc
