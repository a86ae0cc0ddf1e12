"""A static-table rANS entropy coder for integer symbols, compiled with numba.

Top-k ids carry ~11.5 bits of information each against the 16 they are stored in, and
byte-oriented compressors (zstd, Blosc, with any shuffle or dictionary) cannot see it,
because it lies in how often each of ~8,000 distinct ids recurs. An entropy coder over
the ids' own frequencies can. This module is that coder, in kdcache's codecs (codecs.py).

A *stream* codes one array of non-negative integers with a frequency table fitted on the
stream itself (semi-static): the distinct values and their counts (rounded to powers of
two, rans.coarse, then scaled to sum to 2**precision, rans.quantise) are stored with the
stream, so every stream decodes on its own and a chunk needs nothing from the rest of the
store. Decoding is table-driven: one lookup per symbol in a table of 2**precision slots,
in compiled code that releases the GIL.

Why not a library coder: constriction's categorical model decodes at 24-53 ns per symbol
here (binary search over the table, GIL held), which caps a k = 64 read at ~300k tokens/s;
pcodec bins values by numeric range rather than by frequency, so it codes ids in 12.3 bits
(benchmarks/store_size.py has the numbers). rANS itself is the textbook 64-bit variant
(state in [2**31, 2**63), 32-bit renormalisation, J. Duda's asymmetric numeral systems),
with four interleaved states so that four independent chains decode at once (~1.5x).

A chunk codes its streams as one *block* (`encode_streams`): the small tables of all its streams
share one zstd frame, and a large table (ids: ~8,000 distinct values) is itself coded as a
block of two streams, ~6% smaller than zstd over it (tables of fewer than 4,096 values are
smaller, and decode faster, in the shared frame). Fitting and coding all of a block's
streams is one compiled call (rans.fit_encode); decoding is zstd over its table frames
(`tables`), then one compiled call that lays the block out, rebuilds every table and
decodes every stream (rans.layout and rans.run, or a codec's own decoder there).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import numpy as np
from numcodecs import Zstd

from kdcache.storage.errors import StoreError

MIN_PRECISION, MAX_PRECISION = 10, 16
LIMIT_PRECISION = 24  # streams with more distinct values than 2**16 get larger tables
PRECISION_HEADROOM = 4
COUNT_BITS = 1  # measured on SmolLM2 targets: 1 beat 2..6 and exact counts at every k
_TABLE_CODEC = Zstd(level=9)
NESTED_ABOVE = 4096  # distinct values: smaller tables cost less, and decode faster, as zstd frames
DENSE_LIMIT = 1 << 22  # values below it are counted in an array of counts; above, by sorting
PARAMS = np.array([MIN_PRECISION, MAX_PRECISION, LIMIT_PRECISION, PRECISION_HEADROOM, COUNT_BITS,
                    DENSE_LIMIT], dtype=np.int64)  # rans.py's params


@functools.cache
def kernels() -> ModuleType:
    """The compiled loops (rans.py), imported on first use (why: rans.py's docstring)."""
    return importlib.import_module("kdcache.storage.rans")


class EntropyError(StoreError):
    """A stream's bytes are not a stream this module wrote (truncated or corrupt)."""


def _planes(values: np.ndarray) -> bytes:
    """uint32 values as their four byte planes, zstd-coded."""
    v = np.ascontiguousarray(values, dtype="<u4")
    return bytes(_TABLE_CODEC.encode(np.ascontiguousarray(v.view(np.uint8).reshape(-1, 4).T)))


_STREAM = np.dtype([("n", "<u4"), ("precision", "u1"), ("nested", "u1"), ("distinct", "<u4"),
                    ("words", "<u4")])
_U32 = np.dtype("<u4")


def _u32(value: int) -> bytes:
    return np.uint32(value).astype(_U32).tobytes()


def encode_streams(buf: np.ndarray, bounds: np.ndarray, nested: bool = True) -> bytes:
    """A block of the streams buf[bounds[s]:bounds[s + 1]] (uint32), each with its own table.

    Layout (little-endian): u32 streams; per stream u32 symbols, u8 precision, u8 nested,
    u32 distinct values, u32 words; u32 bytes of the shared table frame, that frame (zstd
    over the byte planes of every small table's gaps then frequencies); each large table
    (more than NESTED_ABOVE values: `nested`) as a block of two streams of its own, prefixed
    by its u32 length; then every stream's rANS words.
    """
    try:
        fitted = kernels().fit_encode(buf, bounds, PARAMS)
    except ValueError as exc:
        raise ValueError(f"{exc} (2**{LIMIT_PRECISION} values)") from exc
    counts, gaps, rest, words = fitted
    heads = np.zeros(len(counts), dtype=_STREAM)
    shared: list[np.ndarray] = []
    inner: list[bytes] = []
    at = 0
    for i, (n, precision, distinct, used) in enumerate(counts.tolist()):
        table = slice(at, at + distinct)
        at += distinct
        big = nested and distinct > NESTED_ABOVE
        heads[i] = (n, precision, big, distinct, used)
        if big:
            block = encode_streams(np.concatenate([gaps[table], rest[table]]),
                                   np.array([0, distinct, 2 * distinct], dtype=np.int64), nested=False)
            inner.append(_u32(len(block)) + block)
        else:
            shared += [gaps[table], rest[table]]
    frame = _planes(np.concatenate(shared)) if shared else b""
    return b"".join([_u32(len(counts)), heads.tobytes(), _u32(len(frame)), frame, *inner,
                     words.astype(_U32).tobytes()])


def _errors() -> dict[int, str]:
    r = kernels()
    return {r.TRUNCATED: "block is truncated", r.NOT_TWO: "a nested table is not a block of 2 streams",
            r.TRAILING: "block has bytes after its streams",
            r.BAD_PRECISION: "a stream's table precision is out of range",
            r.BAD_TABLES: "frequency tables have the wrong size",
            r.BAD_SHAPE: "streams do not fit the chunk's shape",
            r.BAD_WORDS: "rANS words do not decode to the streams' symbols",
            r.BAD_FLAGS: "row flags do not match the coded rows"}


def check(status: int) -> None:
    """Raise the EntropyError a rans.py status stands for (none for 0)."""
    if status:
        raise EntropyError(_errors().get(status, f"unknown decoding error {status}"))


def tables(raw: np.ndarray) -> np.ndarray:
    """The zstd table frames of the block raw (uint8), decoded and concatenated: what rans.py's
    decoders take beside the block. zstd is the one step of a decode outside compiled code."""
    found = kernels().frames(raw)
    check(int(found[0, 0]) if found[0, 0] < 0 else 0)
    parts = []
    for at, size, values in found.tolist():
        if not values:
            continue
        try:
            planes = _TABLE_CODEC.decode(raw[at:at + size])
        except Exception as exc:  # zstd raises RuntimeError on damaged frames
            raise EntropyError(f"frequency tables cannot be read ({exc})") from exc
        if len(planes) != 4 * values:
            raise EntropyError("frequency tables have the wrong size")
        parts.append(np.frombuffer(planes, dtype=np.uint8))
    return np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.zeros(0, np.uint8)
