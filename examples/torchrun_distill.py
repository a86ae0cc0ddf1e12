"""Distil a Hugging Face student from a kdcache store with a plain loop, on any number of ranks.

    torchrun --nproc-per-node 2 examples/torchrun_distill.py --store STORE --student-config CONFIG.json

Each rank reads its slice of every global batch from the store (`StoreDataset` takes
rank and world from torch.distributed), so the run does not depend on the world size.
The loss goes through the hidden-state path: `distill_loss(batch, hidden=, lm_head=)`
projects to logits chunk by chunk and never holds [B, T, V]. Under DDP the hidden
states and the head must be used inside the wrapped module's forward (DDP syncs the
gradients of what its forward touched), so the loss is computed in `DistillStep.forward`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from kdcache.train import StoreDataset, distill_loss, document_attention_mask


class DistillStep(nn.Module):
    """The student and its loss in one forward, for DDP to wrap."""

    def __init__(self, lm: nn.Module, vocab: int) -> None:
        super().__init__()
        self.lm, self.vocab = lm, vocab  # the tokenizer's ids; a padded output layer has more rows

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Rows that pack documents (chat data) carry position ids; the 4D mask keeps each
        # document to itself under sdpa and eager attention (flash attention needs only the ids).
        positions = batch.get("position_ids")
        mask = None if positions is None else document_attention_mask(positions, self.lm.dtype)
        hidden = self.lm.base_model(input_ids=batch["input_ids"], position_ids=positions,
                                    attention_mask=mask).last_hidden_state
        return distill_loss(batch, hidden=hidden, lm_head=self.lm.get_output_embeddings().weight,
                            vocab=self.vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--student-config", required=True, help="a transformers config.json")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch, sequences")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")  # "nccl" on GPUs
    losses = train(args, distributed)
    if not distributed or dist.get_rank() == 0:
        print(json.dumps({"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
                          "world": dist.get_world_size() if distributed else 1}))
    if distributed:
        # The DDP model is gone by now (it lived in `train`): a reducer freed after the group
        # is destroyed can block the process's exit.
        gc.collect()
        dist.destroy_process_group()


def train(args: argparse.Namespace, distributed: bool) -> list[float]:
    torch.manual_seed(0)  # every rank starts from the same weights (DDP also broadcasts rank 0's)
    values = json.loads(Path(args.student_config).read_text())
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    lm = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    ds = StoreDataset(args.store, batch_size=args.batch_size, seed=0)
    step = DistillStep(lm, ds.vocab_size)
    model = nn.parallel.DistributedDataParallel(step) if distributed else step
    optimizer = torch.optim.AdamW(lm.parameters(), lr=args.lr)

    losses: list[float] = []
    epoch = 0
    while len(losses) < args.steps:
        ds.set_epoch(epoch)
        for batch in ds:
            loss = model(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            mean = loss.detach().clone()
            if distributed:
                dist.all_reduce(mean)
                mean /= dist.get_world_size()
            losses.append(mean.item())
            if len(losses) == args.steps:
                break
        epoch += 1
    return losses


if __name__ == "__main__":
    main()
