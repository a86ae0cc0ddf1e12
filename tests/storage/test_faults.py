"""Concurrent writers, a reader during the build, and a writer killed mid-shard."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from kdcache.storage import StoreReader, StoreWriter, verify_store

from .conftest import make_meta, make_rows, shard_of, tree_digest

META = dict(rows=24, seq_len=16, vocab=500, k=8, shard_rows=2, chunk_rows=1)


def _write_shards(path: str, shards: list[int]) -> None:
    meta = make_meta(**META)
    rows = make_rows(meta)
    writer = StoreWriter.open(path, meta)
    for shard in shards:
        writer.write_shard(shard, shard_of(meta, rows, shard))
        time.sleep(0.02)


def test_two_writers_and_a_reader(store_path):
    meta = make_meta(**META)
    rows = make_rows(meta)
    StoreWriter.open(store_path, meta)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_shards, args=(str(store_path), list(range(i, 12, 2))))
             for i in (0, 1)]
    for p in procs:
        p.start()
    reader = StoreReader(store_path)
    building = True
    while building:
        building = any(p.is_alive() for p in procs)  # one more full check after they end
        reader.refresh()
        committed = reader.committed_rows()
        if committed.size:
            got = reader.read_rows(committed)
            for name, values in rows.items():
                assert got[name].tobytes() == values[committed].tobytes(), name
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert reader.committed_shards == list(range(meta.num_shards))
    assert verify_store(store_path) == []


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from tests.storage.conftest import make_meta, make_rows, shard_of
    from kdcache.storage import StoreWriter, ledger
    import kdcache.storage.writer as writer_module
    meta = make_meta(**{meta!r})
    rows = make_rows(meta)
    writer = StoreWriter.open(sys.argv[1], meta)
    victim, stage = int(sys.argv[2]), sys.argv[3]
    if stage == "before_ledger":
        real = ledger.write_entry
        def write_entry(store, entry):
            if entry.shard == victim:
                os.kill(os.getpid(), signal.SIGKILL)
            real(store, entry)
        writer_module.ledger.write_entry = write_entry
    else:  # die when only some of the shard's arrays are on disk
        real_write = StoreWriter._write_arrays
        def dying_write(self, start, stop, data):
            if meta.shard_bounds(victim)[0] == start:
                real_write(self, start, stop, {{n: data[n] for n in ("tokens", "ids")}})
                os.kill(os.getpid(), signal.SIGKILL)
            real_write(self, start, stop, data)
        StoreWriter._write_arrays = dying_write
    for shard in range(meta.num_shards):
        writer.write_shard(shard, shard_of(meta, rows, shard))
    """
)


@pytest.mark.parametrize("stage", ["mid_arrays", "before_ledger"])
def test_writer_killed_mid_shard(tmp_path, stage):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    meta = make_meta(**META)
    rows = make_rows(meta)
    killed = tmp_path / "killed.zarr"
    script = KILLER.format(root=root, meta=META)
    proc = subprocess.run([sys.executable, "-c", script, str(killed), "3", stage])
    assert proc.returncode == -signal.SIGKILL
    reader = StoreReader(killed)
    assert reader.committed_shards == [0, 1, 2]  # the torn shard 3 is invisible
    assert verify_store(killed) == []
    with pytest.raises(Exception, match="uncommitted"):
        reader.read_rows([7])
    writer = StoreWriter.open(killed, meta)
    assert writer.pending_shards() == list(range(3, meta.num_shards))
    for shard in writer.pending_shards():
        writer.write_shard(shard, shard_of(meta, rows, shard))
    assert writer.finalize()
    clean = tmp_path / "clean.zarr"
    writer = StoreWriter.open(clean, meta)
    for shard in writer.pending_shards():
        writer.write_shard(shard, shard_of(meta, rows, shard))
    writer.finalize()
    assert tree_digest(killed) == tree_digest(clean)
    got = StoreReader(killed).read_rows(np.arange(meta.rows))
    assert all(got[n].tobytes() == v.tobytes() for n, v in rows.items())
