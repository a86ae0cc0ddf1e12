"""The hidden-state path of the losses (`from_hidden`): the logits path's values and gradients,
chunk sizing in bytes, padded output layers, bf16, and the memory it never holds."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import Tensor

from kdcache.train import losses
from kdcache.train.batches import Batch
from kdcache.train.errors import TrainError
from kdcache.train.kd_losses import DistillLoss
from kdcache.train.losses import LOSS_CHUNK_BYTES, LossSums, NextTokenLoss, positions_per_chunk

B, T, D, VOCAB = 2, 12, 8, 61
RTOL = 1e-5  # hidden path vs logits path, float64 (they differ only in summation order)
BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)

Loss = NextTokenLoss | DistillLoss


def rows(positions: int, vocab: int) -> int:
    """chunk_bytes for chunks of `positions` positions of float32 logits over `vocab` ids."""
    return positions * 4 * vocab


# ---- synthetic teacher targets (what each store kind holds) ----


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    return x - logsumexp(x, axis=-1, keepdims=True)


def make_batch(kind: str | None, tau: float = 1.0, *, b: int = B, t: int = T, v: int = VOCAB,
               dtype: torch.dtype = torch.float64, k: int = 5) -> Batch:
    """Targets and, for a store kind, the extras it provides, from a peaked random teacher."""
    rng = np.random.default_rng(21)
    n = b * t
    targets = torch.from_numpy(rng.integers(0, v, (b, t)))
    if kind is None:
        return Batch(inputs=targets, targets=targets)
    t_lp = np_log_softmax(rng.standard_normal((n, v)) * 3.0 / tau)
    if kind == "full":
        extras = {"logprobs": t_lp}
    elif kind == "topk":
        order = np.argsort(-t_lp, -1, kind="stable")
        ids = order[:, :k]
        extras = {"ids": ids, "logprobs": np.take_along_axis(t_lp, ids, -1),
                  "tail_logmass": logsumexp(np.take_along_axis(t_lp, order[:, k:], -1), -1)}
    else:  # sampled: k draws, unique ids with their counts, unused slots 0
        p = np.exp(t_lp)
        counts_v = np.stack([rng.multinomial(k, row / row.sum()) for row in p])
        order = np.argsort(-counts_v, -1, kind="stable")[:, :k]
        counts = np.take_along_axis(counts_v, order, -1)
        extras = {"ids": np.where(counts > 0, order, 0), "counts": counts,
                  "logprobs": np.where(counts > 0, np.take_along_axis(t_lp, order, -1), 0.0)}
    ext = {key: torch.from_numpy(np.ascontiguousarray(val)).reshape(b, t, *val.shape[1:])
           for key, val in extras.items()}
    ext = {key: val.to(dtype) if val.is_floating_point() else val for key, val in ext.items()}
    return Batch(inputs=targets, targets=targets, extras=ext)


def student(rows_: int, *, b: int = B, t: int = T, d: int = D, dtype: torch.dtype = torch.float64,
            scale: float = 2.0) -> tuple[Tensor, Tensor]:
    """Hidden states [b, t, d] and an output layer [rows_, d] whose logits have std ~`scale`."""
    gen = torch.Generator().manual_seed(22)
    hidden = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
    head = torch.randn(rows_, d, generator=gen, dtype=torch.float64) * scale / math.sqrt(d)
    return hidden.to(dtype).requires_grad_(), head.to(dtype).requires_grad_()


def run(fn: Callable[[], LossSums], *params: Tensor) -> tuple[LossSums, list[Tensor]]:
    out = fn()
    grads = torch.autograd.grad(out.total, params)
    return out, list(grads)


def hidden_vs_logits(loss: Loss, batch: Batch, *, pad: int, chunk_positions: int,
                     dtype: torch.dtype = torch.float64):
    """(hidden path, logits path) results: (LossSums, [grad hidden, grad head]) each."""
    hidden, head = student(VOCAB + pad, dtype=dtype)
    vocab = VOCAB if pad else None
    chunked = dataclasses.replace(loss, chunk_bytes=rows(chunk_positions, VOCAB))
    got = run(lambda: chunked.from_hidden(hidden, head, batch, vocab=vocab), hidden, head)
    want = run(lambda: loss(hidden @ head[:VOCAB].T, batch), hidden, head)  # one chunk (default)
    return got, want


def assert_rel_close(a: Tensor, b: Tensor, rtol: float) -> None:
    """|a - b| <= rtol * max|b| elementwise: relative to the tensor's scale, not per element."""
    scale = b.abs().max().item()
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


def assert_same_sums(got: LossSums, want: LossSums, rtol: float) -> None:
    assert got.tokens == want.tokens
    assert abs(got.total.item() - want.total.item()) <= rtol * abs(want.total.item())
    assert got.metrics.keys() == want.metrics.keys()
    for m, value in want.metrics.items():
        assert abs(got.metrics[m] - value) <= rtol * max(abs(value), 1e-12), m


# ---- the hidden path equals the logits path ----

CONFIGS = [
    {"kind": "full"},
    {"kind": "full", "divergence": "kl_reverse", "tau": 2.0},
    {"kind": "topk", "tail": "tail", "tau": 0.5},
    {"kind": "topk", "tail": "renormalize"},
    {"kind": "topk", "tail": "none", "tau": 2.0},
    {"kind": "topk", "divergence": "kl_reverse", "tail": "tail"},
    {"kind": "topk", "divergence": "kl_reverse", "tail": "renormalize", "tau": 0.5},
    {"kind": "sampled"},
    {"kind": "sampled", "tau": 2.0},
]


def config_id(cfg: dict) -> str:
    return "-".join(map(str, cfg.values()))


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_distill_hidden_path_equals_logits_path(cfg: dict, lam: float, pad: int) -> None:
    loss = DistillLoss(**cfg, lam=lam, z_loss=1e-3)
    batch = make_batch(cfg["kind"], loss.tau)
    (got, g_got), (want, g_want) = hidden_vs_logits(loss, batch, pad=pad, chunk_positions=5)
    assert_same_sums(got, want, RTOL)
    for a, b in zip(g_got, g_want, strict=True):
        assert_rel_close(a, b, RTOL)
    if pad:
        assert torch.equal(g_got[1][VOCAB:], torch.zeros(pad, D, dtype=torch.float64))


@pytest.mark.parametrize("pad", [0, 3])
def test_supervised_hidden_path_equals_logits_path(pad: int) -> None:
    (got, g_got), (want, g_want) = hidden_vs_logits(NextTokenLoss(1e-3), make_batch(None), pad=pad,
                                                    chunk_positions=5)
    assert_same_sums(got, want, RTOL)
    for a, b in zip(g_got, g_want, strict=True):
        assert_rel_close(a, b, RTOL)
    if pad:
        assert torch.equal(g_got[1][VOCAB:], torch.zeros(pad, D, dtype=torch.float64))


def test_supervised_equals_distill_lam_zero_from_hidden() -> None:
    hidden, head = student(VOCAB)
    sup = run(lambda: NextTokenLoss(1e-3, chunk_bytes=rows(7, VOCAB)).from_hidden(hidden, head,
                                                                                  make_batch(None)),
              hidden, head)
    kd = run(lambda: DistillLoss(kind="topk", lam=0.0, z_loss=1e-3, chunk_bytes=rows(4, VOCAB))
             .from_hidden(hidden, head, make_batch("topk")), hidden, head)
    assert abs(sup[0].total.item() - kd[0].total.item()) <= RTOL * abs(kd[0].total.item())
    for a, b in zip(sup[1], kd[1], strict=True):
        assert_rel_close(a, b, RTOL)


@pytest.mark.parametrize("make", [lambda c: NextTokenLoss(1e-3, chunk_bytes=c),
                                  lambda c: DistillLoss(kind="topk", lam=0.5, tau=2.0, chunk_bytes=c)],
                         ids=["supervised", "topk"])
def test_many_chunks_equal_one_chunk(make: Callable[[int], Loss]) -> None:
    kind = None if isinstance(make(1), NextTokenLoss) else "topk"
    batch = make_batch(kind, 2.0)
    results = []
    for chunk in (1, 7, B * T):  # one position per chunk, ragged chunks, one chunk
        hidden, head = student(VOCAB)
        loss = make(rows(chunk, VOCAB))
        results.append(run(lambda h=hidden, w=head, loss=loss: loss.from_hidden(h, w, batch), hidden, head))
    for got, g_got in results[:-1]:
        assert_same_sums(got, results[-1][0], 1e-12)
        for a, b in zip(g_got, results[-1][1], strict=True):
            assert_rel_close(a, b, 1e-12)


# ---- chunk sizing ----


def test_chunks_are_sized_in_bytes_of_float32_logits() -> None:
    assert positions_per_chunk(LOSS_CHUNK_BYTES, 151_936) == 110
    assert positions_per_chunk(LOSS_CHUNK_BYTES, 49_152) == 341
    assert positions_per_chunk(4 * 61 * 3 + 5, 61) == 3
    assert positions_per_chunk(1, 151_936) == 1  # at least one position
    assert NextTokenLoss().chunk_bytes == DistillLoss(kind="full").chunk_bytes == LOSS_CHUNK_BYTES
    assert NextTokenLoss(1e-3).z_loss_weight == 1e-3  # the first field stays positional


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("kind", [None, "topk"])
def test_each_chunk_is_checkpointed(kind: str | None, pad: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = losses.checkpoint

    def counting(fn, *args, use_reentrant):
        calls.append(args[1].shape[0])  # (head rows, hidden chunk, ...)
        return real(fn, *args, use_reentrant=use_reentrant)

    monkeypatch.setattr(losses, "checkpoint", counting)
    loss = NextTokenLoss(chunk_bytes=rows(5, VOCAB)) if kind is None else DistillLoss(
        kind=kind, chunk_bytes=rows(5, VOCAB))
    hidden, head = student(VOCAB + pad)
    # Sized by the real vocabulary, not the padded rows: rows(5, VOCAB) is 5 positions.
    loss.from_hidden(hidden, head, make_batch(kind), vocab=VOCAB).total.backward()
    assert calls == [5, 5, 5, 5, B * T - 20]
    calls.clear()
    with torch.no_grad():  # nothing to recompute
        loss.from_hidden(hidden, head, make_batch(kind), vocab=VOCAB)
    assert calls == []


@pytest.mark.parametrize(
    ("shape", "vocab", "match"),
    [((VOCAB, D), VOCAB + 1, "vocab"), ((VOCAB, D), 0, "vocab"), ((VOCAB, D + 1), None, "do not fit"),
     ((VOCAB,), None, "do not fit")],
)
def test_bad_output_layer_is_a_train_error(shape: tuple[int, ...], vocab: int | None, match: str) -> None:
    hidden = torch.zeros(B, T, D, dtype=torch.float64)
    for loss in (NextTokenLoss(), DistillLoss(kind="topk")):
        with pytest.raises(TrainError, match=match):
            loss.from_hidden(hidden, torch.zeros(shape, dtype=torch.float64), make_batch("topk"), vocab=vocab)
    with pytest.raises(TrainError, match="chunk_bytes"):
        NextTokenLoss(chunk_bytes=0)


# ---- bf16 ----

BF16_CASES = [(None, {}), ("topk", {"lam": 0.5}), ("topk", {"tau": 2.0, "divergence": "kl_reverse"}),
              ("full", {"lam": 0.5}), ("sampled", {"tau": 0.5})]


def make_loss(kind: str | None, cfg: dict, chunk_bytes: int = LOSS_CHUNK_BYTES) -> Loss:
    if kind is None:
        return NextTokenLoss(1e-3, chunk_bytes=chunk_bytes)
    return DistillLoss(kind=kind, z_loss=1e-3, chunk_bytes=chunk_bytes, **cfg)


@pytest.mark.parametrize(("kind", "cfg"), BF16_CASES, ids=lambda c: str(c))
def test_bf16_hidden_matches_float32_logits_of_the_same_inputs(kind: str | None, cfg: dict) -> None:
    """bf16 hidden states and head against the float32 logits path of the same (bf16) values.

    Tolerance, derived: the bf16 path's logits are the exact products rounded once to bf16
    (CPU and GPU bf16 matmuls accumulate in float32), so each moves by |ds| <= u |s| with
    u = 2^-8. To first order the loss moves by sum g ds, so |dL| <= u sum |g s| with g the
    reference gradient wrt the logits; we allow twice that for second-order terms. For the
    gradients: rounding the logits moves each softmax probability by a relative
    2 u max|s / tau| at most, and backward rounds twice more in bf16 (the logits' gradient
    going into the matmul and its result), u each; the gradients' norms must agree to
    2 u (2 + 2 max|s / tau|), twice that sum. (Measured errors sit well below it.)
    """
    loss = make_loss(kind, cfg, rows(5, VOCAB))
    batch = make_batch(kind, getattr(loss, "tau", 1.0), dtype=torch.float32)
    hidden, head = student(VOCAB + 3, dtype=torch.bfloat16, scale=1.0)
    got, g_got = run(lambda: loss.from_hidden(hidden, head, batch, vocab=VOCAB), hidden, head)
    assert got.total.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in g_got)

    h32, w32 = (p.detach().float().requires_grad_() for p in (hidden, head))
    s = h32 @ w32[:VOCAB].T
    s.retain_grad()
    want = make_loss(kind, cfg)(s, batch)
    g_want = torch.autograd.grad(want.total, [h32, w32, s])
    g_s = g_want[2]
    value_tol = 2 * BF16_U * (g_s * s).abs().sum().item()
    assert abs(got.total.item() - want.total.item()) <= value_tol
    z_max = s.abs().max().item() / getattr(loss, "tau", 1.0)
    grad_rtol = 2 * BF16_U * (2 + 2 * z_max)
    assert grad_rtol < 0.2  # the bound is tight enough to catch a wrong gradient
    for a, b in zip(g_got, g_want[:2], strict=True):
        assert (a.float() - b).norm() <= grad_rtol * b.norm()
    assert torch.equal(g_got[1][VOCAB:].float(), torch.zeros(3, D))


def test_bf16_hidden_matches_bf16_logits_path() -> None:
    """Against the logits path fed the same bf16 logits: the same roundings, so the only
    difference is the order of the matmuls' float32 accumulation, which can move a value
    rounded to bf16 by one unit in the last place (2 u relative)."""
    loss = DistillLoss(kind="topk", lam=0.5, chunk_bytes=rows(5, VOCAB))
    batch = make_batch("topk", dtype=torch.float32)
    hidden, head = student(VOCAB, dtype=torch.bfloat16, scale=1.0)
    got = run(lambda: loss.from_hidden(hidden, head, batch), hidden, head)
    want = run(lambda: loss(hidden @ head.T, batch), hidden, head)
    assert_same_sums(got[0], want[0], 1e-5)
    for a, b in zip(got[1], want[1], strict=True):
        assert_rel_close(a.float(), b.float(), 2 * BF16_U)


def test_bf16_hidden_with_float32_head() -> None:
    """Mixed dtypes (no autocast): each chunk of hidden states is cast to the head's dtype."""
    loss = DistillLoss(kind="topk", lam=0.5, chunk_bytes=rows(5, VOCAB))
    batch = make_batch("topk", dtype=torch.float32)
    hidden, head = student(VOCAB, dtype=torch.bfloat16, scale=1.0)
    head = head.detach().float().requires_grad_()
    got = run(lambda: loss.from_hidden(hidden, head, batch), hidden, head)
    h32 = hidden.detach().float().requires_grad_()
    want = run(lambda: loss(h32 @ head.T, batch), h32, head)
    assert_same_sums(got[0], want[0], 1e-5)
    assert got[1][0].dtype == torch.bfloat16
    assert_rel_close(got[1][0].float(), want[1][0], 2 * BF16_U)
    assert_rel_close(got[1][1], want[1][1], 1e-5)


# ---- memory ----


def peak_new_bytes(fn: Callable[[], None]) -> int:
    """Peak bytes allocated by `fn` beyond what was allocated before it (CPU, via the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes: list[tuple[int, int]] = []

    def walk(node) -> None:
        if node.tag == torch._C._profiler._EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    assert sizes, "the profiler recorded no allocations"
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("kind", [None, "topk", "sampled"])
def test_hidden_path_never_holds_the_logits(kind: str | None) -> None:
    """Forward + backward peak: a few chunks of float32 logits, whatever the positions; the
    logits path, as a control of the measurement, holds several copies of [B*T, V]."""
    v, d, chunk = 2048, 16, 32
    chunk_bytes = rows(chunk, v)
    loss = make_loss(kind, {}, chunk_bytes)
    peaks = {}
    for t in (256, 1024):
        batch = make_batch(kind, b=1, t=t, v=v, dtype=torch.float32, k=16)
        hidden, head = student(v, b=1, t=t, d=d, dtype=torch.float32)

        def step(batch=batch, hidden=hidden, head=head) -> None:
            loss.from_hidden(hidden, head, batch).total.backward()

        peaks[t] = peak_new_bytes(step)
        grads = hidden.numel() * 4 + head.numel() * 4  # the .grad tensors it leaves behind
        assert peaks[t] - grads <= 8 * chunk_bytes
    assert 8 * chunk_bytes < 1024 * v * 4
    assert abs(peaks[1024] - peaks[256]) <= 768 * d * 4 + 4096 * 64  # only the hidden grad grows

    batch = make_batch(kind, b=1, t=1024, v=v, dtype=torch.float32, k=16)
    hidden, head = student(v, b=1, t=1024, d=d, dtype=torch.float32)
    logits_peak = peak_new_bytes(lambda: loss(hidden @ head.T, batch).total.backward())
    assert logits_peak >= 2 * 1024 * v * 4 > 4 * peaks[1024]
