"""What documents cost a distillation step: -100 labels and document attention against neither.

Builds conversations-like documents (lengths drawn from `--min-doc`..`--max-doc` tokens, about
half of each one's targets trained), packs them whole into rows of `--seq-len` as `kdcache
prepare` does (`write_documents`), and gives them top-k teacher targets at every position.
Then times real trainer steps (forward, loss, backward, clip, AdamW) of one student on the
SAME rows, from memory (no reads), the modes taking turns step by step (so a machine whose
load drifts slows each alike), `--steps` of each after one warm-up round, the fastest of
each (on a shared machine other work only ever adds time, so the minimum is the step's own
cost; medians are reported too):

- `plain`: every target trained, no position ids: one causal context per row, as text;
- `documents`: labels -100 off the mask, position ids restarting per document, so the
  student builds the block-diagonal mask and attends within documents only;
- `attention_only`: position ids and the mask, but every target trained (what the
  attention mask alone costs);
- `labels_only`: -100 labels, no position ids (what dropping untrained positions saves).

Reports documents / plain (target <= 1.05) and the two parts, per student: the family
(its own SDPA, a boolean mask) and a `transformers` Llama of the same shape (`sdpa`, the
4D additive mask).

    python benchmarks/document_step.py [--students family hf] [--seq-len 512] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, models

from kdcache.storage.tokens.format import IGNORE_INDEX, Rows
from kdcache.storage.tokens.writer import write_documents
from kdcache.train.batches import Batch, rows_to_batch
from kdcache.train.config import ModelConfig
from kdcache.train.kd_losses import DistillLoss
from kdcache.train.model import build_model
from kdcache.train.runtime import tune_cpu_allocator
from kdcache.train.student import FamilyStudent, HFStudent, Student
from kdcache.train.trainer import LoopConfig, Trainer

MODES = ("plain", "documents", "attention_only", "labels_only")


def documents(args: argparse.Namespace, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Documents whose last `trained_frac` of tokens (the answer) are trained."""
    docs = []
    for _ in range(args.docs):
        n = int(rng.integers(args.min_doc, args.max_doc + 1))
        mask = np.zeros(n, dtype=bool)
        mask[n - max(1, round(n * args.trained_frac)):] = True
        docs.append((rng.integers(1, args.vocab, n), mask))
    return docs


def packed_rows(root: Path, args: argparse.Namespace) -> Rows:
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0")).to_str().encode()
    docs = documents(args, np.random.default_rng(0))
    data = write_documents(root / "data", tokenizer, args.seq_len, {"student": docs}, eos_token_id=0)
    n = min(data.rows("student"), args.batches * args.batch_size)
    return data.read_rows("student", slice(0, n))


def topk_targets(b: int, t: int, args: argparse.Namespace, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Valid top-k targets at every position (so `plain` can train on all of them)."""
    logits = torch.randn(b, t, args.vocab, generator=gen) * 3
    logprobs = torch.log_softmax(logits, -1)
    top, ids = logprobs.topk(args.k, -1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    return {"ids": ids, "logprobs": top.half(), "tail_logmass": tail}


def batches(rows: Rows, args: argparse.Namespace) -> dict[str, list[Batch]]:
    out: dict[str, list[Batch]] = {mode: [] for mode in MODES}
    gen = torch.Generator().manual_seed(1)
    for start in range(0, rows.tokens.shape[0] - args.batch_size + 1, args.batch_size):
        part = Rows(*(a[start : start + args.batch_size] for a in (rows.tokens, rows.loss_mask,
                                                                    rows.position_ids)))
        doc = rows_to_batch(part)
        extras = topk_targets(doc.inputs.shape[0], doc.inputs.shape[1], args, gen)
        everything = torch.from_numpy(part.tokens[:, 1:].copy())
        out["plain"].append(Batch(doc.inputs, everything, extras))
        out["documents"].append(Batch(doc.inputs, doc.targets, extras, doc.positions))
        out["attention_only"].append(Batch(doc.inputs, everything, extras, doc.positions))
        out["labels_only"].append(Batch(doc.inputs, doc.targets, extras))
    return out


class Turns:
    """Batches from memory (no reads in the timed steps): step i is mode i % len(MODES)."""

    def __init__(self, sets: dict[str, list[Batch]], device: torch.device) -> None:
        self.sets = {mode: [b.to(device) for b in items] for mode, items in sets.items()}
        self.at = 0

    def next_batch(self) -> Batch:
        round_, turn = divmod(self.at, len(MODES))
        items = self.sets[MODES[turn]]
        self.at += 1
        return items[round_ % len(items)]

    def state_dict(self) -> dict[str, Any]:
        return {"at": self.at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.at = int(state["at"])


def student(kind: str, args: argparse.Namespace) -> Student:
    cfg = ModelConfig(layers=args.layers, vocab_size=args.vocab, rho=args.rho, head_dim=args.head_dim,
                      max_position=args.seq_len + 1)
    if kind == "family":
        return FamilyStudent(build_model(cfg, seed=0), args.vocab)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=args.vocab, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.n_heads,
                     max_position_embeddings=args.seq_len + 1, use_cache=False)
    lm = LlamaForCausalLM(hf)
    assert lm.config._attn_implementation == "sdpa"  # transformers' default where torch has it
    return HFStudent(lm, args.vocab)


def step_times(kind: str, sets: dict[str, list[Batch]], args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds of each step, by mode, after one warm-up round of every mode."""
    device = torch.device(args.device)
    ends: list[float] = []

    def done(_: Any) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())

    steps = len(MODES) * (args.steps + 1)
    trainer = Trainer(student(kind, args).to(device), Turns(sets, device), DistillLoss(kind="topk"),
                      LoopConfig(steps=steps), progress=False, on_step=done)
    ends.append(time.perf_counter())
    trainer.run()
    took = np.diff(ends)
    return {mode: took[len(MODES) + i :: len(MODES)].tolist() for i, mode in enumerate(MODES)}


def measure(kind: str, sets: dict[str, list[Batch]], args: argparse.Namespace) -> dict[str, Any]:
    times = step_times(kind, sets, args)
    step = {mode: min(t) for mode, t in times.items()}
    median = {mode: statistics.median(t) for mode, t in times.items()}
    trained = sum(int((b.targets != IGNORE_INDEX).sum()) for b in sets["documents"])
    positions = sum(b.targets.numel() for b in sets["documents"])
    segments = [int((b.positions == 0).sum()) / b.positions.shape[0] for b in sets["documents"]
                if b.positions is not None]
    return {
        "student": kind,
        "trained_fraction": trained / positions,
        "segments_per_row": statistics.mean(segments),
        **{f"{mode}_step_s": s for mode, s in step.items()},
        "documents_over_plain": step["documents"] / step["plain"],
        "attention_only_over_plain": step["attention_only"] / step["plain"],
        "labels_only_over_plain": step["labels_only"] / step["plain"],
        "median_documents_over_plain": median["documents"] / median["plain"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--students", nargs="+", default=["family", "hf"], choices=["family", "hf"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rho", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--docs", type=int, default=400, help="documents to pack")
    p.add_argument("--min-doc", type=int, default=64)
    p.add_argument("--max-doc", type=int, default=384)
    p.add_argument("--trained-frac", type=float, default=0.5, help="of each document: its answer")
    p.add_argument("--batches", type=int, default=4, help="distinct batches the steps cycle through")
    p.add_argument("--steps", type=int, default=12, help="timed steps of each mode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tune_cpu_allocator()
    with tempfile.TemporaryDirectory() as tmp:
        rows = packed_rows(Path(tmp), args)
    sets = batches(rows, args)
    results = [measure(kind, sets, args) for kind in args.students]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"batch {args.batch_size} x {args.seq_len}, vocab {args.vocab}, k {args.k}, {args.layers} layers "
          f"d_model {args.layers * args.rho}, {args.threads} threads on {args.device}, "
          f"fastest of {args.steps}")
    print(f"{'student':>8} {'trained':>8} {'docs/row':>8} {'documents/plain':>15} {'attention':>9} "
          f"{'labels':>7}")
    for r in results:
        print(f"{r['student']:>8} {r['trained_fraction']:>8.2f} {r['segments_per_row']:>8.2f} "
              f"{r['documents_over_plain']:>15.3f} {r['attention_only_over_plain']:>9.3f} "
              f"{r['labels_only_over_plain']:>7.3f}")


if __name__ == "__main__":
    main()
