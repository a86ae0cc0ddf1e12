"""The store on a real S3 API server (moto, tests/s3_server.py): the same bytes as on disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kdcache.storage import StoreError, StoreReader, StoreWriter, verify_store
from kdcache.storage.location import locate
from tests.storage.conftest import make_meta, make_rows, shard_of


def _write(where, meta, shards):
    writer = StoreWriter.open(where, meta)
    rows = make_rows(meta)
    for s in shards:
        writer.write_shard(s, shard_of(meta, rows, s))
    writer.finalize()
    return writer


def test_a_store_on_s3_has_the_bytes_of_the_same_store_on_disk(s3, tmp_path: Path):
    meta = make_meta(rows=12, shard_rows=4)
    _write(tmp_path / "store.zarr", meta, range(meta.num_shards))
    _write(f"{s3}/store.zarr", meta, range(meta.num_shards))
    local, remote = locate(tmp_path / "store.zarr"), locate(f"{s3}/store.zarr")
    files = {k for k in local.objects() if ".partial" not in k}
    assert files == set(remote.objects())
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    for key in files:
        assert local.read(key) == remote.read(key), key
        assert secret not in remote.read(key)  # credentials live in the environment only
    a, b = StoreReader(tmp_path / "store.zarr"), StoreReader(f"{s3}/store.zarr")
    rows = np.array([0, 5, 6, 11])
    for name, values in a.read_rows(rows).items():
        np.testing.assert_array_equal(values, b.read_rows(rows)[name])
    assert verify_store(f"{s3}/store.zarr") == []


def test_a_missing_bucket_is_one_line_naming_the_url(s3):
    meta = make_meta(rows=8, shard_rows=4)
    with pytest.raises(StoreError, match=r"s3://kdcache-no-such-bucket/x: the bucket does not exist"):
        StoreWriter.open("s3://kdcache-no-such-bucket/x", meta)


def test_a_deleted_shard_object_fails_the_read_naming_shard_and_array(s3):
    meta = make_meta(rows=12, shard_rows=4)
    url = f"{s3}/store.zarr"
    _write(url, meta, range(meta.num_shards))
    reader = StoreReader(url)
    locate(url).delete("logprobs/c/1/0/0")
    np.testing.assert_array_equal(reader.read_rows([0, 1])["ids"], StoreReader(url).read_rows([0, 1])["ids"])
    with pytest.raises(StoreError, match=r"shard 1 array 'logprobs': shard file is missing"):
        reader.read_rows([4, 5])
    problems = verify_store(url)
    assert [(p.shard, p.array) for p in problems] == [(1, "logprobs")]



@pytest.mark.parametrize("verb", ["inspect", "verify", "train"])
def test_a_reader_of_a_missing_bucket_says_so_in_one_line(s3, verb, tmp_path, capsys):
    from kdcache.pipeline.cli import main

    url = "s3://kdcache-no-such-bucket/store.zarr"
    argv = {"inspect": ["inspect", url], "verify": ["verify", url],
            "train": ["train", "--data", url, "--out", str(tmp_path / "student"), "--layers", "1", "--quiet"]}
    assert main(argv[verb]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{url}: the bucket does not exist" in err[0], err
    assert not (tmp_path / "student").exists()
