"""`kdcache run`'s fit stage: enough runs are fitted (lambda = 1 only), too few fall back and say so."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from kdcache.fit.presets import load_distillation
from kdcache.fit.synthetic import distillation_runs, supervised_runs
from kdcache.pipeline.study import run as study
from kdcache.storage.runs import RunRow, append_run

FAST = replace(study.PRESETS["demo"], min_runs_to_fit=(20, 30), bootstrap=0)


def _table(path: Path, supervised: int, distilled: int, mixed: int) -> None:
    """Synthetic runs; the distilled ones read the preset's first grid store, as `kdcache run`'s do."""
    store = str((path.parent / "stores" / next(iter(FAST.teachers))).resolve())
    law = load_distillation("paper")
    sup = supervised_runs(law.supervised, supervised, seed=1)
    for i in range(supervised):
        append_run(path, RunRow(run_id=f"s{i}", kind="supervised", params=int(sup["params"][i]),
                                tokens=int(sup["tokens"][i]), loss=float(sup["loss"][i])))
    dist = distillation_runs(law, distilled + mixed, seed=2)
    for i in range(distilled + mixed):
        lam = 1.0 if i < distilled else 0.7
        loss = float(dist["loss"][i]) * (1.0 if lam == 1.0 else 1.5)  # far off the law: must be left out
        run_id = f"d{i}" if lam == 1.0 else f"finding-d{i}"
        append_run(path, RunRow(run_id=run_id, kind="distill", params=int(dist["params"][i]),
                                tokens=int(dist["tokens"][i]), loss=loss,
                                teacher_loss=float(dist["teacher_loss"][i]), lam=lam, store=store))


def test_fits_lambda_one_runs_and_notes_what_it_left_out(tmp_path: Path) -> None:
    _table(tmp_path / "runs.parquet", supervised=40, distilled=60, mixed=5)
    notes = study._fit(tmp_path, FAST)
    sup = json.loads((tmp_path / "fits" / "supervised.json").read_text())
    dist = json.loads((tmp_path / "fits" / "distillation.json").read_text())
    assert sup["runs"] == 40 and dist["runs"] == 60
    assert "selected 100 of 105 runs" in notes["distillation"]
    assert "5 by run_id!=finding-*" in notes["distillation"]
    assert "supervised" not in notes
    assert dist["selection"]["left_out"] == {"run_id!=finding-*": [f"finding-d{i}" for i in range(60, 65)]}
    held_out = dist["extrapolation"]["held_out_runs"]
    assert len(dist["data"]["loss"]) == 60 and sum(dist["data"]["held_out"]) == held_out > 0
    held = [x for x, out in zip(dist["data"]["extrapolated"], dist["data"]["held_out"], strict=True) if out]
    assert all(x is not None for x in held) and dist["extrapolation"]["mean_relative_error"] < 0.02
    paper = load_distillation("paper")
    assert np.isclose(sup["params"]["E"], paper.supervised.E, rtol=0.05)


def test_too_few_runs_fall_back_to_the_paper_and_say_so(tmp_path: Path) -> None:
    _table(tmp_path / "runs.parquet", supervised=5, distilled=5, mixed=0)
    notes = study._fit(tmp_path, FAST)
    assert not (tmp_path / "fits" / "supervised.json").exists()
    assert "not fitted" in notes["supervised"] and "not fitted" in notes["distillation"]
    assert json.loads((tmp_path / "fits" / "notes.json").read_text()) == notes
