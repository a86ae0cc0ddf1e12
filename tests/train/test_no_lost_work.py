"""`kdcache train` loses no work: inputs refused before training, one writer per OUT, lost rows healed."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from filelock import FileLock

from kdcache.pipeline.cli import main
from kdcache.storage.model_record import MODEL_RECORD as META
from kdcache.storage.runs import RunRow, append_run, has_run
from kdcache.train import run as train_run
from kdcache.train.errors import TrainError
from kdcache.train.job import TrainJobConfig
from kdcache.train.model_dir import WEIGHTS, load_model_dir


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--layers", "1", "--rho", "32",
            "--tokens", "2000", "--batch-size", "4", "--eval-rows", "8", "--checkpoint-every", "4",
            "--threads", "1", "--quiet", *extra]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kdcache train: error: "), err
    return err


def _snapshot(out: Path) -> tuple[int, bytes]:
    weights = out / WEIGHTS
    return weights.stat().st_mtime_ns, weights.read_bytes()


def test_corrupt_or_foreign_runs_table_refused_before_training(
    tiny_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m"
    runs = tmp_path / "runs.parquet"
    runs.write_bytes(b"not parquet at all")
    assert main(_argv(tiny_data_path, out, "--runs", str(runs))) == 1
    err = _one_line_error(capsys)
    assert f"{runs}: not a readable Parquet runs table" in err
    assert not out.exists() and runs.read_bytes() == b"not parquet at all"

    pq.write_table(pa.table({"run_id": ["a"], "params": [1], "tokens": [2], "loss": ["abc"]}), runs)
    assert main(_argv(tiny_data_path, out, "--runs", str(runs))) == 1
    assert "column 'loss' must hold numbers" in _one_line_error(capsys)
    pq.write_table(pa.table({"run_id": ["a"], "colour": ["red"]}), runs)
    assert main(_argv(tiny_data_path, out, "--runs", str(runs))) == 1
    assert "unknown runs-table column 'colour'" in _one_line_error(capsys)
    assert main(_argv(tiny_data_path, out, "--runs", str(tmp_path / "runs.csv"))) == 1
    assert "appended as Parquet" in _one_line_error(capsys)
    assert not out.exists()


def test_unwritable_runs_or_out_refused_before_training(
    tiny_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    out = tmp_path / "m"
    assert main(_argv(tiny_data_path, out, "--runs", str(blocker / "runs.parquet"))) == 1
    assert f"runs.parquet: --runs lies below {blocker}, which is a file" in _one_line_error(capsys)
    assert main(_argv(tiny_data_path, out, "--runs", str(tmp_path))) == 1
    assert f"{tmp_path}: --runs is a directory, not a file" in _one_line_error(capsys)
    assert not out.exists()

    assert main(_argv(tiny_data_path, blocker)) == 1
    assert f"{blocker}: --out is a file, not a directory" in _one_line_error(capsys)
    assert main(_argv(tiny_data_path, blocker / "deeper" / "m")) == 1
    assert f"--out lies below {blocker}, which is a file" in _one_line_error(capsys)
    assert blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain-file"]


def test_eval_rows_zero_refused_before_any_output(
    tiny_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TrainError, match="--eval-rows must be >= 1"):
        TrainJobConfig.from_flat(data="d", out="o", layers=1, eval_rows=0)
    with pytest.raises(TrainError, match="--threads must be >= 1"):
        TrainJobConfig.from_flat(data="d", out="o", layers=1, threads=0)
    assert main([*_argv(tiny_data_path, tmp_path / "m"), "--eval-rows", "0"]) == 1
    assert "eval-rows must be >= 1" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_lost_row_is_added_on_rerun_without_retraining(
    tiny_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, runs = tmp_path / "m", tmp_path / "runs.parquet"
    argv = _argv(tiny_data_path, out, "--runs", str(runs))
    assert main([*argv, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    before = _snapshot(out)
    assert pq.read_table(runs).to_pylist()[0]["loss"] == row["loss"]

    runs.unlink()  # the table is lost; the finished model keeps its row in kdcache.json
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == f"added the missing runs-table row for {out}"
    assert _snapshot(out) == before  # nothing was trained or saved again
    (again,) = pq.read_table(runs).to_pylist()
    assert {k: again[k] for k in row} == row

    assert main(argv) == 1  # the row is there now: a finished model is refused as before
    assert "already holds a finished model" in _one_line_error(capsys)
    assert len(pq.read_table(runs)) == 1
    assert load_model_dir(out).record.training["run_id"] == "m"  # the lock file breaks no loading


def test_kill_between_model_and_row_is_healed(
    tiny_data_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out, runs = tmp_path / "m", tmp_path / "runs.parquet"
    append_run(runs, RunRow(run_id="other", kind="supervised", params=1, tokens=2, loss=3.0))
    argv = _argv(tiny_data_path, out, "--runs", str(runs))

    def killed(path, row) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_run, "append_run", killed)
    assert main(argv) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert (out / META).is_file() and (out / "checkpoint").is_dir()
    assert [r["run_id"] for r in pq.read_table(runs).to_pylist()] == ["other"]
    before = _snapshot(out)

    assert main(argv) == 0
    assert "added the missing runs-table row" in capsys.readouterr().out
    assert _snapshot(out) == before and not (out / "checkpoint").exists()
    rows = pq.read_table(runs).to_pylist()
    assert [r["run_id"] for r in rows] == ["other", "m"]
    assert rows[1]["loss"] == json.loads((out / META).read_text())["training"]["loss"]


def test_second_writer_of_one_out_refused(
    tiny_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, runs = tmp_path / "m", tmp_path / "runs.parquet"
    out.mkdir()
    with FileLock(str(out / train_run.LOCK)):  # as a first `kdcache train` into OUT holds it
        assert main(_argv(tiny_data_path, out, "--runs", str(runs))) == 1
        assert f"another kdcache train is writing {out}" in _one_line_error(capsys)
    assert not runs.exists() and not (out / "checkpoint").exists() and not (out / META).exists()
    assert main(_argv(tiny_data_path, out, "--runs", str(runs))) == 0  # once released, it runs
    assert len(pq.read_table(runs)) == 1


def test_has_run_matches_exactly_and_nan_once(tmp_path: Path) -> None:
    runs = tmp_path / "runs.parquet"
    row = {"run_id": "a", "kind": "supervised", "params": 10, "tokens": 2048, "loss": float("nan")}
    assert not has_run(runs, RunRow.from_json(row))
    append_run(runs, RunRow.from_json(row))
    assert has_run(runs, RunRow.from_json(row))
    assert not has_run(runs, RunRow.from_json({**row, "tokens": 2049}))
    assert not has_run(runs, RunRow.from_json({**row, "loss": 1.0}))
