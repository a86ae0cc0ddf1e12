"""`kdcache run` end to end on a tiny preset: every stage's output, then a rerun that resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kdcache.pipeline import study
from kdcache.pipeline.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY = study.Preset(
    vocab_size=384, seq_len=32, max_tokens=60_000, rho=32,
    teachers={"teacher-L2": (2, 20_000), "teacher-L3": (3, 20_000)},
    k=8, full_store_rows=64, student_layers=(1,), student_tokens=(4_096,), batch_size=8,
)


def test_run_writes_every_stage_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(study.PRESETS, "tiny", TINY)
    out = tmp_path / "run"
    assert main(["run", "--preset", "tiny", "--out", str(out)]) == 0
    assert f"wrote {out / 'report.html'}" in capsys.readouterr().out

    rows = pq.read_table(out / "runs.parquet").to_pylist()
    kinds = [r["kind"] for r in rows]
    # 2 teachers + 1 supervised student; 2 top-k stores x 2 lambdas + 1 full store; 1 online.
    assert kinds.count("supervised") == 3 and kinds.count("distill") == 5 and kinds.count("online") == 1
    assert {p.name for p in (out / "stores").iterdir()} == {"teacher-L2", "teacher-L3", "teacher-L2-full"}
    notes = json.loads((out / "fits" / "notes.json").read_text())
    assert "not fitted" in notes["supervised"] and "not fitted" in notes["distillation"]
    plans = json.loads((out / "plans.json").read_text())
    assert len(plans) == 4 and all(p["student_loss"] > 0 for p in plans)
    costs = json.loads((out / "costs.json").read_text())
    assert [c["label"] for c in costs] == ["teacher-L2", "teacher-L3"]
    html = (out / "report.html").read_text()
    assert "teacher-L2-full" in html and html.count("data:image/png;base64,") == 2
    assert "not fitted" in html and "Missing: fits/supervised.json" not in html  # the note says why

    # Rerun: every training run and store is found finished; nothing is appended twice.
    before = {p: p.stat().st_mtime_ns for p in (out / "students").rglob("model.safetensors")}
    assert main(["run", "--preset", "tiny", "--out", str(out)]) == 0
    assert len(pq.read_table(out / "runs.parquet")) == len(rows)
    assert before == {p: p.stat().st_mtime_ns for p in (out / "students").rglob("model.safetensors")}


def test_unknown_preset_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["run", "--preset", "huge", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "--preset must be one of" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()
