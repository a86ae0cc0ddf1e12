"""Distil a Hugging Face student from a kdcache store with `transformers.Trainer`.

    python examples/hf_trainer_distill.py --store STORE --student-config CONFIG.json --out OUT \
        [--grad-accum N]

`StoreDataset` yields whole batches (it shards over ranks and DataLoader workers
itself), so the Trainer gets a DataLoader with `batch_size=None`, and its loss is
`distill_loss` over the student's logits: the store's kind (top-k, full or sampled)
is read from the batch's keys, its temperature from `teacher_temperature`.

A store over chat data trains only the assistant's tokens (labels of -100 elsewhere) and
packs several conversations per row: batches then carry `position_ids`, and the student
gets them with the 4D mask `document_attention_mask` builds, which `sdpa` and `eager`
attention need to keep the conversations apart. Each micro-batch holds its own number of
trained tokens, so the loss is divided by `num_items_in_batch`, the trained tokens of the
whole optimiser step over every rank and accumulated micro-batch, which the Trainer counts
from `shift_labels` (kdcache's labels are already aligned with the logits).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

from kdcache.train import StoreDataset, distill_loss, document_attention_mask


def with_shift_labels(batch: Any) -> dict[str, torch.Tensor]:
    """The Trainer counts `num_items_in_batch` from `shift_labels` as given (from `labels` it
    would drop the first column, taking them for unshifted ones)."""
    return {**batch, "shift_labels": batch["labels"]}


class StoreTrainer(Trainer):
    def __init__(self, *args, store: StoreDataset, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.store = store

    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(self.store, batch_size=None, collate_fn=with_shift_labels)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positions = inputs.get("position_ids")
        mask = None if positions is None else document_attention_mask(positions, model.dtype)
        logits = model(input_ids=inputs["input_ids"], position_ids=positions, attention_mask=mask).logits
        loss = distill_loss(inputs, logits=logits, num_items_in_batch=num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # a global count; DDP averages over ranks
        return (loss, {"logits": logits}) if return_outputs else loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--student-config", required=True, help="a transformers config.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step")
    args = parser.parse_args()

    torch.manual_seed(0)
    values = json.loads(Path(args.student_config).read_text())
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values))
    store = StoreDataset(args.store, batch_size=args.batch_size, seed=0)
    training = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, learning_rate=1e-3, logging_steps=1,
        gradient_accumulation_steps=args.grad_accum, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = StoreTrainer(model=model, args=training, store=store)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trainer.save_model(args.out)
    print(json.dumps({"steps": trainer.state.global_step, "first_loss": losses[0], "last_loss": losses[-1]}))


if __name__ == "__main__":
    main()
