"""`kdcache cache`: run a teacher once over a split and write its targets to a logit store."""

from __future__ import annotations

import json

from kdcache.pipeline.cache.config import CacheConfig as Config

HELP = "Run a teacher over a token split (Ray, resumable) and write its targets to a logit store."

__all__ = ["HELP", "Config", "run"]


def run(cfg: Config) -> int:
    from kdcache.pipeline.cache.job import run_cache

    r = run_cache(cfg)
    if cfg.json:
        print(json.dumps(r.to_json(), indent=2))
        return 0
    print(f"{r.store}: wrote {r.shards_written} of {r.shards} shards, "
          f"{r.tokens_written:,} tokens at {r.tokens_per_s:,.0f} tokens/s")
    if r.teacher_loss is None:
        print("store not complete")
        return 0
    valid = (f"L_T {r.valid_loss:.4f} nats/token (teacher CE on {r.valid_tokens:,} valid tokens)"
             if r.valid_loss is not None else "L_T not measured (the data has no valid rows)")
    print(f"{valid}; cached-split NLL {r.teacher_loss:.4f}")
    return 0
