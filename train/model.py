"""The model family: a pre-norm Llama-style decoder (RMSNorm, RoPE, SwiGLU, untied embeddings).

Module and parameter names mirror `transformers.LlamaForCausalLM` (`model.layers.0.
self_attn.q_proj.weight`, ...), so the state dict *is* the Hugging Face checkpoint and
export is a plain save. The numerics follow transformers' Llama too (norms and RoPE in
float32), which the equivalence test checks to 1e-4.

Rows that pack several documents pass `position_ids` (restarting at 0 per document): RoPE
takes each token's position within its document, and attention gets the block-diagonal
causal mask (`attention.py`), so each document is computed exactly as it would be alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kdcache.train.attention import document_causal_mask, packs_documents
from kdcache.train.config import ModelConfig

BASE_INIT_STD = 0.02  # std of hidden matrices at the muP base width


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 whatever the activation dtype, as transformers does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Rotary(nn.Module):
    """RoPE in the rotate-half layout transformers' Llama uses."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, Tensor, Tensor] | None = None

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        cache = self._cache
        if cache is None or cache[0] < seq_len or cache[1].device != device:
            pos = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq.to(device))
            emb = torch.cat((freqs, freqs), dim=-1)
            cache = (seq_len, emb.cos(), emb.sin())
            self._cache = cache
        return cache[1][:seq_len], cache[2][:seq_len]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        """`mask` [B, 1, T, T] bool (True: may attend) replaces plain causal attention."""
        b, t, _ = x.shape
        shape = (b, t, self.n_heads, self.head_dim)
        q, k = self.q_proj(x).view(shape), self.k_proj(x).view(shape)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)
        k = apply_rotary(k.transpose(1, 2), cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.max_position = cfg.max_position
        self.gradient_checkpointing = False
        """Keep only each block's input for backward, which reruns the block (`--gradient-checkpointing`)."""

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        x = self.embed_tokens(input_ids)
        t, mask = input_ids.shape[1], None
        if position_ids is None:
            cos, sin = self.rotary.cos_sin(t, input_ids.device)
        else:  # [B, 1, T, head_dim]: each row's own positions, broadcast over heads
            cos, sin = self.rotary.cos_sin(max(t, self.max_position), input_ids.device)
            cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
            if packs_documents(position_ids):  # one document a row needs no mask beyond causal
                mask = document_causal_mask(position_ids)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        return self.norm(x)


class Transformer(nn.Module):
    """A causal LM of the family; `forward(ids [B, T], position_ids=None) -> logits [B, T, V]`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Final-norm activations [B, T, d_model], for losses that chunk the unembedding."""
        return self.model(input_ids, position_ids)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        return self.lm_head(self.model(input_ids, position_ids))

    def non_embedding_params(self) -> int:
        """N counted from the actual tensors (the config's formula is checked against it)."""
        skip = {"model.embed_tokens.weight", "lm_head.weight"}
        return sum(p.numel() for n, p in self.named_parameters() if n not in skip)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """muP (simple) init from one seed: hidden matrices' std shrinks as 1/sqrt(width),
        the unembedding's as 1/width, embeddings and norm gains do not change with width."""
        gen = torch.Generator().manual_seed(seed)
        mult = self.config.width_mult
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name == "model.embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=gen) * BASE_INIT_STD)
            elif name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=gen) * BASE_INIT_STD / mult)
            else:
                std = BASE_INIT_STD / math.sqrt(mult)
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    # Residual-branch outputs: scale by depth so the stream's variance
                    # does not grow with layers (GPT-2/OLMo practice).
                    std /= math.sqrt(2 * self.config.layers)
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_model(cfg: ModelConfig, *, seed: int = 0) -> Transformer:
    model = Transformer(cfg)
    model.reset_parameters(seed)
    return model
