"""`kdcache cache`: run a teacher once over a split and write its targets to a logit store."""

from __future__ import annotations

import json

from kdcache.pipeline.cache import CacheConfig as Config

HELP = "Run a teacher over a token split (Ray, resumable) and write its targets to a logit store."

__all__ = ["HELP", "Config", "run"]


def run(cfg: Config) -> int:
    from kdcache.pipeline.cache import run_cache

    result = run_cache(cfg)
    if cfg.json:
        print(json.dumps(result, indent=2))
        return 0
    loss = result["teacher_loss"]
    print(f"{result['store']}: wrote {result['shards_written']} of {result['shards']} shards, "
          f"{result['tokens_written']:,} tokens at {result['tokens_per_s']:,.0f} tokens/s")
    print(f"teacher_loss {loss:.4f} nats/token" if loss is not None else "store not complete")
    return 0
