"""Cache job throughput against a bare teacher forward + top-k loop, in one run.

For a small and a medium kdcache model (trained weights do not change the cost, so the
models are freshly initialised): tokens/s of `kdcache cache` (Ray actor, targets, store
writes and ledger commits; measured from the first shard dispatched to the last
committed, so Ray and model start-up are excluded and reported separately) divided by
tokens/s of a plain loop of forward + log-softmax + top-k over the same rows with the
same batch size, threads and allocator settings. Backends: native, plus vllm when it
is installed.

    python benchmarks/cache_throughput.py [--json] [--rows 256] [--k 64]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.pipeline.cache import CacheConfig, run_cache
from kdcache.pipeline.prepare import PrepareConfig, prepare
from kdcache.train.config import ModelConfig
from kdcache.train.model import build_model
from kdcache.train.model_dir import load_model_dir, save_model_dir
from kdcache.train.runtime import tune_cpu_allocator
from kdcache.train.tokens import open_token_data

MODELS = {"small": dict(layers=2, rho=64, head_dim=32), "medium": dict(layers=4, rho=64, head_dim=32)}
BATCH_ROWS = 8


def bare_loop(model_dir: Path, rows: np.ndarray, k: int) -> float:
    """tokens/s of forward + log-softmax + top-k, nothing else."""
    model = load_model_dir(model_dir).model
    tokens = 0
    with torch.inference_mode():
        model(torch.from_numpy(rows[:BATCH_ROWS, :-1].astype(np.int64)))  # warm-up
        t0 = time.perf_counter()
        for lo in range(0, len(rows), BATCH_ROWS):
            ids = torch.from_numpy(rows[lo : lo + BATCH_ROWS, :-1].astype(np.int64))
            torch.topk(torch.log_softmax(model(ids), -1), k, dim=-1)
            tokens += ids.numel()
    return tokens / (time.perf_counter() - t0)


def bare_vllm(model_dir: Path, rows: np.ndarray, k: int) -> float:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kdcache.pipeline.teachers.vllm import engine_kwargs

    llm = LLM(model=str(model_dir), **engine_kwargs(k))
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


def backends() -> list[str]:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return ["native"]
    return ["native", "vllm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rows", type=int, default=256, help="student rows to cache")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64)
    args = parser.parse_args()
    tune_cpu_allocator()  # the cache worker runs with it; the bare loop must too
    torch.set_num_threads(os.cpu_count() or 1)  # as many threads as the one cache actor gets
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    prepare(PrepareConfig(out=str(tmp / "data"), source="stdlib", vocab_size=args.vocab,
                          seq_len=args.seq_len, max_tokens=args.rows * (args.seq_len + 1) * 3,
                          quiet=True))
    data = open_token_data(tmp / "data")
    rows = min(args.rows, data.rows("student"))
    student = np.asarray(data.read("student", slice(0, rows)))
    results = []
    for name, shape in MODELS.items():
        model_dir = tmp / name
        model = build_model(ModelConfig(vocab_size=data.vocab_size, **shape), seed=0)
        save_model_dir(model, model_dir, tokenizer=data.tokenizer_path)
        params = model.non_embedding_params()
        for backend in backends():
            bare = (bare_loop if backend == "native" else bare_vllm)(model_dir, student, args.k)
            t0 = time.perf_counter()
            out = run_cache(CacheConfig(teacher=str(model_dir), data=str(tmp / "data"),
                                        out=str(tmp / f"{name}-{backend}.zarr"), backend=backend,
                                        k=args.k, max_rows=rows, shard_rows=32,
                                        batch_rows=BATCH_ROWS, quiet=True))
            results.append({
                "backend": backend, "model": name, "params": params, "k": args.k,
                "cache_tokens_per_s": out["tokens_per_s"], "bare_tokens_per_s": bare,
                "ratio": out["tokens_per_s"] / bare,
                "startup_s": time.perf_counter() - t0 - out["seconds"],
            })
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| backend | model | non-emb params | k | cache tok/s | bare tok/s | ratio | start-up s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['backend']} | {r['model']} | {r['params']:,} | {r['k']} "
              f"| {r['cache_tokens_per_s']:,.0f} | {r['bare_tokens_per_s']:,.0f} "
              f"| {r['ratio']:.2f} | {r['startup_s']:.1f} |")


if __name__ == "__main__":
    main()
