"""Fine-tuning essentials: gradient accumulation, bf16, gradient checkpointing, the divergence stop,
the recipes by kind of student, budgets in epochs or steps, periodic evaluation and the metrics log.

Tolerances:
- Accumulated against whole-batch gradients differ only in float32 summation order: a sum of n
  terms carries a relative error of at most about n * eps (eps = 2^-24; n <= 256 positions of a
  micro-batch here), ~1.5e-5, so gradients are compared at rtol 3e-5 (with an absolute floor of
  3e-5 of the largest gradient entry, for entries that nearly cancel).
- bf16 keeps 8 significant bits: every operand a bf16 matmul reads is rounded with a relative
  error of at most 2^-9 (unit roundoff), and the errors of a few layers add. The loss is a mean
  over many positions, so its relative error stays near the per-operand one: bounded here by
  4 * 2^-8 ~ 1.6%. Gradients pass through more roundings (forward and backward matmuls): their
  relative error, as a whole (||g_bf16 - g_fp32|| / ||g_fp32||), is bounded by 16 * 2^-8 ~ 6%,
  and they must point the same way (cosine >= 0.99).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kdcache.pipeline.cli import main
from kdcache.storage.tokens.format import TokenData
from kdcache.train.batches import TokenBatches
from kdcache.train.config import ModelConfig
from kdcache.train.errors import TrainError
from kdcache.train.job import FINE_TUNE, SCRATCH, LoopSettings, TrainJobConfig
from kdcache.train.losses import NextTokenLoss
from kdcache.train.model import build_model
from kdcache.train.run import check_bf16
from kdcache.train.student import FamilyStudent, HFStudent, Student
from kdcache.train.trainer import LoopConfig, Trainer, decoder_layers, diverged

EPS32 = 2.0**-24
ACCUM_RTOL = 2 * 256 * EPS32 * 2  # ~3e-5: see the module docstring
BF16_UNIT = 2.0**-8


def _family(data: TokenData, layers: int = 2) -> FamilyStudent:
    model = build_model(ModelConfig(layers=layers, vocab_size=data.vocab_size, rho=32, head_dim=32), seed=3)
    return FamilyStudent(model, data.vocab_size)


def _one_step(data: TokenData, student: Student, *, accum: int = 1, precision: str = "fp32",
              batch: int = 8) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, gradients) of one step; no clipping, so the gradients are the loss's own."""
    settings = LoopSettings(lr=1e-3, warmup_frac=0.0, grad_clip=1e9, precision=precision)
    trainer = Trainer(student, TokenBatches(data, "student", batch_size=batch, seed=2), NextTokenLoss(1e-4),
                      LoopConfig(steps=1, settings=settings, grad_accum=accum), progress=False)
    result = trainer.run()
    grads = {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}
    return result.history[0], grads


def test_four_micro_batches_of_two_give_the_step_of_one_batch_of_eight(tiny_data: TokenData) -> None:
    whole_loss, whole = _one_step(tiny_data, _family(tiny_data))
    accum_loss, accum = _one_step(tiny_data, _family(tiny_data), accum=4)
    assert accum_loss == pytest.approx(whole_loss, rel=ACCUM_RTOL)
    assert whole.keys() == accum.keys() and whole
    for name, g in whole.items():
        torch.testing.assert_close(accum[name], g, rtol=ACCUM_RTOL, atol=ACCUM_RTOL * float(g.abs().max()),
                                   msg=name)


def test_accumulation_on_chat_data_weighs_every_trained_token_alike(chat_data: TokenData) -> None:
    """Micro-batches hold different counts of trained tokens; each divides by the step's count."""
    whole_loss, whole = _one_step(chat_data, _family(chat_data), batch=8)
    accum_loss, accum = _one_step(chat_data, _family(chat_data), accum=4, batch=8)
    assert accum_loss == pytest.approx(whole_loss, rel=ACCUM_RTOL)
    for name, g in whole.items():
        torch.testing.assert_close(accum[name], g, rtol=ACCUM_RTOL, atol=ACCUM_RTOL * float(g.abs().max()),
                                   msg=name)


def test_bf16_loss_and_gradients_stay_within_bf16_precision_of_fp32(tiny_data: TokenData) -> None:
    loss32, g32 = _one_step(tiny_data, _family(tiny_data))
    loss16, g16 = _one_step(tiny_data, _family(tiny_data), precision="bf16")
    assert loss16 != loss32  # bf16 really ran
    assert abs(loss16 - loss32) / loss32 <= 4 * BF16_UNIT
    a, b = torch.cat([g.flatten() for g in g32.values()]), torch.cat([g16[n].flatten() for n in g32])
    assert b.dtype == torch.float32  # float32 master weights get float32 gradients
    assert float((b - a).norm() / a.norm()) <= 16 * BF16_UNIT
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) >= 0.99


def _student(kind: str, data: TokenData) -> Student:
    if kind == "family":
        return _family(data)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=data.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, use_cache=False))
    return HFStudent(lm, data.vocab_size)


@pytest.mark.parametrize("kind", ["family", "hf"])
def test_gradient_checkpointing_reruns_each_block_and_gives_the_same_step(tiny_data: TokenData,
                                                                          kind: str) -> None:
    runs = {}
    for checkpointing in (False, True):
        student = _student(kind, tiny_data)
        if checkpointing:
            student.enable_gradient_checkpointing()
        calls: list[int] = []
        decoder_layers(student)[0].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        loss, grads = _one_step(tiny_data, student)
        runs[checkpointing] = loss, grads, len(calls)
    (loss, grads, forwards), (ckpt_loss, ckpt, ckpt_forwards) = runs[False], runs[True]
    assert (forwards, ckpt_forwards) == (1, 2)  # the block's forward reruns in backward
    assert ckpt_loss == loss  # the same forward
    for name, g in grads.items():
        torch.testing.assert_close(ckpt[name], g, rtol=ACCUM_RTOL, atol=0.0, msg=name)


def test_bf16_is_refused_on_a_gpu_without_bf16_arithmetic() -> None:
    with pytest.raises(TrainError, match=r"compute capability 7\.5.*--precision fp32"):
        check_bf16("cuda:0", capability=(7, 5))
    check_bf16("cuda:0", capability=(8, 0))  # Ampere and newer run it
    check_bf16("cpu")


def test_divergence_needs_both_a_doubling_and_a_nat() -> None:
    assert diverged(0.09, [0.09, 8.5])  # the muP learning rate on a pretrained student
    assert not diverged(0.09, [0.5])  # noise near zero: more than double, less than a nat
    assert not diverged(9.0, [10.5])  # noise at a scratch start: a nat, far from double
    assert diverged(9.0, [19.0, 20.0, 21.0])


def test_a_diverging_run_stops_with_one_line_naming_lr(tiny_data: TokenData) -> None:
    settings = LoopSettings(lr=30.0, warmup_frac=0.0, grad_clip=1e9)
    student = _family(tiny_data)
    trainer = Trainer(student, TokenBatches(tiny_data, "student", batch_size=8, seed=2), NextTokenLoss(1e-4),
                      LoopConfig(steps=20, settings=settings), progress=False)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    with pytest.raises(TrainError, match=r"diverged; lower --lr \(it is 30\)") as caught:
        trainer.run()
    assert "\n" not in str(caught.value)
    assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters())


def test_recipes_follow_the_kind_of_student() -> None:
    scratch = TrainJobConfig.from_flat(data="d", out="o", layers=2)
    tuned = TrainJobConfig.from_flat(data="d", out="o", student="s")
    assert scratch.recipe == SCRATCH and tuned.recipe == FINE_TUNE
    assert TrainJobConfig.from_flat(data="d", out="o", student="s", lr=1e-4).recipe.lr == 1e-4
    assert tuned.recipe.weight_decay == 0 and tuned.recipe.lr == 2e-5


@pytest.mark.parametrize(("flags", "message"), [
    (["--epochs", "1", "--tokens", "100"], "give one training budget, not --tokens and --epochs"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
    (["--batch-size", "6", "--grad-accum", "4"],
     "--batch-size 6 does not split into 1 ranks x --grad-accum 4"),
    (["--lora-rank", "8"], "--lora-rank adapts a pretrained --student DIR"),
])
def test_bad_fine_tuning_flags_are_one_line(tiny_data_path: Path, tmp_path: Path, capsys, flags: list[str],
                                            message: str) -> None:
    out = tmp_path / "m"
    argv = ["train", "--data", str(tiny_data_path), "--out", str(out), "--layers", "1", "--quiet", *flags]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.slow
def test_epochs_periodic_evaluation_and_the_metrics_log(tiny_data: TokenData, tmp_path: Path,
                                                              capsys) -> None:
    out = tmp_path / "m"
    rows = tiny_data.rows("student")
    argv = ["train", "--data", str(tiny_data.path), "--out", str(out), "--layers", "1", "--rho", "32",
            "--batch-size", "64", "--epochs", "2", "--eval-every", "4", "--eval-rows", "32",
            "--checkpoint-every", "4", "--threads", "1", "--log", "tensorboard"]
    steps = math.ceil(2 * (rows // 64))
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"length: {steps} steps from --epochs 2, 2.00 passes" in err and "rows repeat" in err
    assert "from-scratch defaults" in err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_lines = [r["step"] for r in records if "loss" in r]
    eval_lines = [r["step"] for r in records if "eval_loss" in r]
    assert step_lines == list(range(1, steps + 1))
    assert eval_lines == [*range(4, steps, 4), steps]
    assert all(r["tokens"] == 64 * tiny_data.seq_len and r["tokens_per_s"] > 0 and r["lr"] > 0
               for r in records if "loss" in r)
    training = json.loads((out / "kdcache.json").read_text())["training"]
    assert training["steps"] == steps and training["passes"] == pytest.approx(2.0)
    assert [e["step"] for e in training["evals"]] == eval_lines
    assert records[-1]["eval_loss"] == pytest.approx(training["loss"])

    # A tokenizer prepare trained has no config of its own: the model names its end of text.
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == tok.pad_token_id == tiny_data.eos_token_id is not None
    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == generation.pad_token_id == tiny_data.eos_token_id

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in records if "loss" in r], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == eval_lines


def test_a_resumed_run_logs_each_step_once(tmp_path: Path) -> None:
    from kdcache.train.metrics_log import METRICS, MetricsLog

    log = MetricsLog(tmp_path, start_step=0)
    for step in range(1, 7):
        log.write({"step": step, "loss": 1.0 / step}, "train")
    log.write({"step": 4, "eval_loss": 2.0}, "eval")
    with (tmp_path / METRICS).open("a") as fh:
        fh.write('{"step": 7, "lo')  # a line a kill cut short
    MetricsLog(tmp_path, start_step=4).write({"step": 5, "loss": 0.3}, "train")  # resumed after step 4
    records = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [(r["step"], "eval_loss" in r) for r in records] == [
        (1, False), (2, False), (3, False), (4, False), (4, True), (5, False)]
    assert records[-1]["loss"] == 0.3


class _Interrupt(Exception):
    pass


def test_an_accumulating_run_resumes_exactly(tiny_data: TokenData, tmp_path: Path) -> None:
    def trainer(ckpt: Path | None, on_step=None) -> Trainer:
        settings = LoopSettings(lr=3e-3, warmup_frac=0.25)
        return Trainer(_family(tiny_data, layers=1), TokenBatches(tiny_data, "student", batch_size=8, seed=5),
                       NextTokenLoss(1e-4), LoopConfig(steps=8, settings=settings, checkpoint_every=3,
                                                       grad_accum=4),
                       checkpoint_dir=ckpt, run_fingerprint="a", progress=False, on_step=on_step)

    reference = trainer(None)
    reference.run()

    def stop_at_5(info) -> None:
        if info.step == 5:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        trainer(tmp_path, stop_at_5).run()  # checkpoint after step 3
    resumed = trainer(tmp_path)
    assert len(resumed.run().history) == 5
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def _pretrained_llama(tmp_path: Path, vocab: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path / "pretrained"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.slow
def test_lora_fine_tunes_a_pretrained_student_merged_or_as_an_adapter(tiny_data: TokenData, tmp_path: Path,
                                                                      capsys) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base_dir = _pretrained_llama(tmp_path, tiny_data.vocab_size)
    base_files = {p.name: p.read_bytes() for p in base_dir.iterdir()}
    outs = {}
    for save in ("merged", "adapter"):
        outs[save] = tmp_path / save
        assert main(["train", "--data", str(tiny_data.path), "--student", str(base_dir), "--lora-rank", "4",
                     "--lora-save", save, "--max-steps", "3", "--lr", "1e-2", "--batch-size", "8",
                     "--eval-rows", "16", "--out", str(outs[save]), "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "fine-tuning defaults (pretrained --student), with --lr given" in err
    assert "LoRA rank 4: 4,096 trainable parameters" in err  # 2 layers x 7 projections
    assert {p.name: p.read_bytes() for p in base_dir.iterdir()} == base_files  # the base is untouched
    base = load_file(str(base_dir / "model.safetensors"))
    merged = load_file(str(outs["merged"] / "model.safetensors"))
    assert merged.keys() == base.keys()  # plain transformers names, no adapter left
    moved = {name for name in base if not torch.equal(base[name], merged[name])}
    assert moved and all(name.endswith("_proj.weight") for name in moved)
    ids = torch.as_tensor(tiny_data.read_rows("valid", slice(0, 2)).tokens[:, :-1].astype("int64"))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(outs["merged"]).eval()(ids).logits
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), outs["adapter"])
        got = adapter.eval()(ids).logits
    # Merging rounds W + s B A once in float32 and reorders the sums: 1e-5 of the logits' scale.
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    record = json.loads((outs["merged"] / "kdcache.json").read_text())
    assert record["nonembedding_params"] == json.loads((outs["adapter"] / "kdcache.json").read_text())[
        "training"]["params"]
    assert record["training"]["lora"]["trainable"] == 4096
