"""`kdcache prepare` throughput and memory, against the tokenizer's own `encode_batch`, in one run.

Generates jsonl corpora of ~12 MB and ~120 MB (the standard library's .py files, one
record each, repeated), trains one 512-token BPE on 4 MB of the same text, then runs
`kdcache prepare --tokenizer` over each corpus with 1 and 2 workers, each in a process
of its own, sampling the resident memory of it and every process it starts (Ray's
included) every 50 ms. Reports per run: tokens/s of the build (from the first document
read to the last shard written; Ray's start-up is the rest of the wall time) and the
peak resident memory of the largest process. The limit for this step is the
tokenizer's own rate: `encode_batch` (and `encode_batch_fast`, which prepare calls:
the same ids without offsets) over the 12 MB corpus's texts in 1 MB batches, in this
process, in the same run, before and after the prepare runs (the machine is shared; the
targets use the mean).

    python benchmarks/prepare_throughput.py [--json] [--sizes-mb 12 120] [--workers 1 2]

`--record-mb 1 4 16` measures instead what one record costs, which sets
`--max-record-bytes`: a record is tokenized whole, so a corpus of one record of R MiB
(standard-library text joined) goes through `kdcache prepare --workers 1`, for the 512-token
BPE and an 8192-token one trained on the same sample; reported are the peak resident
memory per R and the slope, MB per MiB of record.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import psutil

from kdcache.pipeline.prepare.tokenizer import train_tokenizer

BATCH_BYTES = 1 << 20
SEQ_LEN = 256


def _stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for p in sorted(root.rglob("*.py")):
        if "site-packages" in p.parts:
            continue
        try:
            texts.append(p.read_text("utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return [t for t in texts if t]


def write_corpus(path: Path, texts: list[str], size: int) -> int:
    """Records {"text": ...} repeated until the file holds `size` bytes; returns its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("w") as f:
        while written < size:
            for text in texts:
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                written += len(line.encode())
                if written >= size:
                    break
    return path.stat().st_size


def raw_rate(tok: object, corpus: Path) -> dict[str, float]:
    """tokens/s of encode_batch and encode_batch_fast over the corpus's texts, 1 MB batches."""
    texts = [json.loads(line)["text"] for line in corpus.open()]
    batches, cur, size = [], [], 0
    for t in texts:
        cur.append(t)
        size += len(t)
        if size >= BATCH_BYTES:
            batches.append(cur)
            cur, size = [], 0
    batches.append(cur)
    out = {}
    for name in ("encode_batch", "encode_batch_fast"):
        encode = getattr(tok, name)
        t0, tokens = time.perf_counter(), 0
        for b in batches:
            tokens += sum(len(e.ids) for e in encode(b, add_special_tokens=False))
        out[name] = tokens / (time.perf_counter() - t0)
    return out


def run_prepare(corpus: Path, tok: Path, out: Path, workers: int, *extra: str) -> dict[str, float]:
    """One `kdcache prepare` in its own process; its JSON summary plus peak memory."""
    argv = [sys.executable, "-c", "import sys; from kdcache.pipeline.cli import main; sys.exit(main())",
            "prepare", "--source", str(corpus), "--out", str(out), "--tokenizer", str(tok),
            "--seq-len", str(SEQ_LEN), "--workers", str(workers), "--quiet", "--json", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak, largest = 0, ""
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                rss = p.memory_info().rss
                if rss > peak:
                    peak, largest = rss, "driver" if p.pid == proc.pid else p.name()
        time.sleep(0.05)
    stdout = proc.communicate()[0]
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}): {argv}")
    summary = json.loads(stdout)
    shutil.rmtree(out)
    return {"workers": workers, "tokens": sum(summary["tokens"].values()),
            "build_s": summary["seconds"], "wall_s": time.perf_counter() - t0,
            "tokens_per_s": summary["tokens_per_s"], "peak_rss_mb": peak / 2**20,
            "largest_process": largest}


def record_memory(texts: list[str], sample: list[str], tok_path: Path, work: Path,
                  sizes_mb: list[int]) -> dict[str, object]:
    """Peak resident memory of prepare over one record of each size (after the same 1 MiB
    of small records, so every split has rows), per tokenizer."""
    big = train_tokenizer(sample, 8192, False)
    (work / "tok8192.json").write_text(big.to_str())
    joined = "".join(texts)
    out: dict[str, object] = {}
    for name, tok in (("bpe512", tok_path), ("bpe8192", work / "tok8192.json")):
        peaks = {}
        for mb in sizes_mb:
            corpus = work / f"record{mb}.jsonl"
            write_corpus(corpus, texts, 1 << 20)
            with corpus.open("a") as f:
                f.write(json.dumps({"text": (joined * (1 + (mb << 20) // len(joined)))[: mb << 20]}) + "\n")
            bound = str(corpus.stat().st_size)
            peaks[mb] = run_prepare(corpus, tok, work / "out", 1, "--max-record-bytes", bound)["peak_rss_mb"]
        lo, hi = min(sizes_mb), max(sizes_mb)
        slope = (peaks[hi] - peaks[lo]) / (hi - lo) if hi > lo else None
        out[name] = {"peak_rss_mb": peaks, "mb_per_mib": slope}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[12, 120])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--record-mb", type=int, nargs="+", help="measure one record of each size instead")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kdcache-prepare-bench-"))
    try:
        texts = _stdlib_texts()
        sample, size = [], 0
        for t in texts:
            sample.append(t)
            size += len(t)
            if size > 4 << 20:
                break
        tok = train_tokenizer(sample, 512, False)
        tok_path = work / "tokenizer.json"
        tok_path.write_text(tok.to_str())
        if args.record_mb:
            print(json.dumps(record_memory(texts, sample, tok_path, work, args.record_mb), indent=2))
            return
        corpora = {mb: work / f"c{mb}" / "corpus.jsonl" for mb in args.sizes_mb}
        sizes = {mb: write_corpus(path, texts, mb * 10**6) for mb, path in corpora.items()}
        before = raw_rate(tok, corpora[min(args.sizes_mb)])
        runs = [{"corpus_mb": sizes[mb] / 1e6, **run_prepare(path, tok_path, work / "out", w)}
                for mb, path in corpora.items() for w in args.workers]
        after = raw_rate(tok, corpora[min(args.sizes_mb)])
        # The machine is shared: the limit is the mean of the rates before and after the runs.
        raw = {k: (before[k] + after[k]) / 2 for k in before}
        raw |= {f"{k}_before": v for k, v in before.items()}
        raw |= {f"{k}_after": v for k, v in after.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = _report(raw, runs)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in runs:
            print(f"{r['corpus_mb']:6.1f} MB  workers {r['workers']}  {r['tokens_per_s']:>10,.0f} tok/s  "
                  f"peak {r['peak_rss_mb']:7.0f} MB  build {r['build_s']:.1f} s  wall {r['wall_s']:.1f} s")
        print(json.dumps(report["targets"], indent=2))


def _report(raw: dict[str, float], runs: list[dict[str, float]]) -> dict[str, object]:
    small = min(r["corpus_mb"] for r in runs)
    large = max(r["corpus_mb"] for r in runs)
    peak = {c: max(r["peak_rss_mb"] for r in runs if r["corpus_mb"] == c) for c in (small, large)}
    two = [r["tokens_per_s"] for r in runs if r["workers"] == 2 and r["corpus_mb"] == large]
    targets = {
        "peak_ratio_large_over_small": peak[large] / peak[small],
        "peak_large_mb": peak[large],
        "two_workers_over_encode_batch": two[0] / raw["encode_batch"] if two else None,
        "two_workers_over_encode_batch_fast": two[0] / raw["encode_batch_fast"] if two else None,
    }
    return {"raw_tokens_per_s": raw, "runs": runs, "targets": targets,
            "machine": {"cpus": psutil.cpu_count(), "memory_gb": psutil.virtual_memory().total / 2**30}}


if __name__ == "__main__":
    main()
