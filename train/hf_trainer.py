"""`DistillTrainer`: a `transformers.Trainer` that distils from a kdcache logit store.

    trainer = DistillTrainer(model=model, args=TrainingArguments(...), store="store.zarr",
                             processing_class=AutoTokenizer.from_pretrained(DATA))
    trainer.train()
    trainer.save_model(out)  # the model and, through `processing_class`, its tokenizer

The Trainer brings mixed precision, gradient accumulation and checkpointing, peft
adapters, distributed training, logging and saving; this class supplies the batches and
the loss. Tested here: one step equals a step of kdcache's own loop (with LoRA and gradient
checkpointing too), accumulation, and 2 DDP ranks training the 1-rank model. DeepSpeed
(ZeRO-1/2) and FSDP run the same wrapped forward but are not tested here.

Batches. A `StoreDataset` yields whole batches and takes its rank's rows of each global
batch itself, so the Trainer gets a `DataLoader(batch_size=None)` that is not passed
through accelerate's `prepare` (which would dispatch or re-shard an iterable dataset);
the Trainer moves each batch to its device. Built from a path, the store's global batch is
`args.per_device_train_batch_size` times the world size and its seed `args.seed`, so one
rank and many see the same rows per step. Each epoch starts at that epoch's first batch
(`set_epoch`), including the epoch a resumed run skips into.

Loss. The model runs its own forward, through whatever wraps it (DDP, FSDP and DeepSpeed
do their gradient bookkeeping there), asked for its hidden states and for the logits of no
position (`logits_to_keep` an empty index); calling the bare base model instead would skip
DDP's forward, and the ranks' gradients would not be averaged. `distill_loss` then projects the final hidden
states through the output layer's weight chunk by chunk, never forming [B, T, V] logits.
Rows that pack documents get their position ids and, under `sdpa` or `eager` attention,
the 4D mask that keeps documents apart (`attention.py`). Each loss is its batch's sum
divided by `num_items_in_batch`, the trained tokens of the whole optimiser step over every
accumulated micro-batch (and every rank with `average_tokens_across_devices`, where the
loss is then scaled by the world size that DDP's gradient average divides back out). The
Trainer counts them from `shift_labels`: kdcache's labels are already aligned with the
positions that predict them, and from `labels` it would drop each row's first one.

Refused: heads `distill_loss` cannot express (a bias, a logit scale, soft-capping, LoRA on
the output layer), a student with fewer rows than the store's vocabulary, DataParallel
over several GPUs of one process (run one process per GPU), and DeepSpeed ZeRO-3 (it
partitions the output layer's weight outside its module's forward, where the loss reads it).

Saving. `save_model` writes the model (a peft model writes its adapters) and the
`processing_class`. A store records its data's fingerprints, not its path, so the caller
passes the tokenizer: `AutoTokenizer.from_pretrained(DATA)` of the token data the store
was cached from (its tokenizer.json, and tokenizer_config.json for chat data). Beware a
`qwen2` student (among others) with another family's tokenizer: transformers 5's
`AutoTokenizer` loads its directory as `Qwen2Tokenizer`, whose pre-tokenizer replaces the
saved one, so the reloaded tokenizer can split text unlike the data did.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from kdcache.train.attention import document_attention_mask, needs_mask, packs_documents
from kdcache.train.dataset import StoreDataset
from kdcache.train.errors import TrainError
from kdcache.train.kd_losses import DistillLoss, distill_loss
from kdcache.train.student import _check_rows, _refuse_unsupported_head

_NOT_TAKEN = ("train_dataset", "data_collator", "compute_loss_func", "model_init")
"""Trainer arguments the store and the loss replace."""


def with_shift_labels(batch: Any) -> dict[str, Tensor]:
    """A store batch as the Trainer counts its trained tokens: `shift_labels` are taken as
    given (from `labels` the Trainer would drop each row's first column)."""
    return {**batch, "shift_labels": batch["labels"]}


def causal_lm(model: nn.Module) -> Any:
    """The causal LM a peft model wraps (`get_base_model()`), or `model` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


class DistillTrainer(Trainer):
    """`transformers.Trainer` over the logit store `store` (a path or a `StoreDataset`).

    `tail`, `divergence`, `lam` and `z_loss` are `distill_loss`'s, with its defaults (those
    of `kdcache train` from scratch; `kdcache train --student DIR` fine-tunes with `z_loss=0`);
    the temperature is the store's. Other arguments are the Trainer's,
    but for `train_dataset`, `data_collator`, `compute_loss_func` and `model_init`.
    """

    def __init__(
        self,
        model: nn.Module,
        args: TrainingArguments,
        *,
        store: str | os.PathLike[str] | StoreDataset,
        tail: str = "tail",
        divergence: str = "kl_forward",
        lam: float = 1.0,
        z_loss: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        given = [name for name in _NOT_TAKEN if kwargs.get(name) is not None]
        if given:
            raise TrainError(f"DistillTrainer: {given[0]}= is not taken (batches and loss come from store=)")
        if args.n_gpu > 1:
            raise TrainError(f"DistillTrainer: {args.n_gpu} GPUs in one process (DataParallel) are not "
                             "supported; launch one process per GPU (torchrun, accelerate launch)")
        if not isinstance(store, StoreDataset):
            store = StoreDataset(store, batch_size=args.per_device_train_batch_size * args.world_size,
                                 seed=args.seed, rank=args.process_index, world=args.world_size)
        _check_share(store, args)
        self.store = store
        # Checked once here, as a TrainError: the same checks distill_loss makes per batch.
        DistillLoss(kind=store.kind, divergence=divergence, tail=tail, lam=lam, tau=store.temperature,
                    z_loss=z_loss)
        self.loss_options = {"tail": tail, "divergence": divergence, "lam": lam, "z_loss": z_loss}
        _check_student(causal_lm(model), store)
        super().__init__(model=model, args=args, train_dataset=store, **kwargs)
        # Whatever the model's forward signature, the loss is normalised by num_items_in_batch,
        # so the Trainer must count it and must not divide again by the accumulation steps.
        self.model_accepts_loss_kwargs = True

    def get_train_dataloader(self) -> DataLoader:
        if self.args.dataloader_persistent_workers:
            raise TrainError("DistillTrainer: dataloader_persistent_workers would keep each worker's "
                             "position in the store across epochs; turn it off")
        workers = self.args.dataloader_num_workers
        # Forked workers of a process running zarr's or torch's threads can die (dataset.py).
        context = "forkserver" if workers else None
        return DataLoader(self.store, batch_size=None, collate_fn=with_shift_labels, num_workers=workers,
                          multiprocessing_context=context, pin_memory=self.args.dataloader_pin_memory,
                          prefetch_factor=self.args.dataloader_prefetch_factor if workers else None)

    def num_examples(self, dataloader: DataLoader) -> int:
        """Rows per epoch over every rank (the Trainer's default would count batches)."""
        return len(self.store) * self.store.order.batch_size

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # Each epoch has its own shuffle. The Trainer calls set_epoch on the loader only, and
        # a resumed run's skipping wrapper drops even that, so the store is moved here.
        self.store.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        lm = causal_lm(self.accelerator.unwrap_model(model))
        head = lm.get_output_embeddings().weight
        if head.numel() == 0:
            raise TrainError("DistillTrainer: the output layer's weight is partitioned (DeepSpeed ZeRO-3), "
                             "and the loss reads it outside the layer's forward; use ZeRO-1 or -2")
        positions = inputs.get("position_ids")
        mask = None
        if packs_documents(positions) and needs_mask(lm.config._attn_implementation):
            assert positions is not None
            mask = document_attention_mask(positions, head.dtype)
        no_logits = torch.zeros(0, dtype=torch.long, device=inputs["input_ids"].device)
        outputs = model(input_ids=inputs["input_ids"], position_ids=positions, attention_mask=mask,
                        use_cache=False, output_hidden_states=True, logits_to_keep=no_logits)
        if num_items_in_batch is not None:  # a step with no trained token gives 0, not nan
            num_items_in_batch = (num_items_in_batch.clamp_min(1) if isinstance(num_items_in_batch, Tensor)
                                  else max(num_items_in_batch, 1))
        try:
            loss = distill_loss(inputs, hidden=outputs.hidden_states[-1], lm_head=head,
                                num_items_in_batch=num_items_in_batch, **self.loss_options)
        except ValueError as exc:
            raise TrainError(f"DistillTrainer: {exc}") from exc
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # a global count; DDP averages over ranks
        return (loss, outputs) if return_outputs else loss


def _check_share(store: StoreDataset, args: TrainingArguments) -> None:
    """Refuse a given StoreDataset that would feed this rank other rows than the arguments say
    (one built before the process group started reads rank 0's rows on every rank)."""
    ours = (store.rank, store.world, store.local_batch)
    theirs = (args.process_index, args.world_size, args.per_device_train_batch_size)
    if ours != theirs:
        raise TrainError(f"DistillTrainer: store {store.path} yields rank {ours[0]} of {ours[1]}, "
                         f"{ours[2]} rows a batch, but this process is rank {theirs[0]} of {theirs[1]} "
                         f"with per_device_train_batch_size {theirs[2]}")


def _check_student(lm: Any, store: StoreDataset) -> None:
    """Refuse a model the chunked loss cannot train from this store, in one line."""
    where = f"DistillTrainer model ({type(lm).__name__})"
    _refuse_unsupported_head(lm, where)
    if hasattr(lm.get_output_embeddings(), "base_layer"):
        raise TrainError(f"{where}: the output layer carries a peft adapter, which the chunked loss "
                         "does not apply; leave lm_head out of the adapter's target modules")
    _check_rows(lm, store.vocab_size, where, f"store {store.path}")
    if "logits_to_keep" not in inspect.signature(lm.forward).parameters:
        raise TrainError(f"{where}: its forward takes no logits_to_keep, so it cannot skip the "
                         "[B, T, V] logits the chunked loss replaces")
