"""The README and the MkDocs site in docs/ stay current.

- `mkdocs build --strict` succeeds (a broken link between pages fails it);
- the README stays short and keeps its two commands;
- every `kdcache` command line in README.md and docs/*.md names a verb the command line has
  and only flags that verb takes;
- the cheap examples (`kdcache fit` on the shipped Chinchilla runs, `kdcache plan`, `kdcache
  cost` without a store) run as written and print what the page shows;
- `examples/chinchilla_runs.csv` is what `examples/make_chinchilla_runs.py` writes.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mkdocs  # noqa: F401  (a dev dependency: the site must build wherever the tests run)
import pytest
import yaml

from kdcache.pipeline.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 300


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@dataclass(frozen=True)
class Example:
    """One `kdcache ...` command line of a page, with the output printed under it."""

    path: Path
    line: int  # 1-based, the command's first line
    command: str  # without the `$ ` prompt and the comment, continuation lines joined
    output: tuple[str, ...]  # the lines after it in the same block, up to the next prompt

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


INLINE = re.compile(r"`(kdcache [a-z][a-z-]*(?: [^`]*)?)`")
MODULE = "-m kdcache.pipeline.cli "
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def _strip_comment(command: str) -> str:
    return re.sub(r"(^|\s)#.*$", "", command).strip()


def examples(path: Path) -> list[Example]:
    """Command lines of one page: `kdcache ...` or `$ kdcache ...` inside ``` blocks (and
    `torchrun ... -m kdcache.pipeline.cli VERB ...`), `$ kdcache ...` lines anywhere
    (indented blocks), and inline code spans `kdcache VERB ...`."""
    lines = path.read_text().splitlines()
    found: list[Example] = []
    fenced = False
    i = 0
    while i < len(lines):
        raw = lines[i]
        text = raw.strip()
        if text.startswith("```"):
            fenced = not fenced
            i += 1
            continue
        prompt = text.startswith("$ ")
        command = text[2:].lstrip() if prompt else text
        if (fenced or prompt) and MODULE in command:  # torchrun ... -m kdcache.pipeline.cli VERB
            command = "kdcache " + command.split(MODULE, 1)[1]
        output_line = re.match(r"kdcache [a-z-]+:", command)  # `kdcache VERB: ...` is what a verb prints
        if command.startswith("kdcache ") and (fenced or prompt) and not output_line:
            start = i
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1].rstrip() + " " + lines[i].strip()
            output: list[str] = []
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith(("$ ", "```")):
                if not fenced and not lines[j].startswith("    "):
                    break
                output.append(lines[j].rstrip())
                j += 1
            found.append(Example(path, start + 1, _strip_comment(command), tuple(output if prompt else ())))
        elif not fenced:
            for span in INLINE.findall(raw):
                if not re.match(r"kdcache [a-z-]+:", span):  # `kdcache VERB: error: ...` is output
                    found.append(Example(path, i + 1, _strip_comment(span), ()))
        i += 1
    return found


def all_examples() -> list[Example]:
    return [e for path in doc_files() for e in examples(path)]


def verb_flags() -> dict[str, set[str]]:
    parser, verbs = build_parser()
    subparsers = parser._subcommands_action._name_parser_map  # jsonargparse: argparse's map
    return {verb: set(subparsers[verb]._option_string_actions) for verb in verbs}


# --- the site and the README -------------------------------------------------------------


def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs" and config["strict"] is True

    def pages(nav: object) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        if isinstance(nav, list):
            return [p for item in nav for p in pages(item)]
        if isinstance(nav, dict):
            return [p for value in nav.values() for p in pages(value)]
        return []

    in_nav = pages(config["nav"])
    on_disk = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(in_nav) == on_disk


def test_readme_is_short_and_keeps_its_two_commands() -> None:
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"
    # The contract: the first block of the README holds both commands.
    block = text.split("```", 2)[1]
    assert re.search(r"^make demo\b", block, re.M), "README.md's first block lost `make demo`"
    assert re.search(r"^make test\b", block, re.M), "README.md's first block lost `make test`"


def test_readme_links_resolve() -> None:
    text = README.read_text()
    broken = [
        target
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
        if not re.match(r"[a-z]+://", target) and not (ROOT / target).exists()
    ]
    assert not broken, f"README.md links to missing files: {broken}"


# --- the command lines are current --------------------------------------------------------


def test_pages_have_command_lines() -> None:
    found = all_examples()
    assert len(found) >= 40, len(found)
    assert {e.path for e in found} >= {README, DOCS / "laws.md", DOCS / "training.md"}


def test_every_command_line_uses_a_current_verb_and_flags() -> None:
    flags = verb_flags()
    problems = []
    for example in all_examples():
        words = example.command.split()
        verb = words[1]
        if verb not in flags:
            problems.append(f"{example.where}: no verb {verb!r} in `{example.command}`")
            continue
        for flag in FLAG.findall(example.command):
            if flag not in flags[verb]:
                problems.append(f"{example.where}: `kdcache {verb}` has no flag {flag} (`{example.command}`)")
    assert not problems, "stale command lines in the docs:\n" + "\n".join(problems)


# --- the cheap examples run as written ------------------------------------------------------

NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:e[-+]?\d+)?", re.I)


def _same_output(expected: tuple[str, ...], actual: list[str], where: str) -> None:
    """Each shown line against the printed one: the same words, numbers within 0.2%. A line
    `...` ends what the page shows."""
    for n, want in enumerate(expected):
        if want.strip() == "...":
            return
        assert n < len(actual), f"{where}: the page shows more lines than the command printed:\n{want}"
        got = actual[n]
        assert NUMBER.sub("#", want).split() == NUMBER.sub("#", got).split(), (
            f"{where}: line {n + 1} of the output differs\n page: {want}\n  run: {got}"
        )
        for a, b in zip(NUMBER.findall(want), NUMBER.findall(got), strict=True):
            x, y = float(a.replace(",", "")), float(b.replace(",", ""))
            assert math.isclose(x, y, rel_tol=2e-3, abs_tol=1e-12), (
                f"{where}: line {n + 1}: {a} on the page, {b} printed\n page: {want}\n  run: {got}"
            )


def _one(prefix: str, *, without: tuple[str, ...] = ()) -> list[Example]:
    found = [
        e for e in all_examples()
        if e.command.startswith(prefix) and e.output and not any(w in e.command for w in without)
    ]
    assert found, f"no example `{prefix} ...` with its output in the docs"
    return found


def _run(example: Example, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> list[str]:
    """Run a page's command in-process from a copy of the repository root's layout (the
    example's relative paths resolve; what it writes lands in `workdir`)."""
    (workdir / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(workdir)
    capsys.readouterr()
    code = main(shlex.split(example.command)[1:])
    out, err = capsys.readouterr()
    assert code == 0, f"{example.where}: `{example.command}` exited {code}: {err}"
    return out.splitlines()


@pytest.mark.slow
def test_chinchilla_fit_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    found = _one("kdcache fit --runs examples/chinchilla_runs.csv")
    first = found[0]
    out = _run(first, tmp_path, monkeypatch, capsys)
    for example in found:  # the README and docs/laws.md show the same command
        assert example.command == first.command, (example.where, first.where)
        _same_output(example.output, out, example.where)
    assert out[0].startswith("supervised law fitted to 240 runs"), out
    fitted = {m[1]: float(m[2]) for m in re.finditer(r"^\s*(\w+) = ([\d.e+-]+)", "\n".join(out), re.M)}
    assert set(fitted) == {"E", "A", "B", "alpha", "beta", "gamma"}, fitted
    # Epoch AI's estimates (Besiroglu et al. 2024), within their standard errors.
    assert abs(fitted["E"] - 1.8172) <= 0.03 and abs(fitted["alpha"] - 0.3478) <= 0.02
    assert abs(fitted["beta"] - 0.3658) <= 0.02 and fitted["gamma"] == 1
    plot = re.search(r"--plot (\S+)", first.command)
    if plot:
        assert (tmp_path / plot[1]).read_bytes().startswith(b"\x89PNG")


def test_plan_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for example in _one("kdcache plan --law paper"):
        workdir = tmp_path / f"line{example.line}"
        workdir.mkdir()
        _same_output(example.output, _run(example, workdir, monkeypatch, capsys), example.where)


def test_cost_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for example in _one("kdcache cost ", without=("--store", "--runs")):
        workdir = tmp_path / f"line{example.line}"
        workdir.mkdir()
        _same_output(example.output, _run(example, workdir, monkeypatch, capsys), example.where)


# --- the shipped Chinchilla runs ------------------------------------------------------------


def test_chinchilla_runs_csv_is_what_the_generator_writes(tmp_path: Path) -> None:
    script = ROOT / "examples" / "make_chinchilla_runs.py"
    spec = importlib.util.spec_from_file_location("make_chinchilla_runs", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "chinchilla_runs.csv"
    assert module.write(out) == 240
    shipped = ROOT / "examples" / "chinchilla_runs.csv"
    assert out.read_bytes() == shipped.read_bytes(), "run `python examples/make_chinchilla_runs.py`"
    header = shipped.read_text().splitlines()[0]
    assert header == "params,tokens,loss"


# --- facts the pages state about the code ---------------------------------------------------


def test_error_catalogue_counts_match_the_cases() -> None:
    from collections import Counter

    from tests.e2e.test_bad_inputs import CASES

    counts = Counter(case.verb for case in CASES)
    page = (DOCS / "errors.md").read_text()
    table: dict[str, int] = {}
    for row in re.findall(r"^\|(.+)\|$", page, re.M):
        cells = [c.strip() for c in row.split("|")]
        for verb, n in zip(cells[::3], cells[1::3], strict=False):
            if verb and n.isdigit():
                table[verb] = int(n)
    assert table == dict(counts), f"docs/errors.md's table: {table}; the catalogue: {dict(counts)}"
    total = len(CASES)
    assert f"{total} cases in all" in page, f"docs/errors.md should say {total} cases in all"
    assert f"catalogue of {total} bad inputs" in README.read_text(), f"README.md should say {total}"


def test_module_entry_point_the_pages_use_runs() -> None:
    """The pages launch ranks with `torchrun ... -m kdcache.pipeline.cli train ...`."""
    uses = [p for p in doc_files() if MODULE.strip() in p.read_text()]
    if not uses:
        pytest.skip("no page runs the command line as a module")
    result = subprocess.run([sys.executable, *MODULE.split()[:2], "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{[str(p.relative_to(ROOT)) for p in uses]}: {result.stderr}"


PATH_SPAN = re.compile(r"`((?:kdcache|storage|pipeline|train|fit|tests|benchmarks|examples)/[\w./-]*)`")
MODULE_SPAN = re.compile(r"\bkdcache\.(?:storage|pipeline|train|fit|errors|paths|ray_session)(?:\.\w+)*")


def test_repository_paths_the_pages_name_exist() -> None:
    missing = []
    for path in doc_files():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for name in PATH_SPAN.findall(line):
                if "*" not in name and "<" not in name and not (ROOT / name.rstrip("/")).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{n}: {name}")
    assert not missing, "the pages name files that do not exist:\n" + "\n".join(missing)


def test_python_names_the_pages_use_exist() -> None:
    missing = []
    for path in doc_files():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for name in MODULE_SPAN.findall(line):
                if not _resolves(name):
                    missing.append(f"{path.relative_to(ROOT)}:{n}: {name}")
    assert not missing, "the pages name modules or objects that do not exist:\n" + "\n".join(missing)


def _resolves(dotted: str) -> bool:
    """`a.b.c.name`: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_layout_page_names_every_module() -> None:
    page = (DOCS / "layout.md").read_text()
    named = set(re.findall(r"[\w]+\.py\b", page))
    unnamed = [
        str(path.relative_to(ROOT))
        for folder in ("kdcache", "storage", "pipeline", "train", "fit")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "__init__.py" and "__pycache__" not in path.parts and path.name not in named
    ]
    assert not unnamed, "docs/layout.md does not mention: " + ", ".join(unnamed)
