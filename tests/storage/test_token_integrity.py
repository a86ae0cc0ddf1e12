"""Token data integrity: every corruption of a DATA directory ends as one line naming where."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from kdcache.pipeline.cli import main
from kdcache.pipeline.prepare.job import PrepareConfig, prepare
from kdcache.storage.errors import StoreError
from kdcache.storage.tokens.format import open_token_data, sha256_parts
from kdcache.storage.tokens.verify import verify_token_data

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "mu"]
SPLITS = ("teacher", "student", "valid")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data of ~40 small documents; rows of 17 tokens, so each split fits one chunk."""
    root = tmp_path_factory.mktemp("integrity")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        words = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), 200))
        (corpus / f"{i:03d}.txt").write_text(f"doc{i} {words}")
    prepare(PrepareConfig(out=str(root / "data"), source=str(corpus), vocab_size=300, seq_len=16, quiet=True))
    return root / "data"


@pytest.fixture
def data(pristine: Path, tmp_path: Path) -> Path:
    """A private copy each test may corrupt."""
    return Path(shutil.copytree(pristine, tmp_path / "data"))


def _chunk(data: Path, split: str) -> Path:
    return data / split / "c" / "0" / "0"


def _flip(path: Path, at: int = 20) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def _rewrite_row(data: Path, split: str, row: int, values: np.ndarray) -> None:
    """Write through zarr, so the chunk stays checksummed and only the ids are wrong."""
    zarr.open_array(store=str(data / split), mode="r+")[row] = values


def _edit_meta(data: Path, edit) -> None:
    path = data / "zarr.json"
    root = json.loads(path.read_text())
    edit(root["attributes"]["kdcache"])
    path.write_text(json.dumps(root))


def test_writes_checksummed_chunks_with_fill_minus_one(data: Path) -> None:
    meta = json.loads((data / "student" / "zarr.json").read_text())
    assert meta["fill_value"] == -1
    [shard] = meta["codecs"]  # shard files of inner chunks, each inner chunk checksummed
    assert shard["name"] == "sharding_indexed"
    assert [c["name"] for c in shard["configuration"]["codecs"]][-1] == "crc32c"
    assert [c["name"] for c in shard["configuration"]["index_codecs"]][-1] == "crc32c"
    assert open_token_data(data).meta["splits"]["student"]["checksums"] == "crc32c"


def test_intact_data_reads_and_verifies(data: Path, capsys) -> None:
    tokens = open_token_data(data)
    rows = tokens.read("student", slice(None))
    assert rows.dtype == np.int64 and rows.min() >= 0 and rows.max() < tokens.vocab_size
    picked = tokens.read("student", np.array([5, 0, 3]))
    assert np.array_equal(picked, rows[[5, 0, 3]])
    assert verify_token_data(data) == []
    assert main(["verify", str(data)]) == 0
    assert f"{data}: ok, token data verified" in capsys.readouterr().out
    assert main(["verify", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "bad_splits": [], "problems": []}


def test_streamed_fingerprint_is_the_prepare_definition(data: Path) -> None:
    tokens = open_token_data(data)
    for split in SPLITS:
        rows = tokens.read(split, slice(None)).astype(np.int32)
        assert sha256_parts(str(rows.shape).encode(), rows.astype("<i4").tobytes()) == \
            tokens.split_fingerprint(split)


def test_flipped_byte_fails_the_read_and_verify(data: Path, capsys) -> None:
    _flip(_chunk(data, "student"))
    tokens = open_token_data(data)  # opening reads no chunk: still cheap and fine
    n = tokens.rows("student")
    with pytest.raises(StoreError, match=rf"{data}: split 'student' rows 0\.\.{n - 1}: corrupt chunk"):
        tokens.read("student", slice(0, 4))
    with pytest.raises(StoreError, match="split 'student' rows 0"):
        tokens.read("student", np.array([2, 1]))
    assert tokens.read("teacher", slice(0, 4)).shape == (4, 17)
    assert main(["verify", str(data)]) == 1
    err = capsys.readouterr().err
    assert f"{data}: split 'student' rows 0..{n - 1}: chunk file {_chunk(data, 'student')} fails" in err
    assert "bad split(s) ['student']" in err and "teacher" not in err
    assert main(["verify", str(data), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["bad_splits"] == ["student"]


def test_deleted_chunk_reads_as_missing(data: Path, capsys) -> None:
    _chunk(data, "valid").unlink()
    tokens = open_token_data(data)
    with pytest.raises(StoreError, match=r"split 'valid' rows 0\.\.3: missing data"):
        tokens.read("valid", slice(0, 4))
    assert main(["verify", str(data)]) == 1
    assert "split 'valid' rows 0.." in capsys.readouterr().err


def test_id_outside_the_vocabulary(data: Path, capsys) -> None:
    _rewrite_row(data, "teacher", 3, np.full(17, 300, np.int32))
    tokens = open_token_data(data)
    assert tokens.read("teacher", slice(0, 3)).shape == (3, 17)
    with pytest.raises(StoreError, match=r"split 'teacher' rows 3\.\.3: token id 300 >= vocab_size 300"):
        tokens.read("teacher", slice(0, 8))
    with pytest.raises(StoreError, match=r"rows 3\.\.3"):
        tokens.read("teacher", np.array([7, 3]))
    assert main(["verify", str(data)]) == 1
    err = capsys.readouterr().err
    assert "split 'teacher' rows 0.." in err and "token id 300 >= vocab_size 300" in err


def test_negative_id_written_into_a_chunk(data: Path) -> None:
    _rewrite_row(data, "student", 1, np.full(17, -5, np.int32))
    with pytest.raises(StoreError, match=r"split 'student' rows 1\.\.1: missing data"):
        open_token_data(data).read("student", slice(0, 2))


def test_broken_split_metadata_fails_open(data: Path, capsys) -> None:
    (data / "student" / "zarr.json").write_text('{"shape": [1, 17] "oops"')
    where = data / "student" / "zarr.json"
    with pytest.raises(StoreError, match=f"{where}: unreadable array metadata"):
        open_token_data(data)
    assert main(["verify", str(data)]) == 1
    assert f"{data}: split 'student': {where}: unreadable" in capsys.readouterr().err


def test_wrong_shape_or_dtype_fails_open(data: Path) -> None:
    _edit_meta(data, lambda m: m["splits"]["valid"].update(rows=m["splits"]["valid"]["rows"] + 1))
    with pytest.raises(StoreError, match=r"valid/zarr.json: field 'shape' is \[\d+, 17\]"):
        open_token_data(data)
    other = data.parent / "other"
    shutil.copytree(data, other)
    shutil.rmtree(other / "valid")
    with pytest.raises(StoreError, match="valid/zarr.json: missing"):
        open_token_data(other)


def test_edited_tokenizer_fails_open(data: Path, capsys) -> None:
    tok = data / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"alpha"', '"alphx"', 1) + " ")
    with pytest.raises(StoreError, match=f"{tok}: sha256 does not match 'kdcache.tokenizer_fingerprint'"):
        open_token_data(data)
    assert main(["verify", str(data)]) == 1
    assert f"{tok}: sha256 does not match" in capsys.readouterr().err


def test_verify_finds_edited_fingerprints(data: Path, capsys) -> None:
    right = open_token_data(data).meta
    _edit_meta(data, lambda m: m["splits"]["student"].update(fingerprint="0" * 64))
    open_token_data(data)  # split fingerprints are not recomputed on open
    assert main(["verify", str(data)]) == 1
    err = capsys.readouterr().err
    assert f"{data}: split 'student': {data}/zarr.json: 'kdcache.splits.student.fingerprint' does not" in err
    assert "'kdcache.fingerprint'" not in err  # the data itself is intact: one problem, said once

    def overall_only(meta: dict) -> None:
        meta["splits"]["student"]["fingerprint"] = right["splits"]["student"]["fingerprint"]
        meta["fingerprint"] = "1" * 64

    _edit_meta(data, overall_only)
    assert [str(p) for p in verify_token_data(data)] == [
        f"{data}/zarr.json: 'kdcache.fingerprint' 111111111111... does not match the data "
        f"(recomputed {right['fingerprint'][:12]}...)"
    ]


def test_verify_refuses_repair_of_token_data(data: Path, capsys) -> None:
    assert main(["verify", str(data), "--repair"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"kdcache verify: error: {data}: --repair works on logit stores only; token data "
                   "cannot be repaired, re-run kdcache prepare"]


def test_data_written_before_checksums_still_reads(data: Path) -> None:
    """Old layout: zarr's default codecs (no crc32c) and fill value 0."""
    tokens = open_token_data(data)
    before = {split: tokens.read(split, slice(None)) for split in SPLITS}
    for split, rows in before.items():
        attrs = dict(zarr.open_array(store=str(data / split), mode="r").attrs)
        shutil.rmtree(data / split)
        group = zarr.open_group(store=str(data), mode="r+")
        arr = group.create_array(split, shape=rows.shape, chunks=(963, 17), dtype="int32")
        arr[:] = rows.astype(np.int32)
        arr.attrs.update(attrs)
    _edit_meta(data, lambda m: [s.pop("checksums") for s in m["splits"].values()])
    old = open_token_data(data)
    written = json.loads((data / "student" / "zarr.json").read_text())
    assert written["fill_value"] == 0 and "crc32c" not in [c["name"] for c in written["codecs"]]
    assert all(np.array_equal(old.read(split, slice(None)), rows) for split, rows in before.items())
    assert verify_token_data(data) == []
    _rewrite_row(data, "teacher", 0, (before["teacher"][0] + 1) % 300)  # valid ids, other tokens
    [changed] = [str(p) for p in verify_token_data(data)]
    assert changed.startswith(f"split 'teacher': {data}/zarr.json: 'kdcache.splits.teacher.fingerprint' "
                              "does not match the tokens")
    assert changed.endswith("written before chunks had checksums, so the bad chunk cannot be named")
    _chunk(data, "student").unlink()  # reads as id 0 here: only verify can tell
    problems = [str(p) for p in verify_token_data(data)]
    assert any("split 'student' rows 0.." in p and "does not exist" in p for p in problems)


def test_rows_name_the_bad_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """With 64-row chunks, one per shard file, a bad second chunk is named as rows 64..127,
    by reads and by verify."""
    import kdcache.storage.tokens.writer as write_module

    monkeypatch.setattr(write_module, "CHUNK_TOKENS", 64 * 17)
    monkeypatch.setattr(write_module, "SHARD_CHUNKS", 1)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"{i:03d}.txt").write_text(" ".join(WORDS[(i * j) % len(WORDS)] for j in range(200)))
    data = tmp_path / "data"
    prepare(PrepareConfig(out=str(data), source=str(corpus), vocab_size=300, seq_len=16, quiet=True))
    tokens = open_token_data(data)
    assert tokens.array("student").chunks == (64, 17) and tokens.rows("student") > 128
    assert verify_token_data(data) == []
    _flip(data / "student" / "c" / "1" / "0")
    assert tokens.read("student", slice(0, 64)).shape == (64, 17)
    with pytest.raises(StoreError, match=r"split 'student' rows 64\.\.127: corrupt chunk"):
        tokens.read("student", slice(60, 70))
    with pytest.raises(StoreError, match=r"split 'student' rows 64\.\.127: corrupt chunk"):
        tokens.read("student", np.array([130, 5, 100]))
    (data / "teacher" / "c" / "1" / "0").unlink()
    assert main(["verify", str(data)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"{data}: split 'teacher' rows 64..127: missing data: chunk file "
                      f"{data}/teacher/c/1/0 does not exist")
    assert err[1].startswith(f"{data}: split 'student' rows 64..127: chunk file {data}/student/c/1/0 fails")
    assert err[2] == (f"{data}: 2 problem(s), bad split(s) ['student', 'teacher']; the token data is "
                      "corrupt, re-run kdcache prepare")
