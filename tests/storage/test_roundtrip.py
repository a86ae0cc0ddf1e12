"""Write, read back, bit-exact: property-based over kinds, shapes, k and vocab sizes, with and
without documents (a loss mask and position ids beside the targets)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.storage import StoreReader, StoreWriter, verify_store

from .conftest import make_meta, make_rows, shard_of


@st.composite
def metas(draw):
    kind = draw(st.sampled_from(["topk", "full", "sampled"]))
    if kind == "full":
        vocab = draw(st.integers(2, 64))
    else:
        vocab = draw(st.sampled_from([5, 300, 65535, 65536, 65537, 70000]))
    chunk_rows = draw(st.integers(1, 3))
    return make_meta(
        kind,
        rows=draw(st.integers(1, 9)),
        seq_len=draw(st.integers(1, 6)),
        vocab=vocab,
        k=draw(st.integers(1, min(vocab, 8))),
        shard_rows=chunk_rows * draw(st.integers(1, 3)),
        chunk_rows=chunk_rows,
        documents=draw(st.booleans()),
    )


def bytes_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=metas(), seed=st.integers(0, 2**16), data=st.data())
def test_roundtrip_bit_exact(meta, seed, data):
    rows = make_rows(meta, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.zarr"
        writer = StoreWriter.open(path, meta)
        for shard in writer.pending_shards():
            writer.write_shard(shard, shard_of(meta, rows, shard))
        assert writer.finalize()
        reader = StoreReader(path)
        order = data.draw(st.lists(st.integers(0, meta.rows - 1), min_size=1, max_size=12))
        got = reader.read_rows(order)
        for name, values in rows.items():
            assert bytes_equal(got[name], values[order]), name
        streamed = list(reader.iter_batches(batch_rows=2))
        for name, values in rows.items():
            assert bytes_equal(np.concatenate([b[name] for b in streamed]), values), name
        assert verify_store(path) == []
        # Over trained positions only, where the rows carry a loss mask.
        trained = rows["loss_mask"][:, 1:] == 1 if meta.documents else slice(None)
        expected_loss = float(-rows["target_logprob"][trained].astype(np.float64).mean())
        assert abs(reader.meta.teacher_loss - expected_loss) < 1e-9 * max(1.0, expected_loss)


def test_ids_dtype_follows_vocab(store_path):
    import zarr

    for vocab, dtype in [(65536, np.uint16), (65537, np.uint32)]:
        path = store_path.with_name(f"v{vocab}.zarr")
        StoreWriter.open(path, make_meta(vocab=vocab))
        assert zarr.open_group(str(path), mode="r")["ids"].dtype == dtype


def test_resume_skips_committed_and_refinalizes(store_path):
    meta = make_meta(rows=10, shard_rows=4)
    rows = make_rows(meta)
    writer = StoreWriter.open(store_path, meta)
    writer.write_shard(1, shard_of(meta, rows, 1))
    assert not writer.finalize()
    again = StoreWriter.open(store_path, meta)
    assert again.pending_shards() == [0, 2]
    for shard in again.pending_shards():
        again.write_shard(shard, shard_of(meta, rows, shard))
    assert again.finalize() and again.meta.complete
