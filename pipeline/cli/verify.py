"""`kdcache verify PATH [--repair]`: re-check a logit store's committed shards against its
ledger, or decode every chunk of a token DATA directory and recompute its fingerprints."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from kdcache.storage import StoreError, repair_store, summarize, verify_store
from kdcache.storage.tokens.format import is_token_data, open_token_data
from kdcache.storage.tokens.verify import verify_token_data

HELP = ("Re-check every committed shard of a store against its ledger checksums, or every chunk "
        "and fingerprint of token data.")


@dataclass(frozen=True, kw_only=True)
class Config:
    store: str = field(metadata={"positional": True})
    """Path of the logit store, or of a token DATA directory (`kdcache prepare`)."""
    repair: bool = False
    """Uncommit bad shards so that rerunning `kdcache cache` rewrites them (stores only)."""
    json: bool = False
    """Print the result as JSON."""


def run(cfg: Config) -> int:
    if is_token_data(cfg.store):
        return _run_data(cfg)
    return _run_store(cfg)


def _run_store(cfg: Config) -> int:
    problems = verify_store(cfg.store)
    repaired = repair_store(cfg.store, problems) if cfg.repair else []
    bad = sorted({p.shard for p in problems if p.shard is not None})
    whole = [p for p in problems if p.shard is None]
    if cfg.json:
        report = {"ok": not problems, "bad_shards": bad, "store_problems": len(whole),
                  "problems": [str(p) for p in problems], "repaired_shards": repaired}
        print(json.dumps(report, indent=2))
    elif problems:
        for p in problems:
            print(f"{cfg.store}: {p}", file=sys.stderr)
        if repaired:
            action = f"uncommitted shards {repaired}; rerun the cache job"
        elif bad:
            action = "run with --repair, then rerun the cache job"
        else:
            action = ("the metadata does not match the arrays or the ledger; restore the 'kdcache' "
                      "attribute (rerunning the cache job recomputes 'complete' and 'teacher_loss')")
        print(f"{cfg.store}: {len(bad)} bad shard(s) {bad}, {len(whole)} store problem(s); {action}",
              file=sys.stderr)
    else:
        info = summarize(cfg.store)
        print(f"{cfg.store}: ok, {info['shards_committed']}/{info['shards']} committed shards verified")
    return 1 if problems else 0


def _run_data(cfg: Config) -> int:
    """Token data has no second copy to repair from, so --repair is refused before any work."""
    if cfg.repair:
        raise StoreError(
            f"{cfg.store}: --repair works on logit stores only; token data cannot be repaired, "
            "re-run kdcache prepare"
        )
    problems = verify_token_data(cfg.store)
    bad = sorted({p.split for p in problems if p.split})
    if cfg.json:
        print(json.dumps({"ok": not problems, "bad_splits": bad, "problems": [str(p) for p in problems]},
                         indent=2))
    elif problems:
        for p in problems:
            print(f"{cfg.store}: {p}", file=sys.stderr)
        where = f", bad split(s) {bad}" if bad else ""
        print(f"{cfg.store}: {len(problems)} problem(s){where}; the token data is corrupt, "
              "re-run kdcache prepare", file=sys.stderr)
    else:
        data = open_token_data(cfg.store)
        splits = ", ".join(f"{s} {data.rows(s)} rows" for s in data.meta["splits"])
        print(f"{cfg.store}: ok, token data verified ({splits}; fingerprint {data.fingerprint[:12]}...)")
    return 1 if problems else 0
