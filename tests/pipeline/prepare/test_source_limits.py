"""The limits `kdcache prepare` holds a source to: a `datasets` directory's `state.json`
names only `.arrow` files inside it; a record over `--max-record-bytes` is refused at
the bound, not one byte before, and a jsonl line is not read past it; a null text is
refused in every record format; a file gone after the source was listed is one line,
from a Ray worker too, with Ray's own logs kept off stderr."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import kdcache.pipeline.prepare.job as job
from kdcache.pipeline.cli import main
from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.corpus import read_unit, read_units
from kdcache.pipeline.prepare.job import PrepareConfig, prepare
from kdcache.pipeline.prepare.records import ARROW_BATCH_ROWS, Columns

DATA = Path(__file__).parent / "data"
BOUND = 300
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa"


def _cfg(source: Path | str, out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(**{"source": str(source), "out": str(out), "vocab_size": 300, "seq_len": 16,
                            "quiet": True, **kw})


def _docs(n: int) -> list[str]:
    return [f"doc{i} {WORDS}" for i in range(n)]


def _read_all(source: Path, columns: Columns) -> list[str]:
    units = read_units(str(source))
    return [v for u in units for _, values, _ in read_unit(u, columns, 1 << 20) for v in values]


def _refused(cfg: PrepareConfig, match: str) -> str:
    with pytest.raises(PipelineError, match=match) as info:
        prepare(cfg)
    out = Path(cfg.out)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    assert "\n" not in str(info.value)
    return str(info.value)


# ---- a datasets directory's state.json --------------------------------------------------------------

@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A real save_to_disk directory, and beside it what a hostile state.json could name."""
    d = tmp_path / "ds"
    shutil.copytree(DATA / "saved_dataset", d)
    (tmp_path / "secret.txt").write_text("SECRET " * 100)
    shutil.copy(d / "data-00000-of-00001.arrow", tmp_path / "outside.arrow")
    (d / "notes.txt").write_text("a text file inside the directory")
    (d / "escape.arrow").symlink_to(tmp_path / "outside.arrow")
    return d


def _name_file(d: Path, name: object) -> None:
    state = json.loads((d / "state.json").read_text())
    state["_data_files"][0]["filename"] = name
    (d / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize(("name", "why"), [
    ("../secret.txt", "not the name of an .arrow file"),
    ("../outside.arrow", "must be a relative path inside the directory"),
    ("sub/../../outside.arrow", "must be a relative path inside the directory"),
    ("{tmp}/outside.arrow", "must be a relative path inside the directory"),
    ("/etc/hostname", "not the name of an .arrow file"),
    ("notes.txt", "not the name of an .arrow file"),
    ("escape.arrow", "a symlink that leads out of the directory"),
    ("missing.arrow", "no such file in"),
    (7, "not the name of an .arrow file"),
])
def test_state_json_names_only_arrow_files_inside(saved: Path, tmp_path: Path, name: object,
                                                  why: str) -> None:
    shown = name.format(tmp=tmp_path) if isinstance(name, str) else name
    _name_file(saved, shown)
    message = _refused(_cfg(saved, tmp_path / "out"), r"state.json: field '_data_files\[0\].filename' is ")
    assert why in message and repr(shown) in message


def test_a_symlink_inside_the_directory_is_read(saved: Path) -> None:
    (saved / "inner").mkdir()
    (saved / "data-00000-of-00001.arrow").rename(saved / "inner" / "real.arrow")
    (saved / "linked.arrow").symlink_to(saved / "inner" / "real.arrow")
    _name_file(saved, "linked.arrow")
    assert len(_read_all(saved, Columns(("text",)))) == 60


def test_dataset_dict_split_outside_is_refused(saved: Path, tmp_path: Path) -> None:
    root = tmp_path / "dd"
    root.mkdir()
    shutil.copytree(saved, root / "train", symlinks=True)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "../ds"]}))
    _refused(_cfg(root, tmp_path / "out"),
             r"dd/dataset_dict.json: field 'splits\[1\]' is '../ds': must be a relative path inside")


# ---- the record bound ----------------------------------------------------------------------------------

def _line(nbytes: int) -> str:
    """A jsonl record of exactly `nbytes` bytes, newline not counted."""
    line = json.dumps({"text": "x" * (nbytes - 12)})
    assert len(line) == nbytes
    return line


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_jsonl_record_at_the_bound_reads_one_byte_over_is_refused(tmp_path: Path, newline: str) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text(newline.join([json.dumps({"text": t}) for t in _docs(3)] + [_line(BOUND), ""]))
    assert len(_read_all(path, Columns(("text",), max_bytes=BOUND))) == 4
    with path.open("a") as f:
        f.write(_line(BOUND + 1) + newline)
    with pytest.raises(PipelineError, match=rf"r.jsonl:5: record over --max-record-bytes {BOUND}"):
        _read_all(path, Columns(("text",), max_bytes=BOUND))


def test_jsonl_line_is_not_read_past_the_bound(tmp_path: Path) -> None:
    """A 64 MiB line under a 1 MiB bound: refused having held at most the bound (plus the
    reader's buffer), not the line."""
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"text": "ok"}) + "\n")
        f.write('{"text": "' + "y" * (64 << 20) + '"}\n')
    tracemalloc.start()
    try:
        with pytest.raises(PipelineError, match=r"big.jsonl:2: record over --max-record-bytes 1,048,576"):
            _read_all(path, Columns(("text",), max_bytes=1 << 20))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_parquet_and_arrow_values_at_the_bound_read_one_byte_over_is_refused(tmp_path: Path) -> None:
    # Past the first record batch, so the row is numbered within the file, not the batch.
    rows = _docs(ARROW_BATCH_ROWS + 5)
    at = ARROW_BATCH_ROWS + 2
    for long, ok in ((BOUND, True), (BOUND + 1, False)):
        texts = [*rows[:at], "é" * (long // 2) + "z" * (long % 2), *rows[at:]]  # bytes, not characters
        table = pa.table({"text": texts})
        pq.write_table(table, tmp_path / "p.parquet", row_group_size=len(texts))
        with pa.OSFile(str(tmp_path / "a.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table, max_chunksize=ARROW_BATCH_ROWS)
        for name in ("p.parquet", "a.arrow"):
            columns = Columns(("text",), max_bytes=BOUND)
            if ok:
                assert len(_read_all(tmp_path / name, columns)) == len(texts)
                continue
            with pytest.raises(PipelineError, match=rf"{name}: row {at}: record over --max-record-bytes "
                                                    rf"{BOUND} \({BOUND + 1} bytes\)"):
                _read_all(tmp_path / name, columns)


def test_text_file_at_the_bound_reads_one_byte_over_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i, doc in enumerate(_docs(20)):
        (src / f"{i:02d}.txt").write_text(doc)
    (src / "99.txt").write_text("w" * BOUND)
    assert len(_read_all(src, Columns(("text",), max_bytes=BOUND))) == 21
    (src / "99.txt").write_text("w" * (BOUND + 1))
    _refused(_cfg(src, tmp_path / "out", max_record_bytes=BOUND),
             rf"99.txt: a text file, one document, over --max-record-bytes {BOUND} \({BOUND + 1} bytes\)")


def test_chat_record_over_the_bound_is_refused(tmp_path: Path) -> None:
    """Conversations are bounded too: by the jsonl line, or by their strings in Parquet
    (roles and contents: "user" + "q" + "assistant" are 14 bytes)."""
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * (BOUND - 14)}]
    chat = Columns(("messages",), text=False, max_bytes=BOUND)
    pq.write_table(pa.table({"messages": [turns]}), tmp_path / "c.parquet")
    assert len(_read_all(tmp_path / "c.parquet", chat)) == 1
    turns[1]["content"] += "a"
    pq.write_table(pa.table({"messages": [turns]}), tmp_path / "c.parquet")
    with pytest.raises(PipelineError, match=rf"c.parquet: row 0: record over --max-record-bytes {BOUND} "
                                            rf"\({BOUND + 1} bytes\)"):
        _read_all(tmp_path / "c.parquet", chat)
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(PipelineError, match=r"c.jsonl:1: record over --max-record-bytes"):
        _read_all(tmp_path / "c.jsonl", chat)


def test_max_record_bytes_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"--max-record-bytes must be >= 1"):
        _cfg("stdlib", tmp_path / "out", max_record_bytes=0)


# ---- null texts --------------------------------------------------------------------------------------

def test_null_text_is_refused_in_every_record_format(tmp_path: Path) -> None:
    texts: list[str | None] = [*_docs(ARROW_BATCH_ROWS + 10)]
    texts[ARROW_BATCH_ROWS + 3] = None
    table = pa.table({"text": texts})
    pq.write_table(table, tmp_path / "n.parquet")
    with pa.OSFile(str(tmp_path / "n.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=ARROW_BATCH_ROWS)
    for name in ("n.parquet", "n.arrow"):
        _refused(_cfg(tmp_path / name, tmp_path / "out"),
                 rf"{name}: row {ARROW_BATCH_ROWS + 3}: column 'text' is null, not a string$")
    (tmp_path / "n.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    _refused(_cfg(tmp_path / "n.jsonl", tmp_path / "out"), r"n.jsonl:2: column 'text' is null, not a string")


def test_null_text_in_a_datasets_directory(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    shutil.copytree(DATA / "saved_dataset", d)
    arrow = d / "data-00000-of-00001.arrow"
    with pa.OSFile(str(arrow)) as f:
        table = pa.ipc.open_stream(f).read_all()
    texts = table.column("text").to_pylist()
    texts[7] = None
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    _refused(_cfg(d, tmp_path / "out"), r"data-00000-of-00001.arrow: row 7: column 'text' is null")


# ---- files gone after the source was listed ------------------------------------------------------------

def test_broken_symlink_in_a_glob_is_one_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(20)))
    (src / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")
    _refused(_cfg(f"{src}/*.jsonl", tmp_path / "out"),
             r"src/b.jsonl: cannot read the file \(No such file or directory\) \(field 'source'\)")


@pytest.mark.ray
@pytest.mark.slow
def test_file_gone_before_a_ray_worker_reads_it(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is deleted after the driver listed it, as a concurrent cleanup would: the
    worker's error is one line naming it, through the CLI, with nothing else on stderr."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(40)))
    prepare(_cfg(src, tmp_path / "tok"))
    listed = job.read_units

    def list_then_delete(source: str):
        units = listed(source)
        os.unlink(src / "2.jsonl")
        return units

    monkeypatch.setattr(job, "read_units", list_then_delete)
    capfd.readouterr()
    argv = ["prepare", "--source", str(src), "--out", str(tmp_path / "out"), "--tokenizer",
            str(tmp_path / "tok" / "tokenizer.json"), "--seq-len", "16", "--workers", "2", "--quiet"]
    assert main(argv) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [f"kdcache prepare: error: {src / '2.jsonl'}: cannot read the file (No such file or "
                   "directory); it was there when the source was listed (field 'source')"], err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
