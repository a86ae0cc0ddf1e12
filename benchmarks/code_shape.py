"""The shape of kdcache's library code, measured from its syntax trees.

Per folder: files and lines. Over the whole library: function length (median, p90, max),
`Any` and `dict[str, Any]` per 1,000 lines, the share of kdcache's own imports and of all
imports made inside functions, and the files that list every store kind in one collection
(where adding a kind must be written, beside the code that computes and uses it).
Run from the repository root:

    python benchmarks/code_shape.py [--json]
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
from pathlib import Path

FOLDERS = ("kdcache", "storage", "pipeline", "train", "fit")
KIND_NAMES = ("topk", "full", "sampled")


def _files(root: Path, folder: str) -> list[Path]:
    return sorted(p for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _function_lengths(tree: ast.AST) -> list[int]:
    return [
        node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno
    ]


def _imports(tree: ast.Module) -> tuple[int, int, int, int]:
    """(all imports, those inside functions, kdcache imports, kdcache imports inside functions)."""
    inside: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            inside.update(id(n) for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom))
    total = nested = own = own_nested = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        is_own = any(n.startswith("kdcache") for n in names) or (
            isinstance(node, ast.ImportFrom) and node.level > 0)
        total += 1
        nested += id(node) in inside
        own += is_own
        own_nested += is_own and id(node) in inside
    return total, nested, own, own_nested


def _strings(nodes: list[ast.expr | None]) -> set[str]:
    return {n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _enumerates_kinds(tree: ast.AST) -> bool:
    """Whether the module lists every store kind in one collection (a tuple, list, set, the keys
    of a dict, or a Literal): the places a new kind must be added to, beside its own code."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            names = _strings(list(node.elts))
        elif isinstance(node, ast.Dict):
            names = _strings(list(node.keys))
        else:
            continue
        if set(KIND_NAMES) <= names:
            return True
    return False


def measure(root: Path) -> dict[str, object]:
    folders: dict[str, dict[str, int]] = {}
    lengths: list[int] = []
    lines = any_count = dict_any = 0
    imports = [0, 0, 0, 0]
    kind_files: list[str] = []
    for folder in FOLDERS:
        files = _files(root, folder)
        n_lines = 0
        for path in files:
            text = path.read_text()
            tree = ast.parse(text)
            n_lines += len(text.splitlines())
            lengths += _function_lengths(tree)
            any_count += sum(1 for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "Any")
            any_count += text.count('"Any"')
            dict_any += text.count("dict[str, Any]")
            imports = [a + b for a, b in zip(imports, _imports(tree), strict=True)]
            if _enumerates_kinds(tree):
                kind_files.append(str(path.relative_to(root)))
        folders[folder] = {"files": len(files), "lines": n_lines}
        lines += n_lines
    lengths.sort()
    per_k = 1000 / lines
    return {
        "folders": folders,
        "library_lines": lines,
        "functions": len(lengths),
        "function_lines_median": statistics.median(lengths),
        "function_lines_p90": lengths[int(0.9 * (len(lengths) - 1))],
        "function_lines_max": lengths[-1],
        "any_per_1000_lines": round(any_count * per_k, 1),
        "dict_str_any_per_1000_lines": round(dict_any * per_k, 1),
        "imports_inside_functions": round(imports[1] / imports[0], 3),
        "own_imports_inside_functions": round(imports[3] / imports[2], 3),
        "files_listing_store_kinds": kind_files,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    result = measure(args.root)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for folder, row in result["folders"].items():  # type: ignore[attr-defined]
        print(f"{folder:10s} {row['files']:4d} files {row['lines']:6d} lines")
    for key, value in result.items():
        if key != "folders":
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
