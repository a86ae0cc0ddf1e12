"""The store-streaming loader: order, content, resume, ranks, a store still being built, bad stores."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.storage import DataInfo, StoreError, StoreMeta, StoreReader, StoreWriter, TeacherInfo, id_dtype
from kdcache.storage.tokens.format import TokenData
from kdcache.train.batches import TokenBatches
from kdcache.train.errors import TrainError
from kdcache.train.row_order import RowOrder
from kdcache.train.store_batches import StoreBatches, check_store_matches

VOCAB, SEQ, K = 300, 8, 4


def _meta(kind: str = "topk", rows: int = 100, shard_rows: int = 16) -> StoreMeta:
    k = VOCAB if kind == "full" else K
    return StoreMeta(
        kind=kind, k=k, vocab_size=VOCAB, seq_len=SEQ, temperature=1.0,
        teacher=TeacherInfo(name="t", fingerprint="fp", params=10, nonembedding_params=8),
        data=DataInfo(fingerprint="d", split="student", rows=rows, tokenizer="tok"),
        shard_rows=shard_rows, chunk_rows=4, draws=8 if kind == "sampled" else None,
    )


def _rows(meta: StoreMeta) -> dict[str, np.ndarray]:
    """Arrays whose values encode their row, so a misplaced row cannot go unnoticed."""
    r, t, k = meta.rows, meta.seq_len, meta.k
    row = np.arange(r)[:, None, None]
    logp = -(row + np.arange(k)[None, None, :] + 1) / 100.0 * np.ones((1, t, 1))
    out = {
        "tokens": (np.arange(r)[:, None] + np.arange(t + 1)[None, :]).astype(np.int32) % VOCAB,
        "target_logprob": logp[..., 0].astype(np.float32),
        "logprobs": logp.astype(np.float16),
    }
    if meta.kind != "full":
        out["ids"] = ((row + np.arange(k)) % VOCAB * np.ones((1, t, 1))).astype(id_dtype(VOCAB))
    if meta.kind == "topk":
        out["tail_logmass"] = np.full((r, t), -3.0, dtype=np.float32)
    if meta.kind == "sampled":
        out["counts"] = np.full((r, t, k), 2, dtype=np.uint8)
    return out


def _write(path: Path, meta: StoreMeta, shards: list[int] | None = None) -> dict[str, np.ndarray]:
    rows = _rows(meta)
    writer = StoreWriter.open(path, meta)
    for s in range(meta.num_shards) if shards is None else shards:
        a, b = meta.shard_bounds(s)
        writer.write_shard(s, {n: v[a:b] for n, v in rows.items()})
    writer.finalize()
    return rows


def _round_robin_windows(n_rows: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                         world: int = 1, block_rows: int = 16, window_batches: int = 4) -> list[np.ndarray]:
    """The order before batch_size became global: window w went whole to rank w % world."""
    blocks = np.random.default_rng([seed, epoch]).permutation(-(-n_rows // block_rows))
    seq = np.concatenate([np.arange(s, min(s + block_rows, n_rows)) for s in blocks * block_rows])
    window_rows = window_batches * batch_size
    out = []
    for w in range(rank, -(-n_rows // window_rows), world):
        rows = seq[w * window_rows : (w + 1) * window_rows]
        rows = np.random.default_rng([seed, epoch, w]).permutation(rows)
        usable = len(rows) // batch_size * batch_size
        if usable:
            out.append(rows[:usable].reshape(-1, batch_size))
    return out


@pytest.mark.parametrize(("n_rows", "batch_size", "seed"),
                         [(203, 8, 3), (1000, 16, 0), (37, 5, 9), (64, 64, 1)])
def test_one_rank_keeps_the_round_robin_order(n_rows: int, batch_size: int, seed: int) -> None:
    """Runs on one rank see exactly the batches they saw before the order became world-independent."""
    order = RowOrder(n_rows=n_rows, batch_size=batch_size, seed=seed)
    for epoch in range(3):
        old = _round_robin_windows(n_rows, batch_size, seed, epoch)
        assert [w.shape for w in order.windows(epoch)] == [w.shape for w in old]
        assert all(np.array_equal(a, b) for a, b in zip(order.windows(epoch), old, strict=True))
        assert order.batches_per_epoch() == sum(len(w) for w in old)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_row_order_covers_each_row_once_per_epoch_and_splits_ranks(world: int) -> None:
    orders = [RowOrder(n_rows=203, batch_size=8, seed=3, rank=r, world=world) for r in range(world)]
    seen = np.concatenate([np.concatenate(o.windows(epoch=1)).ravel() for o in orders])
    assert len(seen) == len(set(seen.tolist()))  # disjoint across ranks, no repeats
    assert len(seen) == 203 // 8 * 8  # only the rows short of a last global batch drop
    assert all(o.batches_per_epoch() == 203 // 8 and o.local_batch == 8 // world for o in orders)
    single = np.concatenate(RowOrder(n_rows=203, batch_size=8, seed=3).windows(1)).ravel()
    assert set(seen.tolist()) <= set(range(203)) and not np.array_equal(single, np.sort(single))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_take_slices_of_the_world_one_batches(world: int) -> None:
    """The data a run sees does not depend on its world size: rank r's batch j is rows
    [r*b, (r+1)*b) of the single-rank batch j, in every epoch, window by window."""
    single = RowOrder(n_rows=203, batch_size=8, seed=3)
    ranks = [RowOrder(n_rows=203, batch_size=8, seed=3, rank=r, world=world) for r in range(world)]
    for epoch in range(4):
        whole = single.windows(epoch)
        parts = [o.windows(epoch) for o in ranks]
        for w, window in enumerate(whole):
            assert all(p[w].shape == (len(window), 8 // world) for p in parts)
            np.testing.assert_array_equal(np.concatenate([p[w] for p in parts], axis=1), window)


def test_refuses_a_batch_size_the_world_does_not_divide(tmp_path: Path, tiny_data: TokenData) -> None:
    message = r"^--batch-size 6 is not divisible by the world size 4$"
    with pytest.raises(TrainError, match=message):
        RowOrder(n_rows=100, batch_size=6, seed=0, rank=0, world=4)
    with pytest.raises(TrainError, match=message):
        TokenBatches(tiny_data, "student", batch_size=6, seed=0, rank=3, world=4)
    _write(tmp_path / "s", _meta())
    with pytest.raises(TrainError, match=message):
        StoreBatches(str(tmp_path / "s"), batch_size=6, seed=0, rank=2, world=4)
    with pytest.raises(TrainError, match="rank 4 must lie in"):
        RowOrder(n_rows=100, batch_size=8, seed=0, rank=4, world=4)


def test_token_batches_split_each_global_batch(tiny_data: TokenData) -> None:
    single = TokenBatches(tiny_data, "student", batch_size=8, seed=2)
    ranks = [TokenBatches(tiny_data, "student", batch_size=8, seed=2, rank=r, world=2) for r in range(2)]
    for _ in range(single.order.batches_per_epoch() + 5):  # into the second epoch
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert all(p.inputs.shape == (4, tiny_data.seq_len) for p in parts)
        assert torch.equal(torch.cat([p.inputs for p in parts]), whole.inputs)
        assert all(r.state_dict() == single.state_dict() for r in ranks)


def test_row_order_is_chunk_local_and_seeded() -> None:
    order = RowOrder(n_rows=1000, batch_size=16, seed=0)
    for window in order.windows(0):
        blocks = np.unique(window // order.block_rows)
        assert len(blocks) <= order.window_rows // order.block_rows + 1
    again = RowOrder(n_rows=1000, batch_size=16, seed=0).windows(0)
    other = RowOrder(n_rows=1000, batch_size=16, seed=1).windows(0)
    assert all(np.array_equal(a, b) for a, b in zip(order.windows(0), again, strict=True))
    assert not np.array_equal(order.windows(0)[0], other[0])
    assert not np.array_equal(order.windows(0)[0], order.windows(1)[0])


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("kind", ["topk", "full", "sampled"])
def test_batches_hold_the_store_rows_in_row_order(tmp_path: Path, kind: str, prefetch: int) -> None:
    meta = _meta(kind)
    rows = _write(tmp_path / "s", meta)
    loader = StoreBatches(str(tmp_path / "s"), batch_size=8, seed=4, prefetch=prefetch)
    expected = np.concatenate(RowOrder(n_rows=100, batch_size=8, seed=4).windows(0))
    for idx in expected:
        batch = loader.next_batch()
        assert torch.equal(batch.inputs, torch.from_numpy(rows["tokens"][idx, :-1].astype(np.int64)))
        assert torch.equal(batch.targets, torch.from_numpy(rows["tokens"][idx, 1:].astype(np.int64)))
        for name, values in batch.extras.items():
            np.testing.assert_array_equal(values.numpy(), rows[name][idx].astype(values.numpy().dtype))
            assert values.dtype == {"ids": torch.int64, "logprobs": torch.float16}.get(name, torch.float32)
    loader.close()


def test_same_order_as_the_token_split(tmp_path: Path, tiny_data: TokenData) -> None:
    """Supervised, online and offline runs of one seed visit the same rows step by step."""
    n = tiny_data.rows("student")
    meta = _meta(rows=n, shard_rows=64)
    _write(tmp_path / "s", meta)
    tokens = TokenBatches(tiny_data, "student", batch_size=8, seed=2)
    loader = StoreBatches(str(tmp_path / "s"), batch_size=8, seed=2)
    reader = StoreReader(tmp_path / "s", ["tokens"])
    for _ in range(20):
        idx = tokens.next_rows()
        got = loader.next_batch().inputs.numpy()
        np.testing.assert_array_equal(got, reader.read_rows(idx)["tokens"][:, :-1])
    loader.close()


@pytest.mark.parametrize("prefetch", [0, 1])
def test_resume_mid_epoch_gives_the_same_batches(tmp_path: Path, prefetch: int) -> None:
    _write(tmp_path / "s", _meta())
    a = StoreBatches(str(tmp_path / "s"), batch_size=8, seed=1, prefetch=prefetch)
    per_epoch = a.order.batches_per_epoch()
    for _ in range(per_epoch + 3):  # into the second epoch
        a.next_batch()
    state = a.state_dict()
    assert state == {"epoch": 1, "batch": 3}
    b = StoreBatches(str(tmp_path / "s"), batch_size=8, seed=1)
    b.load_state_dict(state)
    for _ in range(per_epoch):
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.extras["ids"], y.extras["ids"])
    a.close(), b.close()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_ranks_read_their_slices_of_each_global_batch(tmp_path: Path, prefetch: int) -> None:
    _write(tmp_path / "s", _meta())
    single = StoreBatches(str(tmp_path / "s"), batch_size=8, seed=0, prefetch=prefetch)
    ranks = [StoreBatches(str(tmp_path / "s"), batch_size=8, seed=0, rank=r, world=2, prefetch=prefetch)
             for r in range(2)]
    for _ in range(single.order.batches_per_epoch() + 3):
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(torch.cat([p.inputs for p in parts]), whole.inputs)
        for name in whole.extras:
            assert torch.equal(torch.cat([p.extras[name] for p in parts]), whole.extras[name])
        assert all(r.state_dict() == single.state_dict() for r in ranks)
    for loader in [single, *ranks]:
        loader.close()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_waits_for_shards_a_cache_job_commits_later(tmp_path: Path, prefetch: int) -> None:
    meta = _meta()
    rows = _rows(meta)
    writer = StoreWriter.open(tmp_path / "s", meta)
    loader = StoreBatches(str(tmp_path / "s"), batch_size=8, seed=0, prefetch=prefetch)

    def cache_job() -> None:
        time.sleep(1.0)
        for s in range(meta.num_shards):
            a, b = meta.shard_bounds(s)
            writer.write_shard(s, {n: v[a:b] for n, v in rows.items()})

    job = threading.Thread(target=cache_job)
    job.start()
    t0 = time.monotonic()
    first = loader.next_batch()
    assert time.monotonic() - t0 > 0.9  # it waited rather than failing or reading fill values
    idx = RowOrder(n_rows=100, batch_size=8, seed=0).windows(0)[0][0]
    np.testing.assert_array_equal(first.inputs.numpy(), rows["tokens"][idx, :-1])
    job.join()
    loader.close()


def test_gives_up_when_no_shard_is_ever_committed(tmp_path: Path) -> None:
    StoreWriter.open(tmp_path / "s", _meta())
    loader = StoreBatches(str(tmp_path / "s"), batch_size=8, seed=0, wait_timeout_s=0.5)
    with pytest.raises(TrainError, match="no shard committed"):
        loader.next_batch()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_corrupt_chunk_fails_the_batch(tmp_path: Path, prefetch: int) -> None:
    _write(tmp_path / "s", _meta())
    shard_files = [p for p in (tmp_path / "s" / "logprobs").rglob("*") if p.is_file() and "c" in p.parts]
    assert shard_files
    for shard_file in shard_files:
        data = bytearray(shard_file.read_bytes())
        data[40] ^= 0xFF
        shard_file.write_bytes(bytes(data))
    loader = StoreBatches(str(tmp_path / "s"), batch_size=8, seed=0, prefetch=prefetch)
    with pytest.raises(StoreError, match="corrupt"):
        loader.next_batch()


def test_refuses_a_store_of_other_data(tmp_path: Path, tiny_data: TokenData) -> None:
    meta = _meta()
    with pytest.raises(TrainError, match="vocab_size"):
        check_store_matches("S", meta, tiny_data)
    ok = StoreMeta(**{**meta.__dict__, "vocab_size": tiny_data.vocab_size, "seq_len": tiny_data.seq_len,
                      "data": DataInfo(fingerprint="d", split="student", rows=100,
                                       tokenizer=tiny_data.tokenizer_fingerprint)})
    check_store_matches("S", ok, tiny_data)
    other_tok = StoreMeta(**{**ok.__dict__, "data": DataInfo(fingerprint="d", split="student", rows=100,
                                                             tokenizer="another")})
    with pytest.raises(TrainError, match="data.tokenizer"):
        check_store_matches("S", other_tok, tiny_data)
    wrong_len = StoreMeta(**{**ok.__dict__, "seq_len": tiny_data.seq_len + 1})
    with pytest.raises(TrainError, match="seq_len"):
        check_store_matches("S", wrong_len, tiny_data)
