"""`kdcache inspect STORE`: metadata, progress and size of a logit store.

It reads metadata, the ledger and file sizes, never the shards' contents: "complete" is the
ledger's word that every shard was committed, and a shard file replaced or damaged since
is found by `kdcache verify` (and by a reader, at its first read of that shard).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from kdcache.storage import summarize

HELP = ("Show a logit store's metadata, committed rows/shards, bytes on disk and bytes per token "
        "(and per trained token where the data has a loss mask); exit 1 if its metadata, ledger or "
        "files are damaged. Shard contents are not decoded: kdcache verify checks them.")


@dataclass(frozen=True, kw_only=True)
class Config:
    store: str = field(metadata={"positional": True})
    """Path of the logit store (a Zarr v3 group)."""
    json: bool = False
    """Print the summary as JSON."""


def run(cfg: Config) -> int:
    info = summarize(cfg.store)
    status = 1 if info["damaged"] else 0
    if cfg.json:
        print(json.dumps(info, indent=2))
        return status
    meta = info["metadata"]
    teacher, data = meta["teacher"], meta["data"]
    per_token = info["bytes_per_token"]
    loss = info["teacher_loss"]
    lines = [
        f"store        {info['path']}",
        f"format       {meta['format']}  kind={meta['kind']} k={meta['k']} "
        f"vocab={meta['vocab_size']} seq_len={meta['seq_len']} temperature={meta['temperature']}"
        + (f" values={meta['values']}" if meta.get("values", "exact") != "exact" else "")
        + (f" (also at {', '.join(map(str, meta['temperatures']))})" if meta.get("temperatures") else ""),
        f"teacher      {teacher['name']} ({teacher['params']:,} params, {teacher['dtype']}, "
        f"fingerprint {teacher['fingerprint'][:12]})",
        f"output rows  {_rows(teacher['output_rows'], meta['vocab_size'], meta.get('padded_mass'))}",
        f"data         split={data['split']} rows={data['rows']:,} fingerprint {data['fingerprint'][:12]}",
        f"committed    {info['shards_committed']}/{info['shards']} shards, {info['rows']:,} rows, "
        f"{info['tokens']:,} tokens{'  (complete)' if meta['complete'] else ''}",
        f"size         {info['bytes']:,} bytes"
        + (f", {per_token:.1f} bytes/token ({info['target_bytes_per_token']:.1f} for targets)"
           if per_token else ""),
        *_trained(info, data),
        f"teacher_loss {loss:.4f} nats/token (cached-split NLL)" if loss is not None
        else "teacher_loss (not complete)",
        f"L_T          {_valid(meta)}",
        "checked      metadata, ledger, files present; contents not decoded (kdcache verify decodes them)",
        *(f"DAMAGED      {problem}" for problem in info["damaged"]),
    ]
    print("\n".join(lines))
    if status:
        count = len(info["damaged"])
        print(f"{cfg.store}: damaged ({count} problem(s)); run kdcache verify", file=sys.stderr)
    return status


def _trained(info: dict, data: dict) -> list[str]:
    """Where the data's loss mask leaves positions untrained: bytes per trained token, the
    figure that matters for chat data (untrained positions hold fill values costing ~nothing)."""
    trained, per_trained = info["trained_tokens"], info["bytes_per_trained_token"]
    if not data.get("mask_fingerprint"):
        return []
    share = f" ({trained / info['tokens']:.0%} of positions)" if info["tokens"] else ""
    line = f"trained      {trained:,} tokens{share}"
    if per_trained:
        line += (f", {per_trained:.1f} bytes/trained token "
                 f"({info['target_bytes_per_trained_token']:.1f} for targets)")
    return [line]


def _valid(meta: dict) -> str:
    """The teacher loss the law uses: its cross-entropy on the data's valid split."""
    if meta.get("valid_loss") is None:
        return "not recorded (a store made before kdcache measured it: rerun kdcache cache to add it)"
    return f"{meta['valid_loss']:.4f} nats/token (teacher CE on {meta['valid_tokens']:,} valid tokens)"


def _rows(rows: int | None, vocab: int, mass: float | None) -> str:
    """The teacher's output layer against the tokenizer, and the mass its padding held."""
    if rows is None:
        return "not recorded (store written before kdcache recorded it)"
    if rows == vocab:
        return f"{rows:,} (the tokenizer's ids; no padding)"
    held = "not measured (vllm)" if mass is None else f"mean padded mass {mass:.3g}"
    return f"{rows:,} over the tokenizer's {vocab:,} ids: {rows - vocab:,} padded rows dropped, {held}"
