"""benchmarks/gpu_check.sh, the one-call GPU check, in its CPU mode: every part runs without
Ray or vLLM (neither is on the lent GPU machine) and reports every measurement; a part that
fails leaves the others measured, the JSON written and the exit status non-zero."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
MEASURED = {
    "capture": ("bare_tokens_per_s", "cache_serial_tokens_per_s", "cache_tokens_per_s", "ratio",
                "serial_ratio", "bytes_per_token"),
    "train": ("supervised", "distilled", "ratio"),
    "feeding": ("reader_tokens_per_s", "dataset_tokens_per_s", "loader_2_tokens_per_s",
                "dataset_over_distilled", "loader_2_over_distilled"),
}
MEMORY = ("hidden_over_supervised", "logits_over_hidden", "cases")


def numbers(value: Any) -> list[float]:
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    return [value] if isinstance(value, int | float) and not isinstance(value, bool) else []


def without(tmp_path: Path, *modules: str) -> str:
    """A PYTHONPATH entry on which importing any of `modules` fails, as on the GPU machine."""
    for name in modules:
        (tmp_path / "absent" / name).mkdir(parents=True)
        (tmp_path / "absent" / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not on the GPU machine')\n")
    return str(tmp_path / "absent")


def test_cpu_mode_measures_everything_without_ray(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": without(tmp_path, "ray", "vllm")}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "--cpu"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["ok"] and report["errors"] == {} and report["mode"] == "cpu"
    assert "capture" in (tmp_path / "out" / "gpu_check.log").read_text()
    for part, keys in MEASURED.items():
        assert set(keys) <= set(report[part]), part
    assert report["kd_memory"] and all(set(MEMORY) <= set(row) for row in report["kd_memory"])
    for part in (*MEASURED, "kd_memory"):
        values = numbers(report[part])
        assert values and all(math.isfinite(v) and v > 0 for v in values), (part, report[part])


def test_a_failed_part_keeps_the_others_and_fails_the_run(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_check import JSON_NAME, run
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    work = tmp_path / "work"
    work.write_text("a file where the inputs' folder should be")
    report = run("cpu", tmp_path, work)
    written = json.loads((tmp_path / JSON_NAME).read_text())
    assert written == report and report["ok"] is False
    assert set(report["errors"]) == {"inputs", "capture", "train", "feeding"}
    assert report["errors"]["train"] == "RuntimeError: skipped: capture failed"
    assert report["kd_memory"][0]["hidden_over_supervised"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="without --cpu it would run the GPU sizes")
def test_gpu_mode_without_a_gpu_fails_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode != 0
    assert "--device cuda: no CUDA device is available" in done.stdout + done.stderr
