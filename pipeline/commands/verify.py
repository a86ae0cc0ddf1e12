"""`kdcache verify STORE [--repair]`: re-check every committed shard against the ledger."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

HELP = "Re-check every committed shard of a store against its ledger checksums."


@dataclass(frozen=True, kw_only=True)
class Config:
    store: str = field(metadata={"positional": True})
    """Path of the logit store."""
    repair: bool = False
    """Uncommit bad shards so that rerunning `kdcache cache` rewrites them."""
    json: bool = False
    """Print the result as JSON."""


def run(cfg: Config) -> int:
    import json

    from kdcache.storage import repair_store, summarize, verify_store

    problems = verify_store(cfg.store)
    repaired = repair_store(cfg.store, problems) if cfg.repair else []
    bad = sorted({p.shard for p in problems})
    if cfg.json:
        report = {"ok": not problems, "bad_shards": bad, "problems": [str(p) for p in problems],
                  "repaired_shards": repaired}
        print(json.dumps(report, indent=2))
    elif problems:
        for p in problems:
            print(f"{cfg.store}: {p}", file=sys.stderr)
        action = f"uncommitted shards {repaired}; rerun the cache job" if repaired else "run with --repair"
        print(f"{cfg.store}: {len(bad)} bad shard(s) {bad}; {action}", file=sys.stderr)
    else:
        info = summarize(cfg.store)
        print(f"{cfg.store}: ok, {info['shards_committed']}/{info['shards']} committed shards verified")
    return 1 if problems else 0
