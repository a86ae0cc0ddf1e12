"""StoreDataset: batch contents, epochs, exact resume, DataLoader workers, ranks, what a rank reads."""

from __future__ import annotations

import json
import os
import pickle
import socket
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kdcache.storage import StoreWriter
from kdcache.train.batches import (
    BATCH_KEYS,
    TEMPERATURE_KEY,
    VOCAB_KEY,
    Batch,
    batch_from_dict,
    batch_to_dict,
)
from kdcache.train.dataset import StoreDataset
from kdcache.train.errors import TrainError
from kdcache.train.row_order import RowOrder
from tests.storage.conftest import make_meta, make_rows, shard_of

ROWS, BATCH = 100, 8
BATCH_DTYPES = {"teacher_ids": torch.int64, "teacher_logprobs": torch.float16,
                "teacher_tail_logmass": torch.float32, "teacher_counts": torch.float32}
TEACHER_KEYS = {
    "topk": {"teacher_ids", "teacher_logprobs", "teacher_tail_logmass"},
    "full": {"teacher_logprobs"},
    "sampled": {"teacher_ids", "teacher_logprobs", "teacher_counts"},
}


def _store(path: Path, kind: str = "topk", *, temperature: float = 1.0) -> dict[str, np.ndarray]:
    """A finished store of ROWS random rows; returns its arrays."""
    meta = make_meta(kind, rows=ROWS, shard_rows=16, chunk_rows=4, temperature=temperature)
    rows = make_rows(meta)
    writer = StoreWriter.open(path, meta)
    for s in range(meta.num_shards):
        writer.write_shard(s, shard_of(meta, rows, s))
    writer.finalize()
    return rows


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("store") / "s.zarr"
    return path, _store(path)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _same_batches(xs: list[dict[str, torch.Tensor]], ys: list[dict[str, torch.Tensor]]) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert _equal(x, y)


@pytest.mark.parametrize("kind", ["topk", "full", "sampled"])
def test_batches_hold_the_store_rows_in_row_order(tmp_path: Path, kind: str) -> None:
    rows = _store(tmp_path / "s", kind, temperature=2.0)
    ds = StoreDataset(tmp_path / "s", batch_size=BATCH, seed=4)
    assert (ds.kind, ds.temperature, ds.vocab_size, ds.seq_len) == (kind, 2.0, 300, 8)
    assert ds.meta.rows == ROWS and len(ds) == ROWS // BATCH
    expected = np.concatenate(RowOrder(n_rows=ROWS, batch_size=BATCH, seed=4).windows(0))
    got = list(ds)
    assert len(got) == len(expected)
    for idx, batch in zip(expected, got, strict=True):
        assert set(batch) == {"input_ids", "labels", TEMPERATURE_KEY, VOCAB_KEY} | TEACHER_KEYS[kind]
        tokens = rows["tokens"][idx].astype(np.int64)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
        assert batch["input_ids"].shape == batch["labels"].shape == (BATCH, 8)
        np.testing.assert_array_equal(batch["input_ids"].numpy(), tokens[:, :-1])
        np.testing.assert_array_equal(batch["labels"].numpy(), tokens[:, 1:])
        assert batch["labels"].is_contiguous()  # labels.view(-1) must work
        for key in TEACHER_KEYS[kind]:
            values = batch[key]
            assert values.dtype == BATCH_DTYPES[key]
            assert values.shape[:2] == (BATCH, 8)
            stored = rows[BATCH_KEYS[key]][idx]
            np.testing.assert_array_equal(values.numpy(), stored.astype(values.numpy().dtype))
        temp = batch[TEMPERATURE_KEY]
        assert temp.dtype == torch.float32 and temp.dim() == 0 and temp.item() == 2.0
        assert batch[VOCAB_KEY].dtype == torch.int64 and batch[VOCAB_KEY].item() == 300


def test_an_epoch_per_iteration_and_set_epoch(store: tuple[Path, dict]) -> None:
    ds = StoreDataset(store[0], batch_size=BATCH, seed=1)
    first = list(ds)
    assert len(first) == len(ds) == 12 and ds.state_dict() == {"epoch": 1, "batch": 0}
    second = list(ds)
    assert ds.state_dict() == {"epoch": 2, "batch": 0}
    assert not torch.equal(first[0]["input_ids"], second[0]["input_ids"])  # reshuffled
    ds.set_epoch(1)
    assert ds.state_dict() == {"epoch": 1, "batch": 0}
    _same_batches(list(ds), second)
    ds.set_epoch(0)
    _same_batches(list(ds), first)
    with pytest.raises(TrainError, match="epoch -1"):
        ds.set_epoch(-1)


def test_resume_mid_epoch_continues_exactly(store: tuple[Path, dict]) -> None:
    a = StoreDataset(store[0], batch_size=BATCH, seed=1)
    it = iter(a)
    for _ in range(5):
        next(it)
    state = a.state_dict()
    assert state == {"epoch": 0, "batch": 5} and json.loads(json.dumps(state)) == state
    rest = list(it) + list(a)  # the rest of epoch 0, then epoch 1
    b = StoreDataset(store[0], batch_size=BATCH, seed=1)
    b.load_state_dict(state)
    _same_batches(list(b) + list(b), rest)
    with pytest.raises(TrainError, match="outside an epoch of 12 batches"):
        b.load_state_dict({"epoch": 0, "batch": 12})


def test_advance_moves_across_epochs(store: tuple[Path, dict]) -> None:
    ds = StoreDataset(store[0], batch_size=BATCH, seed=1)
    ds.advance(11)
    assert ds.state_dict() == {"epoch": 0, "batch": 11}
    ds.advance()
    assert ds.state_dict() == {"epoch": 1, "batch": 0}
    ds.advance(25)
    assert ds.state_dict() == {"epoch": 3, "batch": 1}


@pytest.mark.parametrize("start", [0, 3])
def test_dataloader_workers_give_the_in_process_order(store: tuple[Path, dict], start: int) -> None:
    """Two workers, from an even and an odd position (9 batches left: the workers end unevenly)."""
    ds = StoreDataset(store[0], batch_size=BATCH, seed=2)
    ds.load_state_dict({"epoch": 1, "batch": start})
    through_workers = list(DataLoader(ds, batch_size=None, num_workers=2,
                                      multiprocessing_context="forkserver"))
    assert ds.state_dict() == {"epoch": 1, "batch": start}  # the workers moved their copies
    in_process = list(ds)
    assert len(in_process) == 12 - start
    _same_batches(through_workers, in_process)


def test_loader_keeps_the_position_exact(store: tuple[Path, dict]) -> None:
    ds = StoreDataset(store[0], batch_size=BATCH, seed=2)
    ref = StoreDataset(store[0], batch_size=BATCH, seed=2)
    expected = list(ref) + list(ref)
    got = []
    for batch in ds.loader(num_workers=2):
        got.append(batch)
        if len(got) == 7:
            break
    assert ds.state_dict() == {"epoch": 0, "batch": 7}
    got += list(ds.loader(num_workers=2))
    assert ds.state_dict() == {"epoch": 1, "batch": 0}
    got += list(ds.loader(num_workers=0))
    assert ds.state_dict() == {"epoch": 2, "batch": 0}
    _same_batches(got, expected)
    with pytest.raises(TrainError, match="persistent_workers"):
        next(ds.loader(num_workers=2, persistent_workers=True))


def _record_parent(folder: Path, worker: int) -> None:
    """A loader worker's `worker_init_fn`: write down which process started it."""
    (folder / f"worker-{worker}").write_text(str(os.getppid()))


def test_loader_workers_are_not_forked_from_this_process(store: tuple[Path, dict], tmp_path: Path) -> None:
    """A fork server starts them: a fork would copy this process's threads' half-done state."""
    ds = StoreDataset(store[0], batch_size=BATCH, seed=2)
    assert len(list(ds.loader(num_workers=2, worker_init_fn=partial(_record_parent, tmp_path)))) == len(ds)
    parents = {int((tmp_path / f"worker-{w}").read_text()) for w in (0, 1)}
    assert os.getpid() not in parents and len(parents) == 1


def test_a_pickled_copy_reopens_the_store(store: tuple[Path, dict]) -> None:
    ds = StoreDataset(store[0], batch_size=BATCH, seed=3)
    ds.advance(4)
    copy = pickle.loads(pickle.dumps(ds))
    _same_batches(list(copy), list(ds))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_each_global_batch(store: tuple[Path, dict], world: int) -> None:
    """Rank r's batch j is rows [r*b, (r+1)*b) of world 1's batch j, in every epoch."""
    single = StoreDataset(store[0], batch_size=BATCH, seed=5)
    ranks = [StoreDataset(store[0], batch_size=BATCH, seed=5, rank=r, world=world) for r in range(world)]
    assert all(len(r) == len(single) and r.local_batch == BATCH // world for r in ranks)
    for _ in range(3):
        whole = list(single)
        parts = [list(r) for r in ranks]
        for j, batch in enumerate(whole):
            for key, values in batch.items():
                if key in (TEMPERATURE_KEY, VOCAB_KEY):
                    assert all(torch.equal(p[j][key], values) for p in parts)
                else:
                    assert torch.equal(torch.cat([p[j][key] for p in parts]), values)
        assert {r.state_dict()["epoch"] for r in ranks} == {single.state_dict()["epoch"]}


def test_refuses_a_batch_size_the_world_does_not_divide(store: tuple[Path, dict]) -> None:
    with pytest.raises(TrainError, match=r"^--batch-size 6 is not divisible by the world size 4$"):
        StoreDataset(store[0], batch_size=6, rank=1, world=4)


def _record_reads(ds: StoreDataset) -> list[np.ndarray]:
    calls: list[np.ndarray] = []
    read = ds.reader.read_rows

    def recording(rows):  # type: ignore[no-untyped-def]
        calls.append(np.asarray(rows).copy())
        return read(rows)

    ds.reader.read_rows = recording  # type: ignore[method-assign]
    return calls


def test_a_rank_reads_only_its_rows_one_call_per_window(store: tuple[Path, dict]) -> None:
    ds = StoreDataset(store[0], batch_size=BATCH, seed=6, rank=1, world=4)
    calls = _record_reads(ds)
    list(ds)
    order = RowOrder(n_rows=ROWS, batch_size=BATCH, seed=6, rank=1, world=4)
    windows = order.windows(0)
    assert len(calls) == len(windows)
    for rows, window in zip(calls, windows, strict=True):
        assert window.shape[1] == 2
        np.testing.assert_array_equal(rows, np.unique(window))  # sorted unique, this window only
    global_rows = np.concatenate(order.global_windows(0))[:, 2:4]
    np.testing.assert_array_equal(np.sort(np.concatenate(calls)), np.sort(global_rows.ravel()))


def test_a_worker_reads_only_its_batches(store: tuple[Path, dict]) -> None:
    ds = StoreDataset(store[0], batch_size=BATCH, seed=6, rank=0, world=2)
    calls = _record_reads(ds)
    got = list(ds.read_batches(0, 1, worker=1, workers=2))
    assert [j for j, _ in got] == [2, 4, 6, 8, 10]
    mine = np.concatenate(ds.order.windows(0))[[2, 4, 6, 8, 10]]
    np.testing.assert_array_equal(np.sort(np.concatenate(calls)), np.sort(mine.ravel()))
    assert ds.state_dict() == {"epoch": 0, "batch": 0}  # read_batches leaves the position alone


def test_a_loader_worker_reads_whole_windows(store: tuple[Path, dict]) -> None:
    """Worker w of n reads windows w, w + n, ... from the one holding `start`: one call each."""
    ds = StoreDataset(store[0], batch_size=BATCH, seed=6)
    calls = _record_reads(ds)
    windows = ds.order.windows(0)  # 3 windows of 4 batches; batch 1 lies in the first
    by_worker = [list(ds.read_windows(0, 1, worker=w, workers=2)) for w in (0, 1)]
    assert [[w.index for w in got] for got in by_worker] == [[[1, 2, 3], [8, 9, 10, 11]], [[4, 5, 6, 7]]]
    for rows, window in zip(calls, [windows[0][1:], windows[2], windows[1]], strict=True):
        np.testing.assert_array_equal(rows, np.unique(window))
    in_process = dict(ds.read_batches(0, 1))
    for window in by_worker[0] + by_worker[1]:
        values = {name: t.numpy() for name, t in window.values.items()}
        for index, pos in zip(window.index, window.pos, strict=True):
            assert _equal(ds._as_dict(ds._to_batch(values, np.asarray(pos))), ds._as_dict(in_process[index]))


@pytest.mark.parametrize(("workers", "start"), [(2, 0), (2, 5)])  # 3 windows, then 2
def test_loader_workers_hand_out_the_in_process_order(store: tuple[Path, dict], workers: int,
                                                      start: int) -> None:
    ds = StoreDataset(store[0], batch_size=BATCH, seed=2)
    ref = StoreDataset(store[0], batch_size=BATCH, seed=2)
    for d in (ds, ref):
        d.load_state_dict({"epoch": 1, "batch": start})
    _same_batches(list(ds.loader(num_workers=workers)), list(ref))
    assert ds.state_dict() == ref.state_dict() == {"epoch": 2, "batch": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_and_world_come_from_torch_distributed(store: tuple[Path, dict]) -> None:
    dist = torch.distributed
    assert StoreDataset(store[0], batch_size=BATCH).world == 1  # no process group: 0 of 1
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        ds = StoreDataset(store[0], batch_size=BATCH)
        assert (ds.rank, ds.world) == (0, 1) and ds.local_batch == BATCH
        explicit = StoreDataset(store[0], batch_size=BATCH, rank=1, world=2)
        assert (explicit.rank, explicit.world) == (1, 2)
    finally:
        dist.destroy_process_group()


def test_waits_then_gives_up_on_a_store_no_job_fills(tmp_path: Path) -> None:
    StoreWriter.open(tmp_path / "s", make_meta(rows=ROWS, shard_rows=16, chunk_rows=4))
    ds = StoreDataset(tmp_path / "s", batch_size=BATCH, wait_timeout_s=0.5)
    with pytest.raises(TrainError, match="no shard committed"):
        next(iter(ds))


@pytest.mark.parametrize("kind", ["topk", "full", "sampled"])
def test_batch_dicts_and_trainer_batches_convert_both_ways(tmp_path: Path, kind: str) -> None:
    _store(tmp_path / "s", kind, temperature=0.5)
    d = next(iter(StoreDataset(tmp_path / "s", batch_size=BATCH)))
    batch = batch_from_dict(d)
    assert set(batch.extras) == {BATCH_KEYS[k] for k in TEACHER_KEYS[kind]}
    assert batch.inputs is d["input_ids"] and batch.targets is d["labels"]
    assert _equal(batch_to_dict(batch, temperature=0.5, vocab_size=300), d)
    plain = Batch(d["input_ids"], d["labels"])
    assert set(batch_to_dict(plain)) == {"input_ids", "labels"}
    with pytest.raises(TrainError, match="temperature"):
        batch_to_dict(batch)
    with pytest.raises(TrainError, match="no batch-dict key"):
        batch_to_dict(Batch(d["input_ids"], d["labels"], {"other": d["labels"]}), temperature=1.0)
