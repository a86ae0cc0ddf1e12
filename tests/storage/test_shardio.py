"""Direct shard coding (shardio.py) and the bit-pattern layout of log-probs: lossless, and
readable by plain zarr both ways."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcache.storage import StoreError, StoreReader, StoreWriter, verify_store
from kdcache.storage.layout import BITS_ATTR

from .conftest import make_meta, make_rows, shard_of, write_previous_layout

SPECIAL = np.array([0.0, -0.0, -np.inf, np.nan, -65504.0, -6e-8, 1e-4], dtype=np.float16)


def _write_all(path, meta, rows):
    writer = StoreWriter.open(path, meta)
    for shard in writer.pending_shards():
        writer.write_shard(shard, shard_of(meta, rows, shard))
    writer.finalize()
    return writer


def _plain(path, name):
    array = zarr.open_group(str(path), mode="r")[name]
    values = array[:]
    bits = array.attrs.get(BITS_ATTR)
    return values.view(bits) if bits else values


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(k=st.integers(1, 6), rows=st.integers(1, 7), wide=st.booleans(), ties=st.booleans(),
       seed=st.integers(0, 2**16))
def test_store_round_trip_is_bit_exact(tmp_path_factory, k, rows, wide, ties, seed):
    """Any top-k shard, k = 1 and uint32 ids included, reads back byte for byte, through
    the reader and through plain zarr plus the documented view."""
    meta = make_meta(rows=rows, seq_len=5, vocab=70000 if wide else 300, k=k, shard_rows=3,
                     chunk_rows=1 + (seed % 3 == 0) * 2)
    data = make_rows(meta, seed=seed)
    if ties:  # equal neighbours: a delta of zero
        data["logprobs"][..., 1:] = data["logprobs"][..., :1]
        data["tail_logmass"][:] = -np.inf
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    _write_all(path, meta, data)
    got = StoreReader(path).read_rows(np.arange(rows))
    for name, values in data.items():
        assert got[name].dtype == values.dtype
        assert got[name].tobytes() == values.tobytes(), name
        assert _plain(path, name).tobytes() == values.tobytes(), name
    assert verify_store(path) == []


def test_any_float16_bit_pattern_survives_the_delta(tmp_path):
    """The transform is a bijection on bit patterns: -inf, NaN, -0.0 and unsorted values too."""
    meta = make_meta(rows=4, seq_len=8, k=7, shard_rows=2, chunk_rows=1)
    writer = StoreWriter.open(tmp_path / "s.zarr", meta)
    rng = np.random.default_rng(1)
    values = rng.choice(SPECIAL, size=(2, 8, 7)).astype(np.float16)
    values[0, 0] = SPECIAL
    writer._write_arrays(0, 2, {"logprobs": values})  # past validation, straight to the codec
    array = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["logprobs"]
    assert array.dtype == np.float16
    assert array[0:2].tobytes() == values.tobytes()


def test_stores_of_the_bit_pattern_layout_still_read(tmp_path):
    """Stores whose log-probs are delta-coded uint16 bit patterns (before kdcache's codecs)
    read as float16 through the reader, and through plain zarr plus the documented view."""
    meta = make_meta(rows=7, seq_len=6, k=5, shard_rows=3, chunk_rows=1)
    data = make_rows(meta)
    path = tmp_path / "previous.zarr"
    write_previous_layout(path, meta, data)
    got = StoreReader(path).read_rows([6, 0, 3, 3])
    for name, values in data.items():
        assert got[name].tobytes() == values[[6, 0, 3, 3]].tobytes(), name
        assert _plain(path, name).tobytes() == values.tobytes(), name
    assert zarr.open_group(str(path), mode="r")["logprobs"].dtype == np.uint16
    assert verify_store(path) == []


def test_reader_reads_stores_written_by_zarr_with_the_old_codecs(tmp_path):
    """Stores from before the bit-pattern layout (float16, zarr-written) still read."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    from kdcache.storage import writer as writer_module
    from kdcache.storage.layout import array_specs

    meta = make_meta(rows=5, seq_len=6, k=3, shard_rows=2, chunk_rows=1)
    data = make_rows(meta)
    path = tmp_path / "old.zarr"
    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    for spec in array_specs(meta).values():
        group.create_array(spec.name, shape=(meta.rows, *spec.row_shape), dtype=spec.dtype,
                           chunks=(1, *spec.row_shape), shards=(2, *spec.row_shape),
                           compressors=(BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
                                        Crc32cCodec()),
                           fill_value=spec.fill_value if not spec.bits else float("nan"))
    group.create_group("ledger")
    group.attrs[writer_module.ATTR] = meta.to_json()
    writer = StoreWriter.open(path, meta)
    for shard in range(meta.num_shards):  # commit what zarr wrote, through the ledger
        writer.write_shard(shard, shard_of(meta, data, shard))
    for name, values in data.items():
        group[name][:] = values  # the same bytes again, through zarr's own writer
    got = StoreReader(path).read_rows([4, 0, 3, 3])
    for name, values in data.items():
        assert got[name].tobytes() == values[[4, 0, 3, 3]].tobytes(), name
    assert zarr.open_group(str(path), mode="r")["logprobs"].dtype == np.float16


def test_a_flipped_byte_in_a_directly_read_chunk_is_refused(tmp_path):
    meta = make_meta(rows=4, seq_len=8, k=4, shard_rows=2, chunk_rows=1)
    _write_all(tmp_path / "s.zarr", meta, make_rows(meta))
    shard_file = tmp_path / "s.zarr" / "ids" / "c" / "1" / "0" / "0"
    raw = bytearray(shard_file.read_bytes())
    raw[20] ^= 0x10
    shard_file.write_bytes(bytes(raw))
    reader = StoreReader(tmp_path / "s.zarr")
    reader.read_rows([0, 1])  # the other shard is intact
    with pytest.raises(StoreError, match="array 'ids' in shards \\[1\\].*corrupt"):
        reader.read_rows([2])


def _read_in_child(path, queue):
    got = StoreReader(path).read_rows(np.arange(4))
    queue.put(got["logprobs"].tobytes())


def test_a_forked_process_reads_after_its_parent_did(tmp_path):
    """A DataLoader worker is forked from a process whose thread pool already ran."""
    import multiprocessing as mp

    meta = make_meta(rows=4, seq_len=8, k=4, shard_rows=2, chunk_rows=1)
    rows = make_rows(meta)
    _write_all(tmp_path / "s.zarr", meta, rows)
    StoreReader(tmp_path / "s.zarr").read_rows(np.arange(4))  # several chunks: the pool runs
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(tmp_path / "s.zarr", queue))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == rows["logprobs"].tobytes()
