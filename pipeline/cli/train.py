"""`kdcache train`: train one student (the family's, or a Hugging Face model), supervised or
distilled from a store or a live teacher, on one rank or many; writes a MODEL directory and a
runs-table row."""

from __future__ import annotations

import json
import os

from kdcache.train.job import TrainJobConfig as Config

HELP = ("Train a student (--layers L, --student DIR or --student-config FILE.json) on a token split, "
        "supervised or distilled (--distill STORE, --online-teacher MODEL), on one rank, under torchrun "
        "or over --workers N Ray Train ranks; save it in Hugging Face format.")

__all__ = ["HELP", "Config", "run"]


def run(cfg: Config) -> int:
    from kdcache.train.run import run_training

    result = run_training(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone reports
        return 0
    row = result.row
    assert row is not None  # rank 0 always has the row it wrote or read
    if cfg.runtime.json:
        print(json.dumps(row.to_json(), indent=2))
    elif result.added_row:  # a finished model whose row was lost: nothing was trained
        print(f"added the missing runs-table row for {result.out}")
    else:
        print(
            f"wrote {result.out}: N = {row.params:,} non-embedding params, "
            f"D = {row.tokens:,} tokens, {row.tokens_per_s or 0:,.0f} tokens/s"
        )
        print(f"validation loss {row.loss:.4f} nats/token, ECE {100 * (row.ece or 0):.2f}%")
        if row.teacher_loss is not None:
            print(f"{row.kind} from a teacher of loss {row.teacher_loss:.4f} "
                  f"(N_T = {row.teacher_params or 0:,})")
    return 0
