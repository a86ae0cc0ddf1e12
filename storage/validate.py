"""Checks a shard's arrays against the store's layout before anything is written.

A shard of a store over documents is also checked against its own `loss_mask` and
`position_ids` by the token data's own rules (`document_problem`: the mask is 0 or 1 and
never trains a document's first token, positions step by one or restart at 0), and its
untrained positions must hold exactly the fill values (`layout.untrained_fill`), so the
bytes of what no student reads stay fixed and small.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from kdcache.storage.errors import StoreError
from kdcache.storage.layout import ARRAYS_BY_KIND, TEMPERATURE_ARRAYS, ArraySpec, untrained_fill
from kdcache.storage.metadata import StoreMeta
from kdcache.storage.tokens.format import document_problem

# fp16 rounding can lift a log-prob of -1e-4 to 0; anything above this is a bug upstream.
_MAX_LOGPROB = 1e-3


def validate_shard(
    meta: StoreMeta,
    specs: Mapping[str, ArraySpec],
    arrays: Mapping[str, np.ndarray],
    rows: int,
    where: str,
) -> dict[str, np.ndarray]:
    """The shard's arrays as C-contiguous arrays of the store's dtypes, or a StoreError."""
    missing = set(specs) - set(arrays)
    extra = set(arrays) - set(specs)
    if missing or extra:
        raise StoreError(
            f"{where}: a {meta.kind} shard needs arrays {sorted(specs)}; "
            f"missing {sorted(missing)}, unexpected {sorted(extra)}"
        )
    out = {}
    for name, spec in specs.items():
        value = np.asarray(arrays[name])
        shape = (rows, *spec.row_shape)
        if value.shape != shape:
            raise StoreError(f"{where}: array '{name}' has shape {value.shape}, expected {shape}")
        if value.dtype != spec.dtype:
            raise StoreError(f"{where}: array '{name}' has dtype {value.dtype}, expected {spec.dtype}")
        out[name] = np.ascontiguousarray(value)
    _check_values(meta, out, where)
    if meta.documents:
        _check_documents(meta, out, where)
    return out


def _check_documents(meta: StoreMeta, data: Mapping[str, np.ndarray], where: str) -> None:
    mask = data["loss_mask"]
    problem = document_problem(mask, data["position_ids"], meta.seq_len + 1)
    if problem is not None:
        raise StoreError(f"{where}: arrays 'loss_mask', 'position_ids': {problem}")
    untrained = ~mask[:, 1:].astype(bool)
    for name in (n for n in (*ARRAYS_BY_KIND[meta.kind], *TEMPERATURE_ARRAYS) if n != "tokens" and n in data):
        values = data[name][untrained]
        if not np.array_equal(values, untrained_fill(name, values.shape, values.dtype, meta.draws or 0)):
            raise StoreError(f"{where}: array '{name}' holds targets at untrained positions (they hold "
                             "the fill values: zeros)")


def _check_values(meta: StoreMeta, data: Mapping[str, np.ndarray], where: str) -> None:
    tokens = data["tokens"]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= meta.vocab_size):
        raise StoreError(f"{where}: array 'tokens' has ids outside 0..{meta.vocab_size - 1}")
    if "ids" in data and data["ids"].size and int(data["ids"].max()) >= meta.vocab_size:
        raise StoreError(f"{where}: array 'ids' has ids >= vocab_size {meta.vocab_size}")
    for name in ("logprobs", "target_logprob"):
        # float16 arithmetic is emulated in numpy; one conversion makes every check fast.
        values = data[name].astype(np.float32)
        if name == "logprobs" and meta.kind == "topk" and (values[..., 1:] > values[..., :-1]).any():
            raise StoreError(f"{where}: array 'logprobs' is not sorted most probable first")
        if not np.isfinite(values).all():
            raise StoreError(f"{where}: array '{name}' has NaN or infinite values")
        if values.size and float(values.max()) > _MAX_LOGPROB:
            raise StoreError(f"{where}: array '{name}' has log-probs > 0")
    for name in ("tail_logmass", "tau_tail_logmass"):
        # -inf is legitimate: the k stored ids hold all the mass.
        if name in data and (np.isnan(data[name]).any() or (data[name] > _MAX_LOGPROB).any()):
            raise StoreError(f"{where}: array '{name}' has NaN or positive values")
    if "tau_logz" in data and not np.isfinite(data["tau_logz"]).all():
        raise StoreError(f"{where}: array 'tau_logz' has NaN or infinite values")
    if meta.kind == "sampled":
        counts = data["counts"].astype(np.int64).sum(-1)
        if (counts != meta.draws).any():
            raise StoreError(f"{where}: array 'counts' does not sum to draws={meta.draws}")
