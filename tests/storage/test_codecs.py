"""kdcache's codecs: bit-exact on real and adversarial input, lossy modes within their
documented KL, corruption caught, and the stores they make readable by plain zarr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from kdcache.storage import StoreError, StoreReader, StoreWriter, entropy, verify_store
from kdcache.storage.codecs import (
    CodecError,
    ValueMode,
    decode_ids,
    decode_logprobs,
    encode_ids,
    encode_logprobs,
    ids_decoder,
    logprobs_decoder,
)

from .conftest import make_meta, make_rows, shard_of

REAL = Path(__file__).parents[1] / "data" / "smollm2_top64.npz"

# Documented in docs/store-format.md ("Value modes"): mean KL over positions, and the largest
# at any one position, on SmolLM2-135M targets at k = 64.
KL_BOUND = {"sqrt8": (2.0e-4, 1.0e-3), "sqrt9": (5.0e-5, 1.0e-3)}  # mean, max


def _real() -> dict[str, np.ndarray]:
    with np.load(REAL, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _ids_round_trip(ids: np.ndarray) -> None:
    raw = encode_ids(ids)
    got = decode_ids(raw, ids.shape, ids.dtype)
    assert got.dtype == ids.dtype and got.tobytes() == ids.tobytes()


def test_real_teacher_ids_and_logprobs_round_trip_bit_exactly():
    real = _real()
    _ids_round_trip(real["ids"])
    raw = encode_logprobs(real["logprobs"], ValueMode("exact"))
    assert decode_logprobs(raw, real["logprobs"].shape, ValueMode("exact")).tobytes() == \
        real["logprobs"].tobytes()
    # ~11.5 bits per id where the uint16 the ids came in spend 16
    assert len(encode_ids(real["ids"])) * 8 / real["ids"].size < 12.5


@pytest.mark.parametrize("dtype, ids", [
    (np.uint16, np.zeros((3, 5, 4))),  # all equal
    (np.uint16, np.arange(60).reshape(3, 5, 4)),  # all distinct
    (np.uint16, np.full((2, 3, 4), 65535)),  # the largest uint16 id
    (np.uint16, np.arange(65536)[::-1].reshape(16, 64, 64)),  # every uint16 id once
    (np.uint32, np.arange(65537).reshape(1, 1, 65537)),  # a vocabulary of 65,537
    (np.uint32, np.array([[[2**32 - 1, 0, 151_935]]])),  # the largest uint32 id
    (np.uint16, np.zeros((0, 5, 4))),  # no positions
])
def test_adversarial_ids_round_trip(dtype, ids):
    _ids_round_trip(ids.astype(dtype))


def test_random_ids_of_every_width_round_trip():
    rng = np.random.default_rng(0)
    for high, dtype in ((2, np.uint16), (300, np.uint16), (65536, np.uint16), (151_936, np.uint32)):
        _ids_round_trip(rng.integers(0, high, (7, 9, 11)).astype(dtype))


def test_any_float16_bit_pattern_round_trips_exactly():
    bits = np.arange(65536, dtype=np.uint16).reshape(256, 4, 64)
    values = bits.view(np.float16)
    raw = encode_logprobs(values, ValueMode("exact"))
    assert decode_logprobs(raw, values.shape, ValueMode("exact")).view(np.uint16).tobytes() == bits.tobytes()


@pytest.mark.parametrize("vocab", [65536, 65537])
def test_stores_at_the_id_width_boundary_read_back_through_plain_zarr(tmp_path, vocab):
    meta = make_meta(rows=5, seq_len=6, vocab=vocab, k=4, shard_rows=2, chunk_rows=1)
    rows = make_rows(meta)
    rows["ids"][0, 0] = [vocab - 1, 0, vocab - 2, 1]
    writer = StoreWriter.open(tmp_path / "s.zarr", meta)
    for shard in writer.pending_shards():
        writer.write_shard(shard, shard_of(meta, rows, shard))
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group["ids"].dtype == (np.uint16 if vocab == 65536 else np.uint32)
    for name, values in rows.items():
        assert group[name][:].tobytes() == values.tobytes(), name
        assert StoreReader(tmp_path / "s.zarr").read_rows(np.arange(5))[name].tobytes() == values.tobytes()


def _kl(p: np.ndarray, p_rest: np.ndarray, q: np.ndarray, q_rest: np.ndarray) -> np.ndarray:
    """KL(P || Q) per position over the k ids and one rest category, Q renormalised, float64."""
    p = np.concatenate([p, p_rest[..., None]], -1)
    q = np.concatenate([q, q_rest[..., None]], -1)
    q = q / q.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1).reshape(-1)


@pytest.mark.parametrize("mode", ["sqrt8", "sqrt9"])
def test_lossy_modes_stay_within_their_documented_kl(mode):
    """The stored float16 targets as P (float64), the mode's decoded values as Q, the exact
    tail mass on both sides: mean and largest KL within the bounds docs/store-format.md gives."""
    real = _real()
    value_mode = ValueMode(mode)
    held = value_mode.round_trip(real["logprobs"])
    raw = encode_logprobs(real["logprobs"], value_mode)
    assert decode_logprobs(raw, held.shape, value_mode).tobytes() == held.tobytes()
    assert value_mode.round_trip(held).tobytes() == held.tobytes()  # its grid is a fixed point
    p = np.exp(real["logprobs"].astype(np.float64))
    q = np.exp(held.astype(np.float64))
    rest = np.exp(real["tail_logmass"].astype(np.float64))
    kl = _kl(p, rest, q, rest)
    mean, largest = KL_BOUND[mode]
    assert kl.mean() <= mean and kl.max() <= largest
    assert len(raw) < len(encode_logprobs(real["logprobs"], ValueMode("exact"))) / 2.5


def test_lossy_values_keep_untrained_zeros_and_unwritten_nan():
    mode = ValueMode("sqrt8")
    values = np.array([[0.0, 0.0, 0.0], [np.nan, np.nan, np.nan], [-0.01, -3.0, -30.0]], np.float16)
    got = mode.round_trip(values)
    assert (got[0] == 0).all() and np.isnan(got[1]).all()
    assert np.isfinite(got[2]).all() and (np.diff(got[2].astype(np.float32)) <= 0).all()


@pytest.mark.parametrize("mode", ["exact", "sqrt8"])
def test_chunks_decode_into_the_readers_array_with_zero_and_nan_rows(mode):
    """The compiled decoders write straight into the array they are given (the reader's
    batch): every row coded, some rows zero (untrained), a row of NaN (never written); a
    lossy mode's values come from its table of every code, equal to `round_trip`'s."""
    real = _real()
    ids, logprobs = real["ids"][:, :16].copy(), real["logprobs"][:, :16].copy()
    value_mode = ValueMode(mode)
    for zeroed in (False, True):
        if zeroed:
            ids[:, 3::4], logprobs[:, 3::4] = 0, 0
            logprobs[:, 5] = np.nan
        out = np.full(ids.shape, 7, dtype=ids.dtype)
        assert ids_decoder(encode_ids(ids), ids.shape, ids.dtype)(out) is out
        assert out.tobytes() == ids.tobytes()
        held = value_mode.round_trip(logprobs)
        out = np.full(logprobs.shape, 1.0, dtype=np.float16)
        assert logprobs_decoder(encode_logprobs(logprobs, value_mode), logprobs.shape, value_mode)(out) is out
        assert out.tobytes() == held.tobytes()


def test_a_lossy_store_records_its_mode_and_its_ledger_sums_what_it_holds(tmp_path):
    meta = make_meta(rows=4, seq_len=8, k=4, shard_rows=2, chunk_rows=1, values="sqrt9")
    rows = make_rows(meta)
    writer = StoreWriter.open(tmp_path / "s.zarr", meta)
    for shard in writer.pending_shards():
        writer.write_shard(shard, shard_of(meta, rows, shard))
    writer.finalize()
    reader = StoreReader(tmp_path / "s.zarr")
    assert reader.meta.values == "sqrt9"
    got = reader.read_rows(np.arange(4))
    assert got["logprobs"].tobytes() == ValueMode("sqrt9").round_trip(rows["logprobs"]).tobytes()
    assert got["tail_logmass"].tobytes() == rows["tail_logmass"].tobytes()  # the tail stays exact
    assert verify_store(tmp_path / "s.zarr") == []


def test_a_corrupt_chunk_of_the_new_codecs_is_caught(tmp_path):
    meta = make_meta(rows=4, seq_len=8, k=4, shard_rows=2, chunk_rows=1)
    rows = make_rows(meta)
    writer = StoreWriter.open(tmp_path / "s.zarr", meta)
    for shard in writer.pending_shards():
        writer.write_shard(shard, shard_of(meta, rows, shard))
    shard_file = tmp_path / "s.zarr" / "ids" / "c" / "0" / "0" / "0"
    raw = bytearray(shard_file.read_bytes())
    raw[20] ^= 0x10
    shard_file.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="array .ids.*crc32c"):
        StoreReader(tmp_path / "s.zarr").read_rows([0, 1])
    assert [p.array for p in verify_store(tmp_path / "s.zarr")] == ["ids"]


def test_damaged_streams_raise_instead_of_decoding_garbage():
    """Past the crc32c (a chunk damaged before it was checksummed), the codec still refuses
    truncated or altered streams with an error, never a crash."""
    real = _real()
    raw = encode_ids(real["ids"][:1])
    shape, dtype = real["ids"][:1].shape, real["ids"].dtype
    for bad in (raw[:-4], raw[:10], raw + b"\0\0\0\0", b"\2" + raw[1:]):
        with pytest.raises((CodecError, entropy.EntropyError)):
            decode_ids(bad, shape, dtype)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF  # inside the rANS words: the final state check fails
    with pytest.raises((CodecError, entropy.EntropyError)):
        decode_ids(bytes(flipped), shape, dtype)


def test_untrained_positions_cost_a_flag_not_k_symbols():
    """Rows of zeros (chat data's untrained positions) round-trip and cost about nothing:
    zeroing half the positions of real targets halves the bytes."""
    real = _real()
    ids, logprobs = real["ids"].copy(), real["logprobs"].copy()
    ids[:, ::2], logprobs[:, ::2] = 0, 0
    for encode, decode, full, half in (
            (encode_ids, lambda raw: decode_ids(raw, ids.shape, ids.dtype), real["ids"], ids),
            (lambda v: encode_logprobs(v, ValueMode("exact")),
             lambda raw: decode_logprobs(raw, logprobs.shape, ValueMode("exact")),
             real["logprobs"], logprobs)):
        raw = encode(half)
        assert decode(raw).tobytes() == half.tobytes()
        assert len(raw) < 0.56 * len(encode(full))


def test_importing_kdcache_does_not_load_numba():
    """numba's llvmlite breaks vLLM's CPU start-up (rans.py): the cache worker imports
    kdcache's storage before it starts a vLLM teacher, so numba loads only on first coding."""
    import subprocess
    import sys

    code = ("import sys, kdcache.storage, kdcache.pipeline.cache.worker, kdcache.train; "
            "assert 'numba' not in sys.modules and 'llvmlite' not in sys.modules, 'loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)
