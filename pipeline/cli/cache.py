"""`kdcache cache`: run a teacher once over a split and write its targets to a logit store."""

from __future__ import annotations

import json

from kdcache.pipeline.cache.job import CacheConfig as Config

HELP = "Run a teacher over a token split (Ray, resumable) and write its targets to a logit store."

__all__ = ["HELP", "Config", "run"]


def run(cfg: Config) -> int:
    from kdcache.pipeline.cache.job import run_cache

    result = run_cache(cfg)
    if cfg.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['store']}: wrote {result['shards_written']} of {result['shards']} shards, "
          f"{result['tokens_written']:,} tokens at {result['tokens_per_s']:,.0f} tokens/s")
    if result["teacher_loss"] is None:
        print("store not complete")
        return 0
    lt = result["valid_loss"]
    valid = (f"L_T {lt:.4f} nats/token (teacher CE on {result['valid_tokens']:,} valid tokens)"
             if lt is not None else "L_T not measured (the data has no valid rows)")
    print(f"{valid}; cached-split NLL {result['teacher_loss']:.4f}")
    return 0
