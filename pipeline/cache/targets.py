"""Turn a teacher's logits into the arrays a logit store holds (topk, full or sampled).

Pure torch, float32, over a flat run of positions: the trained positions of a batch of
rows, gathered before the output layer so that untrained ones are never projected, and
placed back into rows afterwards (`place_trained`), the others holding the store's fill.
Every quantity is normalised over the whole vocabulary: top-k log-probs are not
renormalised over k. The tail, the log of the
probability outside the top k, is the log-sum-exp of the logits outside the top k minus
the log-normaliser. Computed as log(1 - sum of the k probabilities) it would cancel: at a
peaked position the k probabilities sum to 1 in float32 while the true tail is ~1e-6,
and a positive tail would be stored as -inf. From the logits it is exact to float32's
relative precision however small it is.

`target_logprob` is at temperature 1, so the store's `teacher_loss` is the teacher's
real cross-entropy whatever temperature the targets were cached at.

A top-k spec with further `temperatures` also returns, per temperature tau_j, the
log-normaliser at tau_j relative to the stored one and the tail at tau_j (`tau_logz`,
`tau_tail_logmass`): two more log-sum-exps over the vocabulary per temperature, and a
student can then train at tau_j from the same ids (layout.at_temperature).

Top-k needs no full log-softmax: a top-k over the raw logits and two log-sum-exps per
position (all ids, and all but the top k) give the same numbers without writing the
[B, T, V] log-probs, which at small model sizes cost as much as the forward pass itself.

Padded output layers (Qwen2.5: 151,665 tokens over 151,936 rows) are cut to the
tokenizer's `vocab` ids before anything else, so every quantity is normalised over the
real ids; the probability mass the padded rows held is returned per position as
`padded_mass` (not a store array: the cache job sums it into the ledger). Logits arrive
in any dtype and on any device; the arithmetic is float32 there, and only [N, k]-sized
results move to the host.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import Tensor

from kdcache.pipeline.cache.teachers import TargetSpec
from kdcache.pipeline.errors import PipelineError
from kdcache.storage import id_dtype
from kdcache.storage.layout import untrained_fill


def targets_from_logits(
    logits: Tensor, next_ids: np.ndarray, spec: TargetSpec, rows: np.ndarray, positions: np.ndarray
) -> dict[str, np.ndarray]:
    """Store arrays for N positions given the teacher's logits there [N, output rows].

    `next_ids` [N] are the true next tokens; `rows` [N] (the split's row index) and
    `positions` [N] (the position within that row) say where each one is: they seed the
    sampled kind's draws, and the first row names where non-finite logits came from.
    """
    out_rows = logits.shape[-1]
    if out_rows < spec.vocab:
        raise PipelineError(f"teacher output layer has {out_rows} rows, fewer than the vocabulary "
                            f"{spec.vocab}")
    full = logits.float()
    logits = full[..., : spec.vocab]
    nxt = torch.from_numpy(np.asarray(next_ids, dtype=np.int64)).unsqueeze(-1).to(logits.device)
    scaled = logits if spec.temperature == 1.0 else logits / spec.temperature
    # NaN or +inf anywhere in a position's logits shows up in its log-normaliser.
    logz = torch.logsumexp(scaled, -1, keepdim=True)
    logz1 = logz if spec.temperature == 1.0 else torch.logsumexp(logits, -1, keepdim=True)
    if not (torch.isfinite(logz).all() and torch.isfinite(logz1).all()):
        raise PipelineError(f"teacher produced non-finite logits for rows from {int(rows.min())}")
    target = (logits.gather(-1, nxt) - logz1).squeeze(-1)
    out = {"target_logprob": _host(target)}
    if out_rows > spec.vocab:  # 1 - Z_real / Z_all, at temperature 1
        out["padded_mass"] = _host(-torch.expm1(logz1 - torch.logsumexp(full, -1, keepdim=True))[..., 0])
    else:
        out["padded_mass"] = np.zeros(target.shape, dtype=np.float32)
    if spec.kind == "topk":
        top, ids = torch.topk(scaled, spec.k, dim=-1, sorted=True)
        rest = scaled.scatter(-1, ids, float("-inf"))  # a copy: `scaled` may be the caller's logits
        out["ids"] = _host(ids).astype(id_dtype(spec.vocab))
        out["logprobs"] = _host(top - logz).astype(np.float16)
        out["tail_logmass"] = _host(torch.logsumexp(rest, -1) - logz[..., 0]).astype(np.float32)
        if spec.temperatures:
            out.update(_other_temperatures(scaled, rest, logz, spec))
    elif spec.kind == "full":
        out["logprobs"] = _host(scaled - logz).astype(np.float16)
    else:
        out.update(_sampled(scaled - logz, spec, rows, positions))
    return out


def _other_temperatures(scaled: Tensor, rest: Tensor, logz: Tensor,
                        spec: TargetSpec) -> dict[str, np.ndarray]:
    """`tau_logz` and `tau_tail_logmass` [N, len(temperatures)] (layout.TEMPERATURE_ARRAYS):
    each temperature's log-normaliser less (tau / tau_j) times the stored one, and its tail."""
    shifts, tails = [], []
    for tau in spec.temperatures:
        ratio = spec.temperature / tau
        logz_j = torch.logsumexp(scaled * ratio, -1)
        shifts.append(logz_j - ratio * logz[..., 0])
        tails.append(torch.logsumexp(rest * ratio, -1) - logz_j)
    return {"tau_logz": _host(torch.stack(shifts, -1)).astype(np.float32),
            "tau_tail_logmass": _host(torch.stack(tails, -1)).astype(np.float32)}


def place_trained(flat: dict[str, np.ndarray], trained: np.ndarray, draws: int = 0) -> dict[str, np.ndarray]:
    """Arrays of the trained positions ([N, ...], row-major order of `trained` [B, T]) as
    [B, T, ...] arrays whose untrained positions hold the store's fill (`untrained_fill`)."""
    out = {}
    for name, values in flat.items():
        grid = untrained_fill(name, (*trained.shape, *values.shape[1:]), values.dtype, draws)
        grid[trained] = values
        out[name] = grid
    return out


def _host(x: Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _sampled(logp: Tensor, spec: TargetSpec, rows: np.ndarray,
             positions: np.ndarray) -> dict[str, np.ndarray]:
    """`draws` samples per position, stored as unique ids with counts, most probable first.

    Each run of one row's positions draws from a generator seeded by (seed, row index, the
    run's first position), so the samples do not depend on which worker runs the rows.
    """
    n = logp.shape[0]
    logp = logp.cpu()
    probs = logp.exp()
    samples = torch.empty(n, spec.draws, dtype=torch.int64)
    runs = np.flatnonzero(np.diff(rows, prepend=-1) != 0).tolist()
    for lo, hi in itertools.pairwise([*runs, n] if n else []):
        seed = spec.seed * 1_000_003 + int(rows[lo]) + int(positions[lo]) * 1_000_000_007
        gen = torch.Generator().manual_seed(seed)
        samples[lo:hi] = torch.multinomial(probs[lo:hi], spec.draws, replacement=True, generator=gen)
    s = samples.sort(-1).values
    starts = torch.ones_like(s, dtype=torch.bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = starts.long().cumsum(-1) - 1
    ids = torch.zeros_like(s).scatter_(1, slot, s)
    counts = torch.zeros_like(s).scatter_add_(1, slot, torch.ones_like(s))
    used = torch.arange(spec.draws).expand_as(s) < starts.sum(-1, keepdim=True)
    lp = logp.gather(1, ids).masked_fill(~used, float("-inf"))
    order = torch.sort(lp, dim=-1, descending=True, stable=True).indices
    ids, counts, lp = (x.gather(1, order) for x in (ids, counts, lp))
    return {
        "ids": ids.masked_fill(counts == 0, 0).numpy().astype(id_dtype(spec.vocab)),
        "logprobs": lp.masked_fill(counts == 0, 0.0).numpy().astype(np.float16),
        "counts": counts.numpy().astype(np.uint8),
    }
