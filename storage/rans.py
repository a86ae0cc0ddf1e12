"""The compiled loops of the rANS coder (entropy.py): encode, decode, count.

Kept apart and imported only when a stream is first coded (`entropy._kernels`): importing
numba loads llvmlite, whose FFI wrappers break vLLM's CPU worker start-up (it scans every
loaded module's objects for Triton kernels, and llvmlite's do not answer `vars()` as
dicts), so a process that starts a vLLM teacher must not have imported it yet.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def encode(index: np.ndarray, freq: np.ndarray, start: np.ndarray, precision: int,
           out: np.ndarray) -> int:
    """rANS-code symbol indices into `out` (filled from its end, which needs n + 8 words) with
    four interleaved states; returns the first word used. The four final states come first
    (state 0 first, high word first), then the renormalisation words in decoding order."""
    pos = out.size
    shift = np.uint64(precision)
    bound = (np.uint64(1 << 31) >> shift) << np.uint64(32)
    states = np.full(4, np.uint64(1 << 31), dtype=np.uint64)
    for i in range(index.size - 1, -1, -1):
        s = index[i]
        f = np.uint64(freq[s])
        x = states[i & 3]
        if x >= bound * f:
            pos -= 1
            out[pos] = np.uint32(x & np.uint64(0xFFFFFFFF))
            x >>= np.uint64(32)
        states[i & 3] = ((x // f) << shift) + (x % f) + np.uint64(start[s])
    for j in range(3, -1, -1):
        pos -= 2
        out[pos] = np.uint32(states[j] >> np.uint64(32))
        out[pos + 1] = np.uint32(states[j] & np.uint64(0xFFFFFFFF))
    return pos


@numba.njit(cache=True, nogil=True)
def decode(words: np.ndarray, gaps: np.ndarray, rest: np.ndarray, precision: int,
           lookup: np.ndarray, out: np.ndarray) -> int:
    """Decode out.size symbols (as their values) from `words`, the table given as the gaps
    between distinct values less 1 (the first: the value itself) and frequencies less 1.
    Returns the words consumed, or -1 when the table does not fill 2**precision slots, the
    words run out, or a final state is not the encoder's initial one. `lookup` (2**precision
    slots) is scratch space for the slot -> symbol table."""
    m = gaps.size
    values = np.empty(m, dtype=out.dtype)
    freq = np.empty(m, dtype=np.uint64)
    start = np.empty(m, dtype=np.uint64)
    size = np.int64(1) << precision
    value = np.uint64(0)
    at = np.int64(0)
    for s in range(m):
        value = value + np.uint64(gaps[s]) + (np.uint64(1) if s else np.uint64(0))
        values[s] = value
        f = np.int64(rest[s]) + 1
        if at + f > size:
            return -1
        freq[s] = f
        start[s] = at
        for j in range(at, at + f):
            lookup[j] = s
        at += f
    nw = words.size
    if at != size or nw < 8:
        return -1
    x0 = (np.uint64(words[0]) << np.uint64(32)) | np.uint64(words[1])
    x1 = (np.uint64(words[2]) << np.uint64(32)) | np.uint64(words[3])
    x2 = (np.uint64(words[4]) << np.uint64(32)) | np.uint64(words[5])
    x3 = (np.uint64(words[6]) << np.uint64(32)) | np.uint64(words[7])
    pos = 8
    mask = np.uint64(size - 1)
    shift = np.uint64(precision)
    low = np.uint64(1 << 31)
    n = out.size
    whole = n - n % 4
    for i in range(0, whole, 4):
        s0 = lookup[x0 & mask]
        s1 = lookup[x1 & mask]
        s2 = lookup[x2 & mask]
        s3 = lookup[x3 & mask]
        out[i] = values[s0]
        out[i + 1] = values[s1]
        out[i + 2] = values[s2]
        out[i + 3] = values[s3]
        x0 = freq[s0] * (x0 >> shift) + (x0 & mask) - start[s0]
        x1 = freq[s1] * (x1 >> shift) + (x1 & mask) - start[s1]
        x2 = freq[s2] * (x2 >> shift) + (x2 & mask) - start[s2]
        x3 = freq[s3] * (x3 >> shift) + (x3 & mask) - start[s3]
        if pos + 4 > nw:  # room for any refills below; past it, the careful loop
            return _decode_tail(words, pos, x0, x1, x2, x3, values, freq, start, lookup, mask, shift,
                                out, i + 4, True)
        # Unrolled, as the four updates above: each state is its own dependency chain.
        if x0 < low:
            x0 = (x0 << np.uint64(32)) | np.uint64(words[pos])
            pos += 1
        if x1 < low:
            x1 = (x1 << np.uint64(32)) | np.uint64(words[pos])
            pos += 1
        if x2 < low:
            x2 = (x2 << np.uint64(32)) | np.uint64(words[pos])
            pos += 1
        if x3 < low:
            x3 = (x3 << np.uint64(32)) | np.uint64(words[pos])
            pos += 1
    return _decode_tail(words, pos, x0, x1, x2, x3, values, freq, start, lookup, mask, shift, out,
                        whole, False)


@numba.njit(cache=True, nogil=True)
def _decode_tail(words: np.ndarray, pos: int, x0: np.uint64, x1: np.uint64, x2: np.uint64,
                 x3: np.uint64, values: np.ndarray, freq: np.ndarray, start: np.ndarray,
                 lookup: np.ndarray, mask: np.uint64, shift: np.uint64, out: np.ndarray, i: int,
                 refill: bool) -> int:
    """The rest of a decode, one symbol at a time with bounds checks: from symbol `i`, after
    (when `refill`) the renormalisation of the four states that just decoded symbols i-4..i-1."""
    low = np.uint64(1 << 31)
    xs = np.empty(4, dtype=np.uint64)
    xs[0], xs[1], xs[2], xs[3] = x0, x1, x2, x3
    if refill:
        for j in range(4):
            if xs[j] < low:
                if pos >= words.size:
                    return -1
                xs[j] = (xs[j] << np.uint64(32)) | np.uint64(words[pos])
                pos += 1
    for k in range(i, out.size):
        j = k & 3
        x = xs[j]
        s = lookup[x & mask]
        out[k] = values[s]
        x = freq[s] * (x >> shift) + (x & mask) - start[s]
        if x < low:
            if pos >= words.size:
                return -1
            x = (x << np.uint64(32)) | np.uint64(words[pos])
            pos += 1
        xs[j] = x
    for j in range(4):
        if xs[j] != low:
            return -1
    return pos


@numba.njit(cache=True, nogil=True)
def dense_counts(symbols: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = np.zeros(top + 1, dtype=np.int64)
    for v in symbols:
        counts[v] += 1
    m = 0
    for v in range(top + 1):
        m += counts[v] > 0
    values = np.empty(m, dtype=np.uint64)
    kept = np.empty(m, dtype=np.int64)
    where = np.empty(top + 1, dtype=np.uint32)
    j = 0
    for v in range(top + 1):
        if counts[v]:
            values[j] = v
            kept[j] = counts[v]
            where[v] = j
            j += 1
    index = np.empty(symbols.size, dtype=np.uint32)
    for i in range(symbols.size):
        index[i] = where[symbols[i]]
    return values, kept, index


@numba.njit(cache=True, nogil=True)
def prefix_rows(codes: np.ndarray) -> None:
    """In place, each row's running sum, wrapping modulo 2**16 (uint16 codes): undoes the
    differences `codecs.encode_logprobs` took (numpy's cumsum along short rows is ~10x slower)."""
    for r in range(codes.shape[0]):
        acc = np.uint16(0)
        for c in range(codes.shape[1]):
            acc = np.uint16(acc + codes[r, c])
            codes[r, c] = acc
