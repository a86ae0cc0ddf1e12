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


UNPICKLERS = {"pickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}
LOADERS = ("from_pretrained", "from_config")
"""`transformers` entry points that import a repository's code when it asks (`auto_map`) and
they are allowed to (`AutoConfig.for_model` and a config class's `from_dict` never do)."""


def _calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]


def _name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


@pytest.mark.parametrize("folder", FOLDERS)
def test_nothing_unpickles(folder):
    """No module imports an unpickler or calls `torch.load` (safetensors and JSON only)."""
    wrong = [f"{p.relative_to(ROOT)} imports {n}" for p in _modules(folder) for n in _imports(p)
             if n.split(".")[0] in UNPICKLERS]
    wrong += [f"{p.relative_to(ROOT)}:{c.lineno} calls torch.load"
              for p in _modules(folder) for c in _calls(p) if _name(c) == "load"
              and isinstance(c.func, ast.Attribute) and isinstance(c.func.value, ast.Name)
              and c.func.value.id == "torch"]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("folder", FOLDERS)
def test_transformers_never_runs_model_code(folder):
    """Every `from_pretrained` (and other config or model builder) passes trust_remote_code=False."""
    wrong = []
    for path in _modules(folder):
        if "transformers" not in path.read_text() and "peft" not in path.read_text():
            continue
        for call in _calls(path):
            if _name(call) not in LOADERS:
                continue
            given = {k.arg: k.value for k in call.keywords}
            value = given.get("trust_remote_code")
            if not (isinstance(value, ast.Constant) and value.value is False):
                wrong.append(f"{path.relative_to(ROOT)}:{call.lineno} {_name(call)} without "
                             "trust_remote_code=False")
    assert not wrong, "\n".join(wrong)
