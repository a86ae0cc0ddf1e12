"""kdcache's own Zarr codecs for top-k targets, registered with zarr through entry points.

Two array-to-bytes codecs (each followed by crc32c inside the sharding codec):

- `kdcache.ids`: top-k ids, entropy-coded with a frequency table fitted on the chunk
  itself (entropy.py). Ids are ~11.5 bits of information each at k = 64 on real teacher
  output; Blosc-zstd leaves them at 13.6.
- `kdcache.sorted_logprobs`: a top-k store's float16 log-probs, sorted within each
  position. Each value becomes an integer code that rises along k (its float16 bit
  pattern, or a quantisation level in a lossy `values` mode); the first column is coded
  as is and the others as differences from their left neighbour (modulo 2**16, so any
  input round-trips), each group of ranks (1, 2-3, 4-7, ...) with its own table, since
  gaps widen with rank.

Both first code one flag per position: a row of zeros (an untrained position of chat
data) costs that flag, not k symbols.

The array's dtype is the values' own (uint16/uint32 ids, float16 log-probs): plain zarr,
with kdcache installed, reads them like any other array. Without kdcache, zarr cannot
open these two arrays (it names the unknown codec) and reads every other array.

`ValueMode` says how log-probs become codes. `exact` keeps float16 bit patterns and is
lossless. `sqrt8` and `sqrt9` quantise sqrt(p) on a uniform grid of 2**8 or 2**9 steps:
KL(p || q) ~ sum p (delta log p)**2 / 2 is flat in sqrt(p), so one global step spends
bits where the KL is. Lossy modes are applied by the writer before it checksums a shard
(`ValueMode.round_trip`), so what the ledger records is what readers get; their codes
round-trip exactly from then on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import JSON, parse_named_configuration

from kdcache.storage import entropy
from kdcache.storage.errors import StoreError

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

Decoder = Callable[..., np.ndarray]
"""A chunk's decoder: `decoder(out=None)` decodes into `out` (a contiguous array of the
chunk's shape and dtype) or a new array and returns it. Its work is one compiled call that
releases the GIL, so a reader runs decoders on its threads and everything else on its own."""

IDS = "kdcache.ids"
LOGPROBS = "kdcache.sorted_logprobs"
_VERSION = 1
VALUE_MODES = ("exact", "sqrt8", "sqrt9")


class CodecError(StoreError):
    """A chunk is not one this codec wrote."""


def rank_groups(k: int) -> list[tuple[int, int]]:
    """Column ranges [a, b) of the difference columns 1..k-1: ranks 1, 2-3, 4-7, ..."""
    groups, a = [], 1
    while a < k:
        groups.append((a, min(2 * a, k)))
        a *= 2
    return groups


# ---- value modes --------------------------------------------------------------------


@dataclass(frozen=True)
class ValueMode:
    """How float16 log-probs map to integer codes that rise along a sorted row."""

    name: str

    @property
    def levels(self) -> int:
        return 0 if self.name == "exact" else 1 << int(self.name.removeprefix("sqrt"))

    def codes(self, logprobs: np.ndarray) -> np.ndarray:
        """uint16 codes of float16 log-probs (NaN, the fill of unwritten rows, has one too)."""
        if not self.levels:
            return logprobs.view(np.uint16)
        n = self.levels
        with np.errstate(invalid="ignore", over="ignore"):
            q = np.rint(np.exp(np.minimum(logprobs.astype(np.float32), 0) / 2) * n)
        return np.where(np.isnan(q), n + 1, n - q).astype(np.uint16)

    def values(self, codes: np.ndarray) -> np.ndarray:
        """The float16 log-probs codes stand for."""
        if not self.levels:
            return codes.view(np.float16)
        n = self.levels
        q = (n - codes.astype(np.float32)).clip(0.25, n)  # level 0 decodes a quarter step up
        out = (2 * np.log(q / n)).astype(np.float16)
        out[codes > n] = np.nan
        return out

    def table(self) -> np.ndarray:
        """values() of every uint16 code, as float16 bit patterns (empty when exact: the codes
        are the bit patterns): the compiled decoder looks values up rather than compute them."""
        return _value_table(self.name)

    def round_trip(self, logprobs: np.ndarray) -> np.ndarray:
        """What a store in this mode holds for `logprobs` (the values themselves when exact)."""
        return logprobs if not self.levels else self.values(self.codes(logprobs))


@functools.cache
def _value_table(name: str) -> np.ndarray:
    mode = ValueMode(name)
    if not mode.levels:
        return np.zeros(0, dtype=np.uint16)
    return mode.values(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)).view(np.uint16)


def value_mode(name: str) -> ValueMode:
    if name not in VALUE_MODES:
        raise StoreError(f"values mode must be one of {VALUE_MODES}, got {name!r}")
    return ValueMode(name)


# ---- chunk coding (shared by the zarr codecs and shardio's fast path) ----------------


def _edges(k: int) -> np.ndarray:
    """rank_groups(k) as the edges rans.logprob_streams takes: 1, 2, 4, ..., k."""
    return np.array([1, *(b for _, b in rank_groups(k))], dtype=np.int64)


def encode_ids(chunk: np.ndarray) -> bytes:
    k = chunk.shape[-1] if chunk.ndim else 1
    rows = np.ascontiguousarray(chunk).reshape(-1, k)
    return bytes([_VERSION]) + entropy.encode_streams(*entropy.kernels().id_streams(rows))


def decode_ids(raw: memoryview | bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    return ids_decoder(raw, shape, dtype)()


def ids_decoder(raw: memoryview | bytes, shape: tuple[int, ...], dtype: np.dtype) -> Decoder:
    """Read an ids chunk's table frames now; its decoder decodes the chunk (`Decoder`)."""
    k = shape[-1]
    positions = int(np.prod(shape[:-1]))
    block, planes = _block(raw)

    def decode(out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(shape, dtype=dtype) if out is None else out
        rows = _rows_of(out, positions, k)
        entropy.check(entropy.kernels().ids_chunk(block, planes, entropy.PARAMS, rows))
        return out

    return decode


def encode_logprobs(chunk: np.ndarray, mode: ValueMode) -> bytes:
    k = chunk.shape[-1]
    codes = mode.codes(np.ascontiguousarray(chunk)).reshape(-1, k)
    return bytes([_VERSION]) + entropy.encode_streams(*entropy.kernels().logprob_streams(codes, _edges(k)))


def decode_logprobs(raw: memoryview | bytes, shape: tuple[int, ...], mode: ValueMode) -> np.ndarray:
    return logprobs_decoder(raw, shape, mode)()


def logprobs_decoder(raw: memoryview | bytes, shape: tuple[int, ...], mode: ValueMode) -> Decoder:
    """Read a log-prob chunk's table frames now; its decoder decodes the chunk (`Decoder`)."""
    k = shape[-1]
    positions = int(np.prod(shape[:-1]))
    edges = _edges(k)
    block, planes = _block(raw)

    def decode(out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty(shape, dtype=np.float16) if out is None else out
        bits = _rows_of(out.view(np.uint16), positions, k)
        entropy.check(entropy.kernels().logprobs_chunk(block, planes, entropy.PARAMS, edges, mode.table(),
                                                        bits))
        return out

    return decode


def _rows_of(out: np.ndarray, positions: int, k: int) -> np.ndarray:
    """`out` as [positions, k], the same memory (a decoder's destination)."""
    if not out.flags.c_contiguous or out.size != positions * k:
        raise ValueError(f"a chunk decodes into a contiguous array of {positions * k} values")
    return out.reshape(positions, k)


def _block(raw: memoryview | bytes) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's block (uint8) and its table frames, decoded (entropy.tables)."""
    block = np.frombuffer(raw, dtype=np.uint8)
    if block.size < 1 or block[0] != _VERSION:
        raise CodecError(f"chunk is not a version-{_VERSION} kdcache chunk")
    return block[1:], entropy.tables(block[1:])


# ---- the zarr codecs -------------------------------------------------------------------


@dataclass(frozen=True)
class KdcacheCodec(ArrayBytesCodec):
    """The array-to-bytes codecs of this module; `chunk_encode`/`chunk_decode` are the whole
    codec, so shardio.py codes chunks without zarr."""

    is_fixed_size = False

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size, as any compressor

    def chunk_encode(self, chunk: np.ndarray) -> bytes:
        raise NotImplementedError

    def chunk_decoder(self, raw: memoryview | bytes, shape: tuple[int, ...], dtype: np.dtype) -> Decoder:
        raise NotImplementedError

    def chunk_decode(self, raw: memoryview | bytes, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return self.chunk_decoder(raw, shape, dtype)()

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        dtype = chunk_spec.dtype.to_native_dtype()
        out = self.chunk_decode(chunk_bytes.to_bytes(), tuple(chunk_spec.shape), dtype)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(out)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        data = np.asarray(chunk_array.as_ndarray_like())
        return chunk_spec.prototype.buffer.from_bytes(self.chunk_encode(data))


@dataclass(frozen=True)
class TopkIds(KdcacheCodec):
    """`kdcache.ids`: unsigned integer ids, entropy-coded per chunk."""

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        parse_named_configuration(data, IDS, require_configuration=False)
        return cls()

    def to_dict(self) -> dict[str, JSON]:
        return {"name": IDS}

    def validate(self, *, dtype: Any, **_: Any) -> None:
        if dtype.to_native_dtype().kind != "u":
            raise ValueError(f"{IDS} codes unsigned integer ids, not {dtype}")

    def chunk_encode(self, chunk: np.ndarray) -> bytes:
        return encode_ids(chunk)

    def chunk_decoder(self, raw: memoryview | bytes, shape: tuple[int, ...], dtype: np.dtype) -> Decoder:
        return ids_decoder(raw, shape, dtype)


@dataclass(frozen=True)
class SortedLogprobs(KdcacheCodec):
    """`kdcache.sorted_logprobs`: float16 log-probs sorted along the last axis."""

    values: str = "exact"

    def __init__(self, *, values: str = "exact") -> None:
        object.__setattr__(self, "values", value_mode(values).name)

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, config = parse_named_configuration(data, LOGPROBS, require_configuration=False)
        return cls(**(config or {}))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        return {"name": LOGPROBS, "configuration": {"values": self.values}}

    def validate(self, *, dtype: Any, **_: Any) -> None:
        if dtype.to_native_dtype() != np.float16:
            raise ValueError(f"{LOGPROBS} codes float16 log-probs, not {dtype}")

    def chunk_encode(self, chunk: np.ndarray) -> bytes:
        return encode_logprobs(chunk, ValueMode(self.values))

    def chunk_decoder(self, raw: memoryview | bytes, shape: tuple[int, ...], dtype: np.dtype) -> Decoder:
        return logprobs_decoder(raw, shape, ValueMode(self.values))
