"""Distil a Hugging Face student from a kdcache store with `transformers.Trainer`.

    python examples/hf_trainer_distill.py --store STORE --data DATA --out OUT \
        (--student DIR | --student-config CONFIG.json) [--grad-accum N] [--lr LR] [--bf16]

`kdcache.train.DistillTrainer` is a `transformers.Trainer` that reads its batches from the
store and trains on `distill_loss` (chunked: never the [B, T, V] logits), so bf16, gradient
accumulation, peft, DeepSpeed and FSDP come from the Trainer and its arguments. The
student is a local model directory trained on from its weights (`--student`) or a
`transformers` config trained from scratch (`--student-config`). `--data` is the token data
the store was cached from (`kdcache prepare`'s DATA, checked against the store): its
tokenizer is saved beside the model, so OUT loads with `AutoModelForCausalLM` and
`AutoTokenizer` alike. Chat data keeps its chat template there too.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from kdcache.storage import read_meta
from kdcache.storage.tokens.format import open_token_data
from kdcache.train.hf_trainer import DistillTrainer
from kdcache.train.store_batches import check_store_matches


def load_student(args: argparse.Namespace) -> torch.nn.Module:
    if args.student:
        return AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32,
                                                    trust_remote_code=False)
    with open(args.student_config) as fh:
        values = json.load(fh)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values),
                                            trust_remote_code=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--data", help="the token data the store was cached from; its tokenizer is saved")
    student = parser.add_mutually_exclusive_group(required=True)
    student.add_argument("--student", help="a local Hugging Face causal-LM directory")
    student.add_argument("--student-config", help="a transformers config.json, trained from scratch")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch and device")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    args = parser.parse_args()

    tokenizer = None
    if args.data:
        check_store_matches(args.store, read_meta(args.store), open_token_data(args.data))
        tokenizer = AutoTokenizer.from_pretrained(args.data, trust_remote_code=False)
    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, learning_rate=args.lr, logging_steps=1,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        bf16=args.bf16, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = DistillTrainer(model=load_student(args), args=training, store=args.store,
                             processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.out)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(json.dumps({"steps": trainer.state.global_step, "first_loss": losses[0], "last_loss": losses[-1]}))


if __name__ == "__main__":
    main()
