"""The compiled loops of the rANS coder (entropy.py) and of the codecs' chunk layouts
(codecs.py): fitting tables, coding streams, and turning a chunk into its streams and back.

Each entry point does a whole chunk's work in one call that releases the GIL once. A
reader decodes a chunk's arrays on several threads, and every hand-over of the GIL between
them costs tens of microseconds here; per-stream calls (nine for k = 64 log-probs) cost
more in hand-overs than in decoding (benchmarks/store_io.py, docs/benchmarks.md).

A block's streams travel as one uint32 buffer (`buf`) and a *program*, one row per stream:
symbols, table precision, where the table sits in `buf` (its gaps, then its frequencies
less 1, `m` each), `m`, the stream's first rANS word and word count in `words`, and where
its symbols go in `buf`. A stream whose table is itself coded (entropy.NESTED_ABOVE)
decodes after the stream that writes that table.

Kept apart and imported only when a stream is first coded (`entropy.kernels`): importing
numba loads llvmlite, whose FFI wrappers break vLLM's CPU worker start-up (it scans every
loaded module's objects for Triton kernels, and llvmlite's do not answer `vars()` as
dicts), so a process that starts a vLLM teacher must not have imported it yet.
"""

from __future__ import annotations

import numba
import numpy as np

# program columns
N, PRECISION, TABLE, DISTINCT, WORD, WORDS, OUT = range(7)
# params (entropy.PARAMS): table precision bounds, headroom, count bits, dense-count limit
MIN_P, MAX_P, LIMIT_P, HEADROOM, COUNT_BITS, DENSE_LIMIT = range(6)
BAD_WORDS, BAD_FLAGS = -1, -2  # decode errors (a stream's words; a chunk's row flags)

_jit = numba.njit(cache=True, nogil=True)


# ---- fitting a stream's table -----------------------------------------------------------


@_jit
def _bits(x: int) -> int:
    """Bits of x >= 0 (x.bit_length())."""
    n = 0
    while x > 0:
        x >>= 1
        n += 1
    return n


@_jit
def precision_of(n: int, distinct: int, params: np.ndarray) -> int:
    """Slots of a stream's table as a power of 2, -1 past the limit: enough for the rarest
    values' counts to keep their share (about 2**HEADROOM slots per distinct value, at most
    one per symbol), few enough that the decoder's slot table stays in cache."""
    least = _bits(max(distinct, 1) - 1)  # ceil(log2): a slot for every distinct value
    if least > params[LIMIT_P]:
        return -1
    want = min(params[MAX_P], least + params[HEADROOM], _bits(max(n, 1) - 1))
    return max(params[MIN_P], least, want)


@_jit
def _counts(sym: np.ndarray, dense_limit: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values (ascending), their counts, and each symbol's index among them."""
    n = sym.size
    top = 0
    for v in sym:
        top = max(top, v)
    index = np.empty(n, dtype=np.uint32)
    if top < dense_limit:
        counts = np.zeros(top + 1, dtype=np.uint32)
        for v in sym:
            counts[v] += 1
        m = 0
        for c in counts:
            m += int(c > 0)
        values = np.empty(m, dtype=np.uint64)
        kept = np.empty(m, dtype=np.int64)
        where = np.empty(top + 1, dtype=np.uint32)
        j = 0
        for v in range(top + 1):
            if counts[v]:
                values[j], kept[j], where[v] = v, counts[v], j
                j += 1
        for i in range(n):
            index[i] = where[sym[i]]
        return values, kept, index
    order = np.argsort(sym)
    m = 0
    for i in range(n):
        m += i == 0 or sym[order[i]] != sym[order[i - 1]]
    values = np.empty(m, dtype=np.uint64)
    kept = np.zeros(m, dtype=np.int64)
    j = -1
    for i in range(n):
        v = sym[order[i]]
        if i == 0 or v != sym[order[i - 1]]:
            j += 1
            values[j] = v
        kept[j] += 1
        index[order[i]] = j
    return values, kept, index


@_jit
def coarse(counts: np.ndarray, bits: int) -> np.ndarray:
    """Counts rounded to `bits` significant bits (1: the nearest power of two, ties up)."""
    out = np.empty(counts.size, dtype=np.int64)
    for i in range(counts.size):
        c = max(counts[i], 1)
        shift = max(_bits(c) - bits, 0)
        half = (1 << (shift - 1)) if shift > 0 else 0
        out[i] = max(1, ((c + half) >> shift) << shift)
    return out


@_jit
def quantise(counts: np.ndarray, precision: int) -> np.ndarray:
    """Frequencies >= 1 summing to exactly 2**precision, proportional to `counts`, in
    integer arithmetic (every machine derives the same table): flooring leaves slots over
    for the most frequent value; where the floor of 1 overspends, the most frequent values
    (ties: the lowest) give slots back."""
    total = 1 << precision
    whole = counts.sum()
    freq = np.empty(counts.size, dtype=np.int64)
    for i in range(counts.size):
        freq[i] = max(1, counts[i] * total // whole)
    excess = freq.sum() - total
    order = np.argsort(-freq, kind="mergesort")
    if excess < 0:
        freq[order[0]] -= excess
    elif excess > 0:
        before = 0
        for i in order:
            room = freq[i] - 1
            freq[i] -= min(max(excess - before, 0), room)
            before += room
    return freq


# ---- coding -------------------------------------------------------------------------------


@_jit
def _encode(index: np.ndarray, freq: np.ndarray, start: np.ndarray, precision: int,
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


@_jit
def fit_encode(buf: np.ndarray, bounds: np.ndarray, params: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit and code each stream buf[bounds[s]:bounds[s + 1]]: (heads [streams, 4] of symbols,
    precision, distinct values, words; every table's gaps between distinct values less 1
    (the first: the value itself); every table's frequencies less 1; every stream's words),
    tables and words in stream order. Raises ValueError when a stream's distinct values
    exceed the largest table."""
    streams = bounds.size - 1
    heads = np.zeros((streams, 4), dtype=np.int64)
    total = bounds[-1] - bounds[0]
    gaps = np.empty(total, dtype=np.uint32)
    rest = np.empty(total, dtype=np.uint32)
    words = np.empty(total + 8 * streams, dtype=np.uint32)
    tm = 0
    tw = 0
    for s in range(streams):
        sym = buf[bounds[s]:bounds[s + 1]]
        n = sym.size
        if n == 0:
            heads[s, 1] = params[MIN_P]
            continue
        values, counts, index = _counts(sym, params[DENSE_LIMIT])
        m = values.size
        precision = precision_of(n, m, params)
        if precision < 0:
            raise ValueError("a stream has more distinct values than the coder's largest table")
        freq = quantise(coarse(counts, params[COUNT_BITS]), precision)
        start = np.empty(m, dtype=np.int64)
        at = 0
        for j in range(m):
            start[j] = at
            at += freq[j]
        pos = _encode(index, freq, start, precision, words[tw:tw + n + 8])
        used = n + 8 - pos
        for j in range(used):  # leftwards, so never over words not yet moved
            words[tw + j] = words[tw + pos + j]
        tw += used
        prev = np.uint64(0)
        for j in range(m):
            v = values[j]
            gaps[tm + j] = v if j == 0 else v - prev - np.uint64(1)
            rest[tm + j] = freq[j] - 1
            prev = v
        tm += m
        heads[s, 0], heads[s, 1], heads[s, 2], heads[s, 3] = n, precision, m, used
    return heads, gaps[:tm], rest[:tm], words[:tw]


@_jit
def _decode(words: np.ndarray, buf: np.ndarray, t0: int, m: int, precision: int,
            lookup: np.ndarray, out: np.ndarray) -> int:
    """Decode out.size symbols (as their values) into `out` from `words`, the table at
    buf[t0:t0 + 2m]. Returns the words consumed, or -1 when the table does not fill
    2**precision slots, the words run out, or a final state is not the encoder's initial
    one. `lookup` (2**precision slots) is scratch space for the slot -> symbol table.

    The general case, for tables of more than 2**16 slots (streams of more than 65,536
    distinct values, rare): one symbol at a time, every refill checked. `_decode_packed`
    is the fast path for all others."""
    values = np.empty(m, dtype=np.uint32)
    freq = np.empty(m, dtype=np.uint64)
    start = np.empty(m, dtype=np.uint64)
    size = np.int64(1) << precision
    value = np.uint64(0)
    at = np.int64(0)
    for s in range(m):
        value = value + np.uint64(buf[t0 + s]) + (np.uint64(1) if s else np.uint64(0))
        values[s] = np.uint32(value)
        f = np.int64(buf[t0 + m + s]) + 1
        if at + f > size:
            return -1
        freq[s] = f
        start[s] = at
        lookup[at:at + f] = s
        at += f
    nw = words.size
    if at != size or nw < 8:
        return -1
    xs = np.empty(4, dtype=np.uint64)
    for j in range(4):
        xs[j] = (np.uint64(words[2 * j]) << np.uint64(32)) | np.uint64(words[2 * j + 1])
    pos = 8
    mask = np.uint64(size - 1)
    shift = np.uint64(precision)
    for k in range(out.size):
        j = k & 3
        x = xs[j]
        s = lookup[x & mask]
        out[k] = values[s]
        xs[j], pos = _renormalise(freq[s] * (x >> shift) + (x & mask) - start[s], words, pos)
        if pos < 0:
            return -1
    return _ended(xs, pos)


@_jit
def _decode_packed(words: np.ndarray, buf: np.ndarray, t0: int, m: int, precision: int,
                   table: np.ndarray, out: np.ndarray) -> int:
    """`_decode` for tables of at most 2**16 slots, one load per symbol: each slot holds its
    symbol's value (bits 0-31), frequency less 1 (32-47) and offset in the symbol's slots
    (48-63), so a state moves on as freq * (x >> precision) + offset."""
    size = np.int64(1) << precision
    value = np.uint64(0)
    at = np.int64(0)
    for s in range(m):
        value = value + np.uint64(buf[t0 + s]) + (np.uint64(1) if s else np.uint64(0))
        f = np.int64(buf[t0 + m + s]) + 1
        if at + f > size:
            return -1
        entry = (value & np.uint64(0xFFFFFFFF)) | (np.uint64(f - 1) << np.uint64(32))
        for j in range(f):
            table[at + j] = entry | (np.uint64(j) << np.uint64(48))
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
    sixteen = np.uint64(0xFFFF)
    one = np.uint64(1)
    n = out.size
    whole = n - n % 4
    i = 0
    while i < whole and pos + 4 <= nw:  # room for any refills below; past it, the careful loop
        e0 = table[x0 & mask]
        e1 = table[x1 & mask]
        e2 = table[x2 & mask]
        e3 = table[x3 & mask]
        out[i] = e0 & np.uint64(0xFFFFFFFF)
        out[i + 1] = e1 & np.uint64(0xFFFFFFFF)
        out[i + 2] = e2 & np.uint64(0xFFFFFFFF)
        out[i + 3] = e3 & np.uint64(0xFFFFFFFF)
        x0 = (((e0 >> np.uint64(32)) & sixteen) + one) * (x0 >> shift) + (e0 >> np.uint64(48))
        x1 = (((e1 >> np.uint64(32)) & sixteen) + one) * (x1 >> shift) + (e1 >> np.uint64(48))
        x2 = (((e2 >> np.uint64(32)) & sixteen) + one) * (x2 >> shift) + (e2 >> np.uint64(48))
        x3 = (((e3 >> np.uint64(32)) & sixteen) + one) * (x3 >> shift) + (e3 >> np.uint64(48))
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
        i += 4
    xs = np.empty(4, dtype=np.uint64)
    xs[0], xs[1], xs[2], xs[3] = x0, x1, x2, x3
    for k in range(i, n):
        j = k & 3
        x = xs[j]
        e = table[x & mask]
        out[k] = e & np.uint64(0xFFFFFFFF)
        x = (((e >> np.uint64(32)) & sixteen) + one) * (x >> shift) + (e >> np.uint64(48))
        xs[j], pos = _renormalise(x, words, pos)
        if pos < 0:
            return -1
    return _ended(xs, pos)


@_jit
def _renormalise(x: np.uint64, words: np.ndarray, pos: int) -> tuple[np.uint64, int]:
    """A state below 2**31 takes in the next word: (state, next word), or pos -1 when the
    words have run out."""
    if x >= np.uint64(1 << 31):
        return x, pos
    if pos >= words.size:
        return x, -1
    return (x << np.uint64(32)) | np.uint64(words[pos]), pos + 1


@_jit
def _ended(xs: np.ndarray, pos: int) -> int:
    """The words consumed (`pos`) when all four states ended where the encoder began, else -1."""
    for j in range(4):
        if xs[j] != np.uint64(1 << 31):
            return -1
    return pos


@_jit
def _stream(words: np.ndarray, buf: np.ndarray, program: np.ndarray, p: int, out: np.ndarray) -> int:
    """Decode program row p's symbols into `out`; 0 or BAD_WORDS (they do not decode to
    exactly its symbols from exactly its words)."""
    n, precision, t0, m = program[p, N], program[p, PRECISION], program[p, TABLE], program[p, DISTINCT]
    w0, nw = program[p, WORD], program[p, WORDS]
    if n == 0:
        return BAD_WORDS if nw or m else 0
    if precision <= 16:
        got = _decode_packed(words[w0:w0 + nw], buf, t0, m, precision,
                             np.empty(1 << precision, dtype=np.uint64), out)
    else:
        got = _decode(words[w0:w0 + nw], buf, t0, m, precision,
                      np.empty(1 << precision, dtype=np.uint32), out)
    return 0 if got == nw else BAD_WORDS


@_jit
def run(words: np.ndarray, buf: np.ndarray, program: np.ndarray) -> int:
    """Decode every stream of `program` in order into buf; 0 or BAD_WORDS."""
    for p in range(program.shape[0]):
        o0 = program[p, OUT]
        bad = _stream(words, buf, program, p, buf[o0:o0 + program[p, N]])
        if bad:
            return bad
    return 0


# ---- reading a block (entropy.py's layout) ---------------------------------------------

HEAD = 14  # bytes of a stream's header: u32 symbols, u8 precision, u8 nested, u32 distinct, u32 words
# read errors (entropy._errors names them)
TRUNCATED, NOT_TWO, TRAILING, BAD_PRECISION, BAD_TABLES, BAD_SHAPE = -3, -4, -5, -6, -7, -8


@_jit
def _u32(raw: np.ndarray, at: int) -> int:
    return int(np.int64(raw[at]) | (np.int64(raw[at + 1]) << 8) | (np.int64(raw[at + 2]) << 16)
            | (np.int64(raw[at + 3]) << 24))


@_jit
def _header(raw: np.ndarray, at: int, end: int) -> tuple[int, int, int, int]:
    """(streams, offset of their headers, offset of the table frame, its bytes) of the block
    at raw[at:end]; streams < 0 when the header does not fit."""
    if at + 4 > end:
        return TRUNCATED, 0, 0, 0
    count = _u32(raw, at)
    heads = at + 4
    frame = heads + HEAD * count + 4
    if frame > end:
        return TRUNCATED, 0, 0, 0
    size = _u32(raw, frame - 4)
    if frame + size > end:
        return TRUNCATED, 0, 0, 0
    return count, heads, frame, size


@_jit
def _small(raw: np.ndarray, heads: int, count: int) -> int:
    """Values in the shared table frame of a block: its small tables' gaps and frequencies."""
    total = 0
    for i in range(count):
        h = heads + HEAD * i
        if not raw[h + 5]:
            total += 2 * _u32(raw, h + 6)
    return total


@_jit
def frames(raw: np.ndarray) -> np.ndarray:
    """[frames, 3] (offset, bytes, values) of a block's zstd table frames: its own, then each
    nested table's; a single row (error, 0, 0) when the block's headers do not fit."""
    count, heads, frame, size = _header(raw, 0, raw.size)
    if count < 0:
        return np.array([[count, 0, 0]], dtype=np.int64)
    nested = 0
    for i in range(count):
        nested += raw[heads + HEAD * i + 5] != 0
    out = np.empty((1 + nested, 3), dtype=np.int64)
    out[0, 0], out[0, 1], out[0, 2] = frame, size, _small(raw, heads, count)
    at = frame + size
    j = 1
    for i in range(count):
        if raw[heads + HEAD * i + 5]:
            if at + 4 > raw.size:
                return np.array([[TRUNCATED, 0, 0]], dtype=np.int64)
            inner = _u32(raw, at)
            c2, h2, f2, s2 = _header(raw, at + 4, min(raw.size, at + 4 + inner))
            if c2 < 0:
                return np.array([[c2, 0, 0]], dtype=np.int64)
            if c2 != 2:
                return np.array([[NOT_TWO, 0, 0]], dtype=np.int64)
            out[j, 0], out[j, 1], out[j, 2] = f2, s2, _small(raw, h2, c2)
            j += 1
            at += 4 + inner
    return out


@_jit
def _copy_words(raw: np.ndarray, at: int, words: np.ndarray, word: int, count: int) -> None:
    """words[word:word + count] = the little-endian uint32s at raw[at:] (a byte copy: the
    machines numba targets here are little-endian)."""
    words.view(np.uint8)[4 * word:4 * (word + count)] = raw[at:at + 4 * count]


@_jit
def _unplane(planes: np.ndarray, at: int, count: int, buf: np.ndarray, dst: int) -> None:
    """`count` uint32 values from their four byte planes at planes[at:], into buf[dst:]."""
    for j in range(count):
        buf[dst + j] = (np.uint32(planes[at + j]) | (np.uint32(planes[at + count + j]) << 8)
                        | (np.uint32(planes[at + 2 * count + j]) << 16)
                        | (np.uint32(planes[at + 3 * count + j]) << 24))


@_jit
def _stream_rows(raw: np.ndarray, heads: int, count: int, table: int, tables: np.ndarray,
                 outs: np.ndarray, word: int, program: np.ndarray, row: int, params: np.ndarray) -> int:
    """Program rows `row`.. for a block's `count` streams (headers at raw[heads:], words from
    `word` on): small tables laid out from buf[table] on, nested ones at `tables`, symbols to
    `outs`; returns 0 or BAD_PRECISION."""
    for i in range(count):
        h = heads + HEAD * i
        precision = np.int64(raw[h + 4])
        if precision < params[MIN_P] or precision > params[LIMIT_P]:
            return BAD_PRECISION
        m = _u32(raw, h + 6)
        r = row + i
        program[r, N], program[r, PRECISION], program[r, DISTINCT] = _u32(raw, h), precision, m
        program[r, WORD], program[r, WORDS], program[r, OUT] = word, _u32(raw, h + 10), outs[i]
        word += program[r, WORDS]
        if raw[h + 5]:
            program[r, TABLE] = tables[i]
        else:
            program[r, TABLE] = table
            table += 2 * m
    return 0


@_jit
def layout(raw: np.ndarray, planes: np.ndarray, params: np.ndarray
           ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """A block laid out for `run`: (status: 0 or an error, words, buf, program, the program
    row of the block's first own stream, bytes used).
    `planes`: its table frames (`frames`) decoded and concatenated. Each nested table's two
    streams come first in the program, the block's own streams last; buf holds the block's
    small tables, then per nested table its 2m values and its own small tables, then the
    block's symbols in stream order."""
    empty = np.zeros((0, 7), dtype=np.int64)
    none = np.zeros(0, dtype=np.uint32)
    count, heads, frame, size = _header(raw, 0, raw.size)
    if count < 0:
        return count, none, none, empty, 0, 0
    small = _small(raw, heads, count)
    nested = 0
    symbols = 0
    own_words = 0
    for i in range(count):
        h = heads + HEAD * i
        symbols += _u32(raw, h)
        own_words += _u32(raw, h + 10)
        nested += raw[h + 5] != 0
    program = np.zeros((count + 2 * nested, 7), dtype=np.int64)
    # per nested table: its block's end, its place in buf, m, its stream headers, its words
    spans = np.zeros((nested, 5), dtype=np.int64)
    tables = np.zeros(count, dtype=np.int64)
    room = small  # buf values before the symbols
    valued = small  # table values in the frames
    word_count = own_words
    at = frame + size
    j = 0
    for i in range(count):
        h = heads + HEAD * i
        if not raw[h + 5]:
            continue
        if at + 4 > raw.size or at + 4 + _u32(raw, at) > raw.size:
            return TRUNCATED, none, none, empty, 0, 0
        end = at + 4 + _u32(raw, at)
        c2, h2, f2, s2 = _header(raw, at + 4, end)
        if c2 < 0:
            return c2, none, none, empty, 0, 0
        if c2 != 2 or raw[h2 + 5] or raw[h2 + HEAD + 5]:
            return NOT_TWO, none, none, empty, 0, 0
        m = _u32(raw, h + 6)
        if _u32(raw, h2) != m or _u32(raw, h2 + HEAD) != m:  # the table's m gaps, m frequencies
            return BAD_SHAPE, none, none, empty, 0, 0
        spans[j, 0], spans[j, 1], spans[j, 2], spans[j, 3], spans[j, 4] = end, room, m, h2, f2 + s2
        tables[i] = room
        inner = _small(raw, h2, 2)
        room += 2 * m + inner
        valued += inner
        word_count += _u32(raw, h2 + 10) + _u32(raw, h2 + HEAD + 10)
        j += 1
        at = end
    if planes.size != 4 * valued:
        return BAD_TABLES, none, none, empty, 0, 0
    if at + 4 * own_words > raw.size:
        return TRUNCATED, none, none, empty, 0, 0
    buf = np.empty(room + symbols, dtype=np.uint32)
    words = np.empty(word_count, dtype=np.uint32)
    _unplane(planes, 0, small, buf, 0)
    plane = 4 * small
    word = 0
    outs = np.zeros(2, dtype=np.int64)
    for j in range(nested):
        end, table, m, h2, w0 = spans[j, 0], spans[j, 1], spans[j, 2], spans[j, 3], spans[j, 4]
        inner = _small(raw, h2, 2)
        _unplane(planes, plane, inner, buf, table + 2 * m)
        plane += 4 * inner
        outs[0], outs[1] = table, table + m
        bad = _stream_rows(raw, h2, 2, table + 2 * m, tables, outs, word, program, 2 * j, params)
        if bad:
            return bad, none, none, empty, 0, 0
        nw = program[2 * j, WORDS] + program[2 * j + 1, WORDS]
        if w0 + 4 * nw != end:
            return TRAILING if w0 + 4 * nw < end else TRUNCATED, none, none, empty, 0, 0
        _copy_words(raw, w0, words, word, nw)
        word += nw
    own_outs = np.empty(count, dtype=np.int64)
    out = room
    for i in range(count):
        own_outs[i] = out
        out += _u32(raw, heads + HEAD * i)
    bad = _stream_rows(raw, heads, count, 0, tables, own_outs, word, program, 2 * nested, params)
    if bad:
        return bad, none, none, empty, 0, 0
    _copy_words(raw, at, words, word, own_words)
    return 0, words, buf, program, 2 * nested, at + 4 * own_words


# ---- chunk layouts (codecs.py) ----------------------------------------------------------


@_jit
def _flags(rows: np.ndarray) -> np.ndarray:
    """1 for each row holding anything but zeros, else 0."""
    flags = np.zeros(rows.shape[0], dtype=np.uint32)
    for r in range(rows.shape[0]):
        for c in range(rows.shape[1]):
            if rows[r, c]:
                flags[r] = 1
                break
    return flags


@_jit
def id_streams(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(buf, bounds) of an ids chunk [positions, k]: each position's flag, then the rows flagged."""
    positions, k = rows.shape
    flags = _flags(rows)
    held = flags.sum()
    buf = np.empty(positions + held * k, dtype=np.uint32)
    buf[:positions] = flags
    at = positions
    for r in range(positions):
        if flags[r]:
            buf[at:at + k] = rows[r]
            at += k
    return buf, np.array([0, positions, at], dtype=np.int64)


@_jit
def logprob_streams(codes: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(buf, bounds) of a log-prob chunk's uint16 codes [positions, k]: each position's flag;
    the flagged rows' first codes; then, per rank group edges[g]..edges[g + 1] - 1, the
    flagged rows' differences from their left neighbours (modulo 2**16), row by row."""
    positions = codes.shape[0]
    flags = _flags(codes)
    held = flags.sum()
    bounds = np.empty(edges.size + 2, dtype=np.int64)
    bounds[0], bounds[1], bounds[2] = 0, positions, positions + held
    for g in range(edges.size - 1):
        bounds[3 + g] = bounds[2 + g] + held * (edges[g + 1] - edges[g])
    buf = np.empty(bounds[-1], dtype=np.uint32)
    buf[:positions] = flags
    j = 0
    for r in range(positions):
        if not flags[r]:
            continue
        buf[positions + j] = codes[r, 0]
        for g in range(edges.size - 1):
            a, b = edges[g], edges[g + 1]
            at = bounds[2 + g] + j * (b - a)
            for c in range(a, b):
                buf[at + c - a] = np.uint16(codes[r, c] - codes[r, c - 1])
        j += 1
    return buf, bounds


@_jit
def _held(buf: np.ndarray, f0: int, positions: int, rows: int) -> bool:
    """Whether the flags at buf[f0:f0 + positions] are 0 or 1 and flag `rows` rows."""
    held = 0
    for p in range(positions):
        if buf[f0 + p] > 1:
            return False
        held += buf[f0 + p]
    return held == rows


@_jit
def _chunk(raw: np.ndarray, planes: np.ndarray, params: np.ndarray, sizes: np.ndarray, per_row: int,
           direct: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """A chunk's block laid out and decoded: (status, buf, its own streams' program rows). Its
    streams must be `sizes.size`: the first flags each of sizes[0] positions, the second holds
    per_row symbols for each of some rows, and stream i > 1 holds sizes[i] symbols per row.
    The last stream decodes into `direct` instead of buf when it is that stream's size."""
    bad, words, buf, program, first, used = layout(raw, planes, params)
    empty = np.zeros((0, 7), dtype=np.int64)
    if bad:
        return bad, buf, empty
    if used != raw.size:
        return TRAILING, buf, empty
    own = program[first:]
    if own.shape[0] != sizes.size:
        return BAD_SHAPE, buf, empty
    rows = own[1, N] // per_row
    if own[0, N] != sizes[0] or own[1, N] % per_row or rows > sizes[0]:
        return BAD_SHAPE, buf, empty
    for i in range(2, sizes.size):
        if own[i, N] != rows * sizes[i]:
            return BAD_SHAPE, buf, empty
    last = program.shape[0] - 1
    bad = run(words, buf, program[:last])
    if not bad:
        o0 = program[last, OUT]
        if direct.size == program[last, N]:
            bad = _stream(words, buf, program, last, direct)
        else:
            bad = _stream(words, buf, program, last, buf[o0:o0 + program[last, N]])
    if bad:
        return bad, buf, empty
    if not _held(buf, own[0, OUT], sizes[0], rows):
        return BAD_FLAGS, buf, empty
    return 0, buf, own


@_jit
def ids_chunk(raw: np.ndarray, planes: np.ndarray, params: np.ndarray, out: np.ndarray) -> int:
    """Decode an ids chunk's block (`raw`, its table frames decoded as `planes`) into `out`
    [positions, k], zero rows where its flags say; 0 or an error."""
    positions, k = out.shape
    flat = out.reshape(-1)
    bad, buf, own = _chunk(raw, planes, params, np.array([positions, k]), k, flat)
    if bad or own[1, N] == flat.size:  # every row coded: decoded in place
        return bad
    f0, v0 = own[0, OUT], own[1, OUT]
    for p in range(positions):
        if buf[f0 + p]:
            for c in range(k):
                out[p, c] = buf[v0 + c]
            v0 += k
        else:
            out[p] = 0
    return 0


@_jit
def logprobs_chunk(raw: np.ndarray, planes: np.ndarray, params: np.ndarray, edges: np.ndarray,
                   values: np.ndarray, out: np.ndarray) -> int:
    """Decode a log-prob chunk's block (logprob_streams' streams) into `out` [positions, k]
    (uint16): each row's codes, its differences summed back modulo 2**16, or where `values`
    is not empty the float16 bit patterns values[code] of a lossy mode; 0 or an error."""
    positions = out.shape[0]
    groups = edges.size - 1
    sizes = np.empty(2 + groups, dtype=np.int64)
    sizes[0], sizes[1] = positions, 1
    for g in range(groups):
        sizes[2 + g] = edges[g + 1] - edges[g]
    bad, buf, own = _chunk(raw, planes, params, sizes, 1, np.zeros(0, dtype=out.dtype))
    if bad:
        return bad
    f0, c0 = own[0, OUT], own[1, OUT]
    j = 0
    for p in range(positions):
        if not buf[f0 + p]:
            out[p] = _value(np.uint16(0), values)
            continue
        acc = np.uint16(buf[c0 + j])
        out[p, 0] = _value(acc, values)
        for g in range(groups):
            a, b = edges[g], edges[g + 1]
            at = own[2 + g, OUT] + j * (b - a) - a
            for c in range(a, b):
                acc = np.uint16(acc + np.uint16(buf[at + c]))
                out[p, c] = _value(acc, values)
        j += 1
    return 0


@_jit
def _value(code: np.uint16, values: np.ndarray) -> np.uint16:
    return values[code] if values.size else code
