"""The cost model's wall-time predictions against runs it has not seen.

Prepares a small token data set (stdlib corpus), trains a teacher (into a runs table: it is
itself a measured supervised run of another size), caches it into a store, then trains ONE
student size three ways (supervised, offline from the store, online from the teacher) at two
token budgets. `kdcache cost --runs` is calibrated twice (through `estimate_cost`, the library
function behind it): (a) on the one student size's runs only, (b) on those plus the teacher's
own training run, the table `kdcache run` keeps. Both predict, before they run, a larger
student's offline and online runs and a second cache job over another number of rows; then
those run, and each prediction is set against the measured time: a run's `wall_s` (the
training loop) and a cache job's shard-dispatch time (the store's job log). Each calibration's
own fit is listed too. (b) is the one that can tell a per-token overhead from the FLOP rate.

    python benchmarks/cost_model.py [--threads 2] [--work DIR] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray

from kdcache.pipeline.cli import main as kdcache_main
from kdcache.pipeline.prepare.config import PrepareConfig
from kdcache.pipeline.prepare.job import prepare
from kdcache.pipeline.study.cost import CostQuery, calibrate, estimate_cost, read_timings
from kdcache.storage import read_jobs, read_meta
from kdcache.storage.runs import RunRow, append_run
from kdcache.train.config import ModelConfig


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=600_000, help="tokens prepared over all splits")
    ap.add_argument("--rho", type=int, default=32, help="d_model / layers of teacher and students")
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--teacher-tokens", type=int, default=65_536)
    ap.add_argument("--student-layers", type=int, default=2, help="the size the model is calibrated on")
    ap.add_argument("--big-layers", type=int, default=3, help="the larger size it predicts")
    ap.add_argument("--budgets", type=int, nargs="+", default=[65_536, 131_072],
                    help="token budgets of the calibration runs")
    ap.add_argument("--eval-tokens", type=int, default=131_072, help="token budget of the predicted runs")
    ap.add_argument("--cache-rows", type=int, default=None,
                    help="rows of the calibration store (default: the whole student split)")
    ap.add_argument("--second-cache-rows", type=int, default=1024, help="rows of the predicted cache job")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-rows", type=int, default=32,
                    help="validation rows each run scores (outside wall_s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None,
                    help="folder for the data, models and stores (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    return ap.parse_args(argv)


def _kdcache(argv: list[str]) -> None:
    with contextlib.redirect_stdout(sys.stderr):  # the verbs' reports would break --json
        rc = kdcache_main(argv)
    if rc:
        raise SystemExit(f"kdcache {' '.join(argv)} failed with status {rc}")


class Bench:
    """The benchmark's folder, flags and the kdcache calls it makes."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.data, self.teacher = work / "data", work / "teacher"

    def common(self) -> list[str]:
        a = self.args
        return ["--data", str(self.data), "--rho", str(a.rho), "--batch-size", str(a.batch_size),
                "--threads", str(a.threads), "--eval-rows", str(a.eval_rows), "--checkpoint-every", "0",
                "--quiet"]

    def prepare(self) -> None:
        a = self.args
        prepare(PrepareConfig(out=str(self.data), source="stdlib", vocab_size=a.vocab, seq_len=a.seq_len,
                              max_tokens=a.max_tokens, quiet=True))

    def train_teacher(self, runs: Path) -> None:
        a = self.args
        _kdcache(["train", *self.common(), "--out", str(self.teacher), "--layers", str(a.teacher_layers),
                  "--tokens", str(a.teacher_tokens), "--split", "teacher", "--runs", str(runs),
                  "--run-id", "teacher"])

    def cache(self, name: str, rows: int | None) -> Path:
        out = self.work / name
        _kdcache(["cache", "--teacher", str(self.teacher), "--data", str(self.data), "--out", str(out),
                  "--k", str(self.args.k), "--workers", "1", "--valid-rows", str(self.args.eval_rows),
                  "--quiet", *(["--max-rows", str(rows)] if rows else [])])
        return out

    def student(self, kind: str, layers: int, tokens: int, runs: Path, store: Path) -> str:
        run_id = f"{kind}-L{layers}-{tokens}"
        extra = {"supervised": [], "distill": ["--distill", str(store)],
                 "online": ["--online-teacher", str(self.teacher)]}[kind]
        _kdcache(["train", *self.common(), "--out", str(self.work / "students" / run_id), "--layers",
                  str(layers), "--tokens", str(tokens), "--runs", str(runs), "--run-id", run_id, *extra])
        return run_id


def _cache_seconds(store: Path) -> tuple[float, int]:
    jobs = read_jobs(store)
    return sum(j.seconds for j in jobs), sum(j.tokens for j in jobs)


def _row(role: str, run: str, kind: str, params: float, tokens: float, predicted: float,
         measured: float) -> dict[str, Any]:
    return {"role": role, "run": run, "kind": kind, "params": int(params), "tokens": int(tokens),
            "predicted_s": predicted, "measured_s": measured, "rel_error": predicted / measured - 1.0}


CALIBRATIONS = {
    "one_size": "the one student size's runs only",
    "with_teacher": "the same runs plus the teacher's own training run",
}


def _fit_rows(model: Any, runs: Path, n_t: float, shape: dict[str, float]) -> list[dict[str, Any]]:
    """Each calibration run and cache job against the model fitted to them."""
    timed_runs, cache_jobs, _ = read_timings(str(runs), **shape)
    ids = [r["run_id"] for r in pq.read_table(runs).to_pylist()]
    rows = [_row("fit", run_id, timed.kind, timed.params, timed.tokens, model.run_s(timed), timed.wall_s)
            for run_id, timed in zip(ids, timed_runs, strict=True)]
    rows += [_row("fit", "cache " + Path(job.label).name, "cache", n_t, job.tokens, model.timing_s(job),
                  job.seconds) for job in cache_jobs]
    return rows


def run_benchmark(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bench, started = Bench(args, work), time.perf_counter()
    tables = {"one_size": work / "runs-one-size.parquet", "with_teacher": work / "runs.parquet"}
    ray.init(num_cpus=args.threads, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             configure_logging=False)  # one local Ray for both cache jobs (its start-up is not measured)
    try:
        bench.prepare()
        bench.train_teacher(tables["with_teacher"])
        store = bench.cache("store", args.cache_rows)
        for tokens in args.budgets:
            for kind in ("supervised", "distill", "online"):
                bench.student(kind, args.student_layers, tokens, tables["one_size"], store)
        for row in pq.read_table(tables["one_size"]).to_pylist():  # the teacher's row, then the students'
            append_run(tables["with_teacher"], RunRow.from_json(row))
        shape = {"rho": args.rho, "context": args.seq_len, "vocab": args.vocab}
        n_t = float(read_meta(store).teacher.nonembedding_params)
        big = ModelConfig(layers=args.big_layers, vocab_size=args.vocab, rho=args.rho).non_embedding_params()
        second_tokens = args.second_cache_rows * args.seq_len
        calibrations: dict[str, dict[str, Any]] = {}
        for name, runs in tables.items():
            model = calibrate(str(runs), **shape)
            query = CostQuery(teacher_params=n_t, student_params=(float(big),), tokens=args.eval_tokens,
                              store=str(store), runs=str(runs), rho=args.rho, context=args.seq_len,
                              vocab=args.vocab)
            calibrations[name] = {
                "calibrated_on": CALIBRATIONS[name], "runs_table": runs.name, "time_model": model.to_json(),
                "prediction": estimate_cost(query),
                "cache_prediction": estimate_cost(dataclasses.replace(query, tokens=second_tokens)),
                "runs": _fit_rows(model, runs, n_t, shape),
            }
        held_out = work / "held-out.parquet"
        for kind in ("distill", "online"):
            bench.student(kind, args.big_layers, args.eval_tokens, held_out, store)
        second = bench.cache("store-2", args.second_cache_rows)
        measured = {r["kind"]: r for r in pq.read_table(held_out).to_pylist()}
        seconds, tokens = _cache_seconds(second)
        for cal in calibrations.values():
            predicted, cache_prediction = cal.pop("prediction"), cal.pop("cache_prediction")
            for kind, times in (("distill", predicted.predicted_s.offline_student),
                                ("online", predicted.predicted_s.online_student)):
                r = measured[kind]
                cal["runs"].append(_row("predicted", r["run_id"], kind, r["params"], r["tokens"], times[0],
                                        r["wall_s"]))
            cal["runs"].append(_row("predicted", "cache store-2", "cache", n_t, tokens,
                                    cache_prediction.predicted_s.cache, seconds))
            errors = [abs(r["rel_error"]) for r in cal["runs"] if r["role"] == "predicted"]
            cal["max_abs_rel_error_predicted"] = max(errors)
            cal["mean_abs_rel_error_predicted"] = sum(errors) / len(errors)
    finally:
        ray.shutdown()
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "work")},
        "calibrations": calibrations,
        "total_s": time.perf_counter() - started,
    }


def table(result: dict[str, Any]) -> str:
    """Both calibrations side by side, one row per run (a dash where a calibration did not fit it)."""
    cals = result["calibrations"]
    by_run: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for name, cal in sorted(cals.items(), key=lambda item: -len(item[1]["runs"])):  # the fuller table's order
        for r in cal["runs"]:
            by_run.setdefault((r["role"], r["run"]), {})[name] = r
    lines = ["| role | run | kind | N | tokens | measured s | " + " | ".join(
                 f"{name}: predicted s | {name}: error" for name in cals) + " |",
             "|---|---|---|---:|---:|---:|" + "---:|---:|" * len(cals)]
    for (role, run), rows in by_run.items():
        r = next(iter(rows.values()))
        cells = [f"{rows[n]['predicted_s']:.2f} | {100 * rows[n]['rel_error']:+.1f}%"
                 if n in rows else "- | -" for n in cals]
        lines.append(f"| {role} | {run} | {r['kind']} | {r['params']:,} | {r['tokens']:,} | "
                     f"{r['measured_s']:.2f} | " + " | ".join(cells) + " |")
    lines.append("")
    for name, cal in cals.items():
        m = cal["time_model"]
        lines.append(f"{name} ({cal['calibrated_on']}): held-out max |error| "
                     f"{100 * cal['max_abs_rel_error_predicted']:.1f}%, mean "
                     f"{100 * cal['mean_abs_rel_error_predicted']:.1f}%; "
                     f"calibrated {', '.join(m['calibrated'])}; "
                     f"overhead {m['overhead_s_per_token'] * 1e3:.3f} ms/token, "
                     f"student {m['student_flops_per_s'] or float('inf'):.3g} FLOP/s")
    lines.append(f"benchmark took {result['total_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        result = run_benchmark(args, Path(args.work))
    else:
        with tempfile.TemporaryDirectory(prefix="kdcache-cost-") as tmp:
            result = run_benchmark(args, Path(tmp))
    print(json.dumps(result, indent=2) if args.json else table(result))


if __name__ == "__main__":
    main()
