"""`kdcache train`: supervised training of one model of the family; writes a MODEL directory."""

from __future__ import annotations

import json

from kdcache.train.job import TrainJobConfig as Config

HELP = "Train a model on a token split (supervised); save it in Hugging Face Llama format."

__all__ = ["HELP", "Config", "run"]


def run(cfg: Config) -> int:
    from kdcache.train.supervised import train_supervised

    result = train_supervised(cfg)
    row = result.row
    if cfg.json:
        print(json.dumps(row, indent=2))
    else:
        print(
            f"wrote {result.out}: N = {row['params']:,} non-embedding params, "
            f"D = {row['tokens']:,} tokens, {row['tokens_per_s']:,.0f} tokens/s"
        )
        print(f"validation loss {row['loss']:.4f} nats/token, ECE {100 * row['ece']:.2f}%")
    return 0
