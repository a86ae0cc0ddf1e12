"""A store over data packed by document: batches carry the data's -100 labels and position ids,
in every reading path, and a store of other masks is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.storage import DataInfo, StoreMeta, StoreWriter, TeacherInfo, id_dtype
from kdcache.storage.tokens.format import IGNORE_INDEX, TokenData
from kdcache.storage.tokens.writer import write_documents
from kdcache.train import StoreDataset
from kdcache.train.errors import TrainError
from kdcache.train.store_batches import StoreBatches, check_store_matches
from tests.train.conftest import CHAT_EOS, CHAT_SEQ_LEN, chat_splits, word_tokenizer

K, SPLIT, BATCH = 4, "student", 8


def _meta(data: TokenData, **data_fields) -> StoreMeta:
    info = {"fingerprint": data.fingerprint, "split": SPLIT, "rows": data.rows(SPLIT),
            "tokenizer": data.tokenizer_fingerprint, "mask_fingerprint": data.mask_fingerprint(SPLIT),
            **data_fields}
    return StoreMeta(kind="topk", k=K, vocab_size=data.vocab_size, seq_len=data.seq_len, temperature=1.0,
                     teacher=TeacherInfo(name="t", fingerprint="fp", params=10, nonembedding_params=8),
                     data=DataInfo(**info), shard_rows=32, chunk_rows=8)


def _targets(data: TokenData) -> dict[str, np.ndarray]:
    """Top-k targets that encode their row at trained positions, fill values (zeros) elsewhere."""
    rows = data.read_rows(SPLIT, slice(None))
    assert rows.loss_mask is not None and rows.position_ids is not None
    n, t = rows.tokens.shape[0], data.seq_len
    trained = rows.loss_mask[:, 1:]
    row = np.arange(n)[:, None, None]
    logprobs = -(row + np.arange(K) + 1) / 100.0 * np.ones((1, t, 1))
    ids = (row + np.arange(K)) % data.vocab_size * np.ones((1, t, 1))
    return {
        "tokens": rows.tokens.astype(np.int32),
        "ids": np.where(trained[..., None], ids, 0).astype(id_dtype(data.vocab_size)),
        "logprobs": np.where(trained[..., None], logprobs, 0).astype(np.float16),
        "tail_logmass": np.where(trained, -3.0, 0).astype(np.float32),
        "target_logprob": np.where(trained, logprobs[..., 0], 0).astype(np.float32),
        "loss_mask": rows.loss_mask.astype(np.uint8),
        "position_ids": rows.position_ids.astype(np.int32),
    }


@pytest.fixture(scope="module")
def store(chat_data: TokenData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat-store") / "store"
    meta, values = _meta(chat_data), _targets(chat_data)
    writer = StoreWriter.open(path, meta)
    for shard in range(meta.num_shards):
        a, b = meta.shard_bounds(shard)
        writer.write_shard(shard, {name: v[a:b] for name, v in values.items()})
    writer.finalize()
    return path


def _check(batch: dict[str, torch.Tensor], rows: np.ndarray, data: TokenData) -> None:
    want = data.read_rows(SPLIT, rows)
    assert torch.equal(batch["labels"], torch.from_numpy(want.labels()))
    assert torch.equal(batch["position_ids"], torch.from_numpy(want.input_positions()))
    assert torch.equal(batch["input_ids"], torch.from_numpy(want.tokens[:, :-1]))
    trained = batch["labels"] != IGNORE_INDEX
    top = batch["teacher_logprobs"][..., 0].float()
    expected = torch.from_numpy(-(rows + 1) / 100.0).float()[:, None].expand_as(top)
    torch.testing.assert_close(top[trained], expected[trained], rtol=1e-3, atol=0)  # float16 as stored
    assert not top[~trained].any()


def test_store_batches_carry_the_datas_labels_and_positions(store: Path, chat_data: TokenData) -> None:
    ds = StoreDataset(store, batch_size=BATCH, seed=3)
    assert ds.documents
    order = np.concatenate(ds.order.windows(0))
    seen = 0
    for j, batch in enumerate(ds):
        _check(batch, order[j], chat_data)
        seen += 1
    assert seen == len(ds)
    source = StoreBatches(str(store), batch_size=BATCH, seed=3, prefetch=2)
    try:
        for j in range(3):
            b = source.next_batch()
            want = chat_data.read_rows(SPLIT, order[j])
            assert b.positions is not None
            assert torch.equal(b.positions, torch.from_numpy(want.input_positions()))
            assert b.tokens == int(want.trained().sum()) < b.targets.numel()
    finally:
        source.close()


@pytest.mark.slow  # starts DataLoader workers
def test_loader_workers_carry_them_too(store: Path, chat_data: TokenData) -> None:
    ds = StoreDataset(store, batch_size=BATCH, seed=4)
    order = np.concatenate(ds.order.windows(0))
    for j, batch in enumerate(ds.loader(num_workers=2)):
        _check(batch, order[j], chat_data)


def test_a_store_of_other_masks_is_refused(chat_data: TokenData, tmp_path: Path) -> None:
    check_store_matches("S", _meta(chat_data), chat_data)
    # The same conversations with every token trained: same tokenizer, other masks.
    every = {name: [(ids, np.ones_like(mask)) for ids, mask in docs] for name, docs in chat_splits().items()}
    other = write_documents(tmp_path / "all-trained", word_tokenizer(), CHAT_SEQ_LEN, every,
                            eos_token_id=CHAT_EOS)
    with pytest.raises(TrainError, match="field 'data.mask_fingerprint'") as err:
        check_store_matches("S", _meta(chat_data), other)
    assert "\n" not in str(err.value)
    with pytest.raises(TrainError, match="field 'data.mask_fingerprint'"):  # a text store on chat data
        check_store_matches("S", _meta(chat_data, mask_fingerprint=""), chat_data)
