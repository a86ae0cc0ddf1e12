"""Keeping packed documents apart: segment ids and block-diagonal causal masks from position ids.

Rows that pack several documents restart their position ids at 0 at each document's first
token, so document j of a row is the run of positions after its j-th zero (segments =
cumsum(position_ids == 0)). A token may attend to an earlier token of its own segment only.

Position ids alone do not give that in `transformers` (checked with 5.19 on a tiny Llama,
two documents in one row against each alone): `sdpa` and `eager` attention see the whole
row whenever the model is called with a KV cache (as it is by default), differing by 0.17
in the logits; a 4D boolean mask [B, 1, T, T] isolates them under `sdpa` but not under
`eager` (0.15), and a 4D additive float mask (0 where allowed, the dtype's minimum
elsewhere) does under both, to 6e-8. Flash-attention's varlen path takes position ids
(or cumulative lengths) instead and rejects a 4D mask, so its students get the position
ids alone (`needs_mask`).
"""

from __future__ import annotations

import torch
from torch import Tensor

FLASH_PREFIX = "flash"
"""transformers' flash-attention implementations (`flash_attention_2`, `_3`, kernels) start so."""


def document_ids(position_ids: Tensor) -> Tensor:
    """[B, T] segment of each position: 1 for the row's first document, 2 for the next, ...

    A row whose first position id is not 0 (a cut stream) is segment 0 up to its first 0.
    """
    return (position_ids == 0).cumsum(-1)


def packs_documents(position_ids: Tensor | None) -> bool:
    """Whether some row holds more than one segment (else causal attention alone is exact)."""
    return position_ids is not None and bool((position_ids[:, 1:] == 0).any())


def document_causal_mask(position_ids: Tensor) -> Tensor:
    """[B, 1, T, T] bool, True where query t may attend to key s: s <= t in the same document."""
    seg = document_ids(position_ids)
    t = position_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((seg.unsqueeze(-1) == seg.unsqueeze(-2)) & causal).unsqueeze(1)


def document_attention_mask(position_ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The 4D additive attention mask [B, 1, T, T] of packed rows, for `transformers` models.

    0 where query t may attend to key s (s <= t in the same document), the dtype's minimum
    elsewhere; pass it as `attention_mask=` with `position_ids=` under `sdpa` or `eager`
    attention (in the model's dtype). Not for flash attention: give it `position_ids` alone.
    """
    allowed = document_causal_mask(position_ids)
    zero = torch.zeros((), dtype=dtype, device=position_ids.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def needs_mask(attn_implementation: str | None) -> bool:
    """Whether a `transformers` attention implementation needs the 4D mask to keep documents
    apart (everything but flash attention, which reads the position ids itself)."""
    return not (attn_implementation or "").startswith(FLASH_PREFIX)
