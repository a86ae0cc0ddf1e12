"""`kdcache import-teacher`: a GGUF teacher (llama.cpp format) as a Hugging Face MODEL directory."""

from __future__ import annotations

import json

from kdcache.pipeline.cache.config import ImportConfig as Config

HELP = ("Convert a GGUF teacher into a MODEL directory (safetensors, config, tokenizer) that the hf "
        "and vllm backends run; checks its logits against the GGUF model.")

__all__ = ["HELP", "Config", "run"]


def run(cfg: Config) -> int:
    from kdcache.pipeline.cache.gguf import import_gguf

    r = import_gguf(cfg)
    if cfg.json:
        print(json.dumps(r.to_json(), indent=2))
        return 0
    print(f"wrote {r.out}: {r.architecture}, {r.layers} layers, d_model {r.hidden_size}, "
          f"{r.heads} heads ({r.kv_heads} kv, head_dim {r.head_dim}), vocab {r.vocab_size:,}"
          f"{', tied embeddings' if r.tied_embeddings else ''}")
    print(f"N = {r.nonembedding_params:,} non-embedding params ({r.params:,} in all); "
          f"logits match the GGUF model to {r.max_abs_diff:.1e}; fingerprint {r.fingerprint[:12]}")
    if r.tokenizer_vocab_size != r.vocab_size:
        print(f"note: the tokenizer has {r.tokenizer_vocab_size:,} tokens, the model {r.vocab_size:,}; "
              "kdcache cache needs them equal")
    return 0
