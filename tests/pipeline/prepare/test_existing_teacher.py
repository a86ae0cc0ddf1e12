"""`kdcache prepare --teacher-frac 0`: data for a teacher trained elsewhere has no teacher
split at all; documents go to student or valid by the same keyed hash, the BPE learns from
the student split, and cache, train, verify and inspect work on it end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from kdcache.pipeline.cli import main
from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.corpus import read_unit, read_units
from kdcache.pipeline.prepare.job import PrepareConfig, prepare, split_of
from kdcache.pipeline.prepare.records import Columns
from kdcache.pipeline.prepare.tokenizer import teacher_sample, train_tokenizer
from kdcache.storage import StoreError
from kdcache.storage.tokens.format import open_token_data
from kdcache.storage.tokens.verify import verify_token_data

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "mu"]
FRACS = (0.0, 0.9, 0.1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Documents that each begin with a unique marker word, so a split's text names them."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(60):
        words = [f"doc{i:03d}x", *(WORDS[j] for j in rng.integers(0, len(WORDS), 150))]
        (root / f"{i:03d}.txt").write_text(" ".join(words) + "\n")
    return root


def _cfg(source: Path, out: Path, **kw) -> PrepareConfig:
    fracs = dict(zip(("teacher_frac", "student_frac", "valid_frac"), FRACS, strict=True))
    return PrepareConfig(**{"source": str(source), "out": str(out), "vocab_size": 300, "seq_len": 16,
                            "quiet": True, **fracs, **kw})


def _markers(data_dir: Path, split: str) -> list[int]:
    data = open_token_data(data_dir)
    ids = data.read(split, slice(None)).ravel().tolist()
    text = Tokenizer.from_file(str(data.tokenizer_path)).decode(ids)
    return list(dict.fromkeys(int(w[3:6]) for w in text.split() if w.startswith("doc") and w.endswith("x")))


def test_no_teacher_split_is_written(corpus: Path, tmp_path: Path) -> None:
    result = prepare(_cfg(corpus, tmp_path / "d"))
    data = open_token_data(tmp_path / "d")
    assert sorted(data.meta["splits"]) == ["student", "valid"] and sorted(result.rows) == ["student", "valid"]
    assert not (tmp_path / "d" / "teacher").exists()
    assert data.meta["fractions"] == {"teacher": 0.0, "student": 0.9, "valid": 0.1}
    assert result.documents == 60 and verify_token_data(tmp_path / "d") == []
    with pytest.raises(StoreError, match=r"no split 'teacher' \(has \['student', 'valid'\]\)"):
        data.rows("teacher")


def test_documents_follow_the_keyed_hash(corpus: Path, tmp_path: Path) -> None:
    prepare(_cfg(corpus, tmp_path / "a"))
    prepare(_cfg(corpus, tmp_path / "b"))
    assert open_token_data(tmp_path / "a").fingerprint == open_token_data(tmp_path / "b").fingerprint
    for k, split in ((1, "student"), (2, "valid")):
        want = [i for i in range(60) if split_of(f"{i:03d}.txt", 0, FRACS) == k]
        got = _markers(tmp_path / "a", split)
        # Stream packing drops at most the last partial row: every document but the last is there.
        assert got and got == want[: len(got)] and len(got) >= len(want) - 1


def test_split_rule_sends_nothing_to_a_zero_fraction() -> None:
    n = 20_000
    splits = np.bincount([split_of(f"doc{i}", 3, FRACS) for i in range(n)], minlength=3)
    assert splits[0] == 0
    # Binomial: 5 standard deviations of the student share, sqrt(0.9 * 0.1 / n) each.
    assert abs(splits[1] / n - 0.9) <= 5 * math.sqrt(0.9 * 0.1 / n)


def test_the_tokenizer_learns_from_the_student_split(corpus: Path, tmp_path: Path) -> None:
    prepare(_cfg(corpus, tmp_path / "d", tokenizer_sample_bytes=3000))
    batches = (b for u in read_units(str(corpus)) for b in read_unit(u, Columns(("text",)), 1 << 20))
    sample = teacher_sample(batches, 0, FRACS, 3000, split=1)
    assert sum(len(t.encode()) for t in sample) == 3000
    assert {int(t[3:6]) for t in sample} <= set(_markers(tmp_path / "d", "student"))
    expected = train_tokenizer(sample, 300, progress=False).to_str()
    assert (tmp_path / "d" / "tokenizer.json").read_text() == expected


@pytest.mark.parametrize("fracs", [(-0.1, 1.0, 0.1), (0.0, 1.0, 0.0), (0.5, 0.0, 0.5), (0.0, 0.8, 0.1)])
def test_only_the_teacher_fraction_may_be_zero(fracs: tuple[float, float, float], tmp_path: Path) -> None:
    names = ("teacher_frac", "student_frac", "valid_frac")
    with pytest.raises(PipelineError, match=r"must be positive and sum to 1 \(--teacher-frac may be 0"):
        PrepareConfig(out=str(tmp_path / "d"), **dict(zip(names, fracs, strict=True)))


@pytest.mark.slow
@pytest.mark.ray
def test_cache_and_train_on_data_without_a_teacher_split(tmp_path: Path, ray_local,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The user's teacher is trained here on the student split only because none is at hand."""
    data, teacher, store = tmp_path / "data", tmp_path / "teacher", tmp_path / "topk"
    assert main(["prepare", "--out", str(data), "--teacher-frac", "0", "--student-frac", "0.9",
                 "--valid-frac", "0.1", "--vocab-size", "384", "--seq-len", "32", "--max-tokens", "30000",
                 "--quiet"]) == 0
    assert main(["verify", str(data)]) == 0
    train = ["train", "--data", str(data), "--quiet", "--threads", "1",
             "--runs", str(tmp_path / "runs.parquet")]
    assert main([*train, "--split", "student", "--out", str(teacher), "--layers", "1", "--rho", "32",
                 "--tokens", "8000"]) == 0
    assert main(["cache", "--teacher", str(teacher), "--data", str(data), "--out", str(store), "--k", "16",
                 "--shard-rows", "32", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(store)]) == 0
    assert "split=student" in capsys.readouterr().out
    assert main([*train, "--out", str(tmp_path / "student"), "--layers", "1", "--rho", "32",
                 "--tokens", "4096", "--distill", str(store)]) == 0
    assert (tmp_path / "student" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main([*train, "--split", "teacher", "--out", str(tmp_path / "t2"), "--layers", "1",
                 "--tokens", "4096"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no split 'teacher' (has ['student', 'valid'])" in err[0]
    assert not (tmp_path / "t2").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_ray_workers_write_the_same_bytes(corpus: Path, tmp_path: Path, ray_local) -> None:
    prepare(_cfg(corpus, tmp_path / "one"))
    prepare(_cfg(corpus, tmp_path / "two", workers=2))
    one, two = (_tree(tmp_path / name) for name in ("one", "two"))
    assert one == two and "student/zarr.json" in one and not any(name.startswith("teacher") for name in one)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
