"""A static-table rANS entropy coder for integer symbols, compiled with numba.

Top-k ids carry ~11.5 bits of information each against the 16 they are stored in, and
byte-oriented compressors (zstd, Blosc, with any shuffle or dictionary) cannot see it,
because it lies in how often each of ~8,000 distinct ids recurs. An entropy coder over
the ids' own frequencies can. This module is that coder, in kdcache's codecs (codecs.py).

A *stream* codes one array of non-negative integers with a frequency table fitted on the
stream itself (semi-static): the distinct values and their counts (rounded to powers of
two, `coarse`, then scaled to sum to 2**precision, `quantise`) are stored with the
stream, so every stream decodes on its own and a chunk needs nothing from the rest of the
store. Decoding is table-driven: one lookup per symbol in a table of 2**precision slots,
in compiled code that releases the GIL.

Why not a library coder: constriction's categorical model decodes at 24-53 ns per symbol
here (binary search over the table, GIL held), which caps a k = 64 read at ~300k tokens/s;
pcodec bins values by numeric range rather than by frequency, so it codes ids in 12.3 bits
(benchmarks/store_size.py has the numbers). rANS itself is the textbook 64-bit variant
(state in [2**31, 2**63), 32-bit renormalisation, J. Duda's asymmetric numeral systems),
with four interleaved states so that four independent chains decode at once (~1.5x).

A chunk codes its streams as one *block* (`encode`): the small tables of all its streams
share one zstd frame, and a large table (ids: ~8,000 distinct values) is itself coded as a
block of two streams, ~6% smaller than zstd over it (tables of fewer than 4,096 values are
smaller, and decode faster, in the shared frame). Decoding a stream is one compiled call
that rebuilds its table and decodes it.
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
DENSE_LIMIT = 1 << 24  # values below it are counted in one compiled pass; above, with np.unique


@functools.cache
def _kernels() -> ModuleType:
    """The compiled loops (rans.py), imported on first use (why: rans.py's docstring)."""
    return importlib.import_module("kdcache.storage.rans")


class EntropyError(StoreError):
    """A stream's bytes are not a stream this module wrote (truncated or corrupt)."""


def _counts(symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values (ascending), their counts, and each symbol's index among them."""
    top = int(symbols.max())
    if top < DENSE_LIMIT:
        return _kernels().dense_counts(symbols, top)
    values, index, counts = np.unique(symbols, return_inverse=True, return_counts=True)
    return values.astype(np.uint64), counts, index.astype(np.uint32)


def table_precision(n: int, distinct: int) -> int:
    """Slots of a stream's table, as a power of 2: enough for the rarest values' counts to
    keep their share (about 2**PRECISION_HEADROOM slots per distinct value, at most one per
    symbol), few enough that the decoder's slot table stays in cache."""
    least = int(np.ceil(np.log2(max(distinct, 1))))  # a slot for every distinct value
    if least > LIMIT_PRECISION:
        raise ValueError(f"{distinct} distinct values in one stream exceed the coder's table")
    want = min(MAX_PRECISION, least + PRECISION_HEADROOM, int(np.ceil(np.log2(max(n, 1)))))
    return max(MIN_PRECISION, least, want)


def coarse(counts: np.ndarray) -> np.ndarray:
    """Counts rounded to COUNT_BITS significant bits (1: the nearest power of two, ties up).
    A value's coded length moves by under half a bit, and its table, whose frequencies then
    take a handful of distinct values, costs less than that: 0.2 B/token less at k = 64."""
    counts = counts.astype(np.int64)
    lengths = np.floor(np.log2(np.maximum(counts, 1))).astype(np.int64) + 1
    shift = np.maximum(lengths - COUNT_BITS, 0)
    half = np.where(shift > 0, np.left_shift(1, np.maximum(shift - 1, 0)), 0)
    return np.maximum(1, ((counts + half) >> shift) << shift)


def quantise(counts: np.ndarray, precision: int) -> np.ndarray:
    """Frequencies >= 1 summing to exactly 2**precision, proportional to `counts`
    (integer arithmetic only, so every machine derives the same table)."""
    total = 1 << precision
    freq = np.maximum(1, (counts.astype(np.int64) * total) // int(counts.sum()))
    excess = int(freq.sum()) - total
    order = np.argsort(-freq, kind="stable")
    if excess < 0:  # flooring left slots over: the most frequent value takes them
        freq[order[0]] -= excess
    elif excess > 0:  # the floor of 1 overspent: the most frequent values give slots back
        room = freq[order] - 1
        before = np.cumsum(room) - room
        freq[order] -= np.clip(excess - before, 0, room)
    return freq


def _planes(values: np.ndarray) -> bytes:
    """uint32 values as their four byte planes, zstd-coded."""
    v = np.ascontiguousarray(values, dtype="<u4")
    return bytes(_TABLE_CODEC.encode(np.ascontiguousarray(v.view(np.uint8).reshape(-1, 4).T)))


def _unplanes(raw: memoryview, count: int) -> np.ndarray:
    try:
        planes = np.frombuffer(_TABLE_CODEC.decode(raw), dtype=np.uint8)
    except Exception as exc:  # zstd raises RuntimeError on damaged frames
        raise EntropyError(f"frequency tables cannot be read ({exc})") from exc
    if planes.size != 4 * count:
        raise EntropyError("frequency tables have the wrong size")
    return np.ascontiguousarray(planes.reshape(4, count).T).view("<u4").reshape(-1)


_STREAM = np.dtype([("n", "<u4"), ("precision", "u1"), ("nested", "u1"), ("distinct", "<u4"),
                    ("words", "<u4")])


def _fit(flat: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray, np.ndarray]:
    """A stream's (n, precision, distinct), its table (gaps less 1, frequencies less 1) and words."""
    n = flat.size
    if n == 0:
        return (0, MIN_PRECISION, 0), np.zeros(0, np.uint32), np.zeros(0, np.uint32), np.zeros(0, np.uint32)
    values, counts, index = _counts(flat)
    precision = table_precision(n, values.size)
    freq = quantise(coarse(counts), precision)
    start = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.uint32)
    words = np.empty(n + 8, dtype=np.uint32)
    used = _kernels().encode(index, freq.astype(np.uint32), start, precision, words)
    gaps = np.diff(values, prepend=np.uint64(0))
    gaps[1:] -= np.uint64(1)  # distinct ascending values: gaps of at least 1, stored less 1
    return (n, precision, values.size), gaps.astype(np.uint32), (freq - 1).astype(np.uint32), words[used:]


def encode(arrays: list[np.ndarray], nested: bool = True) -> bytes:
    """A block of streams, one per array of integers in [0, 2**32), each with its own table.

    Layout (little-endian): u32 streams; per stream u32 symbols, u8 precision, u8 nested,
    u32 distinct values, u32 words; u32 bytes of the shared table frame, that frame (zstd
    over the byte planes of every small table's gaps then frequencies); each large table
    (more than NESTED_ABOVE values: `nested`) as a block of two streams of its own, prefixed
    by its u32 length; then every stream's rANS words.
    """
    fitted = [_fit(np.ascontiguousarray(a).reshape(-1)) for a in arrays]
    heads = np.zeros(len(fitted), dtype=_STREAM)
    shared: list[np.ndarray] = []
    inner: list[bytes] = []
    for i, ((n, precision, distinct), gaps, rest, words) in enumerate(fitted):
        big = nested and distinct > NESTED_ABOVE
        heads[i] = (n, precision, big, distinct, words.size)
        if big:
            block = encode([gaps, rest], nested=False)
            inner.append(np.uint32(len(block)).astype("<u4").tobytes() + block)
        else:
            shared += [gaps, rest]
    frame = _planes(np.concatenate(shared)) if shared else b""
    return b"".join([np.uint32(len(fitted)).astype("<u4").tobytes(), heads.tobytes(),
                     np.uint32(len(frame)).astype("<u4").tobytes(), frame, *inner,
                     *(w.astype("<u4").tobytes() for *_, w in fitted)])


def prefix_rows(codes: np.ndarray) -> None:
    """Each row of a uint16 array replaced by its running sum, modulo 2**16, in place."""
    _kernels().prefix_rows(codes)


def stream_sizes(raw: memoryview | bytes) -> list[int]:
    """The symbol count of each stream of the block at the start of `raw` (its header only)."""
    raw = memoryview(raw)
    if len(raw) < 4:
        raise EntropyError("block header is truncated")
    count = int(np.frombuffer(raw[:4], "<u4")[0])
    if len(raw) < 4 + count * _STREAM.itemsize:
        raise EntropyError("block header is truncated")
    return [int(n) for n in np.frombuffer(raw[4:4 + count * _STREAM.itemsize], dtype=_STREAM)["n"]]


def decode(raw: memoryview | bytes, outs: list[np.ndarray]) -> int:
    """Decode a block of streams from the start of `raw` into `outs` (1-D, contiguous, each
    the size of its stream, of any integer dtype wide enough); returns the bytes it took."""
    raw = memoryview(raw)
    at = 4 + len(outs) * _STREAM.itemsize + 4
    if len(raw) < at or int(np.frombuffer(raw[:4], "<u4")[0]) != len(outs):
        raise EntropyError(f"block does not hold {len(outs)} streams")
    heads = np.frombuffer(raw[4:at - 4], dtype=_STREAM)
    frame = int(np.frombuffer(raw[at - 4:at], "<u4")[0])
    small = int(sum(2 * int(h["distinct"]) for h in heads if not h["nested"]))
    if at + frame > len(raw):
        raise EntropyError("block is truncated")
    shared = _unplanes(raw[at:at + frame], small) if small else np.zeros(0, np.uint32)
    at += frame
    tables, used = [], 0
    for h in heads:
        m = int(h["distinct"])
        if h["nested"]:
            if at + 4 > len(raw):
                raise EntropyError("block is truncated")
            size = int(np.frombuffer(raw[at:at + 4], "<u4")[0])
            gaps, rest = np.empty(m, np.uint32), np.empty(m, np.uint32)
            if decode(raw[at + 4:at + 4 + size], [gaps, rest]) != size:
                raise EntropyError("a nested table has bytes after its streams")
            at += 4 + size
        else:
            gaps, rest = shared[used:used + m], shared[used + m:used + 2 * m]
            used += 2 * m
        tables.append((gaps, rest))
    for h, (gaps, rest), out in zip(heads, tables, outs, strict=True):
        n, precision, words = int(h["n"]), int(h["precision"]), int(h["words"])
        if n != out.size or not MIN_PRECISION <= precision <= LIMIT_PRECISION:
            raise EntropyError(f"stream holds {n} symbols at precision {precision}, expected {out.size}")
        if at + 4 * words > len(raw):
            raise EntropyError("block is truncated")
        if n:
            lookup = np.empty(1 << precision, dtype=np.uint16 if gaps.size <= 1 << 16 else np.uint32)
            if _kernels().decode(np.frombuffer(raw[at:at + 4 * words], "<u4"), gaps, rest, precision, lookup,
                       out) != words:
                raise EntropyError("rANS words do not decode to the stream's symbols")
        at += 4 * words
    return at
