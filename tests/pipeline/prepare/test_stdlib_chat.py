"""The stdlib chat corpus: deterministic, well-formed conversations, signatures as Python sees them."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kdcache.pipeline.prepare.chat import ROLES
from kdcache.pipeline.prepare.corpus import _stdlib_files
from kdcache.pipeline.prepare.stdlib_chat import SYSTEM_PROMPTS, conversations

SAMPLE = textwrap.dedent('''
    import asyncio

    def plain(a, b=1, *args, c, d=2, **kw):
        """Add things.

        Args:
            a: the first.
        """
        def local():
            """A local helper: not part of the corpus."""

    async def waiting(x, /, y=3):
        """Wait for it."""

    def undocumented(q):
        return q

    class Base:
        """A base with no __init__."""

    class Point(Base, metaclass=type):
        """A point."""

        def __init__(self, x, /, y=0.5, *, z=None):
            """Make one."""

        def norm(self) -> float:
            """Its length."""

        @property
        def x(self):
            """The x coordinate."""

        @x.setter
        def x(self, value):
            """Set the x coordinate."""

    class Defaults:
        """Every argument has a default."""

        def __init__(self=None, k=1):
            pass
''')


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "pkg" / "mod.py"
    path.parent.mkdir()
    path.write_text(SAMPLE)
    return path


@pytest.fixture
def executed() -> dict:
    """The sample run as code (our own text only: the stdlib itself is never imported)."""
    space: dict = {}
    exec(compile(SAMPLE, "mod.py", "exec", dont_inherit=True), space)
    return space


def test_sample_conversations(sample: Path, executed: dict) -> None:
    found = dict(conversations(sample, "pkg/mod.py"))
    assert list(found) == [f"pkg/mod.py::{q}" for q in (
        "plain", "waiting", "Base", "Point", "Point.__init__", "Point.norm", "Point.x", "Point.x~2",
        "Defaults")]
    turns = [m for m in found["pkg/mod.py::plain"] if m["role"] != "system"]
    assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant"]
    assert "`pkg.mod.plain`" in turns[0]["content"]
    assert turns[1]["content"] == inspect.cleandoc(executed["plain"].__doc__)
    assert turns[1]["content"] == "Add things.\n\nArgs:\n    a: the first."  # relative indents kept
    assert found["pkg/mod.py::Point.x~2"][-3]["content"] == "Set the x coordinate."


def test_signatures_match_inspect(sample: Path, executed: dict) -> None:
    """The signature turn against `inspect.signature` of the same code."""
    space = executed
    found = dict(conversations(sample, "pkg/mod.py"))
    expected = {
        "plain": f"def plain{inspect.signature(space['plain'])}",
        "waiting": f"async def waiting{inspect.signature(space['waiting'])}",
        "Point.norm": f"def norm{inspect.signature(space['Point'].norm)}",
        "Base": "class Base",
        "Point": f"class Point(Base, metaclass=type), created as Point{inspect.signature(space['Point'])}",
        "Defaults": f"class Defaults, created as Defaults{inspect.signature(space['Defaults'])}",
    }
    for name, signature in expected.items():
        assert found[f"pkg/mod.py::{name}"][-1]["content"].endswith(signature), name


def test_unreadable_files_give_nothing(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("def broken(:\n")
    (tmp_path / "latin.py").write_bytes(b'def f():\n    "caf\xe9"\n')
    assert conversations(tmp_path / "bad.py", "bad.py") == []
    assert conversations(tmp_path / "latin.py", "latin.py") == []


@pytest.fixture(scope="module")
def stdlib_slice() -> list[tuple[str, list[dict[str, str]]]]:
    root, files = _stdlib_files()
    tops = ("json", "email", "argparse.py", "textwrap.py")
    chosen = [p for p in files if p.relative_to(root).parts[0] in tops]
    return [c for p in chosen for c in conversations(p, p.relative_to(root).as_posix())]


def test_stdlib_conversations_are_well_formed(stdlib_slice) -> None:
    assert len(stdlib_slice) > 200
    names = [n for n, _ in stdlib_slice]
    assert len(set(names)) == len(names)
    with_system = 0
    for name, messages in stdlib_slice:
        assert all(set(m) == {"role", "content"} and m["role"] in ROLES for m in messages), name
        assert all(isinstance(m["content"], str) and m["content"] for m in messages), name
        roles = [m["role"] for m in messages]
        assert roles[-4:] == ["user", "assistant", "user", "assistant"]  # two turns, both answered
        assert roles[:-4] in ([], ["system"])
        with_system += roles[0] == "system"
        assert messages[0]["content"] in SYSTEM_PROMPTS or roles[0] != "system"
    # One in three by a hash of the name: 3 sigma of a binomial either side.
    n = len(stdlib_slice)
    assert abs(with_system - n / 3) < 3 * (n * (1 / 3) * (2 / 3)) ** 0.5
    phrasings = {m[-4]["content"].split("`")[0] for _, m in stdlib_slice}
    assert len(phrasings) > 1


def test_deterministic_across_processes(stdlib_slice) -> None:
    """Another interpreter (another hash seed) builds the same corpus."""
    code = ("import json, sys; from kdcache.pipeline.prepare.corpus import _stdlib_files;"
            "from kdcache.pipeline.prepare.stdlib_chat import conversations;"
            "root, files = _stdlib_files(); p = root / 'json' / 'decoder.py';"
            "json.dump(conversations(p, 'json/decoder.py'), sys.stdout)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout
    here = [[n, m] for n, m in stdlib_slice if n.startswith("json/decoder.py::")]
    assert json.loads(out) == here
