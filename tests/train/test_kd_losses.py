"""Distillation losses against float64 numpy references, gradients, chunking and memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kdcache.train import batches, job, kd_losses, losses
from kdcache.train.batches import Batch
from kdcache.train.errors import TrainError
from kdcache.train.kd_losses import (
    DistillLoss,
    forward_kl_full,
    forward_kl_topk,
    reverse_kl_full,
    reverse_kl_topk,
    sampled_kl,
)
from kdcache.train.losses import NextTokenLoss

ATOL = 1e-6  # pure functions vs the numpy reference, float64
CHUNK_ATOL = 1e-10  # chunked vs unchunked DistillLoss, float64
TAUS = (0.5, 1.0, 2.0)


def rows(positions: int, vocab: int) -> int:
    """chunk_bytes for chunks of `positions` positions of float32 logits over `vocab` ids."""
    return positions * 4 * vocab


# ---- float64 numpy references, written from the definitions ----


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    return x - logsumexp(x, axis=-1, keepdims=True)


def np_kl(log_p: np.ndarray, log_q: np.ndarray) -> float:
    """sum p (log p - log q), with 0 log 0 = 0."""
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        return float(np.where(p > 0, p * (log_p - log_q), 0.0).sum())


def np_topk_categories(s, ids, t_k, tail_logmass, tau, mode):
    log_q = np_log_softmax(s / tau)
    log_q_k = np.take_along_axis(log_q, ids, -1)
    if mode == "renormalize":
        return t_k - logsumexp(t_k, -1, keepdims=True), log_q_k - logsumexp(log_q_k, -1, keepdims=True)
    if mode == "none":
        return t_k, log_q_k
    outside = np.ones(s.shape, dtype=bool)
    np.put_along_axis(outside, ids, False, -1)
    with np.errstate(divide="ignore"):
        log_q_rest = np.log((np.exp(log_q) * outside).sum(-1))
    log_p = np.concatenate([t_k, tail_logmass[:, None]], -1)
    return log_p, np.concatenate([log_q_k, log_q_rest[:, None]], -1)


def np_sampled(s, ids, t_k, counts, tau):
    log_q = np.take_along_axis(np_log_softmax(s / tau), ids, -1)
    weights = counts / counts.sum(-1, keepdims=True)
    return tau**2 * (weights * (t_k - log_q)).sum(-1)  # per position


# ---- synthetic teacher and stores ----


def teacher_case(seed: int, n: int, v: int, tau: float) -> dict[str, np.ndarray]:
    """Student logits and a peaked teacher (entropy ~1.5-2 nats) at temperature tau."""
    rng = np.random.default_rng(seed)
    t_logits = rng.standard_normal((n, v)) * 3.25
    return {"s": t_logits + rng.standard_normal((n, v)) * 1.5, "t_lp": np_log_softmax(t_logits / tau)}


def topk_store(t_lp: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """What a top-k store holds: most probable ids first, their log-probs, exact tail log-mass."""
    order = np.argsort(-t_lp, axis=-1, kind="stable")
    ids, rest = order[:, :k], order[:, k:]
    tail = np.full(len(t_lp), -np.inf)
    if k < t_lp.shape[-1]:
        tail = logsumexp(np.take_along_axis(t_lp, rest, -1), -1)
    return {"ids": ids, "logprobs": np.take_along_axis(t_lp, ids, -1), "tail_logmass": tail}


def compact_counts(counts_v: np.ndarray, t_lp: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-vocabulary draw counts [..., V] -> a sampled store's k slots; unused slots are 0."""
    order = np.argsort(-counts_v, axis=-1, kind="stable")[..., :k]
    counts = np.take_along_axis(counts_v, order, -1)
    used = counts > 0
    ids = np.where(used, order, 0)
    logprobs = np.where(used, np.take_along_axis(np.broadcast_to(t_lp, counts_v.shape), order, -1), 0.0)
    return {"ids": ids, "logprobs": logprobs, "counts": counts}


def sampled_store(t_lp: np.ndarray, draws: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    counts_v = np.stack([rng.multinomial(draws, np.exp(row) / np.exp(row).sum()) for row in t_lp])
    return compact_counts(counts_v, t_lp, draws)


def tt(x: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


# ---- pure functions vs the reference ----


@pytest.mark.parametrize("v", [61, 257])
@pytest.mark.parametrize("tau", TAUS)
def test_full_divergences_match_reference(v: int, tau: float) -> None:
    c = teacher_case(1, 12, v, tau)
    log_q = np_log_softmax(c["s"] / tau)
    s, t_lp = tt(c["s"]), tt(c["t_lp"])
    assert abs(forward_kl_full(s, t_lp, tau).item() - tau**2 * np_kl(c["t_lp"], log_q)) < ATOL
    assert abs(reverse_kl_full(s, t_lp, tau).item() - tau**2 * np_kl(log_q, c["t_lp"])) < ATOL


@pytest.mark.parametrize("tail", ["renormalize", "tail", "none"])
@pytest.mark.parametrize("k", [1, 5, 61])
@pytest.mark.parametrize("tau", TAUS)
def test_topk_divergences_match_reference(tail: str, k: int, tau: float) -> None:
    c = teacher_case(2, 12, 61, tau)
    st = topk_store(c["t_lp"], k)
    log_p, log_q = np_topk_categories(c["s"], st["ids"], st["logprobs"], st["tail_logmass"], tau, tail)
    args = (tt(c["s"]), tt(st["ids"]), tt(st["logprobs"]), tt(st["tail_logmass"]), tau, tail)
    assert abs(forward_kl_topk(*args).item() - tau**2 * np_kl(log_p, log_q)) < ATOL
    if tail == "none":
        with pytest.raises(ValueError, match="not defined"):
            reverse_kl_topk(*args)
    else:
        assert abs(reverse_kl_topk(*args).item() - tau**2 * np_kl(log_q, log_p)) < ATOL


@pytest.mark.parametrize("tau", TAUS)
def test_sampled_kl_matches_reference(tau: float) -> None:
    c = teacher_case(3, 12, 257, tau)
    st = sampled_store(c["t_lp"], draws=24, seed=4)
    assert (st["counts"] == 0).any()  # some padding slots are exercised
    got = sampled_kl(tt(c["s"]), tt(st["ids"]), tt(st["logprobs"]), tt(st["counts"]), tau)
    want = np_sampled(c["s"], st["ids"], st["logprobs"], st["counts"], tau).sum()
    assert abs(got.item() - want) < ATOL


def test_bad_tail_mode_is_a_value_error() -> None:
    c, st = teacher_case(5, 2, 9, 1.0), topk_store(teacher_case(5, 2, 9, 1.0)["t_lp"], 3)
    with pytest.raises(ValueError, match="unknown tail mode"):
        forward_kl_topk(tt(c["s"]), tt(st["ids"]), tt(st["logprobs"]), tt(st["tail_logmass"]), 1.0, "rest")


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize(
    "name",
    [
        "forward_full",
        "reverse_full",
        "forward_renormalize",
        "forward_tail",
        "forward_none",
        "reverse_renormalize",
        "reverse_tail",
        "sampled",
    ],
)
def test_gradcheck(name: str, k: int) -> None:
    tau = 0.7
    c = teacher_case(6, 3, 7, tau)
    st, sm = topk_store(c["t_lp"], k), sampled_store(c["t_lp"], draws=k, seed=7)
    topk = (tt(st["ids"]), tt(st["logprobs"]), tt(st["tail_logmass"]), tau)
    fns = {
        "forward_full": lambda s: forward_kl_full(s, tt(c["t_lp"]), tau),
        "reverse_full": lambda s: reverse_kl_full(s, tt(c["t_lp"]), tau),
        "forward_renormalize": lambda s: forward_kl_topk(s, *topk, "renormalize"),
        "forward_tail": lambda s: forward_kl_topk(s, *topk, "tail"),
        "forward_none": lambda s: forward_kl_topk(s, *topk, "none"),
        "reverse_renormalize": lambda s: reverse_kl_topk(s, *topk, "renormalize"),
        "reverse_tail": lambda s: reverse_kl_topk(s, *topk, "tail"),
        "sampled": lambda s: sampled_kl(s, tt(sm["ids"]), tt(sm["logprobs"]), tt(sm["counts"]), tau),
    }
    s = tt(c["s"]).requires_grad_()
    assert torch.autograd.gradcheck(fns[name], (s,))


# ---- properties of the tail category and the sampled estimator ----


@pytest.mark.parametrize("tau", TAUS)
def test_tail_mode_with_every_id_is_full_kl(tau: float) -> None:
    c = teacher_case(8, 12, 61, tau)
    st = topk_store(c["t_lp"], 61)
    s, ids, lp = tt(c["s"]), tt(st["ids"]), tt(st["logprobs"])
    full_f, full_r = forward_kl_full(s, tt(c["t_lp"]), tau), reverse_kl_full(s, tt(c["t_lp"]), tau)
    # The exact tail is -inf; a store's log(1 - sum p) may instead hold rounding noise, and
    # with no ids left outside the k there is no rest category for it to belong to.
    for value in (-torch.inf, -16.0):
        tail = torch.full((12,), value, dtype=torch.float64)
        assert abs(forward_kl_topk(s, ids, lp, tail, tau, "tail").item() - full_f.item()) < ATOL
        assert abs(reverse_kl_topk(s, ids, lp, tail, tau, "tail").item() - full_r.item()) < ATOL


@pytest.mark.parametrize("k", [1, 5, 58])
@pytest.mark.parametrize("tau", TAUS)
def test_tail_mode_never_exceeds_full_kl(k: int, tau: float) -> None:
    # Data processing: merging the rest into one category can only lower a KL.
    c = teacher_case(9, 12, 61, tau)
    st = topk_store(c["t_lp"], k)
    for i in range(12):
        s, t_lp = tt(c["s"][i : i + 1]), tt(c["t_lp"][i : i + 1])
        ids, lp, tail = (tt(st[key][i : i + 1]) for key in ("ids", "logprobs", "tail_logmass"))
        assert forward_kl_topk(s, ids, lp, tail, tau, "tail") <= forward_kl_full(s, t_lp, tau) + 1e-12
        assert reverse_kl_topk(s, ids, lp, tail, tau, "tail") <= reverse_kl_full(s, t_lp, tau) + 1e-12


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sampled_kl_is_unbiased(tau: float) -> None:
    replicates, n, v, draws = 20_000, 3, 50, 16
    c = teacher_case(10, n, v, tau)
    p = np.exp(c["t_lp"])
    rng = np.random.default_rng(11)
    counts_v = np.stack([rng.multinomial(draws, row / row.sum(), size=replicates) for row in p], axis=1)
    st = compact_counts(counts_v, c["t_lp"], draws)  # [R, n, draws]
    s_rep = np.broadcast_to(c["s"], (replicates, n, v)).reshape(-1, v)
    flat = {key: tt(val.reshape(replicates * n, draws)) for key, val in st.items()}
    mean = sampled_kl(tt(s_rep), flat["ids"], flat["logprobs"], flat["counts"], tau).item() / replicates
    per_replicate = np_sampled(s_rep, *(val.reshape(-1, draws) for val in st.values()), tau)
    stderr = per_replicate.reshape(replicates, n).sum(-1).std() / np.sqrt(replicates)
    exact = forward_kl_full(tt(c["s"]), tt(c["t_lp"]), tau).item()
    assert stderr < 0.01 * exact  # the tolerance below is tight, not vacuous
    assert abs(mean - exact) < 4 * stderr  # 4 standard errors, fixed seeds


# ---- DistillLoss ----


def make_batch(kind: str, b: int, t: int, v: int, tau: float, dtype: torch.dtype = torch.float64) -> Batch:
    """A batch with the extras a store of `kind` provides (k = 5 or 12 draws)."""
    c = teacher_case(12, b * t, v, tau)
    gen = torch.Generator().manual_seed(13)
    targets = torch.randint(v, (b, t), generator=gen)
    if kind == "full":
        extras = {"logprobs": c["t_lp"]}
    elif kind == "topk":
        extras = topk_store(c["t_lp"], 5)
    else:
        extras = sampled_store(c["t_lp"], draws=12, seed=14)
    ext = {key: tt(val).reshape(b, t, *val.shape[1:]) for key, val in extras.items()}
    ext = {key: val.to(dtype) if val.is_floating_point() else val for key, val in ext.items()}
    return Batch(inputs=targets, targets=targets, extras=ext)


def student_logits(b: int, t: int, v: int, dtype: torch.dtype = torch.float64) -> Tensor:
    gen = torch.Generator().manual_seed(15)
    return (torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 2).to(dtype).requires_grad_()


def kd_reference(loss: DistillLoss, logits: Tensor, batch: Batch) -> Tensor:
    s, e = logits.flatten(0, 1), {key: val.flatten(0, 1) for key, val in batch.extras.items()}
    div = kd_losses.DIVERGENCES[loss.divergence]
    if loss.kind == "full":
        return div.full(s, e["logprobs"], loss.tau)
    if loss.kind == "topk":
        return div.topk(s, e["ids"], e["logprobs"], e["tail_logmass"], loss.tau, loss.tail)
    return sampled_kl(s, e["ids"], e["logprobs"], e["counts"], loss.tau)


def ce_z_reference(logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    lse = logsumexp(logits, -1)
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float(ce.sum()), float((lse**2).sum())


@pytest.mark.parametrize("kind", ["full", "topk", "sampled"])
def test_lam_zero_is_cross_entropy_plus_z(kind: str) -> None:
    logits, batch = student_logits(2, 16, 61), make_batch(kind, 2, 16, 61, 1.0)
    out = DistillLoss(kind=kind, lam=0.0, z_loss=1e-3, chunk_bytes=rows(7, 61))(logits, batch)
    ce, z = ce_z_reference(logits.detach().numpy(), batch.targets.numpy())
    assert abs(out.total.item() - (ce + 1e-3 * z)) < ATOL
    assert out.tokens == 32 and abs(out.metrics["ce"] - ce) < ATOL and abs(out.metrics["z"] - z) < ATOL


def test_lam_zero_matches_next_token_loss_in_float32() -> None:
    logits = student_logits(2, 16, 61, torch.float32)
    batch = make_batch("full", 2, 16, 61, 1.0, torch.float32)
    ours = DistillLoss(kind="full", lam=0.0, z_loss=1e-4, chunk_bytes=rows(5, 61))(logits, batch)
    (g_ours,) = torch.autograd.grad(ours.total, logits)
    theirs = NextTokenLoss(1e-4)(logits, batch)
    (g_theirs,) = torch.autograd.grad(theirs.total, logits)
    torch.testing.assert_close(ours.total, theirs.total, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(g_ours, g_theirs, rtol=0.0, atol=1e-6)


CONFIGS = [
    {"kind": "full"},
    {"kind": "full", "divergence": "kl_reverse", "tau": 2.0},
    {"kind": "topk", "tail": "tail", "tau": 0.5},
    {"kind": "topk", "tail": "renormalize"},
    {"kind": "topk", "tail": "none"},
    {"kind": "topk", "divergence": "kl_reverse"},
    {"kind": "sampled", "tau": 2.0},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_lam_one_is_kd_plus_z(cfg: dict) -> None:
    loss = DistillLoss(**cfg, lam=1.0, z_loss=1e-3, chunk_bytes=rows(7, 61))
    logits, batch = student_logits(2, 16, 61), make_batch(cfg["kind"], 2, 16, 61, loss.tau)
    out = loss(logits, batch)
    kd = kd_reference(loss, logits, batch).item()
    ce, z = ce_z_reference(logits.detach().numpy(), batch.targets.numpy())
    assert abs(out.total.item() - (kd + 1e-3 * z)) < ATOL
    assert abs(out.metrics["kd"] - kd) < ATOL and abs(out.metrics["ce"] - ce) < ATOL


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_chunked_equals_unchunked(cfg: dict, lam: float) -> None:
    batch = make_batch(cfg["kind"], 3, 10, 61, cfg.get("tau", 1.0))
    results = []
    for chunk in (7, 30):  # 30 positions: one chunk; 7 leaves a ragged last chunk
        logits = student_logits(3, 10, 61)
        out = DistillLoss(**cfg, lam=lam, chunk_bytes=rows(chunk, 61))(logits, batch)
        out.total.backward()
        results.append((out, logits.grad))
    (a, ga), (b, gb) = results
    assert abs(a.total.item() - b.total.item()) < CHUNK_ATOL
    assert all(abs(a.metrics[m] - b.metrics[m]) < CHUNK_ATOL for m in ("ce", "kd", "z"))
    assert (ga - gb).abs().max().item() < CHUNK_ATOL


def test_no_grad_and_bf16_logits() -> None:
    batch = make_batch("topk", 2, 8, 61, 1.0, torch.float32)
    logits = student_logits(2, 8, 61, torch.bfloat16)
    loss = DistillLoss(kind="topk", lam=0.5, chunk_bytes=rows(4, 61))
    out = loss(logits, batch)
    assert out.total.dtype == torch.float32
    with torch.no_grad():
        ref = loss(logits.detach().float(), batch)
    assert abs(out.total.item() - ref.total.item()) < 1e-4 and not ref.total.requires_grad
    out.total.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


class LargestNewStorage(TorchDispatchMode):
    """Records the largest storage an op creates, ignoring storages that existed before."""

    def __init__(self, existing: list[Tensor]) -> None:
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in self.existing:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def forward_memory(loss: DistillLoss, logits: Tensor, batch: Batch) -> tuple[int, int]:
    """(bytes saved for backward, largest new storage), both ignoring the logits and batch.

    Saving a view of a tensor that exists anyway (checkpoint keeps its inputs: chunks of the
    logits and of the teacher's extras) costs no memory, so only new storages count.
    """
    inputs = [logits, batch.targets, *batch.extras.values()]
    existing = {t.untyped_storage().data_ptr() for t in inputs}
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        if t.untyped_storage().data_ptr() not in existing:
            saved += t.numel() * t.element_size()
        return t

    mode = LargestNewStorage(inputs)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
        out = loss(logits, batch)
    out.total.backward()  # the saved graph is usable
    return saved, mode.largest


@pytest.mark.parametrize("kind", ["full", "topk"])
def test_chunking_bounds_forward_memory(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    b, t, v, chunk = 4, 64, 4096, 32
    batch = make_batch(kind, b, t, v, 1.0, torch.float32)
    logits_bytes = b * t * v * 4
    loss = DistillLoss(kind=kind, lam=0.5, chunk_bytes=rows(chunk, v))
    saved, largest = forward_memory(loss, student_logits(b, t, v, torch.float32), batch)
    assert saved < logits_bytes
    assert largest <= chunk * v * 4  # no intermediate bigger than one chunk's float32 logits
    # Controls: the same measurements catch a loss that is not chunked, or (for a full store,
    # whose log-softmax is [chunk, V]) not checkpointed. Top-k keeps only [chunk, k] tensors
    # at tau = 1 and is not checkpointed at all.
    one_chunk = DistillLoss(kind=kind, lam=0.5, chunk_bytes=rows(b * t, v))
    unchunked_largest = forward_memory(one_chunk, student_logits(b, t, v, torch.float32), batch)[1]
    assert unchunked_largest >= logits_bytes if kind == "full" else unchunked_largest <= b * t * 64
    monkeypatch.setattr(losses, "checkpoint", lambda fn, *args, use_reentrant: fn(*args))
    unchecked = forward_memory(loss, student_logits(b, t, v, torch.float32), batch)[0]
    assert unchecked >= logits_bytes if kind == "full" else unchecked == saved


@pytest.mark.parametrize(
    "cfg",
    [
        {"kind": "logits"},
        {"kind": "full", "divergence": "kl_sym"},
        {"kind": "topk", "tail": "uniform"},
        {"kind": "topk", "divergence": "kl_reverse", "tail": "none"},
        {"kind": "sampled", "divergence": "kl_reverse"},
        {"kind": "full", "lam": 1.5},
        {"kind": "full", "tau": 0.0},
        {"kind": "full", "z_loss": -1.0},
        {"kind": "full", "chunk_bytes": 0},
    ],
)
def test_bad_config_is_a_train_error(cfg: dict) -> None:
    with pytest.raises(TrainError):
        DistillLoss(**cfg)


def test_missing_extra_is_a_train_error() -> None:
    batch = make_batch("full", 1, 4, 9, 1.0)
    with pytest.raises(TrainError, match="'ids'"):
        DistillLoss(kind="topk")(student_logits(1, 4, 9), batch)


# ---- distill_loss: the public function over dict batches ----


def as_dict(batch: Batch, tau: float | None = None) -> dict[str, Tensor]:
    """A `Batch` as the dict batches `distill_loss` takes (teacher_* keys, teacher_temperature)."""
    names = {extra: key for key, extra in batches.BATCH_KEYS.items()}
    d = {"input_ids": batch.inputs, "labels": batch.targets,
         **{names[extra]: val for extra, val in batch.extras.items()}}
    if tau is not None:
        d["teacher_temperature"] = torch.tensor(tau, dtype=torch.float32)
    return d


def test_batch_keys_cover_every_kind() -> None:
    # Read from the store's layout, in the order the loss functions take them.
    assert batches.KIND_EXTRAS == {"topk": ("ids", "logprobs", "tail_logmass"), "full": ("logprobs",),
                                   "sampled": ("ids", "logprobs", "counts")}
    extras = {e for kind_extras in batches.KIND_EXTRAS.values() for e in kind_extras}
    assert set(batches.BATCH_KEYS.values()) == extras
    assert all(key.startswith("teacher_") for key in batches.BATCH_KEYS)
    for kind in batches.KIND_EXTRAS:
        assert kd_losses.batch_kind(as_dict(make_batch(kind, 1, 2, 9, 1.0), 1.0)) == kind
    assert kd_losses.batch_kind({"input_ids": 0, "labels": 0}) is None


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_distill_loss_is_the_mean_of_distill_loss_sums(cfg: dict) -> None:
    tau = cfg.get("tau", 1.0)
    batch = make_batch(cfg["kind"], 2, 6, 61, tau)
    opts = {"divergence": cfg.get("divergence", "kl_forward"), "tail": cfg.get("tail", "tail")}
    logits = student_logits(2, 6, 61)
    got = kd_losses.distill_loss(as_dict(batch, tau), logits=logits, lam=0.5, z_loss=1e-3, **opts)
    want = DistillLoss(kind=cfg["kind"], lam=0.5, tau=tau, z_loss=1e-3, **opts)(logits, batch)
    assert got.dim() == 0 and got.requires_grad
    assert abs(got.item() - want.total.item() / 12) < 1e-12

    # The hidden-state path gives the same loss and gradients, with a padded head cut to V.
    hidden = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    head = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    from_hidden = kd_losses.distill_loss(as_dict(batch, tau), hidden=hidden, lm_head=head, vocab=61, **opts)
    g_hidden = torch.autograd.grad(from_hidden, [hidden, head])
    from_logits = kd_losses.distill_loss(as_dict(batch, tau), logits=hidden @ head.T, vocab=61, **opts)
    g_logits = torch.autograd.grad(from_logits, [hidden, head])
    assert abs(from_hidden.item() - from_logits.item()) <= 1e-10 * abs(from_logits.item())
    for a, b in zip(g_hidden, g_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    assert not g_hidden[1][61:].any()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
@pytest.mark.parametrize("student", [torch.float64, torch.float32])
def test_distill_loss_takes_targets_in_their_stored_dtypes(cfg: dict, student: torch.dtype) -> None:
    """StoreDataset hands log-probs over as float16, as stored; the loss widens them itself,
    a chunk at a time, to exactly the loss and gradients of the targets widened beforehand."""
    tau = cfg.get("tau", 1.0)
    batch = make_batch(cfg["kind"], 2, 6, 61, tau)
    stored = as_dict(batch, tau)
    stored["teacher_logprobs"] = stored["teacher_logprobs"].to(torch.float16)
    widened = {**stored, "teacher_logprobs": stored["teacher_logprobs"].to(student)}
    opts = {"divergence": cfg.get("divergence", "kl_forward"), "tail": cfg.get("tail", "tail")}
    results = []
    for d in (stored, widened):
        logits = student_logits(2, 6, 61, student)
        loss = kd_losses.distill_loss(d, logits=logits, lam=0.5, **opts)
        results.append((loss, *torch.autograd.grad(loss, logits)))
    for d in (stored, widened):  # the chunked hidden-state path, as `kdcache train` runs it
        gen = torch.Generator().manual_seed(3)
        hidden = torch.randn(2, 6, 8, dtype=student, generator=gen, requires_grad=True)
        head = torch.randn(61, 8, dtype=student, generator=gen)
        loss = kd_losses.distill_loss(d, hidden=hidden, lm_head=head, **opts)
        results.append((loss, *torch.autograd.grad(loss, hidden)))
    (got, g_got), (want, g_want), (h_got, gh_got), (h_want, gh_want) = results
    assert got.item() == want.item() and torch.equal(g_got, g_want)
    assert h_got.item() == h_want.item() and torch.equal(gh_got, gh_want)
    if student == torch.float64:  # and the float64 reference, from the widened values
        ref = DistillLoss(kind=cfg["kind"], lam=1.0, tau=tau, z_loss=0.0, **opts)
        ext = {batches.BATCH_KEYS[k]: v for k, v in widened.items() if k in batches.BATCH_KEYS}
        kd = kd_reference(ref, student_logits(2, 6, 61), Batch(batch.inputs, batch.targets, ext)).item()
        assert abs(kd_losses.distill_loss(stored, logits=student_logits(2, 6, 61), lam=1.0, z_loss=0.0,
                                          **opts).item() - kd / 12) < ATOL


def test_distill_loss_without_teacher_keys_is_supervised() -> None:
    batch = make_batch("full", 2, 6, 61, 1.0)
    logits = student_logits(2, 6, 61)
    plain = {"input_ids": batch.inputs, "labels": batch.targets}
    got = kd_losses.distill_loss(plain, logits=logits, z_loss=1e-3)
    assert abs(got.item() - NextTokenLoss(1e-3)(logits, batch).total.item() / 12) < 1e-12
    linear = torch.nn.Linear(8, 61, bias=False, dtype=torch.float64)  # a module works as lm_head
    hidden = torch.randn(2, 6, 8, dtype=torch.float64)
    assert abs(kd_losses.distill_loss(plain, hidden=hidden, lm_head=linear).item()
               - kd_losses.distill_loss(plain, logits=linear(hidden)).item()) < 1e-12


def test_distill_loss_defaults_are_kdcache_trains() -> None:
    import dataclasses
    import inspect

    from kdcache.train import job

    # Every settings dataclass of `kdcache train`, however the job config nests them.
    defaults: dict[str, set] = {}
    for obj in vars(job).values():
        if dataclasses.is_dataclass(obj) and isinstance(obj, type):
            for f in dataclasses.fields(obj):
                if f.default is not dataclasses.MISSING:
                    defaults.setdefault(f.name, set()).add(f.default)
    # Optimiser settings default by the kind of student: distill_loss takes the from-scratch one.
    for name, value in dataclasses.asdict(job.SCRATCH).items():
        if defaults.get(name) == {None}:
            defaults[name] = {value}
    params = inspect.signature(kd_losses.distill_loss).parameters
    for name in ("tail", "divergence", "lam", "z_loss"):
        assert defaults[name] == {params[name].default}, name


def test_distill_loss_reads_the_batch_temperature() -> None:
    batch = make_batch("topk", 2, 6, 61, 0.7)
    logits = student_logits(2, 6, 61)
    want = DistillLoss(kind="topk", tau=0.7)(logits, batch).total.item() / 12
    d = as_dict(batch, 0.7)  # stored as float32: 0.699999988
    assert kd_losses.distill_loss(d, logits=logits).item() == want  # the store's own 0.7
    assert kd_losses.distill_loss(d, logits=logits, temperature=0.7).item() == want
    with pytest.raises(ValueError, match="teacher_temperature"):
        kd_losses.distill_loss(d, logits=logits, temperature=1.0)
    no_temp = as_dict(batch)
    assert abs(kd_losses.distill_loss(no_temp, logits=logits).item()
               - DistillLoss(kind="topk")(logits, batch).total.item() / 12) < 1e-12


def test_distill_loss_cuts_a_padded_student() -> None:
    batch = make_batch("sampled", 2, 6, 61, 1.0)
    padded = torch.cat([student_logits(2, 6, 61), torch.full((2, 6, 3), 5.0, dtype=torch.float64)], -1)
    got = kd_losses.distill_loss(as_dict(batch), logits=padded, vocab=61)
    assert got.item() == kd_losses.distill_loss(as_dict(batch), logits=padded[..., :61]).item()
    assert got.item() != kd_losses.distill_loss(as_dict(batch), logits=padded).item()
    # A StoreDataset batch names its vocabulary: the cut is the default, a contradiction refused.
    named = {**as_dict(batch), batches.VOCAB_KEY: torch.tensor(61)}
    assert kd_losses.distill_loss(named, logits=padded).item() == got.item()
    with pytest.raises(ValueError, match="vocab=62 but the batch's vocab_size is 61"):
        kd_losses.distill_loss(named, logits=torch.cat([padded[..., :62]], -1), vocab=62)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "needs logits=, or hidden= and lm_head="),
        ({"hidden": "h"}, "needs lm_head="),
        ({"lm_head": "w"}, "needs hidden="),
        ({"logits": "s", "hidden": "h", "lm_head": "w"}, "not both"),
        ({"logits": "s", "tail": "uniform"}, "tail mode"),
        ({"logits": "s", "divergence": "kl_sym"}, "divergence"),
        ({"logits": "s", "lam": 2.0}, "lam"),
        ({"logits": "s", "vocab": 62}, "vocab"),
        ({"hidden": "h", "lm_head": "w", "vocab": 62}, "vocab"),
    ],
)
def test_distill_loss_refuses_bad_arguments(kwargs: dict, match: str) -> None:
    values = {"s": student_logits(1, 4, 61), "h": torch.zeros(1, 4, 8, dtype=torch.float64),
              "w": torch.zeros(61, 8, dtype=torch.float64)}
    kwargs = {k: values.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    ids = torch.zeros(1, 4, dtype=torch.long)
    for batch in (as_dict(make_batch("topk", 1, 4, 61, 1.0)), {"input_ids": ids, "labels": ids}):
        with pytest.raises(ValueError, match=match):
            kd_losses.distill_loss(batch, **kwargs)


def test_distill_loss_refuses_a_batch_of_no_kind() -> None:
    batch = as_dict(make_batch("topk", 1, 4, 61, 1.0))
    del batch["teacher_tail_logmass"]
    with pytest.raises(ValueError, match="match no store kind"):
        kd_losses.distill_loss(batch, logits=student_logits(1, 4, 61))
    with pytest.raises(ValueError, match="labels"):
        kd_losses.distill_loss({"input_ids": batch["input_ids"]}, logits=student_logits(1, 4, 61))


def test_registries_are_the_flags_the_command_line_accepts() -> None:
    """job.py keeps the names torch-free for `kdcache train --help`; the losses must match them."""
    assert set(kd_losses.DIVERGENCES) == set(job.DIVERGENCES)
    assert set(kd_losses.TAIL_MODES) == set(job.TAILS)
