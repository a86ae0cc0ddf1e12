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
    if at != size or words.size < 4:
        return -1
    b = (np.uint64(words[0]) << np.uint64(32)) | np.uint64(words[1])
    a = (np.uint64(words[2]) << np.uint64(32)) | np.uint64(words[3])
    pos = 4
    mask = np.uint64(size - 1)
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
        a = freq[sa] * (a >> shift) + slot_a - start[sa]
        b = freq[sb] * (b >> shift) + slot_b - start[sb]
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
        a = freq[sa] * (a >> shift) + slot_a - start[sa]
        if a < low:
            if pos >= words.size:
                return -1
            a = (a << np.uint64(32)) | np.uint64(words[pos])
            pos += 1
    if a != low or b != low:
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
