"""The model family's shape: one frozen config from which every size follows.

Size is set by `layers` alone: d_model = rho * layers (the paper's fixed aspect
ratio), heads of a fixed size, a SwiGLU FFN of ratio 8/3. The config converts to and
from a Hugging Face `config.json` so exported models load as `LlamaForCausalLM`
(or `Qwen3ForCausalLM` when QK-norm is on, since Llama has no QK-norm).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from kdcache.train.errors import TrainError

FFN_RATIO = 8 / 3
FFN_MULTIPLE = 8  # round the FFN width up to a multiple of this (vectorised matmuls)
# Width at which the default learning rate and init were tuned; muP rescales from here.
MUP_BASE_D_MODEL = 128


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of one member of the model family."""

    layers: int
    """Number of transformer blocks; sets the width through d_model = rho * layers."""
    vocab_size: int
    """Tokenizer vocabulary size (embedding and unembedding rows)."""
    rho: int = 64
    """Aspect ratio d_model / layers (the paper uses 128; smaller suits CPU-sized models)."""
    head_dim: int = 32
    """Size of each attention head; d_model must be a multiple of it."""
    qk_norm: bool = False
    """RMS-normalise queries and keys per head. Llama has no QK-norm, so such models
    export as Qwen3 (which has exactly this) instead of Llama."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    max_position: int = 2048
    """Longest sequence recorded in config.json (RoPE has no learned positions)."""
    mup_base_d_model: int = MUP_BASE_D_MODEL
    """Width the learning rate and init are defined at; muP scales them by width."""

    def __post_init__(self) -> None:
        for name in ("layers", "vocab_size", "rho", "head_dim", "max_position", "mup_base_d_model"):
            if getattr(self, name) < 1:
                raise TrainError(f"model config: field '{name}' must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.head_dim:
            raise TrainError(
                f"model config: d_model = rho * layers = {self.d_model} is not a multiple of "
                f"head_dim {self.head_dim}"
            )
        if not (self.rope_theta > 0 and self.norm_eps > 0):
            raise TrainError("model config: rope_theta and norm_eps must be positive")

    @property
    def d_model(self) -> int:
        return self.rho * self.layers

    @property
    def n_heads(self) -> int:
        return self.d_model // self.head_dim

    @property
    def ffn_hidden(self) -> int:
        return FFN_MULTIPLE * math.ceil(FFN_RATIO * self.d_model / FFN_MULTIPLE)

    @property
    def width_mult(self) -> float:
        """muP width multiplier: d_model relative to the base width."""
        return self.d_model / self.mup_base_d_model

    def non_embedding_params(self) -> int:
        """N: every parameter except the token embedding and the unembedding (lm_head)."""
        d, f = self.d_model, self.ffn_hidden
        attention = 4 * d * d + (2 * self.head_dim if self.qk_norm else 0)
        ffn = 3 * d * f
        norms = 2 * d
        return self.layers * (attention + ffn + norms) + d  # + the final norm

    def embedding_params(self) -> int:
        """Input embedding plus the untied unembedding."""
        return 2 * self.vocab_size * self.d_model

    def hf_config(self, *, eos_token_id: int | None = None) -> dict[str, Any]:
        """The `config.json` that transformers and vLLM load."""
        arch, model_type = ("Qwen3ForCausalLM", "qwen3") if self.qk_norm else (
            "LlamaForCausalLM",
            "llama",
        )
        config: dict[str, Any] = {
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.ffn_hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position,
            "rms_norm_eps": self.norm_eps,
            # Both spellings: transformers 5 reads rope_parameters, older readers rope_theta.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "initializer_range": 0.02,
            "use_cache": True,
            "bos_token_id": None,
            "eos_token_id": eos_token_id,
            "pad_token_id": None,
            "torch_dtype": "float32",
            "dtype": "float32",
        }
        if self.qk_norm:
            config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": 0}
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "model config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise TrainError(f"{where}: unknown fields {sorted(unknown)}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise TrainError(f"{where}: {exc}") from exc
