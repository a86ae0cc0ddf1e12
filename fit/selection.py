"""Which rows of a runs table a law is fitted to: the law grid by default, or a `--where` filter.

The distillation law (Eq. 8) describes pure distillation (lambda = 1) at temperature 1, as
the paper fitted it; runs at other lambdas or temperatures, and the runs `kdcache run`
trains only to test the paper's findings (their ids start with `finding-`: the full store,
the extra seeds), are not points of that law. `DEFAULT_WHERE` says so as a filter, and both
`kdcache fit` and `kdcache run` select with it, so the command line fits what the pipeline fits.

A filter is clauses joined by commas, each `COLUMN=VALUE` or `COLUMN!=VALUE`, with
alternatives joined by `|` (`kind=distill|online`) and shell wildcards in text
(`run_id!=finding-*`). Numbers compare as numbers (`lambda=1` matches 1.0). A clause judges
only the rows that have a value in its column: supervised runs have no lambda, temperature
or store, so `lambda=1` keeps them, and a distillation fit still finds its supervised rows.
`store=NAME` matches the store's path or its directory name, with or without `.zarr`.
`all` selects every row.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from kdcache.fit.errors import FitError

FINDING_PREFIX = "finding-"
"""Run ids of the runs `kdcache run` trains for the findings only (not the law grid)."""
DEFAULT_WHERE = f"run_id!={FINDING_PREFIX}*,lambda=1,temperature=1"
ALL = "all"


@dataclasses.dataclass(frozen=True)
class Clause:
    column: str
    values: tuple[str, ...]
    negate: bool

    def text(self) -> str:
        return f"{self.column}{'!=' if self.negate else '='}{'|'.join(self.values)}"

    def keeps(self, value: Any) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return True
        hit = any(_matches(value, v, self.column) for v in self.values)
        return hit != self.negate


def _matches(value: Any, wanted: str, column: str) -> bool:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return math.isclose(float(value), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
        except ValueError:
            return fnmatch.fnmatchcase(str(value), wanted)
    text = str(value)
    names = [text]
    if column == "store":
        name = Path(text).name
        names += [name, name.removesuffix(".zarr")]
    return any(fnmatch.fnmatchcase(n, wanted) for n in names)


def parse_where(spec: str, flag: str = "--where") -> tuple[Clause, ...]:
    """'kind=distill|online,lambda!=0.7' -> clauses; `all` -> none."""
    if spec.strip() == ALL:
        return ()
    clauses = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        negate = "!=" in item
        column, _, values = item.partition("!=" if negate else "=")
        column, options = column.strip(), tuple(v.strip() for v in values.split("|") if v.strip())
        if not column or not options or "=" not in item:
            raise FitError(f"{flag} expects COLUMN=VALUE[|VALUE] or COLUMN!=VALUE, joined by commas, "
                           f"or 'all'; got {item!r}")
        clauses.append(Clause(column, options, negate))
    if not clauses:
        raise FitError(f"{flag} is empty: give clauses like 'kind=distill,lambda=1', or 'all'")
    return tuple(clauses)


@dataclasses.dataclass(frozen=True)
class Selection:
    """The rows kept, and the run ids left out under the clause that left each out."""

    table: pa.Table
    where: str
    left_out: dict[str, list[str]]
    """Clause text -> run ids (or row numbers where the table has no run_id) it left out."""

    @property
    def runs_in_table(self) -> int:
        return self.table.num_rows + sum(len(ids) for ids in self.left_out.values())

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "runs_in_table": self.runs_in_table, "selected": self.table.num_rows,
                "left_out": self.left_out}

    def summary(self) -> str:
        """'selected 25 of 45 runs (where ...); left out 12 by run_id!=finding-*, 8 by lambda=1'."""
        text = f"selected {self.table.num_rows} of {self.runs_in_table} runs (--where '{self.where}')"
        if self.left_out:
            text += "; left out " + ", ".join(f"{len(ids)} by {c}" for c, ids in self.left_out.items())
        return text


def select(table: pa.Table, where: str = DEFAULT_WHERE, *, source: str = "runs table") -> Selection:
    """The rows of `table` every clause of `where` keeps; a clause on a column the table lacks
    is refused (naming the table and the column), except the default's, which a table from
    elsewhere (params, tokens, loss only) passes whole."""
    clauses = parse_where(where)
    names = table.column_names
    if where != DEFAULT_WHERE:
        unknown = [c.column for c in clauses if c.column not in names]
        if unknown:
            raise FitError(f"{source}: --where names column '{unknown[0]}', which the table lacks "
                           f"(columns: {', '.join(names)})")
    ids = (table.column("run_id").to_pylist() if "run_id" in names
           else [f"row {i}" for i in range(table.num_rows)])
    keep = [True] * table.num_rows
    left_out: dict[str, list[str]] = {}
    for clause in clauses:
        if clause.column not in names:
            continue
        for i, value in enumerate(table.column(clause.column).to_pylist()):
            if keep[i] and not clause.keeps(value):
                keep[i] = False
                left_out.setdefault(clause.text(), []).append(str(ids[i]))
    return Selection(table.filter(pa.array(keep, type=pa.bool_())), where, left_out)
