"""The contract every teacher backend passes on rows that pack documents (chat data).

A packed row's stored targets equal those of each of its documents run alone (one document
a row, padded), and a document's targets do not change when another document precedes it;
both are also checked against a float64 `transformers` forward pass of the document alone.
Only trained positions hold targets; the others hold the store's fill values.

Tolerance, derived: a document's positions see the same tokens at the same positions
whichever row holds it; keys of other documents get attention weight exp(dtype min - max),
exactly 0 in float32. What differs is the shape of every matmul and attention call, so
the summation order: float32 rounding, ~1e-6 on these small teachers' log-probs (the
existing backend tests measure float32 forwards of two implementations within 1e-5).
Stored log-probs are float16: each copy is within half a float16 step (2^-11 of itself)
of its float32 value, so two copies of nearly the same value are within 2^-10 of it (one
step, where the two sit on either side of a rounding boundary): |a - b| <= 2^-10 |b| + 1e-4
holds with a 10x margin on the float32 part. Against float64, one rounding: 2^-11 |x| +
1e-4. Top-k sets may differ only at a tie: an id in one set and not the other must sit at
the k-th log-prob of its set, within that tolerance. Measured here on CPU:
packed, alone and reordered are bit-identical for all three backends, and within 3e-6
(native, hf) and 4.5e-6 (vllm) of float64 on target log-probs.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from kdcache.pipeline.cache import targets as targets_module
from kdcache.pipeline.cache.config import CacheConfig
from kdcache.pipeline.cache.job import run_cache
from kdcache.pipeline.cache.shard import cache_shard
from kdcache.pipeline.cache.teachers import TargetSpec, Teacher, load_teacher
from kdcache.pipeline.cache.teachers import torch_teacher as torch_teacher_module
from kdcache.pipeline.cache.teachers.vllm import documents
from kdcache.pipeline.cli import main
from kdcache.storage import (
    DataInfo,
    StoreError,
    StoreMeta,
    StoreReader,
    StoreWriter,
    read_jobs,
    summarize,
    verify_store,
)
from kdcache.storage.tokens.format import Rows, TokenData, open_token_data
from kdcache.storage.tokens.writer import write_documents
from tests.pipeline.conftest import SEQ_LEN, VOCAB

K = 8
FP16_REL = 2.0**-11  # one float16 rounding, relative: half a step
FP16_STEP = 2.0**-10  # two float16 roundings of nearly one value: one step apart at most
F32_ABS = 1e-4  # float32 forwards of other shapes: ~1e-6 here, with a 10x margin over 1e-5
TARGETS = ("ids", "logprobs", "tail_logmass", "target_logprob")


def make_documents(token_data: Path, count: int = 40, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Conversation-like documents cut from real text: a prompt (untrained) then an answer
    (trained), 4 to 14 tokens (about three to a row), never the padding id 0 (so padding is
    never taken for a document)."""
    rng = np.random.default_rng(seed)
    text = open_token_data(token_data).read("student", slice(0, 40)).reshape(-1)
    text = np.where(text == 0, 1, text)
    docs, at = [], 0
    for _ in range(count):
        n = int(rng.integers(4, 15))
        prompt = int(rng.integers(1, n - 1))
        mask = np.r_[np.zeros(prompt, np.uint8), np.ones(n - prompt, np.uint8)]
        docs.append((text[at : at + n].astype(np.int32), mask))
        at += n
    return docs


def write(path: Path, token_data: Path, docs: list, packing: str) -> TokenData:
    tokenizer = open_token_data(token_data).tokenizer_path.read_bytes()
    return write_documents(path, tokenizer, SEQ_LEN, {"student": docs, "valid": docs[:8]}, packing=packing)


@dataclass(frozen=True)
class Placed:
    """One document as a store holds it: its row, where it starts, and the arrays there."""

    row: int
    start: int
    preceded_by: int | None  # the document before it in its row
    tokens: np.ndarray
    trained: np.ndarray  # bool [n - 1]: which of its positions are trained
    targets: dict[str, np.ndarray]  # each [n - 1, ...]: the positions predicting its tokens 1..n-1


def placed_documents(store: Path, docs: list) -> list[Placed]:
    """Find each document (in order) in the store's rows, by the store's own position ids."""
    got = StoreReader(store).read_rows(np.arange(StoreReader(store).meta.rows))
    out: list[Placed] = []
    for r, positions in enumerate(got["position_ids"]):
        starts = [*np.flatnonzero(positions == 0).tolist(), positions.size]
        before = None
        for a, z in itertools.pairwise(starts):
            if len(out) == len(docs) or not np.array_equal(got["tokens"][r, a:z], docs[len(out)][0]):
                continue  # padding
            out.append(Placed(row=r, start=a, preceded_by=before, tokens=got["tokens"][r, a:z],
                              trained=got["loss_mask"][r, a + 1 : z] == 1,
                              targets={n: got[n][r, a : z - 1] for n in TARGETS}))
            before = len(out) - 1
    assert len(out) == len(docs)
    return out


def cache_serially(teacher: Teacher, data: TokenData, out: Path) -> Path:
    """The serial core (`cache_shard`, what every cache worker runs) over the student split."""
    info = DataInfo(fingerprint=data.split_fingerprint("student"), split="student", rows=data.rows("student"),
                    tokenizer=data.tokenizer_fingerprint, mask_fingerprint=data.mask_fingerprint("student"))
    meta = StoreMeta(kind="topk", k=K, vocab_size=VOCAB, seq_len=SEQ_LEN, temperature=1.0,
                     teacher=teacher.info, data=info, shard_rows=8, chunk_rows=8)
    writer = StoreWriter.open(out, meta)
    for shard in writer.pending_shards():
        cache_shard(teacher, data, "student", writer, shard)
    writer.finalize()
    return out


def assert_same_targets(a: Placed, b: Placed) -> None:
    """Two copies of one document's targets, at its trained positions, within the tolerance."""
    ta, tb = ({n: v[p.trained] for n, v in p.targets.items()} for p in (a, b))
    for name in ("tail_logmass", "target_logprob"):
        assert np.all(np.abs(ta[name] - tb[name]) <= F32_ABS), name
    va, vb = (t["logprobs"].astype(np.float64) for t in (ta, tb))
    for i in range(len(va)):
        ids_a, ids_b = ta["ids"][i].tolist(), tb["ids"][i].tolist()
        for j, x in enumerate(ids_a):
            if x in ids_b:
                y = vb[i][ids_b.index(x)]
                assert abs(va[i][j] - y) <= FP16_STEP * abs(y) + F32_ABS
            else:  # a tie at the k-th place
                assert abs(va[i][j] - va[i][-1]) <= FP16_STEP * abs(va[i][-1]) + 2 * F32_ABS
                assert abs(va[i][-1] - vb[i][-1]) <= FP16_STEP * abs(vb[i][-1]) + F32_ABS


def assert_fill_where_untrained(p: Placed) -> None:
    for name, values in p.targets.items():
        assert not values[~p.trained].any(), name


def reference_logprobs(teacher_dir: Path, tokens: np.ndarray) -> np.ndarray:
    """float64 log-probs [n - 1, V] of one document run alone by transformers' own Llama."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(tokens[None, :-1].astype(np.int64))).logits[0]
    return torch.log_softmax(logits, -1).numpy()


@pytest.fixture(scope="module")
def datasets(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[TokenData, list]]:
    """The same documents packed, one per row, and packed in another order (so other
    documents precede them)."""
    root = tmp_path_factory.mktemp("documents")
    docs = make_documents(token_data)
    shuffled = [docs[i] for i in np.random.default_rng(1).permutation(len(docs))]
    return {"packed": (write(root / "packed", token_data, docs, "documents"), docs),
            "alone": (write(root / "alone", token_data, docs, "none"), docs),
            "shuffled": (write(root / "shuffled", token_data, shuffled, "documents"), shuffled)}


@pytest.fixture
def released():
    """vLLM's engine, run here in the test process rather than in a cache job's actor, starts
    torch.distributed (a gloo group of one) and keeps it; a later test that starts its own
    group would then fail. End it as vLLM does at shutdown."""
    yield
    if "vllm" in sys.modules:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


@pytest.mark.parametrize("backend", ["native", "hf", "vllm"])
def test_packed_documents_equal_documents_alone(backend, teacher, datasets, tmp_path, released):
    if backend == "vllm":
        pytest.importorskip("vllm")
    model = load_teacher(backend, str(teacher), batch_rows=4, max_k=K, max_len=SEQ_LEN + 1, vocab=VOCAB)
    stores = {name: placed_documents(cache_serially(model, data, tmp_path / f"{name}.zarr"), docs)
              for name, (data, docs) in datasets.items()}
    packed, alone = stores["packed"], stores["alone"]
    assert len({p.row for p in packed}) < len(packed) / 2  # rows do pack several documents
    assert sum(p.start > 0 for p in packed) > len(packed) / 2
    for a, b in zip(packed, alone, strict=True):
        assert np.array_equal(a.tokens, b.tokens) and b.start == 0
        assert_same_targets(a, b)
        assert_fill_where_untrained(a)
        assert_fill_where_untrained(b)
    # Another document before it (or none) changes nothing.
    shuffled = datasets["shuffled"][1]
    order = [next(j for j, e in enumerate(shuffled) if e is d) for d in datasets["packed"][1]]
    moved = 0
    for i, a in enumerate(packed):
        b = stores["shuffled"][order[i]]
        before = None if b.preceded_by is None else order.index(b.preceded_by)
        moved += before != a.preceded_by
        assert_same_targets(a, b)
    assert moved > len(packed) / 2
    # And the targets are the document's own: float64 transformers, the document alone.
    for p in packed[:10]:
        logp = reference_logprobs(teacher, p.tokens)[p.trained]
        stored = p.targets["logprobs"][p.trained].astype(np.float64)
        at = np.take_along_axis(logp, p.targets["ids"][p.trained].astype(np.int64), -1)
        assert np.all(np.abs(stored - at) <= FP16_REL * np.abs(at) + F32_ABS)
        target = np.take_along_axis(logp, p.tokens[1:][p.trained, None].astype(np.int64), -1)[:, 0]
        assert np.all(np.abs(p.targets["target_logprob"][p.trained] - target) <= F32_ABS)


def test_only_trained_positions_reach_the_output_layer(teacher, datasets, monkeypatch):
    """The head, top-k and tail run on the trained positions of a batch and nothing else."""
    seen: list[int] = []
    real = targets_module.targets_from_logits

    def counting(logits, *args):
        seen.append(logits.shape[0])
        return real(logits, *args)

    monkeypatch.setattr(torch_teacher_module, "targets_from_logits", counting)
    data, _ = datasets["packed"]
    rows = data.read_rows("student", slice(0, 8))
    spec = TargetSpec(kind="topk", k=K, temperature=1.0, vocab=VOCAB)
    load_teacher("native", str(teacher), batch_rows=4).targets(rows, spec, 0)
    assert sum(seen) == rows.trained().sum() < rows.trained().size


def test_vllm_prompts_are_the_documents_with_trained_targets():
    """Each document is a prompt of its own; padding and documents training nothing are not sent."""
    tokens = np.arange(24).reshape(2, 12)
    positions = np.array([[0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2],
                          [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])
    mask = np.zeros_like(tokens, dtype=bool)
    mask[0, [2, 3, 8]] = True  # documents 1 and 3 of row 0; document 2 trains nothing
    mask[1, [1]] = True  # row 1: the document, then padding
    got = documents(Rows(tokens, mask, positions))
    assert got == [(0, 0, 4), (0, 7, 9), (1, 0, 6)]
    assert documents(Rows(tokens)) == [(0, 0, 12), (1, 0, 12)]


@pytest.mark.ray
def test_cache_job_on_chat_data(ray_local, teacher, datasets, tmp_path, capsys):
    """The Ray job end to end: the store records the mask, counts trained tokens only and
    measures L_T over the trained positions of `valid`."""
    data, docs = datasets["packed"]
    out = tmp_path / "chat.zarr"
    result = run_cache(CacheConfig(teacher=str(teacher), data=str(data.path), out=str(out), k=K, shard_rows=8,
                                   batch_rows=4, quiet=True))
    reader = StoreReader(out)
    meta = reader.meta
    assert meta.documents and meta.data.mask_fingerprint == data.mask_fingerprint("student")
    got = reader.read_rows(np.arange(meta.rows))
    rows = data.read_rows("student", slice(0, meta.rows))
    assert np.array_equal(got["loss_mask"], rows.loss_mask.astype(np.uint8))
    assert np.array_equal(got["position_ids"], rows.position_ids.astype(np.int32))
    trained = rows.trained()
    assert result.tokens_written == trained.sum() == data.trained_tokens("student")
    assert read_jobs(out)[0].tokens == trained.sum()
    nll = -got["target_logprob"][trained].astype(np.float64)
    assert meta.teacher_loss == pytest.approx(nll.mean(), rel=1e-9)
    # L_T: float64 transformers over each valid document alone, at its trained positions.
    nll, count = 0.0, 0
    for ids, mask in docs[:8]:
        logp = reference_logprobs(teacher, ids)
        keep = mask[1:] == 1
        nll -= np.take_along_axis(logp, ids[1:, None].astype(np.int64), -1)[keep, 0].sum()
        count += int(keep.sum())
    assert meta.valid_tokens == count and meta.valid_loss == pytest.approx(nll / count, rel=1e-5)
    assert verify_store(out) == []
    info = summarize(out)
    assert info["trained_tokens"] == trained.sum() and info["tokens"] == trained.size
    assert main(["inspect", str(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("trained"))
    assert f"{trained.sum():,} tokens" in line and "bytes/trained token" in line


@pytest.mark.ray
def test_cache_refuses_a_store_of_another_mask(ray_local, teacher, datasets, tmp_path):
    """The same tokens with another loss mask are other data: resuming the store is refused."""
    data, docs = datasets["packed"]
    out = tmp_path / "s.zarr"
    cfg = dict(teacher=str(teacher), out=str(out), k=K, shard_rows=8, batch_rows=4, max_rows=8, quiet=True)
    run_cache(CacheConfig(data=str(data.path), **cfg))
    other = [(ids, np.r_[0, np.ones(len(ids) - 1, np.uint8)]) for ids, _ in docs]
    other_data = write(tmp_path / "other", Path(data.path), other, "documents")
    with pytest.raises(StoreError, match="data.mask_fingerprint"):
        run_cache(CacheConfig(data=str(other_data.path), **cfg))
