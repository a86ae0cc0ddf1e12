"""`kdcache prepare --workers 2` on a real local Ray: the same bytes as one worker, also
after an interrupted build is rerun and when --max-tokens stops it early; a worker's bad
record is one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import kdcache.pipeline.prepare.job as prepare_module
import kdcache.storage.tokens.writer as write_module
from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.job import PrepareConfig, prepare
from kdcache.storage.tokens.verify import verify_token_data
from tests.pipeline.conftest import interrupt_at_third_shard

pytestmark = [pytest.mark.ray, pytest.mark.slow]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "mu"]


def _doc(rng: np.random.Generator, i: int) -> str:
    return " ".join([f"doc{i:04d}x", *(WORDS[j] for j in rng.integers(0, len(WORDS), 150))])


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """Text files, a jsonl file and a parquet file of four row groups: many read units."""
    rng = np.random.default_rng(0)
    root = tmp_path / "mixed"
    (root / "txt").mkdir(parents=True)
    for i in range(40):
        (root / "txt" / f"{i:03d}.txt").write_text(_doc(rng, i))
    lines = (json.dumps({"text": _doc(rng, 100 + i)}) + "\n" for i in range(300))
    (root / "b.jsonl").write_text("".join(lines))
    pq.write_table(pa.table({"text": [_doc(rng, 500 + i) for i in range(200)]}), root / "c.parquet",
                   row_group_size=50)
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cfg(source: Path | str, out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(**{"source": str(source), "out": str(out), "vocab_size": 300, "seq_len": 16,
                            "quiet": True, **kw})


def test_two_workers_write_the_bytes_of_one(mixed: Path, tmp_path: Path, ray_local,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Small batches and shards: many Ray blocks, many shards, several array resizes.
    monkeypatch.setattr(prepare_module, "BATCH_BYTES", 8192)
    monkeypatch.setattr(write_module, "CHUNK_TOKENS", 64 * 17)
    monkeypatch.setattr(write_module, "SHARD_CHUNKS", 2)
    every = f"{mixed}/**/*"  # a glob: the text files too (a directory holding records reads only those)
    one = prepare(_cfg(every, tmp_path / "one"))
    two = prepare(_cfg(every, tmp_path / "two", workers=2))
    assert one.documents == two.documents == 540
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")
    assert len(list((tmp_path / "two" / "student" / "c").iterdir())) > 3  # several shard files
    assert verify_token_data(tmp_path / "two") == []
    emit = interrupt_at_third_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(every, tmp_path / "again", workers=2))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".again", "again"))]
    monkeypatch.setattr(write_module.SplitWriter, "_emit", emit)
    prepare(_cfg(every, tmp_path / "again", workers=2))  # the rerun: every byte as before
    assert _tree(tmp_path / "again") == _tree(tmp_path / "one")
    capped = prepare(_cfg(mixed, tmp_path / "cap2", workers=2, max_tokens=3000))
    prepare(_cfg(mixed, tmp_path / "cap1", max_tokens=3000))
    assert _tree(tmp_path / "cap1") == _tree(tmp_path / "cap2")
    assert sum(capped.tokens.values()) <= 3000


def test_bad_record_in_a_worker_is_one_line(mixed: Path, tmp_path: Path, ray_local) -> None:
    prepare(_cfg(mixed, tmp_path / "tok"))
    with (mixed / "b.jsonl").open("a") as f:
        f.write('{"text": 7}\n')
    with pytest.raises(PipelineError) as info:
        prepare(_cfg(mixed, tmp_path / "out", workers=2, tokenizer=str(tmp_path / "tok" / "tokenizer.json"),
                     vocab_size=None))
    assert str(info.value) == f"{mixed / 'b.jsonl'}:301: column 'text' is int, not a string"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
