"""A chat corpus with no download: conversations about the Python standard library's own code.

Each function or class with a docstring in a stdlib `.py` file becomes a two-turn
conversation: the user asks what `module.qualname` does and the assistant answers with its
docstring (cleaned as `inspect.cleandoc` cleans it); the user then asks for its signature
and the assistant gives it (`ast.unparse` of the arguments; a class gives its bases and its
`__init__`'s arguments when it defines one). Files are parsed with `ast`, never imported. The phrasing,
and whether a system prompt opens the conversation, are picked by a hash of the document's
name, so the corpus is the same on every run and machine for the same Python.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import warnings
from pathlib import Path

Messages = list[dict[str, str]]
Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef

SYSTEM_PROMPTS = (
    "You are a helpful assistant who knows the Python standard library well.",
    "You answer questions about Python's standard library precisely and briefly.",
)
SYSTEM_EVERY = 3  # about one conversation in three opens with a system prompt
ASK_WHAT = (
    "What does `{name}` do?",
    "Can you explain `{name}`?",
    "I found `{name}` in the standard library. What is it for?",
    "Describe `{name}`, please.",
)
ASK_SIGNATURE = (
    "What is its signature?",
    "How do I call it?",
    "Which arguments does it take?",
)
SAY_SIGNATURE = (
    "Its signature is:\n\n{signature}",
    "It is defined as:\n\n{signature}",
    "{signature}",
)


def conversations(path: Path, name: str) -> list[tuple[str, Messages]]:
    """The conversations of one stdlib file (`name`: its path relative to the stdlib,
    e.g. `json/decoder.py`), as (`json/decoder.py::JSONDecoder.decode`, messages) in
    source order; none when the file does not decode as UTF-8 or does not parse. A name
    defined twice in one body gets `~2`, `~3` after its later definitions."""
    try:
        with warnings.catch_warnings():  # invalid escapes in old test files warn while parsing
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes().decode("utf-8"), filename=name)
    except (UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
        return []  # the stdlib ships a few deliberately broken or mis-encoded test files
    module = _module_name(name)
    out = []
    seen: dict[str, int] = {}
    for qualname, node in _definitions(tree.body, ""):
        doc = ast.get_docstring(node, clean=True)  # inspect.cleandoc, as help() shows it
        if doc:
            # A name defined twice (a property's setter, a platform branch) stays unique.
            seen[qualname] = seen.get(qualname, 0) + 1
            document = f"{name}::{qualname}" + (f"~{seen[qualname]}" if seen[qualname] > 1 else "")
            out.append((document, _conversation(document, f"{module}.{qualname}", doc, node)))
    return out


def _module_name(name: str) -> str:
    parts = name.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _definitions(body: list[ast.stmt], prefix: str) -> list[tuple[str, Definition]]:
    """Functions and classes of a module or class body, with their qualified names; a
    class's members follow it. Functions nested in functions are local, so left out."""
    found: list[tuple[str, Definition]] = []
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            qualname = prefix + node.name
            found.append((qualname, node))
            if isinstance(node, ast.ClassDef):
                found += _definitions(node.body, qualname + ".")
    return found


def _conversation(document: str, name: str, doc: str, node: Definition) -> Messages:
    pick = hashlib.sha256(document.encode()).digest()
    signature = SAY_SIGNATURE[pick[3] % len(SAY_SIGNATURE)].format(signature=signature_of(node))
    messages = [{"role": "system", "content": SYSTEM_PROMPTS[pick[1] % len(SYSTEM_PROMPTS)]}]
    messages = messages if pick[0] % SYSTEM_EVERY == 0 else []
    return [
        *messages,
        {"role": "user", "content": ASK_WHAT[pick[2] % len(ASK_WHAT)].format(name=name)},
        {"role": "assistant", "content": doc},
        {"role": "user", "content": ASK_SIGNATURE[pick[4] % len(ASK_SIGNATURE)]},
        {"role": "assistant", "content": signature},
    ]


def signature_of(node: Definition) -> str:
    """`def name(args) -> returns`, `async def ...`, or for a class `class Name(bases)` and
    its `__init__`'s arguments when it defines one."""
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in [*node.bases, *node.keywords])
        line = f"class {node.name}({bases})" if bases else f"class {node.name}"
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                     and n.name == "__init__"), None)
        return line if init is None else f"{line}, created as {node.name}({_arguments(init, skip_self=True)})"
    keyword = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{keyword} {node.name}({_arguments(node, skip_self=False)}){returns}"


def _arguments(node: ast.FunctionDef | ast.AsyncFunctionDef, *, skip_self: bool) -> str:
    args = node.args
    if skip_self and (args.posonlyargs or args.args):
        args = copy.copy(args)  # the tree itself is left as parsed
        if args.posonlyargs:
            args.posonlyargs = args.posonlyargs[1:]
        else:
            args.args = args.args[1:]
        # Defaults belong to the last positional arguments: at most one per argument left.
        left = len(args.posonlyargs) + len(args.args)
        args.defaults = args.defaults[max(0, len(args.defaults) - left):]
    return ast.unparse(args)
