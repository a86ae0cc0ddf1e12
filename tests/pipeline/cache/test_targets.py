"""`targets_from_logits` against float64 log-softmax, on ordinary and on peaked positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.pipeline.cache.targets import targets_from_logits
from kdcache.pipeline.cache.teachers import TargetSpec

V, K, T = 1000, 8, 6
FP16_REL = 2.0**-11
# float32 log-sum-exps near logit 40 are exact to a few ulps there (~4e-6 nats).
LOG_ABS = 2e-5


def _logits(peak: float, seed: int = 0) -> torch.Tensor:
    """[2, T, V] logits; with a large `peak`, one id holds all but ~V * exp(-peak) of the mass."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, T, V, generator=gen, dtype=torch.float64)
    logits[..., 7] += peak
    return logits


def _reference_tail(logits: torch.Tensor, k: int, temperature: float) -> np.ndarray:
    logp = torch.log_softmax(logits / temperature, -1)
    top = torch.topk(logp, k, -1).indices
    return torch.logsumexp(logp.scatter(-1, top, float("-inf")), -1).numpy()


@pytest.mark.parametrize(("peak", "temperature"), [(0.0, 1.0), (0.0, 2.0), (25.0, 1.0), (40.0, 1.0)])
def test_topk_targets_match_float64(peak, temperature):
    logits = _logits(peak)
    tokens = np.random.default_rng(0).integers(0, V, size=(2, T + 1)).astype(np.int32)
    spec = TargetSpec(kind="topk", k=K, temperature=temperature, vocab=V)
    got = targets_from_logits(logits.float(), tokens, spec, first_row=0)
    logp = torch.log_softmax(logits / temperature, -1).numpy()
    want_ids = np.argsort(-logp, -1, kind="stable")[..., :K]
    assert (got["ids"].astype(np.int64) == want_ids).all()
    want = np.take_along_axis(logp, want_ids, -1)
    assert np.all(np.abs(got["logprobs"] - want) <= FP16_REL * np.abs(want) + LOG_ABS)
    tail = _reference_tail(logits, K, temperature)
    assert np.all(np.abs(got["tail_logmass"] - tail) <= LOG_ABS)
    logp1 = torch.log_softmax(logits, -1).numpy()
    target = np.take_along_axis(logp1, tokens[:, 1:, None].astype(np.int64), -1)
    assert np.all(np.abs(got["target_logprob"] - target[..., 0]) <= LOG_ABS)


def test_a_tiny_tail_is_never_stored_as_zero():
    """At peak 40 the top-k mass is 1 in float32, so 1 - sum would store log(0) = -inf;
    the true tail is ~V * exp(-40) ~ 4e-15 and must come back to float32 precision."""
    logits = _logits(40.0)
    tokens = np.zeros((2, T + 1), dtype=np.int32)
    spec = TargetSpec(kind="topk", k=K, temperature=1.0, vocab=V)
    got = targets_from_logits(logits.float(), tokens, spec, first_row=0)
    top = torch.from_numpy(got["logprobs"].astype(np.float32)).exp().sum(-1)
    assert (top == 1.0).any()  # the cancellation the log-sum-exp avoids
    tail = _reference_tail(logits, K, 1.0)
    assert np.isfinite(got["tail_logmass"]).all()
    assert (tail < np.log(1e-13)).all()
    assert np.all(np.abs(got["tail_logmass"] - tail) <= LOG_ABS)


def test_k_equal_to_vocab_has_no_tail():
    logits = _logits(0.0)[..., :K]
    spec = TargetSpec(kind="topk", k=K, temperature=1.0, vocab=K)
    got = targets_from_logits(logits.float(), np.zeros((2, T + 1), np.int32), spec, first_row=0)
    assert (got["tail_logmass"] == -np.inf).all()
