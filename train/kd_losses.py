"""Distillation losses: pure tensor functions over flattened positions, the trainer's
`DistillLoss`, and `distill_loss`, the public function over dict batches.

Every function takes student logits `s` [N, V] and the teacher targets a logit store holds
for those positions, and returns the SUM over positions of a divergence at temperature tau:
the student is softened as s / tau and the result scaled by tau**2, so gradients match
L_KD = -tau^2 sum_a softmax(z_T/tau)_a log softmax(z_S/tau)_a. The teacher-entropy term is
included (KL rather than cross-entropy) so exact divergences are >= 0.

Top-k stores keep the k most probable ids; `tail` names how the rest of the vocabulary is
treated (`TAIL_MODES`):

- `renormalize`: teacher and student both renormalised over the k ids.
- `tail`: k + 1 categories, the k ids plus one "rest" category holding the stored
  `tail_logmass` for the teacher and the student's mass outside the k ids.
- `none`: the raw top-k terms of forward KL with unrenormalised probabilities; not a
  divergence (it can be negative) and not defined for reverse KL.

Sampled stores hold ids drawn from the teacher at temperature tau with their draw counts;
`sampled_kl` is an unbiased Monte-Carlo estimate of forward KL. Ids within a position are
assumed unique (the stores write them so).

`DistillLoss` combines a divergence with next-token cross-entropy and the z-loss over
chunks of positions, from logits or (`from_hidden`) from the final hidden states and the
output layer, never holding more than a chunk of the logits (losses.py says why). Training
code outside this package calls `distill_loss(batch, logits=...)` or `distill_loss(batch,
hidden=..., lm_head=...)` on dict batches, whose teacher keys (`batches.BATCH_KEYS`) say the
store kind; it is the same `DistillLoss` / `NextTokenLoss` math, averaged over the batch's
trained tokens. Positions labelled -100 are left out of every term (`losses.trained_index`).

The divergences and tail modes are the ones `kdcache train` accepts (`job.DIVERGENCES`,
`job.TAILS`, torch-free for the CLI); a test keeps the registries here in step with them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdcache.storage import KINDS, Kind
from kdcache.train.batches import (
    BATCH_KEYS,
    KIND_EXTRAS,
    TEMPERATURE_KEY,
    VOCAB_KEY,
    Batch,
    batch_from_dict,
)
from kdcache.train.errors import TrainError
from kdcache.train.losses import (
    LOSS_CHUNK_BYTES,
    LossSums,
    NextTokenLoss,
    check_chunk_bytes,
    head_logits,
    needs_grad,
    output_rows,
    positions_per_chunk,
    sum_chunks,
    trained_index,
    trained_rows,
)

NEG_INF = float("-inf")


def _kl_sum(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum p (log p - log q) over every element; categories with p = 0 contribute 0."""
    # Filling both sides where p = 0 keeps -inf (and -inf - -inf = nan) out of the value and
    # out of the gradient, which `torch.where` alone would not.
    empty = torch.isneginf(log_p)
    log_p, log_q = log_p.masked_fill(empty, 0.0), log_q.masked_fill(empty, 0.0)
    return (log_p.exp() * (log_p - log_q)).sum()


def _log_rest_mass(log_q_k: Tensor, vocab: int) -> Tensor:
    """log of the student's mass outside its k ids, from the k log-probs alone.

    log(1 - sum_k q) costs a pass over k, not over the vocabulary. It is exact up to the
    rounding of 1 - sum_k q (~1e-7 in float32), so a rest mass far below that reads as 0;
    such a category then barely moves the KL, whose term for it is p_rest (log p_rest -
    log q_rest) with p_rest near 0 as well. With k = V there is no rest: -inf.
    """
    if log_q_k.shape[-1] >= vocab:
        return torch.full_like(log_q_k[..., 0], NEG_INF)
    log_mass_k = torch.logsumexp(log_q_k, -1).clamp(max=0.0)
    return torch.log((-torch.expm1(log_mass_k)).clamp_min(torch.finfo(log_q_k.dtype).tiny))


def _renormalized(
    z: Tensor, lse: Tensor, ids: Tensor, t_lp: Tensor, tail_logmass: Tensor
) -> tuple[Tensor, Tensor]:
    z_k = z.gather(-1, ids)
    return t_lp - torch.logsumexp(t_lp, -1, keepdim=True), z_k - torch.logsumexp(z_k, -1, keepdim=True)


def _with_tail(
    z: Tensor, lse: Tensor, ids: Tensor, t_lp: Tensor, tail_logmass: Tensor
) -> tuple[Tensor, Tensor]:
    log_q_k = z.gather(-1, ids) - lse.unsqueeze(-1)
    log_q_rest = _log_rest_mass(log_q_k, z.shape[-1])
    # With no ids outside the k (k = V) the rest category does not exist; a stored tail
    # there is rounding in 1 - sum(p), which would otherwise make the KL infinite.
    log_p_rest = tail_logmass.masked_fill(torch.isneginf(log_q_rest), NEG_INF)
    return torch.cat([t_lp, log_p_rest.unsqueeze(-1)], -1), torch.cat([log_q_k, log_q_rest.unsqueeze(-1)], -1)


def _raw_topk(
    z: Tensor, lse: Tensor, ids: Tensor, t_lp: Tensor, tail_logmass: Tensor
) -> tuple[Tensor, Tensor]:
    return t_lp, z.gather(-1, ids) - lse.unsqueeze(-1)


def _scaled(s: Tensor, tau: float, lse: Tensor | None) -> tuple[Tensor, Tensor]:
    """(s / tau, its log-normaliser); a caller's `lse` of s / tau saves a pass over V."""
    z = s if tau == 1.0 else s / tau
    return z, torch.logsumexp(z, -1) if lse is None else lse


TAIL_MODES: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]] = {
    "renormalize": _renormalized,
    "tail": _with_tail,
    "none": _raw_topk,
}
"""Tail mode -> (z = s/tau, logsumexp z, ids, teacher log-probs, tail log-mass) -> (log p, log q)."""


def topk_categories(
    s: Tensor, ids: Tensor, t_logprobs: Tensor, tail_logmass: Tensor, tau: float, tail: str,
    lse: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs [N, k] (k + 1 for `tail`) over the categories of a tail mode."""
    if tail not in TAIL_MODES:
        raise ValueError(f"unknown tail mode {tail!r}; expected one of {sorted(TAIL_MODES)}")
    z, lse = _scaled(s, tau, lse)
    return TAIL_MODES[tail](z, lse, ids, t_logprobs.to(z.dtype), tail_logmass.to(z.dtype))


def forward_kl_full(s: Tensor, t_logprobs: Tensor, tau: float, lse: Tensor | None = None) -> Tensor:
    """tau^2 sum_n KL(p || q) with p the stored full-vocabulary teacher log-probs [N, V]."""
    z, lse = _scaled(s, tau, lse)
    log_q = z - lse.unsqueeze(-1)
    return tau**2 * _kl_sum(t_logprobs.to(log_q.dtype), log_q)


def reverse_kl_full(s: Tensor, t_logprobs: Tensor, tau: float, lse: Tensor | None = None) -> Tensor:
    """tau^2 sum_n KL(q || p): mode-seeking; infinite where the teacher has no mass."""
    z, lse = _scaled(s, tau, lse)
    log_q = z - lse.unsqueeze(-1)
    return tau**2 * _kl_sum(log_q, t_logprobs.to(log_q.dtype))


def forward_kl_topk(
    s: Tensor, ids: Tensor, t_logprobs: Tensor, tail_logmass: Tensor, tau: float, tail: str = "tail",
    lse: Tensor | None = None,
) -> Tensor:
    """tau^2 sum_n KL(p || q) over the categories of `tail` (see the module docstring)."""
    log_p, log_q = topk_categories(s, ids, t_logprobs, tail_logmass, tau, tail, lse)
    return tau**2 * _kl_sum(log_p, log_q)


def reverse_kl_topk(
    s: Tensor, ids: Tensor, t_logprobs: Tensor, tail_logmass: Tensor, tau: float, tail: str = "tail",
    lse: Tensor | None = None,
) -> Tensor:
    """tau^2 sum_n KL(q || p) over `tail` (k + 1 categories) or `renormalize` (k categories).

    Reverse KL weighs by the student, so it needs a teacher probability for every category
    the student puts mass on: the raw top-k terms (`none`) leave the rest out and are refused.
    """
    if tail == "none":
        raise ValueError("reverse KL is not defined for tail mode 'none'; use 'tail' or 'renormalize'")
    log_p, log_q = topk_categories(s, ids, t_logprobs, tail_logmass, tau, tail, lse)
    return tau**2 * _kl_sum(log_q, log_p)


def sampled_kl(
    s: Tensor, ids: Tensor, t_logprobs: Tensor, counts: Tensor, tau: float, lse: Tensor | None = None
) -> Tensor:
    """Importance-weighted Monte-Carlo estimate of tau^2 sum_n KL(p || q) from a sampled store.

    The ids were drawn `draws` = sum(counts) times from p itself (the teacher at tau), so the
    proposal equals the target and the weight of id a is counts_a / draws. Since
    E[counts_a] = draws * p_a, E[sum_a (counts_a / draws)(log p_a - log q_a)] = KL(p || q):
    unbiased, though a single estimate can be negative. Unused slots (count 0) weigh 0.
    """
    z, lse = _scaled(s, tau, lse)
    log_q = z.gather(-1, ids) - lse.unsqueeze(-1)
    counts = counts.to(z.dtype)
    weights = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    return tau**2 * (weights * (t_logprobs.to(z.dtype) - log_q)).sum()


@dataclass(frozen=True)
class Divergence:
    """A divergence's function per store kind; `sampled` is None where it has no estimator."""

    full: Callable[..., Tensor]
    topk: Callable[..., Tensor]
    sampled: Callable[..., Tensor] | None
    tail_modes: tuple[str, ...]


DIVERGENCES: dict[str, Divergence] = {
    "kl_forward": Divergence(forward_kl_full, forward_kl_topk, sampled_kl, ("renormalize", "tail", "none")),
    "kl_reverse": Divergence(reverse_kl_full, reverse_kl_topk, None, ("renormalize", "tail")),
}


@dataclass(frozen=True, kw_only=True)
class DistillLoss:
    """(1 - lam) * NTP + lam * KD + z_loss * Z, summed over positions, computed in chunks.

    `__call__` takes logits [B, T, V]; `from_hidden` takes the final hidden states and the
    output layer's weight and never holds more than one chunk's logits (losses.py).
    """

    kind: Kind
    """Store kind: full | topk | sampled; says which `Batch.extras` the loss reads (`KIND_EXTRAS`)."""
    divergence: str = "kl_forward"
    """kl_forward | kl_reverse (reverse has no sampled estimator)."""
    tail: str = "tail"
    """Top-k tail handling: renormalize | tail | none (forward only)."""
    lam: float = 1.0
    """Weight of the distillation term; 1 - lam goes to next-token cross-entropy."""
    tau: float = 1.0
    """Distillation temperature; must match the temperature the store was written at."""
    z_loss: float = 1e-4
    """Weight of log(Z)^2 of the student's logits at temperature 1."""
    chunk_bytes: int = LOSS_CHUNK_BYTES
    """Bytes of float32 logits per chunk: bounds the float32 activations to about this much."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TrainError(f"unknown store kind {self.kind!r}; expected one of {sorted(KINDS)}")
        if self.divergence not in DIVERGENCES:
            raise TrainError(f"unknown divergence {self.divergence!r}; expected one of {sorted(DIVERGENCES)}")
        if self.tail not in TAIL_MODES:
            raise TrainError(f"unknown tail mode {self.tail!r}; expected one of {sorted(TAIL_MODES)}")
        div = DIVERGENCES[self.divergence]
        if self.kind == "sampled" and div.sampled is None:
            raise TrainError(f"{self.divergence} has no estimator for sampled stores; use kl_forward")
        if self.kind == "topk" and self.tail not in div.tail_modes:
            raise TrainError(f"{self.divergence} is not defined for tail mode {self.tail!r}")
        if not 0.0 <= self.lam <= 1.0:
            raise TrainError(f"lam must be in [0, 1], got {self.lam}")
        if not self.tau > 0.0:
            raise TrainError(f"tau must be > 0, got {self.tau}")
        if not self.z_loss >= 0.0:
            raise TrainError(f"z_loss must be >= 0, got {self.z_loss}")
        check_chunk_bytes(self.chunk_bytes)

    def __call__(self, logits: Tensor, batch: Batch) -> LossSums:
        s, targets = logits.flatten(0, -2), batch.targets.reshape(-1)
        extras = self._extras(batch, logits.shape[:-1])
        rows = trained_index(targets)
        # A chunk that would keep [chunk, V] tensors for backward (a full store's log-softmax,
        # logits scaled by tau, upcast from bf16, or selected to the trained rows) is
        # checkpointed: only its inputs (views) are kept, and it is recomputed in backward.
        # Top-k and sampled losses at tau = 1 on float32 logits, every position trained, keep
        # only [chunk, k] tensors, so they skip the recomputation.
        keeps_vocab = (self.kind == "full" or self.tau != 1.0 or s.dtype != torch.float32
                       or rows is not None)
        sums = sum_chunks(self._chunk_sums, [s, targets, *extras],
                          positions=positions_per_chunk(self.chunk_bytes, s.shape[-1]),
                          recompute=needs_grad(s) and keeps_vocab, rows=rows)
        return self._result(sums, batch)

    def from_hidden(
        self, hidden: Tensor, head: Tensor, batch: Batch, *, vocab: int | None = None
    ) -> LossSums:
        """The loss of logits hidden @ head[:vocab].T, never holding more than a chunk of them.

        `hidden` [B, T, d], `head` the output layer's weight [V_rows, d]; with a padded layer
        (V_rows > vocab) the padding rows are left out and get a zero gradient.
        """
        h, w = output_rows(hidden, head, vocab)
        targets, h, *extras = trained_rows(batch.targets.reshape(-1), h,
                                           *self._extras(batch, hidden.shape[:-1]))
        sums = sum_chunks(lambda w, h, *rest: self._chunk_sums(head_logits(h, w), *rest),
                          [h, targets, *extras], shared=[w],
                          positions=positions_per_chunk(self.chunk_bytes, w.shape[0]),
                          recompute=needs_grad(h, w))
        return self._result(sums, batch)

    def _extras(self, batch: Batch, lead: torch.Size) -> list[Tensor]:
        return [_flat_extra(batch, key, lead) for key in KIND_EXTRAS[self.kind]]

    def _result(self, sums: Tensor, batch: Batch) -> LossSums:
        ce, kd, z = sums[1:].tolist()
        return LossSums(total=sums[0].clone(), tokens=batch.tokens, metrics={"ce": ce, "kd": kd, "z": z})

    def _chunk_sums(self, s: Tensor, targets: Tensor, *extras: Tensor) -> Tensor:
        """[total, ce, kd, z] sums over one chunk; only `total` carries a gradient."""
        s = s.to(torch.promote_types(s.dtype, torch.float32))
        lse = torch.logsumexp(s, -1)
        z = lse.pow(2).sum()
        with torch.set_grad_enabled(self.lam < 1.0 and torch.is_grad_enabled()):
            ce = (lse - s.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).sum()
        with torch.set_grad_enabled(self.lam > 0.0 and torch.is_grad_enabled()):
            kd = self._kd_sum(s, lse if self.tau == 1.0 else None, *extras)
        total = self.z_loss * z
        if self.lam < 1.0:
            total = total + (1.0 - self.lam) * ce
        if self.lam > 0.0:
            total = total + self.lam * kd
        return torch.stack([total, ce.detach(), kd.detach(), z.detach()])

    def _kd_sum(self, s: Tensor, lse: Tensor | None, *extras: Tensor) -> Tensor:
        div = DIVERGENCES[self.divergence]
        if self.kind == "full":
            (t_lp,) = extras
            return div.full(s, t_lp, self.tau, lse)
        if self.kind == "topk":
            ids, t_lp, tail_logmass = extras
            return div.topk(s, ids.long(), t_lp, tail_logmass, self.tau, self.tail, lse)
        assert div.sampled is not None
        ids, t_lp, counts = extras
        return div.sampled(s, ids.long(), t_lp, counts, self.tau, lse)


def _flat_extra(batch: Batch, key: str, lead: torch.Size) -> Tensor:
    """`batch.extras[key]` with its leading [B, T] flattened to match the flattened logits."""
    if key not in batch.extras:
        raise TrainError(f"batch has no {key!r} extra (has {sorted(batch.extras)}); wrong store kind?")
    t = batch.extras[key]
    if t.shape[: len(lead)] != lead:
        raise TrainError(f"extra {key!r} has shape {tuple(t.shape)}, expected leading {tuple(lead)}")
    return t.flatten(0, len(lead) - 1)


# ---- the public function over dict batches ----


def batch_kind(batch: Mapping[str, Any]) -> Kind | None:
    """The store kind a batch dict's teacher keys say; None for a batch with no teacher keys."""
    present = {BATCH_KEYS[key] for key in batch if key in BATCH_KEYS}
    if not present:
        return None
    for kind, extras in KIND_EXTRAS.items():
        if present == set(extras):
            return kind
    names = {extra: key for key, extra in BATCH_KEYS.items()}
    expected = "; ".join(f"{kind}: {', '.join(names[e] for e in extras)}"
                         for kind, extras in KIND_EXTRAS.items())
    have = ", ".join(names[e] for e in sorted(present))
    raise ValueError(f"batch has teacher keys {have}, which match no store kind ({expected})")


def _temperature(batch: Mapping[str, Any], temperature: float | None) -> float:
    """The distillation temperature: the batch's (the store's), which an explicit one must equal."""
    if TEMPERATURE_KEY not in batch:
        return 1.0 if temperature is None else float(temperature)
    stored = np.float32(batch[TEMPERATURE_KEY].item() if isinstance(batch[TEMPERATURE_KEY], Tensor)
                        else batch[TEMPERATURE_KEY])
    if temperature is not None and np.float32(temperature) != stored:
        raise ValueError(
            f"temperature={temperature} but the batch's {TEMPERATURE_KEY} is {stored} (the stored "
            "log-probs fix the temperature; cache again to change it)"
        )
    # The shortest decimal that rounds to the stored float32: the store's own temperature
    # (0.7, not 0.699999988), so the loss equals `kdcache train`'s.
    return float(str(stored)) if temperature is None else float(temperature)


def _head_weight(lm_head: Tensor | torch.nn.Module) -> Tensor:
    if isinstance(lm_head, Tensor):
        return lm_head
    weight, bias = getattr(lm_head, "weight", None), getattr(lm_head, "bias", None)
    if not isinstance(weight, Tensor) or bias is not None:
        raise ValueError("lm_head= must be the output layer's weight [V, d] (or a Linear without bias)")
    return weight


def distill_loss(
    batch: Mapping[str, Any],
    *,
    logits: Tensor | None = None,
    hidden: Tensor | None = None,
    lm_head: Tensor | torch.nn.Module | None = None,
    tail: str = "tail",
    divergence: str = "kl_forward",
    lam: float = 1.0,
    temperature: float | None = None,
    z_loss: float = 1e-4,
    vocab: int | None = None,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """The training loss of one batch dict: its mean over the batch's trained tokens.

    `labels` of -100 mark untrained positions (Hugging Face's convention): they are left out
    of every term, and the mean is over the rest. `num_items_in_batch` (the name
    `transformers.Trainer` passes to `compute_loss`) divides the sum by that count instead:
    the trained tokens of every micro-batch of a gradient-accumulation step (and of every
    rank), so each token weighs the same however the step's batches are cut.

    Give the student's `logits` [B, T, V], or its final `hidden` states [B, T, d] with the
    output layer's weight `lm_head` [V, d]; the latter never holds more than a chunk of
    the logits (`DistillLoss.from_hidden`). The batch's teacher keys say the store kind
    (`batch_kind`); a batch with none gives the supervised loss, cross-entropy + z-loss.
    Otherwise the loss is (1 - lam) * cross-entropy + lam * KD + z_loss * log(Z)^2, with
    `tail` and `divergence` as in `DistillLoss`, at the batch's `teacher_temperature`
    (an explicit `temperature` must equal it). `vocab` cuts a padded student to its first
    `vocab` ids; it defaults to the batch's `vocab_size` (a `StoreDataset` batch has it), so
    a padded head's extra rows never take probability mass. Teacher targets may come in
    any dtype (a `StoreDataset` batch keeps its log-probs float16, as stored): each chunk
    is widened on the logits' device to their precision (float32 at least), so the loss is
    exactly that of targets widened beforehand. The defaults are `kdcache train`'s for a
    student trained from scratch (its fine-tuning recipe has no z-loss: pass `z_loss=0`). Bad
    arguments raise ValueError.
    """
    if logits is not None and (hidden is not None or lm_head is not None):
        raise ValueError("give logits= or hidden= with lm_head=, not both")
    if logits is None:
        if hidden is None and lm_head is None:
            raise ValueError("distill_loss needs logits=, or hidden= and lm_head=")
        if lm_head is None:
            raise ValueError("hidden= needs lm_head= (the output layer's weight [V, d])")
        if hidden is None:
            raise ValueError("lm_head= needs hidden= (the student's final hidden states [B, T, d])")
    if VOCAB_KEY in batch:
        stored = int(batch[VOCAB_KEY])
        if vocab is not None and vocab != stored:
            raise ValueError(f"vocab={vocab} but the batch's {VOCAB_KEY} is {stored}")
        vocab = stored
    try:
        b, kind = batch_from_dict(batch), batch_kind(batch)
        loss: NextTokenLoss | DistillLoss
        if kind is None:
            # Checked as a distillation batch would be, so a typo does not wait for a store.
            DistillLoss(kind="full", divergence=divergence, tail=tail, lam=lam, z_loss=z_loss)
            loss = NextTokenLoss(z_loss)
        else:
            loss = DistillLoss(kind=kind, divergence=divergence, tail=tail, lam=lam,
                               tau=_temperature(batch, temperature), z_loss=z_loss)
        if logits is not None:
            if vocab is not None:
                if not 1 <= vocab <= logits.shape[-1]:
                    raise ValueError(f"vocab {vocab} must lie in [1, {logits.shape[-1]}] (the logits' size)")
                logits = logits[..., :vocab]
            sums = loss(logits, b)
        else:
            assert hidden is not None and lm_head is not None
            sums = loss.from_hidden(hidden, _head_weight(lm_head), b, vocab=vocab)
    except TrainError as e:
        raise ValueError(str(e)) from e
    if num_items_in_batch is not None:
        return sums.total / num_items_in_batch
    return sums.total / max(sums.tokens, 1)  # a batch with nothing trained: 0, in the graph
