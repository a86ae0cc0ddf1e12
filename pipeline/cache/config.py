"""Settings and results of `kdcache cache` and `kdcache import-teacher` (light: the CLI imports
it to build its flags; the work is in `job.py` and `gguf.py`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdcache.pipeline.cache.teachers import Backend
from kdcache.pipeline.errors import PipelineError
from kdcache.storage import Kind


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Run a teacher over a token split and write its targets to a logit store."""

    teacher: str
    """Teacher model (kdcache MODEL or Hugging Face causal LM): a local path or Hugging Face
    Hub id (owner/name[@revision]; its safetensors weights, config and tokenizer files are
    fetched to the Hugging Face cache, or read from it offline)."""
    data: str
    """Token data directory written by `kdcache prepare`."""
    out: str
    """Logit store to create, or to resume if it exists with the same settings."""
    split: str = "student"
    """Split of the token data to run the teacher over."""
    kind: Kind = "topk"
    """Targets to keep: top-k log-probs, the full distribution, or sampled ids with counts."""
    k: int = 64
    """Ids kept per position (topk)."""
    draws: int = 64
    """Samples per position (sampled; at most 255)."""
    values: Literal["exact", "sqrt8", "sqrt9"] = "exact"
    """How top-k log-probs are kept: exact (float16, lossless) or sqrt(p) quantised to 2**8 or
    2**9 levels (lossy, smaller; docs/store-format.md gives each mode's measured KL)."""
    temperature: float = 1.0
    """Temperature of the stored log-probs (the paper finds 1 best)."""
    temperatures: list[float] = field(default_factory=list)
    """Further temperatures students may train at from this store (topk; e.g. [0.5,2,4]): the
    store keeps each one's log-normaliser and tail, two float32 values per position each."""
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
        # flags give None for no temperatures
        object.__setattr__(self, "temperatures", [float(t) for t in self.temperatures or []])
        if self.temperatures and self.kind != "topk":
            raise PipelineError("cache config: field 'temperatures' needs --kind topk")
        if self.temperatures and self.backend == "vllm":
            raise PipelineError("cache config: field 'temperatures' needs the whole-vocabulary logits the "
                                "native and hf backends see (vllm returns the top-k at temperature 1 only)")
        taus = self.temperatures
        if any(not t > 0 for t in taus) or len(set(taus)) != len(taus) or self.temperature in taus:
            raise PipelineError(f"cache config: field 'temperatures' must hold distinct values > 0 other "
                                f"than 'temperature' ({self.temperature}), got {self.temperatures}")
        if self.values != "exact" and self.kind != "topk":
            raise PipelineError(f"cache config: field 'values' is {self.values!r}, but only --kind topk "
                                "has a lossy mode")
        if self.backend == "vllm" and (self.kind != "topk" or self.temperature != 1.0):
            raise PipelineError("cache config: the vllm backend caches kind=topk at temperature 1 only")
        if self.tensor_parallel > 1 and self.backend != "vllm":
            raise PipelineError("cache config: field 'tensor_parallel' > 1 needs --backend vllm")


@dataclass(frozen=True, kw_only=True)
class CacheResult:
    """What one `kdcache cache` run did, and the store's teacher losses once it is complete."""

    store: str
    shards: int
    shards_written: int
    """Shards this run computed (the rest were committed before)."""
    tokens_written: int
    """Trained positions this run wrote targets for (every position of text data)."""
    seconds: float
    """From the first shard dispatched to the last committed (Ray and teacher start-up excluded)."""
    tokens_per_s: float
    complete: bool
    valid_loss: float | None
    """L_T: the teacher's cross-entropy on the trained positions of the data's valid split (None:
    the data has no valid rows)."""
    valid_tokens: int | None
    teacher_loss: float | None
    """Mean NLL over the cached split's trained positions (None until the store is complete)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class ImportConfig:
    """Settings of one `kdcache import-teacher` run."""

    gguf: str
    """GGUF file of the teacher (llama.cpp format; Llama architecture)."""
    out: str
    """MODEL directory to create (must not exist)."""
    quiet: bool = False
    """No progress messages."""
    json: bool = False
    """Print the result as JSON."""


@dataclass(frozen=True, kw_only=True)
class ImportResult:
    out: Path
    architecture: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    tokenizer_vocab_size: int
    tied_embeddings: bool
    params: int
    nonembedding_params: int
    max_abs_diff: float
    fingerprint: str
    """sha256 of the weights: the teacher's identity in a logit store (hf/vllm backends)."""
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "out": str(self.out)}
