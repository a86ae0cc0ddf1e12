"""`kdcache prepare`: tokenize a text source into document-disjoint teacher/student/valid splits
(student/valid only with `--teacher-frac 0`, for a teacher trained elsewhere)."""

from __future__ import annotations

import json

from kdcache.pipeline.prepare.config import PrepareConfig as Config

HELP = ("Train (or load) a tokenizer and write token splits teacher/student/valid to a DATA directory "
        "(no teacher split with --teacher-frac 0).")

__all__ = ["HELP", "Config", "run"]


def run(cfg: Config) -> int:
    from kdcache.pipeline.prepare.job import prepare

    result = prepare(cfg)
    summary = {
        "out": str(result.out),
        "vocab_size": result.vocab_size,
        "rows": result.rows,
        "tokens": result.tokens,
        "trained_tokens": result.trained_tokens,
        "dropped": result.dropped,
        "truncated": result.truncated,
        "fingerprint": result.fingerprint,
        "documents": result.documents,
        "input_bytes": result.input_bytes,
        "seconds": round(result.seconds, 3),
        "tokens_per_s": round(sum(result.tokens.values()) / result.seconds) if result.seconds > 0 else 0,
    }
    if cfg.json:
        print(json.dumps(summary, indent=2))
    else:
        splits = ", ".join(f"{n} {result.tokens[n]:,} tokens ({result.rows[n]} rows)" for n in result.rows)
        print(f"wrote {result.out}: vocab {result.vocab_size}; {splits}")
        if cfg.format != "text" or cfg.row_packing != "stream":
            trained = sum(result.trained_tokens.values()) / max(1, sum(result.tokens.values()))
            print(f"{result.documents:,} documents, {trained:.1%} of positions trained; longer than "
                  f"--seq-len: {result.dropped} dropped, {result.truncated} truncated")
        print(f"fingerprint {result.fingerprint}")
    return 0
