"""Run every benchmark in this folder with --json and print one markdown table per benchmark.

A benchmark is any `*.py` here with a `--json` flag and a `__main__` block (helpers such
as `synthetic.py` have neither), so new scripts join without editing this file. Each
runs as its own process with its default arguments, one after another (they measure
throughput, so they must not share the machine with each other). A script that fails
is reported in the summary table and the others still run; the exit status is then 1.

    python benchmarks/run_all.py [--only NAME ...] [--json] [--out FILE.md]
                                 [--args NAME='--flag value' ...] [--timeout S]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# the docs' order (store, cache, distillation step, training, fitting); others follow by name.
ORDER = ("store_io", "cache_throughput", "distill_step", "train_throughput", "fit_speed")


def discover(folder: Path = HERE) -> list[str]:
    """Benchmark names in ORDER first, then any other script with --json and a main block."""
    found = {
        p.stem
        for p in folder.glob("*.py")
        if p.name != Path(__file__).name and _is_benchmark(p.read_text(encoding="utf-8"))
    }
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def _is_benchmark(source: str) -> bool:
    return '"--json"' in source and '__name__ == "__main__"' in source


def parse_json(stdout: str) -> Any:
    """The JSON a script printed; stray lines before it (library logging) are skipped."""
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        pass
    lines = stdout.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("[", "{")):
            try:
                return json.loads("".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON on stdout")


def run_one(name: str, extra: Sequence[str], timeout: float | None) -> dict[str, Any]:
    """Run one benchmark; never raises, a failure is recorded in the result."""
    argv = [sys.executable, str(HERE / f"{name}.py"), "--json", *extra]
    record: dict[str, Any] = {"args": list(extra), "load_before": os.getloadavg()[0]}
    print(f"[run_all] {name} {shlex.join(extra)}".rstrip(), file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {**record, "ok": False, "seconds": time.perf_counter() - start,
                "error": f"timed out after {timeout:g} s"}
    record["seconds"] = time.perf_counter() - start
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        return {**record, "ok": False, "error": f"exit {proc.returncode}: {tail[0]}",
                "stderr": proc.stderr[-4000:]}
    try:
        return {**record, "ok": True, "result": parse_json(proc.stdout)}
    except ValueError as exc:
        return {**record, "ok": False, "error": f"{exc}: {proc.stdout[-200:]!r}"}


# -- markdown -------------------------------------------------------------------------


def cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):  # tokens/s in full, FLOP/s and tiny gaps in scientific notation
        return f"{value:,.0f}" if 1000 <= abs(value) < 1e7 else f"{value:.4g}"
    if isinstance(value, list | tuple):
        return " ".join(cell(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects become dotted columns ({"flops": {"a": 1}} -> "flops.a")."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    rows = [flatten(r) for r in rows]
    columns = list(dict.fromkeys(k for r in rows for k in r))  # first-seen order across rows
    if len(rows) == 1 and len(columns) > 8:  # one wide record reads better standing up
        return markdown_table([{"key": k, "value": v} for k, v in rows[0].items()])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def result_tables(result: Any) -> str:
    """Tables for the shapes scripts print: a list of records, one record, or a record whose
    values include lists of records (each its own table)."""
    if isinstance(result, list) and all(isinstance(r, dict) for r in result):
        return markdown_table(result) if result else "(empty result)"
    if isinstance(result, dict):
        nested = {k: v for k, v in result.items()
                  if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
        flat = {k: v for k, v in result.items() if k not in nested}
        parts = [markdown_table([flat])] if flat else []
        parts += [f"`{k}`:\n\n{markdown_table(v)}" for k, v in nested.items()]
        return "\n\n".join(parts)
    return f"```\n{json.dumps(result, indent=2)}\n```"


def report(results: dict[str, dict[str, Any]]) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    head = [
        f"# kdcache benchmarks, {now}",
        "",
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}",
        "",
        "| benchmark | status | seconds | load before | arguments |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        status = "ok" if r["ok"] else f"FAILED ({r['error']})"
        head.append(f"| {name} | {cell(status)} | {r['seconds']:.1f} | {r['load_before']:.2f} "
                    f"| {cell(shlex.join(r['args']))} |")
    body = [f"## {name}\n\n" + (result_tables(r["result"]) if r["ok"] else
                                 f"FAILED: {r['error']}\n\n```\n{r.get('stderr', '').strip()}\n```")
            for name, r in results.items()]
    return "\n".join(head) + "\n\n" + "\n\n".join(body) + "\n"


# -- command line ---------------------------------------------------------------------


def parse_extra(specs: Sequence[str], names: Sequence[str]) -> dict[str, list[str]]:
    """--args NAME='--rows 64 --k 16' -> {NAME: ['--rows', '64', '--k', '16']}."""
    extra: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, args = spec.partition("=")
        if not sep or name not in names:
            raise SystemExit(f"run_all: --args expects NAME=ARGS with NAME in {list(names)}, got {spec!r}")
        extra[name] = shlex.split(args)
    return extra


def main(argv: Sequence[str] | None = None) -> int:
    names = discover()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help=f"benchmarks to run (of {', '.join(names)})")
    p.add_argument("--json", action="store_true", help="print all results as one JSON object")
    p.add_argument("--out", type=Path, help="also write the markdown report to this file")
    p.add_argument("--args", action="append", default=[], metavar="NAME=ARGS",
                   help="extra arguments for one benchmark, e.g. fit_speed='--runs 100'")
    p.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default: none)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        p.error(f"unknown benchmarks {unknown}; found {names}")
    selected = list(dict.fromkeys(args.only)) if args.only else names  # --only keeps its order
    extra = parse_extra(args.args, names)
    results = {name: run_one(name, extra.get(name, []), args.timeout) for name in selected}
    text = report(results)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(json.dumps(results, indent=2) if args.json else text)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
