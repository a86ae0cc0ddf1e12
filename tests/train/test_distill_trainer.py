"""DistillTrainer: a `transformers.Trainer` step is kdcache's own step (loss, gradients, weights),
on text and on packed documents, with LoRA and gradient checkpointing; accumulated
micro-batches weigh every trained token alike; 2 DDP ranks train the 1-rank model; epochs
follow the store; bad students and arguments are refused in one line.

Run as a script (under torchrun), this file is the DDP test's worker."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback, TrainingArguments

from kdcache.storage import StoreWriter
from kdcache.train import DistillTrainer, StoreDataset
from kdcache.train.batches import batch_from_dict
from kdcache.train.errors import TrainError
from kdcache.train.hf_trainer import causal_lm
from kdcache.train.job import LoopSettings
from kdcache.train.kd_losses import DistillLoss
from kdcache.train.store_batches import StoreBatches
from kdcache.train.student import HFStudent
from kdcache.train.trainer import LoopConfig, Trainer
from tests.storage.conftest import make_meta, make_rows, shard_of

ROWS, SEQ_LEN, VOCAB, BATCH, SEED = 48, 16, 300, 8, 3
LR, CLIP, Z_LOSS = 1e-3, 1.0, 1e-4
STUDENTS: dict[str, dict[str, Any]] = {
    # An untied Llama whose output layer pads the store's 300 ids to 320 rows.
    "llama": {"model_type": "llama", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": False, "max_position_embeddings": 64},
    "qwen2": {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "tie_word_embeddings": True, "max_position_embeddings": 64},
}


def _store(path: Path, *, documents: bool, rows: int = ROWS) -> Path:
    meta = make_meta("topk", rows=rows, seq_len=SEQ_LEN, vocab=VOCAB, k=8, shard_rows=16, chunk_rows=8,
                     temperature=2.0, documents=documents)
    values = make_rows(meta, seed=1)
    writer = StoreWriter.open(path, meta)
    for shard in range(meta.num_shards):
        writer.write_shard(shard, shard_of(meta, values, shard))
    writer.finalize()
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill-trainer")
    return {"text": _store(root / "text", documents=False), "chat": _store(root / "chat", documents=True)}


def _student(name: str, *, lora: bool = False) -> Any:
    values = dict(STUDENTS[name])
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values),
                                          dtype=torch.float32)
    if lora:  # random A and B, so both get a gradient at the first step
        lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    return lm


def _args(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    """kdcache's optimiser as the Trainer's: AdamW, betas (0.9, 0.95), eps 1e-8, a constant lr."""
    values: dict[str, Any] = {
        "output_dir": str(tmp_path / "hf"), "max_steps": 1, "per_device_train_batch_size": BATCH,
        "learning_rate": LR, "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
        "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_epsilon": 1e-8, "optim": "adamw_torch",
        "max_grad_norm": CLIP, "seed": SEED, "save_strategy": "no", "report_to": [], "use_cpu": True,
        "disable_tqdm": True, "logging_steps": 1,
    }
    return TrainingArguments(**{**values, **overrides})


class _Grads(TrainerCallback):
    """The gradients the optimiser is about to apply (after clipping), by parameter name."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.grads = _grads(causal_lm(kwargs["model"]))


def _grads(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.grad is not None}


def _kdcache_step(lm: Any, store: Path) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One step of kdcache's loop: (its loss, the gradients it applied, the weights after)."""
    meta = StoreDataset(store, batch_size=BATCH).meta
    settings = LoopSettings(batch_size=BATCH, lr=LR, warmup_frac=0.0, final_lr_frac=1.0, weight_decay=0.0,
                            grad_clip=CLIP, z_loss=Z_LOSS, seed=SEED)
    loss = DistillLoss(kind=meta.kind, tau=meta.temperature, z_loss=Z_LOSS)
    source = StoreBatches(str(store), batch_size=BATCH, seed=SEED, prefetch=0)
    loop = LoopConfig(steps=1, settings=settings)
    trainer = Trainer(HFStudent(lm, VOCAB), source, loss, loop, progress=False)
    applied: dict[str, torch.Tensor] = {}
    trainer.optimizer.register_step_pre_hook(lambda *_: applied.update(_grads(lm)))
    result = trainer.run()
    return result.history[0], applied, {n: p.detach().clone() for n, p in lm.named_parameters()}


CASES = {
    "text": ("llama", "text", False, {}),
    "chat": ("qwen2", "chat", False, {}),  # position ids and the document mask, a tied head
    "lora+checkpointing": ("llama", "chat", True, {"gradient_checkpointing": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_a_step_is_kdcaches_own_step(stores: dict[str, Path], tmp_path: Path, case: str) -> None:
    name, store, lora, overrides = CASES[case]
    model = _student(name, lora=lora)
    reference = copy.deepcopy(model)
    before = {n: w.detach().clone() for n, w in causal_lm(model).named_parameters()}
    kd_loss, kd_grads, kd_weights = _kdcache_step(causal_lm(reference), stores[store])

    grads = _Grads()
    trainer = DistillTrainer(model=model, args=_args(tmp_path, **overrides), store=stores[store],
                             z_loss=Z_LOSS, callbacks=[grads])
    hf_loss = trainer.train().training_loss

    # The same float32 operations on the same batch: they agree to float32 rounding of the
    # sums (~1e-7 relative); a wrong token count, mask or temperature is off by percents.
    assert hf_loss == pytest.approx(kd_loss, rel=1e-6)
    lm = causal_lm(model)
    assert grads.grads.keys() == kd_grads.keys() and grads.grads
    for n, g in grads.grads.items():
        scale = kd_grads[n].abs().max().item()
        torch.testing.assert_close(g, kd_grads[n], rtol=1e-5, atol=1e-6 * scale, msg=n)
    # One Adam step moves a weight by lr * g / (|g| + eps), about lr = 1e-3 wherever |g| >> eps;
    # a wrong gradient's sign or a skipped parameter is off by that much. Gradients that agree
    # to 1e-6 of their scale move the weights alike to far below 1e-3 of a step (1e-6).
    for n, w in lm.named_parameters():
        torch.testing.assert_close(w.detach(), kd_weights[n], rtol=0.0, atol=1e-6, msg=n)
    moved = {n for n, w in lm.named_parameters() if not torch.equal(w.detach(), before[n])}
    assert moved == set(kd_grads)


def test_accumulated_micro_batches_weigh_every_trained_token_alike(stores: dict[str, Path], tmp_path: Path
                                                                    ) -> None:
    """Two micro-batches of packed documents hold different numbers of trained tokens; the step's
    gradient is that of their summed losses over the step's trained tokens, not a mean of means."""
    micro = BATCH // 2
    model = _student("qwen2")
    student = HFStudent(copy.deepcopy(model), VOCAB)
    store = StoreDataset(stores["chat"], batch_size=micro, seed=SEED)
    loss = DistillLoss(kind="topk", tau=store.temperature, z_loss=Z_LOSS)
    batches = [batch_from_dict(b) for _, b in zip(range(2), store, strict=False)]
    sums = [loss.from_hidden(student(b.inputs, b.positions), student.head(), b, vocab=VOCAB) for b in batches]
    assert sums[0].tokens != sums[1].tokens  # else a mean of means would agree
    expected = (sums[0].total + sums[1].total) / (sums[0].tokens + sums[1].tokens)
    expected.backward()

    grads = _Grads()
    trainer = DistillTrainer(model=model, args=_args(tmp_path, per_device_train_batch_size=micro,
                                                     gradient_accumulation_steps=2, max_grad_norm=0.0),
                             store=stores["chat"], z_loss=Z_LOSS, callbacks=[grads])
    assert trainer.train().training_loss == pytest.approx(expected.item(), rel=1e-6)
    want = _grads(student.lm)
    assert grads.grads.keys() == want.keys()
    for n, g in grads.grads.items():  # float32 sums in another order: ~1e-7 of the scale
        torch.testing.assert_close(g, want[n], rtol=1e-5, atol=1e-6 * want[n].abs().max().item(), msg=n)


class _Recording(DistillTrainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[torch.Tensor] = []

    def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        self.seen.append(inputs["input_ids"].cpu())
        return super().compute_loss(model, inputs, *args, **kwargs)


def test_each_epoch_reads_its_own_shuffle_also_after_a_resume(tmp_path: Path) -> None:
    """A resumed run starts a fresh store at epoch 0 and the Trainer skips batches into the
    checkpoint's epoch: the store must be moved to that epoch, or it replays epoch 0's."""
    path = _store(tmp_path / "small", documents=False, rows=24)
    epochs = StoreDataset(path, batch_size=BATCH, seed=SEED)
    want = [b["input_ids"] for _ in range(2) for b in epochs]  # 3 batches an epoch
    assert len(want) == 6 and not torch.equal(want[0], want[3])
    args = _args(tmp_path, max_steps=6, save_strategy="steps", save_steps=4)
    first = _Recording(model=_student("llama"), args=args, store=path)
    first.train()
    resumed = _Recording(model=_student("llama"), args=args, store=path)
    resumed.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-4"))
    assert len(first.seen) == 6 and len(resumed.seen) == 2
    assert all(torch.equal(a, b) for a, b in zip(first.seen + resumed.seen, want + want[4:], strict=True))


def _gemma2_softcapped() -> Any:
    config = AutoConfig.for_model("gemma2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=16, final_logit_softcapping=30.0)
    return AutoModelForCausalLM.from_config(config)


def _lora_on_the_head() -> Any:
    return get_peft_model(_student("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))


def _too_small() -> Any:
    values = {**STUDENTS["qwen2"], "vocab_size": 256}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values))


REFUSED: dict[str, tuple[Callable[[], Any], dict[str, Any], str]] = {
    "softcapping": (_gemma2_softcapped, {}, "field 'final_logit_softcapping' is set"),
    "lora head": (_lora_on_the_head, {}, "output layer carries a peft adapter"),
    "small vocab": (_too_small, {}, "field 'vocab_size' is 256, smaller than the tokenizer's 300 ids"),
    "divergence": (lambda: _student("qwen2"), {"divergence": "kl_sideways"}, "unknown divergence"),
    "dataset": (lambda: _student("qwen2"), {"train_dataset": [1]}, "train_dataset= is not taken"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refuses_what_the_chunked_loss_cannot_train(stores: dict[str, Path], tmp_path: Path, case: str
                                                    ) -> None:
    make, kwargs, message = REFUSED[case]
    with pytest.raises(TrainError, match=message):
        DistillTrainer(model=make(), args=_args(tmp_path), store=stores["text"], **kwargs)


def test_refuses_a_store_dataset_of_another_share(stores: dict[str, Path], tmp_path: Path) -> None:
    store = StoreDataset(stores["text"], batch_size=2 * BATCH, seed=SEED)
    with pytest.raises(TrainError, match=f"rank 0 of 1, {2 * BATCH} rows a batch, but this process is rank 0 "
                                         f"of 1 with per_device_train_batch_size {BATCH}"):
        DistillTrainer(model=_student("qwen2"), args=_args(tmp_path), store=store)
    given = StoreDataset(stores["text"], batch_size=BATCH, seed=SEED)
    assert DistillTrainer(model=_student("qwen2"), args=_args(tmp_path), store=given).store is given


def test_refuses_persistent_loader_workers(stores: dict[str, Path], tmp_path: Path) -> None:
    args = _args(tmp_path, dataloader_num_workers=1, dataloader_persistent_workers=True)
    trainer = DistillTrainer(model=_student("qwen2"), args=args, store=stores["text"])
    with pytest.raises(TrainError, match="dataloader_persistent_workers"):
        trainer.get_train_dataloader()


DDP_STEPS = 2


def _train_ranks(store: Path, out: Path) -> dict[str, float]:
    """DDP_STEPS steps of the chat student on this process's rank; rank 0 saves the weights."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = DistillTrainer(model=_student("qwen2"), store=store, z_loss=Z_LOSS,
                             args=_args(out, max_steps=DDP_STEPS, per_device_train_batch_size=BATCH // world))
    trainer.train()
    if trainer.args.process_index == 0:
        save_file({n: w.detach().contiguous() for n, w in trainer.model.named_parameters()},
                  str(out / f"weights-{world}.safetensors"))
    logged = [e for e in trainer.state.log_history if "loss" in e]
    return {"loss": sum(e["loss"] for e in logged), "grad_norm": sum(e["grad_norm"] for e in logged)}


@pytest.mark.slow
def test_two_ddp_ranks_train_the_one_rank_model(stores: dict[str, Path], tmp_path: Path) -> None:
    """Each rank reads half of every global batch and the loss divides by the step's trained
    tokens over both ranks, so 2 gloo ranks differ from 1 only in float32 reduction order:
    relative errors ~1e-7 in the sums, a few 1e-6 at most over 512 positions. The losses and
    gradient norms agree to 1e-5 (a rank normalising by its own tokens, or DDP's average not
    scaled back, is off by percents or by 2x); each weight, moved 2 lr = 2e-3 by Adam, to 1e-6."""
    one = _train_ranks(stores["chat"], tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(port), __file__, str(stores["chat"]), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(done.stdout.strip().splitlines()[-1])
    assert two == pytest.approx(one, rel=1e-5)
    want, got = (load_file(str(tmp_path / f"weights-{n}.safetensors")) for n in (1, 2))
    assert want.keys() == got.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0.0, atol=1e-6, msg=n)


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = _train_ranks(Path(sys.argv[1]), Path(sys.argv[2]))
    if int(os.environ["RANK"]) == 0:
        print(json.dumps(result))
