"""`kdcache prepare` in one process: determinism, document-disjoint splits, sources, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.job import PrepareConfig, prepare, split_of
from kdcache.storage.errors import StoreError
from kdcache.storage.tokens.format import open_token_data
from tests.pipeline.conftest import interrupt_at_third_shard
from tests.pipeline.prepare.conftest import _docs


def _cfg(source: Path | str, out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(source=str(source), out=str(out), vocab_size=300, seq_len=16, quiet=True, **kw)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_disjoint(text_dir: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    prepare(_cfg(text_dir, a))
    prepare(_cfg(text_dir, b))
    assert _tree_bytes(a) == _tree_bytes(b)
    data = open_token_data(a)
    tok = Tokenizer.from_file(str(data.tokenizer_path))
    markers = {}
    for split in ("teacher", "student", "valid"):
        rows = data.read(split, slice(None))
        assert rows.shape == (data.rows(split), 17) and rows.max() < data.vocab_size
        text = tok.decode(rows.ravel().tolist())
        markers[split] = {w for w in text.split() if w.startswith("doc") and w.endswith("x")}
        assert markers[split]
    assert not markers["teacher"] & markers["student"]
    assert not markers["teacher"] & markers["valid"]
    assert not markers["student"] & markers["valid"]
    other = tmp_path / "c"
    prepare(_cfg(text_dir, other, seed=1))
    assert open_token_data(other).fingerprint != data.fingerprint


def test_split_of_is_a_keyed_hash_that_follows_fractions() -> None:
    fracs = (0.45, 0.45, 0.1)
    names = [f"dir/file{i}.jsonl#{i % 7}" for i in range(20_000)]
    got = np.array([split_of(n, 0, fracs) for n in names])
    share = np.bincount(got, minlength=3) / len(names)
    # 4 binomial standard deviations of each share at n = 20,000 (valid: 0.0085).
    assert np.all(np.abs(share - fracs) < 4 * np.sqrt(np.array(fracs) * (1 - np.array(fracs)) / len(names)))
    assert [split_of(n, 0, fracs) for n in names[:50]] == got[:50].tolist()  # a pure function
    other = np.array([split_of(n, 1, fracs) for n in names])
    assert 0.4 < np.mean(other != got) < 0.7  # another seed is another assignment


def _markers(data_dir: Path, split: str) -> list[int]:
    """The documents of a split, by their marker numbers, in the order they were packed."""
    data = open_token_data(data_dir)
    tok = Tokenizer.from_file(str(data.tokenizer_path))
    text = tok.decode(data.read(split, slice(None)).ravel().tolist())
    return list(dict.fromkeys(int(w[3:6]) for w in text.split() if w.startswith("doc") and w.endswith("x")))


def _assert_follows_rule(data_dir: Path, names: list[str]) -> None:
    """Document i (called names[i]) lands whole in the split its name hashes to, in order;
    only the last document of a split can be missing (cut by the row tail)."""
    for k, split in enumerate(("teacher", "student", "valid")):
        want = [i for i, n in enumerate(names) if split_of(n, 0, (0.45, 0.45, 0.1)) == k]
        got = _markers(data_dir, split)
        assert got == want[: len(got)] and len(got) >= len(want) - 1 and got


def test_splits_follow_the_rule(text_dir: Path, tmp_path: Path) -> None:
    prepare(_cfg(text_dir, tmp_path / "a"))
    files = sorted(text_dir.rglob("*.txt"), key=lambda p: p.as_posix())
    order = [int(p.stem) for p in files]
    names = {int(p.stem): p.relative_to(text_dir).as_posix() for p in files}
    for k, split in enumerate(("teacher", "student", "valid")):
        want = [i for i in order if split_of(names[i], 0, (0.45, 0.45, 0.1)) == k]
        got = _markers(tmp_path / "a", split)
        assert got == want[: len(got)] and len(got) >= len(want) - 1 and got


def test_attributes(text_dir: Path, tmp_path: Path) -> None:
    prepare(_cfg(text_dir, tmp_path / "d", max_tokens=2000))
    data = open_token_data(tmp_path / "d")
    assert data.seq_len == 16 and data.vocab_size == 300
    assert data.eos_token_id == 0
    assert sum(data.rows(s) * 17 for s in ("teacher", "student", "valid")) <= 2000
    assert data.meta["source"] == str(text_dir) and len(data.fingerprint) == 64
    assert data.array("student").dtype == np.int32


def test_records_sources(tmp_path: Path) -> None:
    docs = _docs(30)
    lines = (json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs))
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    (tmp_path / "c.jsonl").write_text("".join(lines))
    # Three row groups are three read units; record numbers run on across them.
    pq.write_table(pa.table({"body": docs}), tmp_path / "a" / "c.parquet")
    pq.write_table(pa.table({"body": docs}), tmp_path / "b" / "c.parquet", row_group_size=11)
    prepare(_cfg(tmp_path / "c.jsonl", tmp_path / "j", text_column="body"))
    prepare(_cfg(tmp_path / "a", tmp_path / "p1", text_column="body"))
    prepare(_cfg(tmp_path / "b", tmp_path / "p3", text_column="body"))
    _assert_follows_rule(tmp_path / "j", [f"c.jsonl#{i}" for i in range(30)])
    _assert_follows_rule(tmp_path / "p3", [f"c.parquet#{i}" for i in range(30)])
    assert open_token_data(tmp_path / "p1").meta["splits"] == open_token_data(tmp_path / "p3").meta["splits"]


def test_glob_source_and_existing_tokenizer(text_dir: Path, tmp_path: Path) -> None:
    prepare(_cfg(text_dir, tmp_path / "a"))
    prepare(_cfg(f"{text_dir}/**/*.txt", tmp_path / "g"))
    assert open_token_data(tmp_path / "g").fingerprint == open_token_data(tmp_path / "a").fingerprint
    tok = str(tmp_path / "a" / "tokenizer.json")
    prepare(PrepareConfig(source=str(text_dir), out=str(tmp_path / "t"), tokenizer=tok, seq_len=16,
                          quiet=True))
    reused, trained = open_token_data(tmp_path / "t"), open_token_data(tmp_path / "a")
    assert reused.tokenizer_fingerprint == trained.tokenizer_fingerprint
    with pytest.raises(PipelineError, match="--vocab-size is 999"):
        prepare(PrepareConfig(source=str(text_dir), out=str(tmp_path / "u"), tokenizer=tok,
                              vocab_size=999))


def _assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_bad_inputs(text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {"source has no files": _cfg(empty, out)}
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    cases["source is empty"] = _cfg(tmp_path / "blank", out)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_text("fine text " * 50)
    (bad / "b.txt").write_bytes(b"caf\xe9 latin-1 text")
    cases["b.txt: not UTF-8"] = _cfg(bad, out)
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "x.bin").write_bytes(b"\x00\x01\x02")
    cases["x.bin: not a text file"] = _cfg(binary, out)
    (tmp_path / "r.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    cases["missing text column 'body'"] = _cfg(tmp_path / "r.jsonl", out, text_column="body")
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "r.parquet")
    cases["r.parquet: missing text column 'body'"] = _cfg(tmp_path / "r.parquet", out, text_column="body")
    cases["no such file"] = _cfg(tmp_path / "nope", out)
    cases["fewer than seq_len"] = PrepareConfig(source=str(text_dir), out=str(out), vocab_size=300,
                                                 seq_len=5000, quiet=True)
    for message, cfg in cases.items():
        # Packing rows is the token-data writer's job (kdcache.storage), the rest prepare's.
        error = StoreError if message == "fewer than seq_len" else PipelineError
        with pytest.raises(error, match=message):
            prepare(cfg)
        _assert_nothing_written(tmp_path, out)
    with pytest.raises(PipelineError, match="vocab-size 100 is too small"):
        PrepareConfig(source=str(text_dir), out=str(out), vocab_size=100)
    with pytest.raises(PipelineError, match="seq-len 1 must be at least 2"):
        PrepareConfig(source=str(text_dir), out=str(out), seq_len=1)
    with pytest.raises(PipelineError, match="sum to 1"):
        PrepareConfig(source=str(text_dir), out=str(out), valid_frac=0.5)


def test_refuses_existing_output(text_dir: Path, tmp_path: Path) -> None:
    prepare(_cfg(text_dir, tmp_path / "a"))
    before = _tree_bytes(tmp_path / "a")
    with pytest.raises(PipelineError, match="already exists"):
        prepare(_cfg(text_dir, tmp_path / "a", seed=3))
    assert _tree_bytes(tmp_path / "a") == before
    prepare(_cfg(text_dir, tmp_path / "a", seed=3, overwrite=True))
    assert _tree_bytes(tmp_path / "a") != before


def test_stdlib_source(tmp_path: Path) -> None:
    prepare(PrepareConfig(out=str(tmp_path / "s"), vocab_size=400, seq_len=32, max_tokens=20_000,
                          quiet=True))
    data = open_token_data(tmp_path / "s")
    assert data.meta["source"] == "stdlib" and min(data.rows(s) for s in ("teacher", "student", "valid")) > 0


def test_interrupted_build_leaves_nothing_and_reruns_identically(
    text_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C after some shards were written: no output, no temporary directory; the rerun
    writes the bytes of a build never interrupted (shards are not resumed: see prepare.py)."""
    import kdcache.storage.tokens.writer as write_module

    monkeypatch.setattr(write_module, "CHUNK_TOKENS", 32 * 17)
    monkeypatch.setattr(write_module, "SHARD_CHUNKS", 1)
    prepare(_cfg(text_dir, tmp_path / "clean"))
    emit = interrupt_at_third_shard(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(text_dir, out))
    _assert_nothing_written(tmp_path, out)
    monkeypatch.setattr(write_module.SplitWriter, "_emit", emit)
    prepare(_cfg(text_dir, out))
    assert _tree_bytes(out) == _tree_bytes(tmp_path / "clean")


def test_killed_runs_temporary_directory_is_removed(text_dir: Path, tmp_path: Path) -> None:
    """A run killed with SIGKILL leaves `.OUT.tmp-PID`; the next run removes it (its pid is gone)."""
    stale = tmp_path / ".out.tmp-4194305"  # above the largest pid_max (2**22): never alive
    (stale / "teacher").mkdir(parents=True)
    prepare(_cfg(text_dir, tmp_path / "out"))
    assert not stale.exists() and (tmp_path / "out" / "zarr.json").is_file()
