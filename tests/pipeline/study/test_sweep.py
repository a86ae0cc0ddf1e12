"""`kdcache sweep`: many students from shared stores, one runs table, resume, failures isolated."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from kdcache.pipeline.cache.config import CacheConfig
from kdcache.pipeline.cache.job import run_cache
from kdcache.pipeline.cli import main
from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.study.config import SweepConfig
from kdcache.pipeline.study.sweep import expand
from tests.pipeline.conftest import make_teacher

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def stores(token_data: Path, tmp_path_factory: pytest.TempPathFactory, ray_local) -> list[Path]:
    root = tmp_path_factory.mktemp("sweep-stores")
    out = []
    for seed in (0, 1):
        teacher = make_teacher(root / f"teacher{seed}", token_data, seed=seed)
        store = root / f"t{seed}"
        run_cache(CacheConfig(teacher=str(teacher), data=str(token_data), out=str(store), k=8, quiet=True))
        out.append(store)
    return out


def _sweep_file(tmp_path: Path, token_data: Path, stores: list[Path]) -> Path:
    spec = {
        "data": str(token_data), "runs": str(tmp_path / "runs.parquet"), "out": str(tmp_path / "students"),
        "defaults": {"rho": 32, "batch_size": 4, "tokens": 1024, "checkpoint_every": 0},
        "grid": [
            {"layers": 1},
            {"layers": 1, "distill": [str(s) for s in stores], "lambda": [1.0, 0.5]},
            {"layers": 1, "online_teacher": str(stores[0].parent / "teacher0")},
            {"layers": 2, "workers": 2, "run_id": "two-ranks"},  # one run over 2 Ray Train ranks
            {"layers": 1, "distill": str(tmp_path / "missing-store"), "run_id": "broken"},
        ],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sweep_runs_the_grid_skips_finished_and_isolates_failures(
    token_data: Path, stores: list[Path], tmp_path: Path, capsys
) -> None:
    sweep = _sweep_file(tmp_path, token_data, stores)
    assert main(["sweep", "--config", str(sweep), "--json"]) == 1  # the broken run fails
    result = json.loads(capsys.readouterr().out)
    assert result["runs"] == 8 and result["done"] == 7 and result["skipped"] == 0
    assert list(result["failed"]) == ["broken"] and "not a kdcache store" in result["failed"]["broken"]

    rows = pq.read_table(tmp_path / "runs.parquet").to_pylist()
    kinds = sorted(r["kind"] for r in rows)
    assert kinds == ["distill"] * 4 + ["online", "supervised", "supervised"]
    distilled = [r for r in rows if r["kind"] == "distill"]
    assert {r["store"] for r in distilled} == {str(s.resolve()) for s in stores}
    assert sorted(r["lambda"] for r in distilled) == [0.5, 0.5, 1.0, 1.0]
    assert len({r["run_id"] for r in rows}) == 7
    two = json.loads((tmp_path / "students" / "two-ranks" / "kdcache.json").read_text())["training"]
    assert two["world"] == 2 and two["layers"] == 2

    # Rerun: the seven finished runs are skipped, nothing is appended twice.
    assert main(["sweep", "--config", str(sweep), "--json"]) == 1
    again = json.loads(capsys.readouterr().out)
    assert again["skipped"] == 7 and again["done"] == 0
    assert len(pq.read_table(tmp_path / "runs.parquet")) == 7

    # The table is lost: the finished runs only append their rows again, training nothing.
    weights = {p: p.stat().st_mtime_ns for p in (tmp_path / "students").rglob("model.safetensors")}
    (tmp_path / "runs.parquet").unlink()
    assert main(["sweep", "--config", str(sweep), "--json"]) == 1
    healed = json.loads(capsys.readouterr().out)
    assert healed["skipped"] == 0 and healed["done"] == 7 and list(healed["failed"]) == ["broken"], healed
    assert sorted(r["run_id"] for r in pq.read_table(tmp_path / "runs.parquet").to_pylist()) == sorted(
        r["run_id"] for r in rows)
    assert weights == {p: p.stat().st_mtime_ns for p in (tmp_path / "students").rglob("model.safetensors")}


def test_expand_names_runs_and_refuses_bad_settings(token_data: Path, tmp_path: Path) -> None:
    base = {"data": str(token_data), "runs": "r.parquet", "out": str(tmp_path)}
    jobs = expand(SweepConfig(**base, grid=[{"layers": [1, 2], "tokens": [100, 200]}]))
    ids = [j.runtime.run_id for j in jobs]
    assert len(set(ids)) == 4 and all(i is not None and i.startswith("supervised-L") for i in ids)
    assert all(Path(j.out).parent == tmp_path for j in jobs)
    with pytest.raises(PipelineError, match="unknown train setting 'layer'"):
        expand(SweepConfig(**base, grid=[{"layer": 1}]))
    with pytest.raises(PipelineError, match="share run_id"):
        expand(SweepConfig(**base, grid=[{"layers": [1, 2], "run_id": "same"}]))
    with pytest.raises(PipelineError, match="grid"):
        SweepConfig(**base, grid=[])
    # A group's prefix leads its ids; a seed other than 0 is in the id, seed 0's id is unchanged.
    marked = expand(SweepConfig(**base, grid=[{"layers": 1, "tokens": 100, "seed": [0, 2],
                                               "run_id_prefix": "finding-"}]))
    assert [j.runtime.run_id.startswith("finding-supervised-L1-D100-") for j in marked] == [True, True]
    assert marked[0].runtime.run_id == "finding-" + ids[0] and "-s2-" in marked[1].runtime.run_id
    with pytest.raises(PipelineError, match="grid\\[0\\]: field 'run_id_prefix' must be str"):
        expand(SweepConfig(**base, grid=[{"layers": 1, "run_id_prefix": 3}]))


def test_expand_refuses_settings_of_the_wrong_type(tmp_path: Path) -> None:
    # Without the check, TrainJobConfig's `layers < 1` fails with "'<' not supported between 'str' and 'int'".
    base = {"data": "d", "runs": "r.parquet", "out": str(tmp_path)}
    cases = [
        ({"grid": [{"layers": 1}, {"layers": ["two", 1]}]}, "S.yaml: grid[1]: field 'layers' must be int"),
        ({"grid": [{"layers": 1, "tokens": 1.5}]}, "grid[0]: field 'tokens' must be int or null, got 1.5"),
        ({"grid": [{"layers": True}]}, "grid[0]: field 'layers' must be int or null, got True"),
        ({"grid": [{"layers": 1, "lambda": "half"}]}, "grid[0]: field 'lambda' must be float"),
        ({"grid": [{"layers": 1}], "defaults": {"lr": "fast"}}, "S.yaml: defaults: field 'lr' must be float"),
        ({"grid": [{"layers": 0}]}, "S.yaml: grid[0]: --layers must be >= 1"),
    ]
    for spec, message in cases:
        with pytest.raises(PipelineError, match=re.escape(message)):
            expand(SweepConfig(**base, **spec), "S.yaml")
    good = [{"layers": 1, "lambda": 1, "lr": 3e-3, "temperature": None}]
    assert len(expand(SweepConfig(**base, grid=good))) == 1


def test_sweep_cli_names_the_bad_grid_field(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "SWEEP.yaml"
    sweep.write_text(yaml.safe_dump({"data": "d", "runs": str(tmp_path / "r.parquet"), "out": str(tmp_path),
                                     "grid": [{"layers": ["two", 1]}]}))
    assert main(["sweep", "--config", str(sweep)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grid[0]: field 'layers' must be int or null, got 'two'" in err
