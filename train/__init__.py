"""kdcache.train: students, the store-streaming dataset, losses, trainer, evaluation and MODEL directories.

The public training API (a contract: other people's training loops rely on it):

    from kdcache.train import StoreDataset, distill_loss, document_attention_mask
    ds = StoreDataset("store.zarr", batch_size=8, seed=0)  # rank/world from torch.distributed
    for batch in ds:                                       # one epoch of this rank's rows
        loss = distill_loss(batch, logits=model(input_ids=batch["input_ids"]).logits)
        # or distill_loss(batch, hidden=h, lm_head=W): chunked, never [B, T, V]

Or let `transformers.Trainer` run the loop (bf16, accumulation, peft, DeepSpeed, FSDP):

    from kdcache.train import DistillTrainer
    trainer = DistillTrainer(model=hf_model, args=TrainingArguments(...), store="store.zarr",
                             processing_class=AutoTokenizer.from_pretrained(DATA))
    trainer.train(); trainer.save_model(out)  # the model and its tokenizer

Labels are -100 where a position is not trained, and every loss leaves those out. Rows that
pack documents (chat data) also carry `position_ids`; give a `transformers` model those
and `document_attention_mask(batch["position_ids"], dtype)` under `sdpa` or `eager`
attention (flash attention takes the position ids alone), so no document sees another.

These names load on first use (PEP 562), so `import kdcache.train` stays free of torch
and the CLI starts fast. The rest is in submodules:

- `tokens.open_token_data(DATA) -> TokenData`: the splits `kdcache prepare` wrote.
- `student`: the family (`model.build_model`) or any Hugging Face causal LM, behind `Student`.
- `model_dir.save_model_dir` / `model_dir.load_model_dir(MODEL) -> LoadedModel`.
- `trainer.Trainer(student, source, loss_fn, LoopConfig, world=)`; `run.run_training(
  job.TrainJobConfig)` is `kdcache train`, on one rank, under torchrun, or over Ray Train
  (`distributed.py`, `ray_launch.py`).
- Distillation: `dataset.StoreDataset` / `store_batches.StoreBatches` (a logit store),
  `online.OnlineTeacherBatches` (a live teacher) and `kd_losses.DistillLoss`; all sources
  follow `row_order.RowOrder`, whose batches do not depend on the world size.
- `evaluate.evaluate(model, data)`: validation cross-entropy and ECE (21 bins).
- `hf_trainer.DistillTrainer`: the Trainer above; the store's global batch is
  `per_device_train_batch_size` times the world size, its seed `args.seed`.
- `attention`: segment ids and block-diagonal causal masks from position ids, which keep
  the documents of packed rows apart in every student (and in a cache's teacher).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DistillTrainer", "StoreDataset", "distill_loss", "document_attention_mask"]


def __getattr__(name: str) -> Any:
    if name == "DistillTrainer":
        from kdcache.train.hf_trainer import DistillTrainer

        return DistillTrainer
    if name == "StoreDataset":
        from kdcache.train.dataset import StoreDataset

        return StoreDataset
    if name == "distill_loss":
        from kdcache.train.kd_losses import distill_loss

        return distill_loss
    if name == "document_attention_mask":
        from kdcache.train.attention import document_attention_mask

        return document_attention_mask
    raise AttributeError(f"module 'kdcache.train' has no attribute {name!r}")
