"""Faults of a launch, each one line and nothing lost: relative paths over Ray Train ranks, a
MASTER_PORT in use under an environment-variable launch, and a full disk while saving.

The full disk is a file-size limit (`RLIMIT_FSIZE`, set in the child before it starts, with
SIGXFSZ ignored as Python does anyway): a write past it fails with EFBIG, as one past a full
disk fails with ENOSPC, through the same calls, and it needs neither root nor a mount.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdcache.storage.tokens.format import TokenData
from kdcache.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "kdcache.pipeline.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(data: str, out: str, *extra: str) -> list[str]:
    return [*CLI, "train", "--data", data, "--out", out, "--layers", "1", "--rho", "32", "--batch-size", "8",
            "--threads", "1", "--quiet", "--eval-rows", "16", *extra]


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("kdcache train: error: "), lines[0]
    return lines[0]


@pytest.mark.ray
def test_relative_paths_over_ray_train_ranks_land_where_the_command_ran(
    tiny_data: TokenData, tmp_path: Path
) -> None:
    """Ray Train runs each rank in a folder of its own: the driver makes every path absolute first."""
    (tmp_path / "data").symlink_to(tiny_data.path)
    done = subprocess.run(_train("data", "rt-rel", "--max-steps", "8", "--workers", "2",
                                 "--runs", "rt-rel-runs.parquet", "--checkpoint-every", "0"),
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    training = json.loads((tmp_path / "rt-rel" / "kdcache.json").read_text())["training"]
    assert training["world"] == 2 and training["run_id"] == "rt-rel"
    assert (tmp_path / "rt-rel-runs.parquet").is_file()


def _rank(rank: int, port: int, out: Path, data: Path) -> subprocess.Popen:
    env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    return subprocess.Popen(_train(str(data), str(out), "--max-steps", "2", "--init-timeout", "5"), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_master_port_in_use_ends_every_rank_with_one_line(tiny_data: TokenData, tmp_path: Path) -> None:
    """Rank 0 cannot serve the store and says so; rank 1 reaches what holds the port, which never
    answers, and gives up after --init-timeout (5 s, plus the watchdog's 10 s of grace)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        started = time.monotonic()
        ranks = [_rank(r, port, tmp_path / "m", tiny_data.path) for r in (0, 1)]
        try:
            outputs = [p.communicate(timeout=120) for p in ranks]
        finally:
            for p in ranks:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
        waited = time.monotonic() - started
    assert [p.returncode for p in ranks] == [1, 1]
    assert f"MASTER_PORT {port} is in use on 127.0.0.1" in _error_line(outputs[0][1])
    late = _error_line(outputs[1][1])
    assert "rank 1: the group at MASTER_ADDR 127.0.0.1" in late and "--init-timeout 5 s" in late
    assert waited < 90  # torch's own bound is 30 minutes, and its store client has none at all
    assert not (tmp_path / "m").exists()


def _limited(size: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return apply


def test_a_full_disk_is_one_line_and_keeps_the_checkpoint(tiny_data: TokenData, tmp_path: Path) -> None:
    out, steps = tmp_path / "m", 120
    flags = _train(str(tiny_data.path), str(out), "--max-steps", str(steps), "--checkpoint-every", "4")
    proc = subprocess.Popen(flags, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    before = load_checkpoint(out / "checkpoint")
    assert before is not None and before.step < steps, "ended before a checkpoint"
    size = (out / "checkpoint" / json.loads(state.read_text())["tensors"]).stat().st_size

    # The next checkpoint is as big as this one: with half of that allowed, its write fails.
    full = subprocess.run(flags, env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limited(size // 2))
    assert full.returncode == 1
    line = _error_line(full.stderr)
    assert f"{out / 'checkpoint'}: cannot write the checkpoint of step" in line and "File too large" in line
    kept = load_checkpoint(out / "checkpoint")
    assert kept is not None and kept.step == before.step and kept.tensors.keys() == before.tensors.keys()
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == sorted(
        ["state.json", json.loads(state.read_text())["tensors"]])

    # The model is a third of a checkpoint (weights, then AdamW's two moments): a quarter fails it.
    no_more = [*flags[:-2], "--checkpoint-every", "0"]
    model = subprocess.run(no_more, env=ENV, capture_output=True, text=True, timeout=300,
                           preexec_fn=_limited(size // 4))
    assert model.returncode == 1
    line = _error_line(model.stderr)
    assert f"{out}: cannot write the trained model (File too large); rerun the command to resume" in line
    assert not (out / "kdcache.json").exists() and not list(out.glob("*.tmp"))
    assert load_checkpoint(out / "checkpoint").step == before.step

    done = subprocess.run(flags, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    training = json.loads((out / "kdcache.json").read_text())["training"]
    assert training["steps"] == steps and len(training["loss_history"]) == steps - before.step
