"""FLOPs accounting: per-token forward cost F(N) (App. H.1) and the distillation budget (Eq. 9).

F(N) counts attention (causally) and the unembedding for a fixed-aspect-ratio model,
where the 2N rule is 36% low at 143M parameters. All functions broadcast over numpy
arrays as well as taking plain floats.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RHO = 128  # d_model / n_layers in the paper
CONTEXT = 4096
VOCAB = 32768
# omega = N / (n_layers * d_model^2): 4 for attention + 8 for a gated FFN of ratio 8/3.
OMEGA = 12.0


def _out(value: Any) -> Any:
    """Plain float for scalar input, array otherwise."""
    return float(value) if np.ndim(value) == 0 else value


def forward_flops(n_params: Any, *, rho: float = RHO, context: float = CONTEXT, vocab: float = VOCAB) -> Any:
    """Forward FLOPs per token of a model with `n_params` non-embedding parameters.

    F(N) = 2N (1 + sigma1 n_ctx / N^(1/3) + sigma2 n_vocab / N^(2/3)).
    """
    n = np.asarray(n_params, dtype=np.float64)
    sigma1 = (rho * OMEGA**2) ** (-1.0 / 3.0)
    sigma2 = (rho / OMEGA) ** (1.0 / 3.0)
    return _out(2.0 * n * (1.0 + sigma1 * context / np.cbrt(n) + sigma2 * vocab / np.cbrt(n) ** 2))


def forward_flops_2n(n_params: Any) -> Any:
    """The 2N shortcut for forward FLOPs per token (ignores attention and unembedding)."""
    return _out(2.0 * np.asarray(n_params, dtype=np.float64))


def training_flops_6nd(n_params: Any, tokens: Any) -> Any:
    """The 6ND shortcut for training FLOPs (forward + backward = 3 forwards of 2N)."""
    return _out(6.0 * np.asarray(n_params, dtype=np.float64) * np.asarray(tokens, dtype=np.float64))


def training_flops(n_params: Any, tokens: Any, **shape: float) -> Any:
    """Training FLOPs 3 F(N) D: a backward pass costs two forwards."""
    return _out(3.0 * forward_flops(n_params, **shape) * np.asarray(tokens, dtype=np.float64))


def distillation_flops(
    student_params: Any,
    student_tokens: Any,
    teacher_params: Any,
    teacher_tokens: Any,
    *,
    logits: float,
    pretraining: float,
    **shape: float,
) -> Any:
    """Eq. 9: 3 F(N_S) D_S + F(N_T) (delta_lgt D_S + delta_pre 3 D_T)."""
    d_s = np.asarray(student_tokens, dtype=np.float64)
    d_t = np.asarray(teacher_tokens, dtype=np.float64)
    student = 3.0 * forward_flops(student_params, **shape) * d_s
    teacher = forward_flops(teacher_params, **shape) * (logits * d_s + pretraining * 3.0 * d_t)
    return _out(student + teacher)
