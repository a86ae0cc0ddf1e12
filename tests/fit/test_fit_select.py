"""`kdcache fit` fits the law grid by default, `--where` filters any runs table, and the output
says what was fitted, what was left out, and which coefficients sit on their bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from kdcache.fit.errors import FitError
from kdcache.fit.presets import PAPER_DISTILLATION
from kdcache.fit.selection import DEFAULT_WHERE, parse_where, select
from kdcache.fit.synthetic import distillation_runs, supervised_runs
from kdcache.pipeline.cli import main
from kdcache.storage.runs import RunRow, append_run


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """40 supervised and 60 distilled runs on the paper's laws, plus runs the law must not see:
    5 at lambda 0.7, 4 at temperature 2 and 3 findings-only runs, all far off the law."""
    path = tmp_path / "runs.parquet"
    sup = supervised_runs(PAPER_DISTILLATION.supervised, 40, seed=3)
    for i in range(40):
        append_run(path, RunRow(run_id=f"sup-{i}", kind="supervised", params=int(sup["params"][i]),
                                tokens=int(sup["tokens"][i]), loss=float(sup["loss"][i])))
    dist = distillation_runs(PAPER_DISTILLATION, 72, seed=4)
    for i in range(72):
        lam, temperature, run_id = 1.0, 1.0, f"distill-{i}"
        if 60 <= i < 65:
            lam = 0.7
        elif 65 <= i < 69:
            temperature = 2.0
        elif i >= 69:
            run_id = f"finding-distill-{i}"
        far = 1.0 if i < 60 else 1.5
        append_run(path, RunRow(run_id=run_id, kind="distill", params=int(dist["params"][i]),
                                tokens=int(dist["tokens"][i]), loss=float(dist["loss"][i]) * far,
                                teacher_loss=float(dist["teacher_loss"][i]), lam=lam, temperature=temperature,
                                store=f"/runs/stores/teacher-{i % 2}.zarr"))
    return path


def _fit(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:  # type: ignore[type-arg]
    assert main(["fit", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_default_fits_the_law_grid_and_names_what_it_left_out(table: Path, capsys) -> None:
    out = _fit(capsys, ["--runs", str(table), "--law", "distillation", "--supervised", "paper"])
    assert out["runs"] == 60
    assert out["selection"]["selected"] == 100 and out["selection"]["runs_in_table"] == 112
    left = out["selection"]["left_out"]
    assert left["run_id!=finding-*"] == [f"finding-distill-{i}" for i in range(69, 72)]
    assert left["lambda=1"] == [f"distill-{i}" for i in range(60, 65)]
    assert left["temperature=1"] == [f"distill-{i}" for i in range(65, 69)]
    assert out["supervised_at_bounds"] == []  # a published law has no bounds of its own
    # The text says the same, and which coefficients sit on a bound.
    assert main(["fit", "--runs", str(table), "--law", "distillation", "--supervised", "paper"]) == 0
    text = capsys.readouterr().out
    assert "selected 100 of 112 rows" in text and "3 by run_id!=finding-*" in text and "\nat_bounds: " in text


@pytest.mark.slow
def test_where_replaces_the_default(table: Path, capsys) -> None:
    out = _fit(capsys, ["--runs", str(table), "--law", "distillation", "--supervised", "paper",
                        "--where", "kind=distill,lambda=0.7|1,temperature!=2,run_id!=finding-*"])
    assert out["runs"] == 65 and "kind=distill" in out["selection"]["left_out"]
    everything = _fit(capsys, ["--runs", str(table), "--law", "supervised", "--where", "all"])
    assert everything["selection"]["selected"] == 112 and everything["runs"] == 40
    # A store by its directory name, with or without .zarr; supervised rows have none and stay.
    stores = [{"run_id": "a", "store": "/x/teacher-0.zarr"}, {"run_id": "b", "store": "/x/teacher-1.zarr"},
              {"run_id": "c", "store": None}]
    one = select(pa.Table.from_pylist(stores), "store=teacher-0")
    assert one.table.column("run_id").to_pylist() == ["a", "c"]


def test_bad_where_is_one_line(table: Path, capsys) -> None:
    for spec, says in (("lambda", "expects COLUMN=VALUE"), ("colour=red", "names column 'colour'")):
        assert main(["fit", "--runs", str(table), "--law", "supervised", "--where", spec]) == 1
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    with pytest.raises(FitError, match="is empty"):
        parse_where(" , ")
    assert len(parse_where(DEFAULT_WHERE)) == 3
