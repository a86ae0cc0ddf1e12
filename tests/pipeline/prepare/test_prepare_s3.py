"""`kdcache prepare` to and from a real S3 API server (moto, tests/s3_server.py): token data
published whole (its root `zarr.json` last), byte for byte what the same job writes on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdcache.pipeline.cli import main
from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.job import prepare
from kdcache.storage.errors import StoreError
from kdcache.storage.location import ObjectPrefix, locate
from kdcache.storage.tokens.format import open_token_data
from kdcache.storage.tokens.verify import verify_token_data
from tests.pipeline.prepare.test_prepare import _cfg, _tree_bytes


def _objects(url: str) -> dict[str, bytes]:
    where = locate(url)
    return {key: where.read(key) for key in sorted(where.objects())}


def test_prepare_to_s3_writes_the_bytes_it_writes_on_disk(text_dir: Path, tmp_path: Path, s3: str) -> None:
    prepare(_cfg(text_dir, tmp_path / "local"))
    result = prepare(_cfg(text_dir, f"{s3}/data"))  # type: ignore[arg-type]
    assert result.out == f"{s3}/data"
    assert _objects(f"{s3}/data") == _tree_bytes(tmp_path / "local")
    local, remote = open_token_data(tmp_path / "local"), open_token_data(f"{s3}/data")
    assert remote.fingerprint == local.fingerprint
    rows = np.array([3, 0, 7])
    np.testing.assert_array_equal(remote.read("student", rows), local.read("student", rows))
    assert remote.tokenizer_path.read_bytes() == local.tokenizer_path.read_bytes()
    assert verify_token_data(f"{s3}/data") == []


def test_prepare_reads_its_source_from_s3(text_dir: Path, tmp_path: Path, s3: str) -> None:
    for path in sorted(text_dir.rglob("*.txt")):
        locate(f"{s3}/corpus").publish(path.relative_to(text_dir).as_posix(), path.read_bytes())
    prepare(_cfg(text_dir, tmp_path / "local"))
    prepare(_cfg(f"{s3}/corpus", tmp_path / "from-s3"))
    local, remote = open_token_data(tmp_path / "local"), open_token_data(tmp_path / "from-s3")
    assert remote.meta["source"] == f"{s3}/corpus"
    # The same documents in the same order: the same rows (the source name is only metadata).
    for split in ("teacher", "student", "valid"):
        np.testing.assert_array_equal(remote.read(split, slice(None)), local.read(split, slice(None)))


def test_refuses_existing_output_and_overwrites_whole(text_dir: Path, s3: str) -> None:
    prepare(_cfg(text_dir, f"{s3}/data"))  # type: ignore[arg-type]
    before = _objects(f"{s3}/data")
    with pytest.raises(PipelineError, match=r"s3://.*/data: output already exists"):
        prepare(_cfg(text_dir, f"{s3}/data"))  # type: ignore[arg-type]
    assert _objects(f"{s3}/data") == before
    prepare(_cfg(text_dir, f"{s3}/data", seed=1, overwrite=True))  # type: ignore[arg-type]
    after = open_token_data(f"{s3}/data")
    assert after.meta["seed"] == 1 and set(_objects(f"{s3}/data")) == set(before)


def test_an_interrupted_upload_is_never_readable(text_dir: Path, s3: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The upload dies after a few objects: readers find no token data, not part of one."""
    real, calls = ObjectPrefix.publish, []

    def publish(self: ObjectPrefix, key: str, data: bytes) -> None:
        calls.append(key)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real(self, key, data)

    monkeypatch.setattr(ObjectPrefix, "publish", publish)
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(text_dir, f"{s3}/data"))  # type: ignore[arg-type]
    monkeypatch.setattr(ObjectPrefix, "publish", real)
    assert locate(f"{s3}/data").objects() and "zarr.json" not in locate(f"{s3}/data").objects()
    with pytest.raises(StoreError, match="not a token data directory"):
        open_token_data(f"{s3}/data")
    with pytest.raises(PipelineError, match="holds objects but no token data"):
        prepare(_cfg(text_dir, f"{s3}/data"))  # type: ignore[arg-type]
    prepare(_cfg(text_dir, f"{s3}/data", overwrite=True))  # type: ignore[arg-type]
    assert verify_token_data(f"{s3}/data") == []


def test_a_missing_bucket_is_one_line_and_writes_nothing(text_dir: Path, s3: str, capsys) -> None:
    code = main(["prepare", "--source", str(text_dir), "--out", "s3://kdcache-no-such-bucket/data",
                 "--vocab-size", "300", "--seq-len", "16", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "s3://kdcache-no-such-bucket/data: the bucket does not exist" in err[0]
