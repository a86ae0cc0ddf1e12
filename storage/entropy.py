"""A static-table rANS entropy coder for integer symbols, compiled with numba.

Top-k ids carry ~11.5 bits of information each against the 16 they are stored in, and
byte-oriented compressors (zstd, Blosc, with any shuffle or dictionary) cannot see it,
because it lies in how often each of ~8,000 distinct ids recurs. An entropy coder over
the ids' own frequencies can. This module is that coder, in kdcache's codecs (codecs.py).

A *stream* codes one array of non-negative integers with a frequency table fitted on the
stream itself (semi-static): the distinct values and their counts, quantised to sum to
2**precision, are stored with the stream, so every stream decodes on its own and a chunk
needs nothing from the rest of the store. Decoding is table-driven: one lookup per symbol
in a table of 2**precision slots, in compiled code that releases the GIL.

Why not a library coder: constriction's categorical model decodes at 24-53 ns per symbol
here (binary search over the table, GIL held), which caps a k = 64 read at ~300k tokens/s;
pcodec bins values by numeric range rather than by frequency, so it codes ids in 12.3 bits
(benchmarks/store_size.py has the numbers). rANS itself is the textbook 64-bit variant
(state in [2**31, 2**63), 32-bit renormalisation, J. Duda's asymmetric numeral systems).

Stream layout (little-endian): u32 symbols, u8 precision, u32 table bytes, u32 words,
the table (zstd over byte planes of the distinct values' gaps and of their frequencies),
then the rANS words.
The table is u32 distinct values, u32 bytes of its first part (top bit: the parts are
streams), then the gaps between the distinct values, less 1, and their frequencies, less 1,
each a stream of its own (whose tables are zstd frames over byte planes).
"""

from __future__ import annotations

import numba
import numpy as np
from numcodecs import Zstd

from kdcache.storage.errors import StoreError

_L = np.uint64(1 << 31)
MIN_PRECISION, MAX_PRECISION = 10, 18
_HEADER = np.dtype([("n", "<u4"), ("precision", "u1"), ("table", "<u4"), ("words", "<u4")])
_TABLE_CODEC = Zstd(level=9)
NESTED_ABOVE = 256  # distinct values: smaller tables cost less as zstd frames than as streams
DENSE_LIMIT = 1 << 24  # values below it are counted with bincount; above, with np.unique


class EntropyError(StoreError):
    """A stream's bytes are not a stream this module wrote (truncated or corrupt)."""


@numba.njit(cache=True, nogil=True)
def _encode(index: np.ndarray, freq: np.ndarray, start: np.ndarray, precision: int,
            out: np.ndarray) -> int:
    """rANS-code symbol indices into `out` (filled from its end) with two interleaved states
    (even and odd symbols); returns the first word used."""
    pos = out.size
    shift = np.uint64(precision)
    bound = (np.uint64(1 << 31) >> shift) << np.uint64(32)
    states = np.full(2, np.uint64(1 << 31), dtype=np.uint64)
    for i in range(index.size - 1, -1, -1):
        s = index[i]
        f = np.uint64(freq[s])
        x = states[i & 1]
        if x >= bound * f:
            pos -= 1
            out[pos] = np.uint32(x & np.uint64(0xFFFFFFFF))
            x >>= np.uint64(32)
        states[i & 1] = ((x // f) << shift) + (x % f) + np.uint64(start[s])
    for j in range(2):
        pos -= 2
        out[pos] = np.uint32(states[j] >> np.uint64(32))
        out[pos + 1] = np.uint32(states[j] & np.uint64(0xFFFFFFFF))
    return pos


@numba.njit(cache=True, nogil=True)
def _decode(words: np.ndarray, values: np.ndarray, freq: np.ndarray, start: np.ndarray,
            precision: int, lookup: np.ndarray, out: np.ndarray) -> int:
    """Decode out.size symbols (as their values) from `words`; returns the words consumed,
    or -1 when the words run out or a final state is not the encoder's initial one.
    `lookup` (2**precision slots) is scratch space for the slot -> symbol table."""
    for s in range(freq.size):
        for j in range(start[s], start[s] + freq[s]):
            lookup[j] = s
    if words.size < 4:
        return -1
    b = (np.uint64(words[0]) << np.uint64(32)) | np.uint64(words[1])
    a = (np.uint64(words[2]) << np.uint64(32)) | np.uint64(words[3])
    pos = 4
    mask = np.uint64((1 << precision) - 1)
    shift = np.uint64(precision)
    low = np.uint64(1 << 31)
    n = out.size
    for i in range(0, n - 1, 2):
        slot_a = a & mask
        slot_b = b & mask
        sa = lookup[slot_a]
        sb = lookup[slot_b]
        out[i] = values[sa]
        out[i + 1] = values[sb]
        a = np.uint64(freq[sa]) * (a >> shift) + slot_a - np.uint64(start[sa])
        b = np.uint64(freq[sb]) * (b >> shift) + slot_b - np.uint64(start[sb])
        if a < low:
            if pos >= words.size:
                return -1
            a = (a << np.uint64(32)) | np.uint64(words[pos])
            pos += 1
        if b < low:
            if pos >= words.size:
                return -1
            b = (b << np.uint64(32)) | np.uint64(words[pos])
            pos += 1
    if n % 2:
        slot_a = a & mask
        sa = lookup[slot_a]
        out[n - 1] = values[sa]
        a = np.uint64(freq[sa]) * (a >> shift) + slot_a - np.uint64(start[sa])
        if a < low:
            if pos >= words.size:
                return -1
            a = (a << np.uint64(32)) | np.uint64(words[pos])
            pos += 1
    if a != low or b != low:
        return -1
    return pos


def _counts(symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values (ascending), their counts, and each symbol's index among them."""
    top = int(symbols.max())
    if top < DENSE_LIMIT:
        counts = np.bincount(symbols, minlength=top + 1)
        values = np.flatnonzero(counts)
        where = np.zeros(top + 1, dtype=np.uint32)
        where[values] = np.arange(values.size, dtype=np.uint32)
        return values.astype(np.uint64), counts[values], where[symbols]
    values, index, counts = np.unique(symbols, return_inverse=True, return_counts=True)
    return values.astype(np.uint64), counts, index.astype(np.uint32)


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
    """uint64 values as their four low byte planes, zstd-coded (values < 2**32)."""
    v = values.astype("<u4")
    return bytes(_TABLE_CODEC.encode(np.ascontiguousarray(v.view(np.uint8).reshape(-1, 4).T)))


def _unplanes(raw: bytes, count: int) -> np.ndarray:
    planes = np.frombuffer(_TABLE_CODEC.decode(raw), dtype=np.uint8)
    if planes.size != 4 * count:
        raise EntropyError("frequency table has the wrong size")
    return np.ascontiguousarray(planes.reshape(4, count).T).view("<u4").reshape(-1).astype(np.uint64)


def encode(symbols: np.ndarray, nested: bool = True) -> bytes:
    """One stream: a 1-D array of integers in [0, 2**32) as bytes. The stream's table is
    itself two streams (`nested`, ~6% smaller than zstd over it) or zstd byte planes."""
    flat = np.ascontiguousarray(symbols).reshape(-1)
    n = flat.size
    if n == 0:
        return np.array([(0, MIN_PRECISION, 0, 0)], dtype=_HEADER).tobytes()
    values, counts, index = _counts(flat.astype(np.int64, copy=False))
    precision = int(min(MAX_PRECISION, max(MIN_PRECISION, int(np.ceil(np.log2(max(n, values.size)))))))
    if values.size > 1 << precision:
        raise ValueError(f"{values.size} distinct values exceed a {precision}-bit table")
    freq = quantise(counts, precision)
    start = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.uint32)
    words = np.empty(n + 4, dtype=np.uint32)
    used = _encode(index, freq.astype(np.uint32), start, precision, words)
    gaps = np.diff(values, prepend=np.uint64(0))
    gaps[1:] -= np.uint64(1)  # distinct ascending values: gaps of at least 1, stored less 1
    rest = freq.astype(np.uint64) - np.uint64(1)
    nested = nested and values.size > NESTED_ABOVE
    first = encode(gaps, nested=False) if nested else _planes(gaps)
    second = encode(rest, nested=False) if nested else _planes(rest)
    table = np.array([values.size, len(first) | nested << 31], dtype="<u4").tobytes() + first + second
    header = np.array([(n, precision, len(table), words.size - used)], dtype=_HEADER)
    return header.tobytes() + table + words[used:].astype("<u4").tobytes()


def decode(raw: memoryview | bytes, out: np.ndarray) -> int:
    """Decode one stream from the start of `raw` into `out` (1-D, its size the stream's
    symbol count, any integer dtype wide enough); returns the bytes the stream took."""
    raw = memoryview(raw)
    if len(raw) < _HEADER.itemsize:
        raise EntropyError("stream header is truncated")
    head = np.frombuffer(raw[:_HEADER.itemsize], dtype=_HEADER)[0]
    n, precision, table_bytes, n_words = (int(head[f]) for f in ("n", "precision", "table", "words"))
    if n != out.size or not MIN_PRECISION <= precision <= MAX_PRECISION:
        raise EntropyError(f"stream holds {n} symbols at precision {precision}, expected {out.size}")
    if n == 0:
        return _HEADER.itemsize
    at = _HEADER.itemsize
    end = at + table_bytes + 4 * n_words
    if len(raw) < end or table_bytes < 8:
        raise EntropyError("stream is truncated")
    count, gap_bytes = (int(v) for v in np.frombuffer(raw[at:at + 8], dtype="<u4"))
    nested, gap_bytes = bool(gap_bytes >> 31), gap_bytes & 0x7FFFFFFF
    if not 0 < count <= 1 << precision or 8 + gap_bytes > table_bytes:
        raise EntropyError("frequency table header is corrupt")
    try:
        first, second = raw[at + 8:at + 8 + gap_bytes], raw[at + 8 + gap_bytes:at + table_bytes]
        if nested:
            gaps, freq = np.empty(count, dtype=np.uint64), np.empty(count, dtype=np.uint64)
            if decode(first, gaps) != len(first) or decode(second, freq) != len(second):
                raise EntropyError("frequency table has bytes after its streams")
        else:
            gaps, freq = _unplanes(bytes(first), count), _unplanes(bytes(second), count)
    except EntropyError:
        raise
    except Exception as exc:  # zstd raises RuntimeError on damaged frames
        raise EntropyError(f"frequency table cannot be read ({exc})") from exc
    gaps[1:] += np.uint64(1)
    values = np.cumsum(gaps, dtype=np.uint64)
    freq += np.uint64(1)
    if int(freq.sum()) != 1 << precision:
        raise EntropyError("frequency table does not sum to its precision")
    start = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.uint32)
    words = np.frombuffer(raw[at + table_bytes:end], dtype="<u4")
    lookup = np.empty(1 << precision, dtype=np.uint16 if count <= 1 << 16 else np.uint32)
    if _decode(words, values.astype(out.dtype), freq.astype(np.uint32), start, precision, lookup,
               out) != n_words:
        raise EntropyError("rANS words do not decode to the stream's symbols")
    return end
