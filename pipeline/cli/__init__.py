"""The `kdcache` command line: the entry point, and one module per verb beside it.

Each verb module in this package holds a `HELP` line, a frozen `Config` dataclass and
`run(cfg) -> int`; adding a verb means adding a module here (`import_teacher` becomes the
verb `import-teacher`). Verb modules keep their module-level imports light (no torch, no
ray), because every one is imported to build the parser.

Every verb is a frozen config dataclass whose documented fields become dashed flags
(`ray_address` -> `--ray-address`), plus `--config FILE.yaml` whose values the flags
override. Every user mistake, a malformed flag as much as a refused input, ends as one
line on stderr, `kdcache VERB: error: MESSAGE`, and exit status 1; so do environment
faults kdcache cannot fix (an unwritable output path), as the OSError's own line.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import sys
import typing
from types import ModuleType

import docstring_parser
import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from kdcache.errors import KdcacheError

DESCRIPTION = "Precompute teacher logits once, distil many students, fit distillation laws."
EXIT_ERROR = 1


def _verb_modules() -> dict[str, ModuleType]:
    found = pkgutil.iter_modules(__path__)
    names = sorted(m.name for m in found if not m.name.startswith("_"))
    return {n.replace("_", "-"): importlib.import_module(f"{__name__}.{n}") for n in names}


def add_dataclass_arguments(parser: ArgumentParser, cls: type) -> None:
    """Add one flag per field of `cls`, help text from the field's docstring.

    A field's `metadata["flag"]` names its flag when the field name cannot (`lambda`).
    """
    docs = {p.arg_name: p.description for p in docstring_parser.parse_from_object(cls).params}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):  # a group of settings: its fields, flat
            add_dataclass_arguments(parser, hints[field.name])
            continue
        kwargs: dict[str, typing.Any] = {"help": docs.get(field.name)}
        missing = dataclasses.MISSING
        required = field.default is missing and field.default_factory is missing
        if hints[field.name] is bool:
            if field.default is not False:  # a store_true flag could never turn it off
                raise TypeError(f"{cls.__name__}.{field.name}: bool flags must default to False")
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = hints[field.name]
            if field.default is not dataclasses.MISSING:
                kwargs["default"] = field.default
        if field.metadata.get("positional"):
            name = field.name
            if not required:
                kwargs["nargs"] = "?"
        else:
            name = "--" + field.metadata.get("flag", field.name.replace("_", "-"))
            kwargs["required"] = required
            kwargs["dest"] = field.name
        parser.add_argument(name, **kwargs)


def build_parser() -> tuple[ArgumentParser, dict[str, ModuleType]]:
    verbs = _verb_modules()
    parser = ArgumentParser(prog="kdcache", description=DESCRIPTION, exit_on_error=False)
    sub = parser.add_subcommands(dest="verb", required=True)
    for name, module in verbs.items():
        verb = ArgumentParser(prog=f"kdcache {name}", description=module.HELP, exit_on_error=False)
        verb.add_argument("--config", action=ActionConfigFile, help="YAML file of flag values.")
        add_dataclass_arguments(verb, module.Config)
        sub.add_subcommand(name, verb, help=module.HELP)
    return parser, verbs


def one_line(message: str) -> str:
    """Collapse a multi-line message (jsonargparse nests its reasons) into one line."""
    parts = (re.sub(r"^- ", "", line.strip()) for line in str(message).splitlines())
    return "; ".join(part for part in parts if part)


def parser_message(message: str, verbs: dict[str, ModuleType]) -> str:
    """jsonargparse's message in one line, naming flags as they are typed (`--batch-size`,
    not `Parser key "batch_size"` or `train.batch_size`)."""
    text = one_line(message)
    text = re.sub(r'Parser key "([\w.]+)":;?', lambda m: f"--{_flag(m[1])}:", text)
    text = re.sub(r"Expected a <class '(\w+)'>\. Got value: ", r"expected \1, got ", text)
    text = re.sub(r"Does not validate against any of the Union subtypes.*?Given value: (.*)$", _union, text)
    names = "|".join(re.escape(v) for v in verbs)
    return re.sub(rf"\b(?:{names})\.(\w+)\b", lambda m: f"--{_flag(m[1])}", text)


def _union(match: re.Match[str]) -> str:
    """jsonargparse's long Union message as "expected int or null, got x"."""
    kinds = re.findall(r"Expected a <class '(\w+)'>", match[0])
    names = ["null" if k == "NoneType" else k for k in dict.fromkeys(kinds)]
    return f"expected {' or '.join(names)}, got {match[1]}"


def _flag(key: str) -> str:
    return key.rsplit(".", 1)[-1].replace("_", "-")


def check_config_files(argv: list[str]) -> dict[str, set[str]]:
    """Parse every `--config FILE` up front, so a broken file is named; returns its keys."""
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    keys = {}
    for path in files:
        try:
            with open(path) as fh:
                doc = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ArgumentError(None, f"{path}: not valid YAML ({one_line(str(exc))})") from exc
        except OSError as exc:
            raise ArgumentError(None, f"{path}: cannot read the --config file ({exc.strerror})") from exc
        if not isinstance(doc, dict):
            raise ArgumentError(None, f"{path}: a --config file must be a mapping of flag names to values")
        keys[path] = {str(k) for k in doc}
    return keys


def _name_config(message: str, keys: dict[str, set[str]], leading: bool = False) -> str:
    """Say which --config file a refused value came from: one whose key the message names
    (only at its start when `leading`, as library errors that begin with a path name it)."""
    for path, names in keys.items():
        for name in names:
            pattern = rf"\b{re.escape(name)}\b|--{re.escape(_flag(name))}\b"
            if re.match(pattern, message) if leading else re.search(pattern, message):
                return f"{path}: {message}"
    return message


def _verb_of(argv: list[str], verbs: dict[str, ModuleType]) -> str:
    return next((a for a in argv if a in verbs), "")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, verbs = build_parser()
    name = _verb_of(argv, verbs)
    prefix = f"kdcache {name}".strip()
    keys: dict[str, set[str]] = {}
    try:
        keys = check_config_files(argv)
        ns = parser.parse_args(argv)
        module = verbs[ns.verb]
        # jsonargparse keeps a flag whose name is a Namespace method (`cache --values`) under
        # the name with a zero-width space in front.
        values = {k.removeprefix("\u200b"): v for k, v in vars(ns[ns.verb]).items() if k != "config"}
        build = getattr(module.Config, "from_flat", module.Config)  # grouped settings take flat flags
        return int(module.run(build(**values)) or 0)
    except ArgumentError as exc:
        print(f"{prefix}: error: {_name_config(parser_message(str(exc), verbs), keys)}", file=sys.stderr)
        return EXIT_ERROR
    except KdcacheError as exc:
        print(f"{prefix}: error: {_name_config(one_line(str(exc)), keys, leading=True)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # the environment, not kdcache: the message names the path
        print(f"{prefix}: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
