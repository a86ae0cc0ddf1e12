"""`targets_from_logits` against float64 log-softmax, on ordinary and on peaked positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.pipeline.cache.targets import targets_from_logits
from kdcache.pipeline.cache.teachers import TargetSpec
from kdcache.storage.layout import untrained_fill

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


def _targets(logits: torch.Tensor, tokens: np.ndarray, spec: TargetSpec) -> dict[str, np.ndarray]:
    """`targets_from_logits` over every position of [2, T] rows, reshaped back to rows."""
    b, t, v = logits.shape
    rows, positions = np.divmod(np.arange(b * t), t)
    flat = logits.reshape(b * t, v).float()
    got = targets_from_logits(flat, tokens[:, 1:].reshape(-1), spec, rows, positions)
    return {name: value.reshape(b, t, *value.shape[1:]) for name, value in got.items()}


def _reference_tail(logits: torch.Tensor, k: int, temperature: float) -> np.ndarray:
    logp = torch.log_softmax(logits / temperature, -1)
    top = torch.topk(logp, k, -1).indices
    return torch.logsumexp(logp.scatter(-1, top, float("-inf")), -1).numpy()


@pytest.mark.parametrize(("peak", "temperature"), [(0.0, 1.0), (0.0, 2.0), (25.0, 1.0), (40.0, 1.0)])
def test_topk_targets_match_float64(peak, temperature):
    logits = _logits(peak)
    tokens = np.random.default_rng(0).integers(0, V, size=(2, T + 1)).astype(np.int32)
    spec = TargetSpec(kind="topk", k=K, temperature=temperature, vocab=V)
    got = _targets(logits, tokens, spec)
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
    got = _targets(logits, tokens, spec)
    top = torch.from_numpy(got["logprobs"].astype(np.float32)).exp().sum(-1)
    assert (top == 1.0).any()  # the cancellation the log-sum-exp avoids
    tail = _reference_tail(logits, K, 1.0)
    assert np.isfinite(got["tail_logmass"]).all()
    assert (tail < np.log(1e-13)).all()
    assert np.all(np.abs(got["tail_logmass"] - tail) <= LOG_ABS)


def test_k_equal_to_vocab_has_no_tail():
    logits = _logits(0.0)[..., :K]
    spec = TargetSpec(kind="topk", k=K, temperature=1.0, vocab=K)
    got = _targets(logits, np.zeros((2, T + 1), np.int32), spec)
    assert (got["tail_logmass"] == -np.inf).all()


@pytest.mark.parametrize("kind", ["topk", "full", "sampled"])
def test_no_position_gives_arrays_of_every_name(kind):
    """Zero positions (a shard with nothing trained) still give each array, empty, in its dtype."""
    spec = TargetSpec(kind=kind, k=V if kind == "full" else K, temperature=1.0, vocab=V, draws=16)
    empty = np.zeros(0, np.int64)
    got = targets_from_logits(torch.zeros(0, V), empty, spec, empty, empty)
    some = targets_from_logits(_logits(0.0)[0].float(), np.zeros(T, np.int64), spec, np.zeros(T, np.int64),
                               np.arange(T))
    assert got.keys() == some.keys()
    for name in got:
        assert got[name].shape == (0, *some[name].shape[1:]) and got[name].dtype == some[name].dtype


def test_sampled_draws_follow_the_row_and_position_not_the_run():
    """A row's draws are seeded by (seed, row, first position of its run): the same run of
    positions draws the same ids whether or not other rows' positions come before it."""
    logits = _logits(0.0).reshape(2 * T, V).float()
    spec = TargetSpec(kind="sampled", k=16, temperature=1.0, vocab=V, draws=16, seed=3)
    rows, positions = np.divmod(np.arange(2 * T), T)
    both = targets_from_logits(logits, np.zeros(2 * T, np.int64), spec, rows + 10, positions)
    second = targets_from_logits(logits[T:], np.zeros(T, np.int64), spec, rows[T:] + 10, positions[T:])
    for name in ("ids", "counts", "logprobs"):
        assert np.array_equal(both[name][T:], second[name])
    assert (both["counts"].astype(np.int64).sum(-1) == 16).all()
    assert untrained_fill("counts", (2, 16), np.dtype(np.uint8), 16).sum(-1).tolist() == [16, 16]


@pytest.mark.parametrize(("peak", "temperature"), [(0.0, 1.0), (25.0, 1.0), (0.0, 2.0)])
def test_targets_at_further_temperatures_match_float64(peak, temperature):
    """Log-probs of the stored ids and the tail at each further temperature, derived from the
    stored log-probs and `tau_logz`/`tau_tail_logmass` (layout.at_temperature), match a
    float64 log-softmax at that temperature."""
    from kdcache.storage.layout import at_temperature

    from ...storage.conftest import make_meta

    logits = _logits(peak)
    tokens = np.random.default_rng(0).integers(0, V, size=(2, T + 1)).astype(np.int32)
    taus = (0.5, 2.0 if temperature != 2.0 else 1.0, 4.0)
    spec = TargetSpec(kind="topk", k=K, temperature=temperature, vocab=V, temperatures=taus)
    got = _targets(logits, tokens, spec)
    meta = make_meta(k=K, vocab=V, seq_len=T, temperature=temperature, temperatures=list(taus))
    for tau in taus:
        logprobs, tail = at_temperature(meta, tau, got["logprobs"], got["tail_logmass"],
                                        got["tau_logz"], got["tau_tail_logmass"])
        logp = torch.log_softmax(logits / tau, -1).numpy()
        want = np.take_along_axis(logp, got["ids"].astype(np.int64), -1)
        # the stored values' float16 rounding and float32 log-sum-exps, scaled by temperature / tau
        ratio = temperature / tau
        bound = FP16_REL * ratio * np.abs(got["logprobs"].astype(np.float64)) + (1 + ratio) * LOG_ABS
        assert np.all(np.abs(logprobs - want) <= bound), tau
        assert np.all(np.abs(tail - _reference_tail(logits, K, tau)) <= LOG_ABS), tau
