"""Loading laws by preset name and from fit JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdcache.fit.errors import FitError
from kdcache.fit.presets import PAPER_DISTILLATION, load_distillation, load_supervised


def test_presets_by_name() -> None:
    assert pytest.approx(1.69) == load_supervised("chinchilla").E
    assert load_supervised("epoch").alpha == pytest.approx(0.3478)
    assert load_distillation("paper") is PAPER_DISTILLATION
    with pytest.raises(FitError, match="only a supervised law"):
        load_distillation("epoch")


def test_from_fit_json(tmp_path: Path) -> None:
    path = tmp_path / "fit.json"
    doc = {
        "law": "distillation",
        "params": PAPER_DISTILLATION.to_dict(),
        "supervised": PAPER_DISTILLATION.supervised.to_dict(),
    }
    path.write_text(json.dumps(doc))
    assert load_distillation(str(path)) == PAPER_DISTILLATION
    assert load_supervised(str(path)) == PAPER_DISTILLATION.supervised


def test_unknown_spec_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FitError, match="neither a preset"):
        load_supervised(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(FitError, match="not a readable fit JSON"):
        load_supervised(str(bad))
