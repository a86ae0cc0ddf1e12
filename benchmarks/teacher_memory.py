"""Peak memory of a teacher replica at long rows over a Qwen2.5-sized output layer.

A tiny random Qwen2 (2 layers, d_model 64) with 151,936 output rows over 151,665 real
ids, run through the `hf` backend's `targets` (top-k 64) on rows of 1,024 to 4,096
tokens. Each measurement is a fresh process, so `ru_maxrss` is that run's own peak
resident memory; the model alone is measured the same way and subtracted. *chunked* is
kdcache's path (hidden states projected through the output layer 256 MB of logits at a
time); *whole* sets the budget so high that each micro-batch's logits are made at once,
which is what the backend did before.

    python benchmarks/teacher_memory.py [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

OUTPUT_ROWS, VOCAB, K, BATCH_ROWS = 151_936, 151_665, 64, 2

CHILD = """
import json, resource, sys, time
import numpy as np, torch
from kdcache.pipeline.cache.teachers import TargetSpec, load_teacher, torch_teacher
from kdcache.storage.tokens.format import Rows
model, mode, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(2)
if mode == "whole":
    torch_teacher.LOGITS_BUDGET = 1 << 62
teacher = load_teacher("hf", model, batch_rows=%(batch)d)
rows = np.random.default_rng(0).integers(0, %(vocab)d, size=(%(batch)d, seq_len + 1)).astype(np.int32)
spec = TargetSpec(kind="topk", k=%(k)d, temperature=1.0, vocab=%(vocab)d)
t0 = time.perf_counter()
if mode != "model":
    teacher.targets(Rows(rows.astype(np.int64)), spec, 0)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - t0}))
""" % {"batch": BATCH_ROWS, "vocab": VOCAB, "k": K}  # noqa: UP031 (the script's own braces)


def make_model(out: Path) -> Path:
    config = Qwen2Config(vocab_size=OUTPUT_ROWS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


def measure(model: Path, mode: str, seq_len: int) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), mode, str(seq_len)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seq-lens", default="1024,2048,4096")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "qwen2-151936")
        base = measure(model, "model", 0)["peak_mb"]
        rows = []
        for seq_len in map(int, args.seq_lens.split(",")):
            for mode in ("chunked", "whole") if seq_len <= 2048 else ("chunked",):
                got = measure(model, mode, seq_len)
                rows.append({"mode": mode, "seq_len": seq_len, "rows": BATCH_ROWS, "output_rows": OUTPUT_ROWS,
                             "peak_mb": round(got["peak_mb"]), "over_model_mb": round(got["peak_mb"] - base),
                             "model_mb": round(base),
                             "tokens_per_s": round(BATCH_ROWS * seq_len / got["seconds"])})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
