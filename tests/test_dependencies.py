"""The import graph's rules, read from every library module's syntax tree.

storage/ and fit/ import nothing of ours but the root (and never torch); train/ may import
storage/ and fit/; pipeline/ may import all three; nothing imports pipeline/.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("storage", "fit", "train", "pipeline", "kdcache")
ALLOWED = {  # folder -> the kdcache subpackages it may import besides itself and the root
    "kdcache": set(),
    "storage": set(),
    "fit": set(),
    "train": {"storage", "fit"},
    "pipeline": {"storage", "fit", "train"},
}
ROOT_MODULES = {"kdcache", "kdcache.errors", "kdcache.hub", "kdcache.paths", "kdcache.ray_session"}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def _modules(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("folder", FOLDERS)
def test_imports_point_one_way(folder):
    allowed = ALLOWED[folder] | {folder}
    wrong = []
    for path in _modules(folder):
        for name in _imports(path):
            if not name.startswith("kdcache.") or name in ROOT_MODULES:
                continue
            sub = name.split(".")[1]
            if sub not in allowed:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("folder", ["storage", "fit"])
def test_torch_free(folder):
    users = [str(p.relative_to(ROOT)) for p in _modules(folder)
             if any(n == "torch" or n.startswith("torch.") for n in _imports(p))]
    assert not users


def test_the_command_line_loads_without_torch():
    """`kdcache --help` builds every verb's parser; torch (seconds to import) waits for the work."""
    code = ("import sys; from kdcache.pipeline.cli import build_parser; build_parser(); "
            "print(sorted({'torch', 'ray', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
