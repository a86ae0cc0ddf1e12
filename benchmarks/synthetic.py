"""Realistic synthetic teacher outputs for store benchmarks.

Real next-token distributions are heavy-tailed: a Zipf-like unigram prior (low BPE ids
are frequent tokens) plus a context term that lifts a few candidates. The parameters
below give a mean entropy of ~2.2 nats, a mean top-1 probability of ~0.6 and ~0.9 of the
mass in the top 64 at vocab 32768, close to a small LM on code. Uniform noise would
flatter no codec and would make ids incompressible, which real ids are not.
"""

from __future__ import annotations

import numpy as np

NOISE, SLOPE, SPIKES, BOOST = 2.2, 1.2, 4, 1.0


def teacher_logprobs(rng: np.random.Generator, positions: int, vocab: int) -> np.ndarray:
    """[positions, vocab] float64 log-probabilities."""
    logits = -SLOPE * np.log1p(np.arange(vocab, dtype=np.float64))[None, :]
    logits = logits + rng.normal(size=(positions, vocab)) * NOISE
    cand = rng.zipf(1.3, size=(positions, SPIKES)).clip(1, vocab) - 1
    boost = BOOST + rng.exponential(2.0, size=(positions, SPIKES))
    np.add.at(logits, (np.repeat(np.arange(positions), SPIKES), cand.ravel()), boost.ravel())
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def _topk_block(rng: np.random.Generator, positions: int, vocab: int, k: int) -> tuple:
    logp = teacher_logprobs(rng, positions, vocab)
    ids = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    part = np.take_along_axis(logp, ids, axis=-1)
    order = np.argsort(-part, axis=-1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=-1)
    top = np.take_along_axis(part, order, axis=-1)
    with np.errstate(divide="ignore"):
        tail = np.log1p(-np.minimum(np.exp(top).sum(-1), 1.0))
    # The true next token is drawn from the teacher, so target log-probs look real.
    cdf = np.cumsum(np.exp(logp), axis=-1)
    nxt = (cdf < rng.random((positions, 1)) * cdf[:, -1:]).sum(-1).clip(0, vocab - 1)
    return ids, top, tail, nxt, logp[np.arange(positions), nxt]


def topk_targets(
    rng: np.random.Generator, rows: int, seq_len: int, vocab: int, k: int
) -> dict[str, np.ndarray]:
    """Top-k arrays in the store's layout for `rows` rows of `seq_len` positions."""
    return topk_family(rng, rows, seq_len, vocab, [k])[k]


def topk_family(
    rng: np.random.Generator, rows: int, seq_len: int, vocab: int, ks: list[int]
) -> dict[int, dict[str, np.ndarray]]:
    """Top-k arrays for several k from one set of distributions (smaller k are prefixes)."""
    kmax = max(ks)
    block = max(1, (1 << 24) // vocab)  # positions per block: ~128 MB of float64
    parts = [_topk_block(rng, min(block, rows * seq_len - s), vocab, kmax)
             for s in range(0, rows * seq_len, block)]
    ids, top, _, nxt, target = (np.concatenate(p) for p in zip(*parts, strict=True))
    nxt = nxt.reshape(rows, seq_len)
    id_dtype = np.uint16 if vocab <= 65536 else np.uint32
    out = {}
    for k in ks:
        with np.errstate(divide="ignore"):
            tail = np.log1p(-np.minimum(np.exp(top[:, :k]).sum(-1), 1.0))
        out[k] = {
            "tokens": np.concatenate([nxt[:, :1], nxt], axis=1).astype(np.int32),
            "ids": ids[:, :k].reshape(rows, seq_len, k).astype(id_dtype),
            "logprobs": top[:, :k].reshape(rows, seq_len, k).astype(np.float16),
            "tail_logmass": tail.reshape(rows, seq_len).astype(np.float32),
            "target_logprob": target.reshape(rows, seq_len).astype(np.float32),
        }
    return out


def synthetic_meta(rows: int, seq_len: int, vocab: int, k: int, shard_rows: int):
    """StoreMeta of a top-k store of synthetic targets (what the store benchmarks write)."""
    from kdcache.storage import DataInfo, StoreMeta, TeacherInfo, suggest_chunk_rows

    return StoreMeta(
        kind="topk", k=k, vocab_size=vocab, seq_len=seq_len, temperature=1.0,
        teacher=TeacherInfo(name="synthetic", fingerprint="synthetic", params=0, nonembedding_params=0),
        data=DataInfo(fingerprint="synthetic", split="student", rows=rows),
        shard_rows=shard_rows, chunk_rows=suggest_chunk_rows(seq_len, k, shard_rows),
    )


def write_topk_store(path, rows: int, distinct: int, seq_len: int, vocab: int, k: int,
                     shard_rows: int) -> None:
    """A finished top-k store of `rows` rows: `distinct` drawn rows (slow at a real vocabulary),
    tiled. Every inner chunk is coded alone, so a chunk's decode costs what fresh rows' would."""
    from kdcache.storage import StoreWriter

    family = topk_family(np.random.default_rng(0), min(distinct, rows), seq_len, vocab, [k])[k]
    arrays = {name: np.resize(values, (rows, *values.shape[1:])) for name, values in family.items()}
    meta = synthetic_meta(rows, seq_len, vocab, k, shard_rows)
    writer = StoreWriter.open(path, meta)
    for shard in range(meta.num_shards):
        start, stop = meta.shard_bounds(shard)
        writer.write_shard(shard, {name: values[start:stop] for name, values in arrays.items()})
    writer.finalize()


def best_time(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls (the least disturbed by other load)."""
    import time

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
