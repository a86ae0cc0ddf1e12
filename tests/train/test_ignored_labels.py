"""Labels of -100 (Hugging Face's convention): every loss is over the trained positions alone.

References are float64 numpy, written from the definitions, over the trained positions
only. Float64 sums of a few hundred terms of size ~10 carry errors ~1e-13; REF_ATOL = 1e-9
leaves room for that and still catches a single untrained position leaking in (each
moves the mean by ~1/n ~ 0.05). Untrained positions hold NaN teacher targets here, so any
leak also shows as a NaN.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from kdcache.storage.tokens.format import IGNORE_INDEX
from kdcache.train import batches, distill_loss
from kdcache.train.batches import Batch, batch_from_dict, batch_to_dict
from kdcache.train.kd_losses import DistillLoss
from kdcache.train.losses import NextTokenLoss
from tests.train.test_kd_losses import (
    CONFIGS,
    as_dict,
    forward_memory,
    make_batch,
    np_kl,
    np_log_softmax,
    np_sampled,
    np_topk_categories,
    rows,
    student_logits,
)

REF_ATOL = 1e-9
B, T, V = 3, 10, 61


def masked(batch: Batch, seed: int = 0) -> tuple[Batch, np.ndarray]:
    """`batch` with about half its labels -100 and NaN teacher targets at those positions."""
    trained = np.random.default_rng(seed).random((B, T)) < 0.5
    trained[0, 0] = True  # at least one
    keep = torch.from_numpy(trained)
    targets = batch.targets.masked_fill(~keep, IGNORE_INDEX)
    extras = {}
    for name, values in batch.extras.items():
        where = keep.reshape(B, T, *([1] * (values.dim() - 2)))
        extras[name] = values.masked_fill(~where, float("nan")) if values.is_floating_point() else values
    return Batch(batch.inputs, targets, extras), trained


def np_kd(cfg: dict, s: np.ndarray, extras: dict[str, np.ndarray], tau: float) -> np.ndarray:
    """Per-position KD (times tau^2) over flat positions."""
    reverse = cfg.get("divergence") == "kl_reverse"
    if cfg["kind"] == "sampled":
        return np_sampled(s, extras["ids"], extras["logprobs"], extras["counts"], tau)
    if cfg["kind"] == "full":
        log_p, log_q = extras["logprobs"], np_log_softmax(s / tau)
    else:
        log_p, log_q = np_topk_categories(s, extras["ids"], extras["logprobs"], extras["tail_logmass"], tau,
                                          cfg.get("tail", "tail"))
    pairs = zip(log_q, log_p, strict=True) if reverse else zip(log_p, log_q, strict=True)
    return tau**2 * np.array([np_kl(a, b) for a, b in pairs])


def np_loss(cfg: dict | None, logits: np.ndarray, batch: Batch, trained: np.ndarray, *, lam: float,
            z_loss: float) -> float:
    """The float64 reference: mean over trained positions of (1 - lam) ce + lam kd + z_loss lse^2."""
    s = logits.reshape(B * T, -1)[trained.reshape(-1)]
    targets = batch.targets.numpy().reshape(-1)[trained.reshape(-1)]
    lse = logsumexp(s, -1)
    ce = lse - s[np.arange(len(s)), targets]
    per = ce + z_loss * lse**2
    if cfg is not None:
        extras = {k: v.numpy().reshape(B * T, *v.shape[2:])[trained.reshape(-1)]
                  for k, v in batch.extras.items()}
        per = (1 - lam) * ce + lam * np_kd(cfg, s, extras, cfg.get("tau", 1.0)) + z_loss * lse**2
    return float(per.mean())


@pytest.mark.parametrize("cfg", [None, *CONFIGS], ids=lambda c: "supervised" if c is None else
                         "-".join(map(str, c.values())))
def test_distill_loss_is_the_mean_over_trained_positions(cfg: dict | None) -> None:
    tau = 1.0 if cfg is None else cfg.get("tau", 1.0)
    full, trained = masked(make_batch("full" if cfg is None else cfg["kind"], B, T, V, tau))
    batch = Batch(full.inputs, full.targets) if cfg is None else full
    opts = {} if cfg is None else {"divergence": cfg.get("divergence", "kl_forward"),
                                   "tail": cfg.get("tail", "tail")}
    d = as_dict(batch, None if cfg is None else tau)
    logits = student_logits(B, T, V)
    loss = distill_loss(d, logits=logits, lam=0.5, z_loss=1e-3, **opts)
    ref = np_loss(cfg, logits.detach().numpy(), batch, trained, lam=0.5, z_loss=1e-3)
    assert abs(loss.item() - ref) < REF_ATOL
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all()
    assert not grad[torch.from_numpy(~trained)].any()  # untrained positions get no gradient
    assert grad[torch.from_numpy(trained)].abs().sum(-1).min() > 0

    # The chunked hidden-state path: the same loss, the same gradients.
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    head = torch.randn(V, 8, dtype=torch.float64, generator=gen)
    chunked = distill_loss(d, hidden=hidden, lm_head=head, lam=0.5, z_loss=1e-3, **opts)
    ref = np_loss(cfg, (hidden @ head.T).detach().numpy(), batch, trained, lam=0.5, z_loss=1e-3)
    assert abs(chunked.item() - ref) < REF_ATOL
    (g_hidden,) = torch.autograd.grad(chunked, hidden)
    assert torch.isfinite(g_hidden).all() and not g_hidden[torch.from_numpy(~trained)].any()


@pytest.mark.parametrize("kind", ["full", "topk", "sampled"])
def test_loss_sums_count_trained_tokens_only(kind: str) -> None:
    batch, trained = masked(make_batch(kind, B, T, V, 1.0))
    logits = student_logits(B, T, V)
    for out in (DistillLoss(kind=kind, lam=0.5)(logits, batch), NextTokenLoss()(logits, batch)):
        assert out.tokens == batch.tokens == int(trained.sum())


def test_num_items_in_batch_weighs_every_token_alike() -> None:
    """Two micro-batches of a gradient-accumulation step, divided by the step's trained count,
    add up to the loss of the step's batch as one; the per-batch means would not."""
    whole, trained = masked(make_batch("topk", B, T, V, 1.0))
    logits = student_logits(B, T, V)
    d = as_dict(whole, 1.0)
    one = distill_loss(d, logits=logits)
    parts = [{k: (v[rows] if v.dim() else v) for k, v in d.items()} for rows in (slice(0, 1), slice(1, B))]
    n = int(trained.sum())
    summed = sum(distill_loss(p, logits=logits[rows], num_items_in_batch=n)
                 for p, rows in zip(parts, (slice(0, 1), slice(1, B)), strict=True))
    assert abs(summed.item() - one.item()) < 1e-12
    means = sum(distill_loss(p, logits=logits[rows]) for p, rows in zip(parts, (slice(0, 1), slice(1, B)),
                                                                         strict=True)) / 2
    assert abs(means.item() - one.item()) > 1e-3  # the two hold different trained counts


def test_a_batch_with_nothing_trained_is_zero_and_in_the_graph() -> None:
    batch = make_batch("topk", B, T, V, 1.0)
    d = as_dict(Batch(batch.inputs, torch.full_like(batch.targets, IGNORE_INDEX), batch.extras), 1.0)
    logits = student_logits(B, T, V)
    loss = distill_loss(d, logits=logits)
    assert loss.item() == 0.0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, logits)
    assert not grad.any()
    hidden = torch.randn(B, T, 8, dtype=torch.float64, requires_grad=True)
    head = torch.randn(V, 8, dtype=torch.float64, requires_grad=True)
    loss = distill_loss(d, hidden=hidden, lm_head=head)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None and not hidden.grad.any()


def test_batch_dicts_carry_labels_and_position_ids() -> None:
    batch, _ = masked(make_batch("topk", B, T, V, 1.0))
    positions = torch.arange(T).repeat(B, 1)
    positions[:, 6:] -= 6
    with_positions = Batch(batch.inputs, batch.targets, batch.extras, positions)
    d = batch_to_dict(with_positions, temperature=1.0)
    assert torch.equal(d["position_ids"], positions) and (d["labels"] == IGNORE_INDEX).any()
    back = batch_from_dict(d)
    assert back.positions is not None and torch.equal(back.positions, positions)
    assert torch.equal(back.targets, batch.targets) and back.tokens == batch.tokens
    assert "position_ids" not in batch_to_dict(batch, temperature=1.0)
    assert batch_from_dict(batch_to_dict(batch, temperature=1.0)).positions is None
    assert set(batches.BATCH_KEYS).isdisjoint({"labels", "position_ids"})


@pytest.mark.parametrize("loss", [DistillLoss(kind="full", lam=0.5, chunk_bytes=rows(32, 4096)),
                                  DistillLoss(kind="topk", lam=0.5, chunk_bytes=rows(32, 4096)),
                                  NextTokenLoss(chunk_bytes=rows(32, 4096))],
                         ids=["full", "topk", "next-token"])
def test_ignored_positions_keep_the_chunked_memory_bound(loss: DistillLoss | NextTokenLoss) -> None:
    """Trained rows of the logits are selected inside each chunk: backward keeps the chunks'
    indices, not a copy of the trained logits (half of [B, T, V] here), and no intermediate
    outgrows one chunk's float32 logits."""
    b, t, v = 4, 64, 4096
    batch = make_batch("full" if isinstance(loss, NextTokenLoss) else loss.kind, b, t, v, 1.0, torch.float32)
    keep = torch.rand(b, t, generator=torch.Generator().manual_seed(0)) < 0.5
    batch = Batch(batch.inputs, batch.targets.masked_fill(~keep, IGNORE_INDEX), batch.extras)
    saved, largest = forward_memory(loss, student_logits(b, t, v, torch.float32), batch)  # type: ignore[arg-type]
    assert saved < b * t * v * 4 / 16
    assert largest <= 32 * v * 4
