"""The cache job: run a teacher once over a token split and write its targets to a store.

The unit of work is one store shard. Teacher replicas are Ray actors (`--workers`, one
GPU each when the cluster has GPUs); each reads its shard's rows straight from the token
data, runs the teacher and writes and commits the shard itself, so only small summaries
travel through Ray. Actors restart and their tasks retry when a worker or node dies;
rerunning the same command skips committed shards. Shards are computed in fixed
micro-batches, so the store's bytes do not depend on the number of workers.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from kdcache.errors import KdcacheError
from kdcache.paths import check_writable
from kdcache.pipeline.cache.placement import check_tensor_parallel, replica_options
from kdcache.pipeline.cache.vocab import check_teacher_vocab
from kdcache.pipeline.errors import PipelineError

Backend = Literal["native", "hf", "vllm"]
RECORDED_RTOL = 1e-4
"""A teacher's recorded validation loss against the cache job's own measurement: float32
forwards in other batch shapes agree to ~1e-6; wrong weights differ by far more."""


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Run a teacher over a token split and write its targets to a logit store."""

    teacher: str
    """Teacher model directory (kdcache MODEL or Hugging Face causal LM)."""
    data: str
    """Token data directory written by `kdcache prepare`."""
    out: str
    """Logit store to create, or to resume if it exists with the same settings."""
    split: str = "student"
    """Split of the token data to run the teacher over."""
    kind: Literal["topk", "full", "sampled"] = "topk"
    """Targets to keep: top-k log-probs, the full distribution, or sampled ids with counts."""
    k: int = 64
    """Ids kept per position (topk)."""
    draws: int = 64
    """Samples per position (sampled; at most 255)."""
    temperature: float = 1.0
    """Temperature of the stored log-probs (the paper finds 1 best)."""
    backend: Backend = "native"
    """Teacher backend: native (kdcache model), hf (transformers), vllm."""
    workers: int = 1
    """Teacher replicas (Ray actors)."""
    ray_address: str | None = None
    """Address of an existing Ray cluster; default starts a local one."""
    shard_rows: int = 64
    """Rows per store shard: the unit of work, of commit and of resume."""
    batch_rows: int = 8
    """Rows per teacher forward pass (native/hf project their logits in chunks of 256 MB)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Teacher weights' dtype (hf, vllm; native too): auto is float32 on CPU, the checkpoint's
    torch_dtype on GPU. Log-probs are computed in float32 whatever it is."""
    tensor_parallel: int = 1
    """GPUs per teacher replica (vllm), held as one placement group on one node."""
    max_rows: int | None = None
    """Cache only the first N rows of the split (quick runs)."""
    valid_rows: int | None = None
    """Rows of the `valid` split the teacher loss L_T is measured on (default: all, the rows
    students are scored on; match the students' --eval-rows if they use fewer)."""
    seed: int = 0
    """Seed of the sampled kind's draws."""
    json: bool = False
    """Print the result as JSON."""
    quiet: bool = False
    """No progress bar."""

    def __post_init__(self) -> None:
        for name in ("k", "draws", "workers", "shard_rows", "batch_rows", "tensor_parallel"):
            if getattr(self, name) < 1:
                raise PipelineError(f"cache config: field '{name}' must be >= 1")
        for name in ("max_rows", "valid_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PipelineError(f"cache config: field '{name}' must be >= 1")
        if not self.temperature > 0:
            raise PipelineError("cache config: field 'temperature' must be > 0")
        if self.kind == "sampled" and self.draws > 255:
            raise PipelineError("cache config: field 'draws' must be <= 255 (counts are uint8)")
        if self.backend == "vllm" and (self.kind != "topk" or self.temperature != 1.0):
            raise PipelineError("cache config: the vllm backend caches kind=topk at temperature 1 only")
        if self.tensor_parallel > 1 and self.backend != "vllm":
            raise PipelineError("cache config: field 'tensor_parallel' > 1 needs --backend vllm")


def run_cache(cfg: CacheConfig) -> dict[str, Any]:
    """Build (or finish) the store; returns a summary with teacher_loss and throughput."""
    import ray

    from kdcache.ray_session import ray_session
    from kdcache.storage import CacheJob, StoreWriter, append_job

    data = _check_paths(cfg)
    started = time.perf_counter()
    with ray_session(cfg.ray_address):
        created = not Path(cfg.out).exists()
        actors: list[Any] = []
        groups: list[Any] = []
        try:
            actors = _start_actors(cfg, groups)
            described = _get(actors[0].describe.remote())
            meta = _store_meta(cfg, described, data)
            writer = StoreWriter.open(cfg.out, meta)
            pending = writer.pending_shards()
            # L_T first: a teacher that disagrees with its own record fails in seconds, not at the end.
            valid = _valid_loss(cfg, actors, data) if pending or writer.meta.valid_loss is None else None
            t0 = time.perf_counter()
            tokens = _dispatch(cfg, actors, pending, writer.meta)
            seconds = time.perf_counter() - t0
            writer.finalize(valid=valid)
            if pending:
                append_job(cfg.out, CacheJob(seconds=seconds, tokens=tokens, shards=len(pending),
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
    return {
        "store": cfg.out,
        "shards": writer.meta.num_shards,
        "shards_written": len(pending),
        "tokens_written": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "complete": writer.meta.complete,
        "valid_loss": writer.meta.valid_loss,
        "valid_tokens": writer.meta.valid_tokens,
        "teacher_loss": writer.meta.teacher_loss,
    }


def _valid_loss(cfg: CacheConfig, actors: list[Any], data: Any) -> tuple[float, int] | None:
    """L_T: the teacher's cross-entropy on the data's valid split, in `shard_rows` pieces over
    the actors, summed in row order (so it does not depend on the number of workers).

    A kdcache teacher records the validation loss it reached in training; when that was
    measured on the same rows it must agree, or the weights are not the ones that were scored.
    """
    rows = int(data.rows("valid")) if "valid" in data.meta["splits"] else 0
    rows = min(rows, cfg.valid_rows) if cfg.valid_rows else rows
    if rows == 0:
        return None
    refs = [actors[i % len(actors)].valid_nll.remote(start, min(start + cfg.shard_rows, rows))
            for i, start in enumerate(range(0, rows, cfg.shard_rows))]
    sums = [_get(ref) for ref in refs]
    nll, tokens = sum(s["nll_sum"] for s in sums), sum(s["tokens"] for s in sums)
    _check_recorded_loss(cfg.teacher, data, nll / tokens, tokens)
    return nll / tokens, tokens


def _check_recorded_loss(teacher: str, data: Any, loss: float, tokens: int) -> None:
    import json
    import math

    try:
        meta = json.loads((Path(teacher) / "kdcache.json").read_text())
    except (OSError, ValueError):
        return  # not a kdcache teacher (a Hugging Face one): nothing recorded to compare
    training, trained_on = meta.get("training") or {}, meta.get("data") or {}
    recorded = training.get("loss")
    same_rows = trained_on.get("fingerprint") == data.fingerprint and training.get("eval_tokens") == tokens
    if same_rows and isinstance(recorded, float) and not math.isclose(recorded, loss, rel_tol=RECORDED_RTOL):
        raise PipelineError(
            f"{teacher}/kdcache.json: field 'training.loss' is {recorded:.6f} but the teacher measures "
            f"{loss:.6f} on the same {tokens:,} valid tokens: these are not the weights that were scored")


def _roll_back(out: str, created: bool) -> None:
    """A store this run created and never committed to is removed: bad input changes nothing."""
    from kdcache.storage.ledger import committed

    path = Path(out)
    # The ledger alone decides: a reader's integrity checks must never get committed work deleted.
    if created and path.is_dir() and not committed(path):
        shutil.rmtree(path, ignore_errors=True)


def _check_paths(cfg: CacheConfig) -> Any:
    """Cheap checks before any worker starts, so bad paths fail in a second; the token data."""
    from kdcache.storage import read_meta
    from kdcache.storage.tokens.format import open_token_data

    teacher = Path(cfg.teacher)
    if not (teacher / "config.json").is_file():
        raise PipelineError(f"{teacher}: missing config.json (not a model directory)")
    if not any(teacher.glob("*.safetensors")):
        raise PipelineError(f"{teacher}: missing model.safetensors (no weights)")
    check_writable(cfg.out, "--out")
    if Path(cfg.out).is_dir() and any(Path(cfg.out).iterdir()):
        read_meta(cfg.out)  # an existing store must at least parse before workers start
    data = open_token_data(cfg.data)
    _split_rows(data, cfg)
    return data


def _split_rows(data: Any, cfg: CacheConfig) -> int:
    rows = int(data.rows(cfg.split))
    return min(rows, cfg.max_rows) if cfg.max_rows else rows


def _store_meta(cfg: CacheConfig, described: dict[str, Any], data: Any) -> Any:
    from kdcache.storage import DataInfo, StoreMeta, TeacherInfo, suggest_chunk_rows

    vocab = data.vocab_size  # the store's ids are the tokenizer's; padded output rows are dropped
    check_teacher_vocab(cfg.teacher, int(described["output_rows"]), described["tokenizer"],
                        Path(data.tokenizer_path), vocab)
    k = {"topk": cfg.k, "full": vocab, "sampled": cfg.draws}[cfg.kind]
    if k > vocab:
        raise PipelineError(f"cache config: field 'k' ({k}) exceeds the vocabulary ({vocab})")
    return StoreMeta(
        kind=cfg.kind, k=k, vocab_size=vocab, seq_len=data.seq_len, temperature=cfg.temperature,
        teacher=TeacherInfo(**described["info"]),
        data=DataInfo(fingerprint=data.split_fingerprint(cfg.split), split=cfg.split,
                      rows=_split_rows(data, cfg), tokenizer=data.tokenizer_fingerprint),
        shard_rows=cfg.shard_rows,
        chunk_rows=suggest_chunk_rows(data.seq_len, k, cfg.shard_rows),
        draws=cfg.draws if cfg.kind == "sampled" else None,
        seed=cfg.seed if cfg.kind == "sampled" else 0,
    )


def _start_actors(cfg: CacheConfig, groups: list[Any]) -> list[Any]:
    """One actor per replica; placement groups it reserves are appended to `groups`."""
    import ray

    from kdcache.pipeline.cache.worker import CacheWorker

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
        actors.append(actor.remote(asdict(cfg), options["num_cpus"]))
    return actors


def _dispatch(cfg: CacheConfig, actors: list[Any], pending: list[int], meta: Any) -> int:
    """Keep every actor busy with two shards until none are left; returns tokens written."""
    import ray
    from tqdm import tqdm

    queue = deque(pending)
    in_flight: dict[Any, int] = {}
    meta_json = meta.to_json()

    def submit(worker: int) -> None:
        if queue:
            in_flight[actors[worker].process.remote(queue.popleft(), meta_json)] = worker

    for worker in range(len(actors)):
        submit(worker)
        submit(worker)
    tokens, t0 = 0, time.perf_counter()
    with tqdm(total=meta.num_shards, initial=meta.num_shards - len(pending), unit="shard",
              desc="cache", disable=cfg.quiet) as bar:
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            worker = in_flight.pop(done[0])
            tokens += _get(done[0])["tokens"]
            bar.update(1)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):,.0f}")
            submit(worker)
    return tokens


def _get(ref: Any) -> Any:
    """ray.get, turning a worker's domain error back into that error (one clear line)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, KdcacheError):
            raise type(cause)(str(cause)) from None
        raise PipelineError(f"cache worker failed: {cause or exc}") from exc
