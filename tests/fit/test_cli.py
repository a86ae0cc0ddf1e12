"""`kdcache fit`, `plan` and `cost` through the CLI: JSON key names, plots, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from kdcache.fit.presets import PAPER_DISTILLATION
from kdcache.fit.synthetic import distillation_runs, supervised_runs
from kdcache.pipeline.cli import main
from kdcache.storage.runs import RunRow, append_run

SUPERVISED_KEYS = {"E", "A", "B", "alpha", "beta", "gamma"}
DISTILLATION_KEYS = {"A", "B", "alpha", "beta", "gamma", "c0", "c1", "f1", "d1"}


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:  # type: ignore[type-arg]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def runs_csv(tmp_path: Path) -> Path:
    sup = supervised_runs(PAPER_DISTILLATION.supervised, 40, seed=3)
    dist = distillation_runs(PAPER_DISTILLATION, 60, seed=4)
    rows = [
        {"kind": "supervised", "params": n, "tokens": d, "loss": ls, "teacher_loss": None}
        for n, d, ls in zip(sup["params"], sup["tokens"], sup["loss"], strict=True)
    ]
    rows += [
        {"kind": "distill", "params": n, "tokens": d, "loss": ls, "teacher_loss": t}
        for n, d, ls, t in zip(
            dist["params"], dist["tokens"], dist["loss"], dist["teacher_loss"], strict=True
        )
    ]
    path = tmp_path / "runs.csv"
    pacsv.write_csv(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.slow
def test_fit_supervised_json_and_plot(
    runs_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "fit.png"
    out = _json(
        capsys,
        [
            "fit",
            "--runs",
            str(runs_csv),
            "--law",
            "supervised",
            "--fix",
            "gamma=0.452",
            "--bootstrap",
            "8",
            "--json",
            "--plot",
            str(png),
        ],
    )
    assert out["law"] == "supervised"
    assert set(out["params"]) == SUPERVISED_KEYS
    assert out["params"]["gamma"] == 0.452
    assert set(out["bootstrap"]["intervals"]) == SUPERVISED_KEYS
    assert out["extrapolation"]["held_out_runs"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_fit_distillation_json_from_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "runs.parquet"
    sup = supervised_runs(PAPER_DISTILLATION.supervised, 30, seed=1)
    dist = distillation_runs(PAPER_DISTILLATION, 40, seed=2)
    for i in range(30):
        append_run(
            table,
            RunRow(run_id=f"s{i}", kind="supervised", params=int(sup["params"][i]),
                   tokens=int(sup["tokens"][i]), loss=float(sup["loss"][i])),
        )
    for i in range(40):
        append_run(
            table,
            RunRow(run_id=f"d{i}", kind="distill", params=int(dist["params"][i]),
                   tokens=int(dist["tokens"][i]), loss=float(dist["loss"][i]),
                   teacher_loss=float(dist["teacher_loss"][i])),
        )
    # --holdout-loss 0 holds nothing out: skips the extrapolation refit, which other tests cover.
    out = _json(
        capsys, ["fit", "--runs", str(table), "--law", "distillation", "--holdout-loss", "0", "--json"]
    )
    assert out["extrapolation"]["held_out_runs"] == 0
    assert out["law"] == "distillation"
    assert set(out["params"]) == DISTILLATION_KEYS
    assert set(out["supervised"]) == SUPERVISED_KEYS
    fit_json = tmp_path / "fit.json"
    fit_json.write_text(json.dumps(out))
    plan = _json(
        capsys,
        [
            "plan",
            "--law",
            str(fit_json),
            "--student-params",
            "1e9",
            "--compute",
            "1e21",
            "--no-crossover",
            "--extrapolate",
            "--json",
        ],
    )
    # The fitted law leaves a coefficient on its bound (or the recipe far beyond its runs):
    # `plan` answers only with --extrapolate, and says why.
    assert plan["student_loss"] > 0 and plan["extrapolated"]


def test_fit_distillation_needs_a_supervised_law(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dist = distillation_runs(PAPER_DISTILLATION, 20, seed=2)
    path = tmp_path / "only_distill.csv"
    pacsv.write_csv(
        pa.table(
            {"kind": ["distill"] * 20, **{k: dist[k] for k in ("params", "tokens", "loss", "teacher_loss")}}
        ),
        path,
    )
    assert main(["fit", "--runs", str(path), "--law", "distillation"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--supervised" in err and len(err.splitlines()) == 1


def test_fit_refuses_text_in_a_numeric_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.csv"
    path.write_text("kind,params,tokens,loss\nsupervised,1e8,2e9,3.1\nsupervised,2e8,4e9,abc\n")
    assert main(["fit", "--runs", str(path), "--law", "supervised"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{path}: column 'loss' must hold numbers" in err and "'abc'" in err


def test_plan_refuses_recipes_outside_the_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    # 1e10 FLOPs buy a 1e9-param student 1.36 tokens: no recipe, in the default scenario too.
    assert main(["plan", "--law", "paper", "--student-params", "1e9", "--compute", "1e10"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kdcache plan: error: " in err
    assert "compute 1e10 buys the student 1.36 tokens, fewer than the bound D_S >= 1e6" in err
    assert main(["plan", "--student-params", "1e9", "--compute", "1e28", "--no-crossover"]) == 1
    assert "more than the bound D_S <= 1e17" in capsys.readouterr().err


def test_fit_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("params,loss\n1,2\n")
    assert main(["fit", "--runs", str(path), "--law", "supervised"]) == 1
    assert "missing column 'tokens'" in capsys.readouterr().err
    assert main(["fit", "--runs", str(path), "--law", "quadratic"]) == 1
    assert main(["fit", "--runs", str(path), "--law", "supervised", "--fix", "gamma"]) == 1


PLAN_KEYS = {
    "student_params",
    "student_tokens",
    "teacher_params",
    "teacher_tokens",
    "teacher_loss",
    "student_loss",
    "supervised_loss",
    "flops",
}


@pytest.mark.parametrize("scenario", ["best", "pretraining+inference"])
def test_plan_json_keys(scenario: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = _json(
        capsys,
        [
            "plan",
            "--law",
            "paper",
            "--student-params",
            "1e9",
            "--compute",
            "1e21",
            "--scenario",
            scenario,
            "--no-crossover",
            "--json",
        ],
    )
    assert set(out) >= PLAN_KEYS
    assert set(out["flops"]) == {"student_training", "teacher_logits", "teacher_training"}
    assert sum(out["flops"].values()) == pytest.approx(1e21, rel=1e-6)


@pytest.mark.slow
def test_plan_crossover_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "plan.png"
    out = _json(
        capsys, ["plan", "--student-params", "1e9", "--compute", "1e21", "--json", "--plot", str(png)]
    )
    assert out["distill"] is True
    assert 1e21 < out["crossover_compute"] < 1e24
    assert png.exists() and (tmp_path / "plan-capacity-gap.png").exists()


def test_plan_refuses_supervised_only_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--law", "chinchilla", "--student-params", "1e9", "--compute", "1e21"]) == 1
    assert "only a supervised law" in capsys.readouterr().err


COST_KEYS = {"online_flops", "cache_flops", "store_bytes", "break_even_students"}


def test_cost_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "cost.png"
    out = _json(
        capsys,
        [
            "cost",
            "--teacher-params",
            "7e9",
            "--student-params",
            "1e9",
            "--tokens",
            "1e11",
            "--students",
            "4",
            "--json",
            "--plot",
            str(png),
        ],
    )
    assert set(out) >= COST_KEYS
    assert out["students"] == 4
    assert out["store_bytes"] == pytest.approx(268 * 1e11)
    assert png.exists()
    measured = _json(
        capsys,
        [
            "cost",
            "--teacher-params",
            "7e9",
            "--student-params",
            "1e9",
            "--tokens",
            "1e11",
            "--bytes-per-token",
            "150",
            "--json",
        ],
    )
    assert measured["store_bytes"] == pytest.approx(150 * 1e11)


def test_cost_calibrates_from_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "runs.parquet"
    append_run(
        table,
        RunRow(run_id="a", kind="supervised", params=10**8, tokens=10**9, loss=3.0, tokens_per_s=1000.0),
    )
    out = _json(
        capsys,
        [
            "cost",
            "--teacher-params",
            "1e9",
            "--student-params",
            "1e8",
            "--tokens",
            "1e10",
            "--runs",
            str(table),
            "--json",
        ],
    )
    from kdcache.fit.flops import forward_flops

    assert out["calibrated"] is True
    assert out["flops_per_s"] == pytest.approx(3 * forward_flops(1e8) * 1000.0)


def test_cost_from_a_real_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kdcache import storage
    from tests.storage.conftest import make_meta, make_rows, shard_of

    meta = make_meta(rows=8, seq_len=8, vocab=300, k=4, shard_rows=4)
    path = tmp_path / "store.zarr"
    writer = storage.StoreWriter.open(path, meta)
    rows = make_rows(meta)
    for shard in range(meta.num_shards):
        writer.write_shard(shard, shard_of(meta, rows, shard))
    summary = storage.summarize(path)
    out = _json(
        capsys,
        [
            "cost",
            "--teacher-params",
            "1e9",
            "--student-params",
            "1e8",
            "--tokens",
            "1e10",
            "--store",
            str(path),
            "--json",
        ],
    )
    assert out["bytes_per_token"] == pytest.approx(summary["bytes_per_token"])
    assert out["store_bytes"] == pytest.approx(summary["bytes_per_token"] * 1e10)
    assert np.isfinite(out["break_even_students"])
