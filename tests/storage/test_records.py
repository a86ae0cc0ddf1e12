"""The runs-table row and the MODEL directory's record: typed, round-tripped, refused when wrong."""

from pathlib import Path

import pyarrow as pa
import pytest

from kdcache.storage.errors import StoreError
from kdcache.storage.model_record import (
    MODEL_RECORD,
    ModelRecord,
    has_model_record,
    read_model_record,
    write_model_record,
)
from kdcache.storage.runs import SCHEMA, RunRow, append_run, has_run, read_runs

# The runs table's columns as the docs list them: the schema derived from RunRow must keep them.
COLUMNS = [
    ("run_id", pa.string()), ("kind", pa.string()), ("params", pa.int64()), ("tokens", pa.int64()),
    ("loss", pa.float64()), ("teacher_loss", pa.float64()), ("teacher_params", pa.int64()),
    ("store", pa.string()), ("k", pa.int64()), ("temperature", pa.float64()), ("lambda", pa.float64()),
    ("ece", pa.float64()), ("flops", pa.float64()), ("wall_s", pa.float64()),
    ("tokens_per_s", pa.float64()), ("layers", pa.int64()), ("d_model", pa.int64()),
    ("n_heads", pa.int64()), ("vocab_size", pa.int64()), ("seq_len", pa.int64()), ("seed", pa.int64()),
]

ROW = RunRow(run_id="s1", kind="distill", params=1000, tokens=20_000, loss=3.25, teacher_loss=2.5,
             teacher_params=5000, store="/s.zarr", k=64, temperature=1.0, lam=0.7, seed=3)


def test_schema_is_derived_from_the_row():
    assert pa.schema(COLUMNS) == SCHEMA


def test_row_round_trips_through_json_and_parquet(tmp_path: Path):
    assert RunRow.from_json(ROW.to_json()) == ROW
    assert ROW.to_json()["lambda"] == 0.7
    path = tmp_path / "runs.parquet"
    append_run(path, ROW)
    assert has_run(path, ROW)
    assert RunRow.from_json(read_runs(path).to_pylist()[0]) == ROW


def test_row_refuses_unknown_kind_and_missing_columns():
    with pytest.raises(StoreError, match="row: field 'kind' must be one of"):
        RunRow.from_json({**ROW.to_json(), "kind": "distilled"}, where="row")
    with pytest.raises(StoreError, match="row: not a runs-table row"):
        RunRow.from_json({"run_id": "x", "kind": "supervised", "params": 1}, where="row")


def test_model_record_round_trip(tmp_path: Path):
    assert read_model_record(tmp_path) is None and not has_model_record(tmp_path)
    record = ModelRecord(fingerprint="ab" * 32, nonembedding_params=1000, model={"layers": 1},
                         training={**ROW.to_json(), "steps": 4}, data={"tokenizer_fingerprint": "t"})
    write_model_record(tmp_path, record)
    back = read_model_record(tmp_path)
    assert back == record and has_model_record(tmp_path)
    assert back.run_row == ROW and back.training_loss == 3.25 and back.tokenizer_fingerprint == "t"


def test_model_record_refuses_other_formats(tmp_path: Path):
    (tmp_path / MODEL_RECORD).write_text('{"format": "other/1", "fingerprint": "x"}')
    with pytest.raises(StoreError, match=r"kdcache.json: field 'format' is 'other/1', not kdcache.model/1"):
        read_model_record(tmp_path)
    (tmp_path / MODEL_RECORD).write_text("{")
    with pytest.raises(StoreError, match=r"kdcache.json: unreadable"):
        read_model_record(tmp_path)
