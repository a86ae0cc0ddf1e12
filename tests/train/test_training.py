"""Trainer, schedule, muP groups, evaluation, resume, and a real tiny training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.storage.tokens.format import TokenData
from kdcache.train.batches import Batch, TokenBatches
from kdcache.train.config import ModelConfig
from kdcache.train.errors import TrainError
from kdcache.train.evaluate import evaluate, expected_calibration_error
from kdcache.train.job import LoopSettings, TrainJobConfig
from kdcache.train.losses import NextTokenLoss, cross_entropy_sum
from kdcache.train.model import build_model
from kdcache.train.optim import build_optimizer, lr_factor
from kdcache.train.trainer import LoopConfig, Trainer


class Interrupt(Exception):
    pass


def _trainer(data: TokenData, ckpt: Path | None, steps: int = 8, on_step=None) -> Trainer:
    model = build_model(ModelConfig(layers=1, vocab_size=data.vocab_size, rho=32, head_dim=32), seed=1)
    return Trainer(
        model,
        TokenBatches(data, "student", batch_size=4, seed=5),
        NextTokenLoss(1e-4),
        LoopConfig(steps=steps, settings=LoopSettings(lr=3e-3, warmup_frac=2 / steps), checkpoint_every=3),
        checkpoint_dir=ckpt,
        run_fingerprint="run-a",
        progress=False,
        on_step=on_step,
    )


def test_resume_gives_identical_weights(tiny_data: TokenData, tmp_path: Path) -> None:
    reference = _trainer(tiny_data, None)
    reference.run()

    def stop_at_5(info) -> None:
        if info.step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        _trainer(tiny_data, tmp_path, on_step=stop_at_5).run()  # checkpoint at step 3
    resumed = _trainer(tiny_data, tmp_path)
    result = resumed.run()
    assert result.steps == 8 and len(result.history) == 5  # steps 4..8 ran again
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_resume_refuses_other_run(tiny_data: TokenData, tmp_path: Path) -> None:
    with pytest.raises(Interrupt):
        _trainer(tiny_data, tmp_path, on_step=lambda i: (_ for _ in ()).throw(Interrupt) if i.step == 4
                 else None).run()
    other = _trainer(tiny_data, tmp_path)
    other.run_fingerprint = "run-b"
    with pytest.raises(TrainError, match="different settings"):
        other.run()


def test_token_batches_state_roundtrip(tiny_data: TokenData) -> None:
    a = TokenBatches(tiny_data, "student", batch_size=64, seed=0)
    for _ in range(30):  # crosses an epoch boundary
        a.next_batch()
    b = TokenBatches(tiny_data, "student", batch_size=64, seed=0)
    b.load_state_dict(a.state_dict())
    assert a.epoch >= 1 and a.state_dict() == {"epoch": a.epoch, "batch": a.batch}
    assert torch.equal(a.next_batch().inputs, b.next_batch().inputs)
    batch = b.next_batch()
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])


def test_schedule() -> None:
    assert lr_factor(0, total=100, warmup=10, final=0.1) == pytest.approx(0.1)
    assert lr_factor(9, total=100, warmup=10, final=0.1) == pytest.approx(1.0)
    assert lr_factor(55, total=100, warmup=10, final=0.1) == pytest.approx(0.55)
    assert lr_factor(100, total=100, warmup=10, final=0.1) == pytest.approx(0.1)


def test_mup_learning_rates_scale_with_width() -> None:
    def lrs(layers: int) -> dict[str, float]:
        model = build_model(ModelConfig(layers=layers, vocab_size=64, rho=64, head_dim=32))
        opt = build_optimizer(model, lr=1e-2, weight_decay=1e-4)
        return {g["name"]: g["lr"] for g in opt.param_groups}

    small, big = lrs(2), lrs(8)  # d_model 128 (the base width) and 512
    assert small == {"embedding": 1e-2, "hidden": 1e-2, "lm_head": 1e-2, "norms": 1e-2}
    assert big["hidden"] == pytest.approx(1e-2 / 4) and big["lm_head"] == pytest.approx(1e-2 / 4)
    assert big["embedding"] == big["norms"] == 1e-2


def test_ece_matches_numpy_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(500, 7, generator=gen) * 2, dim=-1)
    targets = torch.randint(0, 7, (500,), generator=gen)
    conf = logprobs.exp().max(-1).values.double().numpy()
    hit = (logprobs.argmax(-1) == targets).double().numpy()
    bins = np.minimum((conf * 21).astype(int), 20)
    want = sum(abs(hit[bins == b].sum() - conf[bins == b].sum()) for b in range(21)) / len(conf)
    assert expected_calibration_error(logprobs, targets) == pytest.approx(want, rel=1e-12)


def test_evaluate_matches_cross_entropy(tiny_data: TokenData) -> None:
    model = build_model(ModelConfig(layers=1, vocab_size=tiny_data.vocab_size, rho=32, head_dim=32))
    result = evaluate(model, tiny_data, batch_size=5, max_rows=12)
    rows = torch.from_numpy(tiny_data.read("valid", slice(0, 12)))
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten())
    assert result.loss == pytest.approx(want.item(), rel=1e-5)
    assert result.tokens == 12 * tiny_data.seq_len


def _unigram_entropy(data: TokenData, split: str) -> float:
    counts = np.bincount(data.read(split, slice(None))[:, 1:].ravel(), minlength=data.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.slow
def test_training_beats_unigram_entropy(tiny_data: TokenData) -> None:
    model = build_model(ModelConfig(layers=2, vocab_size=tiny_data.vocab_size, rho=32, head_dim=32))
    before = evaluate(model, tiny_data).loss
    Trainer(
        model,
        TokenBatches(tiny_data, "student", batch_size=8, seed=0),
        NextTokenLoss(1e-4),
        LoopConfig(steps=150, settings=LoopSettings(lr=3e-3, warmup_frac=8 / 150)),
        progress=False,
    ).run()
    after = evaluate(model, tiny_data)
    # The valid split's own unigram entropy: the best any context-free model could do on it.
    unigram = _unigram_entropy(tiny_data, "valid")
    assert after.loss < unigram < before
    assert 0 <= after.ece < 0.1


def test_job_config_errors() -> None:
    with pytest.raises(TrainError, match="--split"):
        TrainJobConfig.from_flat(data="d", out="o", layers=2, split="valid")
    with pytest.raises(TrainError, match="--layers"):
        TrainJobConfig.from_flat(data="d", out="o", layers=0)
    with pytest.raises(TrainError, match="--lr"):
        TrainJobConfig.from_flat(data="d", out="o", layers=1, lr=0.0)


def test_next_token_loss_matches_float64_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    batch = Batch(inputs=targets, targets=targets)
    sums = NextTokenLoss(0.5)(logits.float(), batch)
    lse = logits.logsumexp(-1)
    ce = (lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).sum()
    assert sums.tokens == 15
    assert sums.total.item() == pytest.approx((ce + 0.5 * lse.pow(2).sum()).item(), rel=1e-6)
    assert sums.metrics["ce"] == pytest.approx(cross_entropy_sum(logits, targets).item(), rel=1e-6)
