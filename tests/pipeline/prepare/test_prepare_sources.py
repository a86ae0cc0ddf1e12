"""`kdcache prepare` sources beyond plain files: a real `datasets` save_to_disk directory, a
Hub-style parquet directory, `--text-column` on each, the bounded tokenizer sample, and
each bad input the issue names (one line naming the file and record, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.corpus import read_unit, read_units
from kdcache.pipeline.prepare.job import PrepareConfig, prepare, split_of
from kdcache.pipeline.prepare.records import Columns
from kdcache.pipeline.prepare.tokenizer import teacher_sample
from kdcache.storage.tokens.format import open_token_data

DATA = Path(__file__).parent / "data"
FRACS = (0.45, 0.45, 0.1)


def _cfg(source: Path | str, out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(source=str(source), out=str(out), vocab_size=300, seq_len=16, quiet=True, **kw)


def _records_by_split(data_dir: Path) -> list[list[int]]:
    data = open_token_data(data_dir)
    tok = Tokenizer.from_file(str(data.tokenizer_path))
    out = []
    for split in ("teacher", "student", "valid"):
        words = tok.decode(data.read(split, slice(None)).ravel().tolist()).split()
        out.append(list(dict.fromkeys(int(w[3:6]) for w in words if w.startswith("rec") and w.endswith("x"))))
    return out


def _assert_follows_rule(data_dir: Path, names: list[str]) -> None:
    for k, got in enumerate(_records_by_split(data_dir)):
        want = [i for i, n in enumerate(names) if split_of(n, 0, FRACS) == k]
        assert got and got == want[: len(got)] and len(got) >= len(want) - 1


def test_saved_dataset_directory(tmp_path: Path) -> None:
    result = prepare(_cfg(DATA / "saved_dataset", tmp_path / "d"))
    assert result.documents == 60
    _assert_follows_rule(tmp_path / "d", [f"data-00000-of-00001.arrow#{i}" for i in range(60)])


def test_hub_parquet_directory_reads_records_only(tmp_path: Path) -> None:
    result = prepare(_cfg(DATA / "hub_parquet", tmp_path / "p"))
    assert result.documents == 60  # README.md beside the data is not a document
    names = [f"data/train-0000{i // 30}-of-00002.parquet#{i % 30}" for i in range(60)]
    _assert_follows_rule(tmp_path / "p", names)


def test_text_column_on_every_record_format(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(DATA / "saved_dataset", src / "saved")
    shutil.copytree(DATA / "hub_parquet", src / "hub")
    rows = [json.dumps({"body": f"rec{i:03d}x words " * 20}) for i in range(30)]
    (src / "j.jsonl").write_text("\n".join(rows) + "\n")
    for path, column in ((src / "saved", "id"), (src / "hub", "id")):
        with pytest.raises(PipelineError, match=r"column 'id' is int64, not a string column"):
            prepare(_cfg(path, tmp_path / "o", text_column=column))
    with pytest.raises(PipelineError, match=r"saved/data-00000-of-00001.arrow: missing text column 'body'"):
        prepare(_cfg(src / "saved", tmp_path / "o", text_column="body"))
    assert prepare(_cfg(src / "j.jsonl", tmp_path / "o", text_column="body")).documents == 30
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]


def test_tokenizer_sample_is_bounded_teacher_text() -> None:
    units = read_units(str(DATA / "saved_dataset"))
    batches = (b for u in units for b in read_unit(u, Columns(("text",)), 1 << 20))
    sample = teacher_sample(batches, 0, FRACS, 1000)
    assert sum(len(t.encode()) for t in sample) == 1000
    teacher = {f"rec{i:03d}x" for i in range(60) if split_of(f"data-00000-of-00001.arrow#{i}", 0, FRACS) == 0}
    assert {t.split()[0] for t in sample} <= teacher


def test_tokenizer_sample_bytes_changes_only_the_tokenizer(tmp_path: Path) -> None:
    small = prepare(_cfg(DATA / "saved_dataset", tmp_path / "s", tokenizer_sample_bytes=400))
    whole = prepare(_cfg(DATA / "saved_dataset", tmp_path / "w"))
    assert small.fingerprint != whole.fingerprint
    assert _records_by_split(tmp_path / "s") == _records_by_split(tmp_path / "w")


def _bad(tmp_path: Path) -> dict[str, PrepareConfig]:
    out = tmp_path / "out"
    (tmp_path / "nocol.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    (tmp_path / "latin.jsonl").write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n')
    (tmp_path / "int.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jsonl").write_text("\n")
    broken = tmp_path / "broken"
    shutil.copytree(DATA / "saved_dataset", broken)
    (broken / "dataset_info.json").unlink()
    return {
        r"nocol.jsonl:2: missing text column 'text'": _cfg(tmp_path / "nocol.jsonl", out),
        r"latin.jsonl:3: record is not UTF-8 text \(byte 13\)": _cfg(tmp_path / "latin.jsonl", out),
        r"int.jsonl:2: column 'text' is int, not a string": _cfg(tmp_path / "int.jsonl", out),
        r"empty: source is empty": _cfg(tmp_path / "empty", out),
        r"broken: a datasets save_to_disk directory without dataset_info.json": _cfg(broken, out),
        r"hub_parquet/data/train-00000-of-00002.parquet: column 'id' is int64": _cfg(
            DATA / "hub_parquet", out, text_column="id"),
    }


def test_bad_inputs_one_line_nothing_written(tmp_path: Path) -> None:
    for message, cfg in _bad(tmp_path).items():
        with pytest.raises(PipelineError, match=message) as info:
            prepare(cfg)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
