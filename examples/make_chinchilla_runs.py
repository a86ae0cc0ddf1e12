"""Write `examples/chinchilla_runs.csv`, the Chinchilla runs as a kdcache runs table.

The data are Epoch AI's extraction of Figure 4 of Hoffmann et al. 2022 ("Training
Compute-Optimal Large Language Models"), made for their replication study: Besiroglu,
Erdil, Barnett, You 2024, "Chinchilla Scaling: A replication attempt" (arXiv 2404.10102).
The extracted points are shipped unchanged as `tests/fit/data/chinchilla_svg_extracted.csv`
(see `tests/fit/data/README.md` for their source); this script turns them into the
`params, tokens, loss` table that `kdcache fit` reads:

- `params` = `Model Size` (N),
- `tokens` = `Training FLOP` / (6 N) (D = C / 6N), rounded to an integer,
- `loss` as extracted,

with Epoch's preprocessing: the 5 highest-loss points are dropped (245 points, 240 runs),
as in their analysis and in `tests/fit/test_fitting.py`. Standard library only. From the
repository root:

    python examples/make_chinchilla_runs.py
    kdcache fit --runs examples/chinchilla_runs.csv --law supervised --delta 1e-3 --fix gamma=1
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "fit" / "data" / "chinchilla_svg_extracted.csv"
TARGET = ROOT / "examples" / "chinchilla_runs.csv"
#: Epoch AI dropped the 5 highest-loss points of the extraction before fitting.
DROP_HIGHEST = 5


def chinchilla_runs(source: Path = SOURCE) -> list[tuple[int, int, float]]:
    """(params, tokens, loss) per kept point, in the extraction's order."""
    with open(source, newline="") as fh:
        points = [
            (float(row["Model Size"]), float(row["Training FLOP"]), float(row["loss"]))
            for row in csv.DictReader(fh)
        ]
    highest = sorted(range(len(points)), key=lambda i: points[i][2])[len(points) - DROP_HIGHEST:]
    dropped = set(highest)
    return [
        (round(n), round(c / (6 * n)), loss)
        for i, (n, c, loss) in enumerate(points)
        if i not in dropped
    ]


def write(target: Path = TARGET, source: Path = SOURCE) -> int:
    """Write the runs table to `target`; returns the number of runs."""
    runs = chinchilla_runs(source)
    with open(target, "w", newline="") as fh:
        out = csv.writer(fh, lineterminator="\n")
        out.writerow(["params", "tokens", "loss"])
        out.writerows((n, d, repr(loss)) for n, d, loss in runs)
    return len(runs)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else TARGET
    print(f"wrote {path}: {write(path)} runs")
