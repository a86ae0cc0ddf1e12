"""The `kdcache` command line: verbs discovered from `kdcache.pipeline.commands`.

Every verb is a frozen config dataclass whose documented fields become dashed flags
(`ray_address` -> `--ray-address`), plus `--config FILE.yaml` whose values the flags
override. User mistakes end as one line on stderr and exit status 1.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import sys
import typing
from types import ModuleType

import docstring_parser
from jsonargparse import ActionConfigFile, ArgumentParser

from kdcache.fit.errors import FitError
from kdcache.pipeline import commands
from kdcache.pipeline.errors import PipelineError
from kdcache.storage.errors import StoreError
from kdcache.train.errors import TrainError

DESCRIPTION = "Precompute teacher logits once, distil many students, fit distillation laws."
USER_ERRORS = (StoreError, FitError, TrainError, PipelineError)


def _verb_modules() -> dict[str, ModuleType]:
    found = pkgutil.iter_modules(commands.__path__)
    names = sorted(m.name for m in found if not m.name.startswith("_"))
    return {
        n.replace("_", "-"): importlib.import_module(f"{commands.__name__}.{n}") for n in names
    }


def add_dataclass_arguments(parser: ArgumentParser, cls: type) -> None:
    """Add one flag per field of `cls`, help text from the field's docstring.

    A field's `metadata["flag"]` names its flag when the field name cannot (`lambda`).
    """
    docs = {p.arg_name: p.description for p in docstring_parser.parse_from_object(cls).params}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
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
    parser = ArgumentParser(prog="kdcache", description=DESCRIPTION)
    sub = parser.add_subcommands(dest="verb", required=True)
    for name, module in verbs.items():
        verb = ArgumentParser(prog=f"kdcache {name}", description=module.HELP)
        verb.add_argument("--config", action=ActionConfigFile, help="YAML file of flag values.")
        add_dataclass_arguments(verb, module.Config)
        sub.add_subcommand(name, verb, help=module.HELP)
    return parser, verbs


def main(argv: list[str] | None = None) -> int:
    parser, verbs = build_parser()
    ns = parser.parse_args(sys.argv[1:] if argv is None else argv)
    name = ns.verb
    module = verbs[name]
    values = {k: v for k, v in vars(ns[name]).items() if k != "config"}
    try:
        return int(module.run(module.Config(**values)) or 0)
    except USER_ERRORS as exc:
        print(f"kdcache {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kdcache {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
