"""`kdcache inspect` and `kdcache verify` on real stores, through the console entry point."""

from __future__ import annotations

import json

import pytest

from kdcache.pipeline.cli import main
from kdcache.storage import StoreWriter
from tests.storage.conftest import make_meta, make_rows, shard_of


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.zarr"
    meta = make_meta(rows=6, seq_len=16, vocab=700, k=8, shard_rows=2, chunk_rows=1)
    rows = make_rows(meta)
    writer = StoreWriter.open(path, meta)
    for shard in (0, 1):
        writer.write_shard(shard, shard_of(meta, rows, shard))
    return path, meta, rows, writer


def test_inspect_json_reports_progress_and_size(store, capsys):
    path, *_ = store
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shards"] == 3 and info["shards_committed"] == 2
    assert info["rows"] == 4 and info["tokens"] == 4 * 16
    assert info["bytes"] > 0 and info["bytes_per_token"] == info["bytes"] / 64
    assert info["metadata"]["k"] == 8 and info["teacher_loss"] is None


def test_inspect_text_after_completion(store, capsys):
    path, meta, rows, writer = store
    writer.write_shard(2, shard_of(meta, rows, 2))
    writer.finalize()
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3/3 shards" in out and "(complete)" in out and "bytes/token" in out
    expected = float(-rows["target_logprob"].astype("float64").mean())
    assert f"teacher_loss {expected:.4f}" in out
    assert "L_T          not recorded" in out  # finalized without a measurement of the valid split
    writer.finalize(valid=(3.25, 640))
    assert main(["inspect", str(path)]) == 0
    assert "L_T          3.2500 nats/token (teacher CE on 640 valid tokens)" in capsys.readouterr().out


def test_verify_ok_then_names_bad_shard(store, capsys):
    path, *_ = store
    assert main(["verify", str(path)]) == 0
    assert "ok, 2/3" in capsys.readouterr().out
    shard_file = path / "ids" / "c" / "1" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[30] ^= 0xFF
    shard_file.write_bytes(bytes(data))
    assert main(["verify", str(path)]) == 1
    err = capsys.readouterr().err
    assert "shard 1 array 'ids'" in err and "[1]" in err
    assert main(["verify", str(path), "--repair", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["repaired_shards"] == [1]
    assert main(["verify", str(path)]) == 0


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a kdcache store" in err[0]
