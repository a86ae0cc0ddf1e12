"""The CLI end to end: prepare -> train (interrupted and resumed) -> runs table -> transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from kdcache.pipeline.cli import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "data"
    argv = ["prepare", "--out", str(out), "--vocab-size", "512", "--seq-len", "64",
            "--max-tokens", "120000", "--quiet"]
    assert main(argv) == 0
    return out


def _train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--split", "student", "--layers", "2",
            "--rho", "32",
            "--tokens", "40960", "--batch-size", "8", "--checkpoint-every", "20", "--quiet",
            "--threads", "1", *extra]


@pytest.mark.slow
def test_prepare_train_resume_and_load(data_dir: Path, tmp_path: Path, capsys) -> None:
    from transformers import LlamaForCausalLM

    runs = tmp_path / "runs.parquet"
    assert main([*_train_argv(data_dir, tmp_path / "full", "--runs", str(runs)), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["kind"] == "supervised" and row["tokens"] == 40960 and row["params"] == 100_672
    assert 0 < row["loss"] < 6.0 and 0 <= row["ece"] <= 1 and row["flops"] > 6 * 100_672 * 40960

    # A second, identical run is interrupted (Ctrl-C at step 50, after the step-40
    # checkpoint); rerunning the same command resumes it and ends with identical weights.
    from kdcache.train import run as train_run

    original = train_run.Trainer.run

    def crash_midway(self):
        self.on_step = lambda info: (_ for _ in ()).throw(KeyboardInterrupt) if info.step == 50 else None
        return original(self)

    train_run.Trainer.run = crash_midway
    try:
        assert main(_train_argv(data_dir, tmp_path / "resumed")) == 130
    finally:
        train_run.Trainer.run = original
    assert (tmp_path / "resumed" / "checkpoint" / "state.json").is_file()
    assert not (tmp_path / "resumed" / "kdcache.json").exists()
    assert main([*_train_argv(data_dir, tmp_path / "resumed", "--runs", str(runs))]) == 0
    assert "validation loss" in capsys.readouterr().out
    assert not (tmp_path / "resumed" / "checkpoint").exists()

    a = (tmp_path / "full" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "resumed" / "model.safetensors").read_bytes()
    table = pq.read_table(runs).to_pylist()
    assert [r["run_id"] for r in table] == ["full", "resumed"]
    assert table[0]["loss"] == table[1]["loss"]

    hf = LlamaForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    assert hf.config.vocab_size == 512 and hf.config.num_hidden_layers == 2


def test_cli_user_errors(data_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["prepare", "--out", str(tmp_path / "x"), "--seq-len", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seq-len 1 must be at least 2" in err
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "m"),
                 "--layers", "1"]) == 1
    assert "not a token data directory" in capsys.readouterr().err
    assert main(["train", "--data", str(data_dir), "--out", str(tmp_path / "m"), "--layers", "1",
                 "--rho", "48"]) == 1
    assert "head_dim" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
