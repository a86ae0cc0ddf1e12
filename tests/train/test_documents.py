"""Documents stay apart in students: packed rows train exactly as the same documents one per row.

The proof runs in float64, where the only differences between a packed and an unpacked
step are summation order and the padding's zero terms: a sum of n terms reordered moves
by at most n * eps * sum |terms| (eps = 1.1e-16). The step losses here sum ~100-300
terms of size <= 10, so they agree to LOSS_RTOL = 1e-12 relative. AdamW (eps 1e-8)
moves a weight by lr * g / (|g| + 1e-8), whose slope in g is at most lr / 1e-8 = 3e5 at
lr 3e-3: a gradient that differs by ~1e-16 (its own rounding) moves a weight by ~3e-11
per step, so after STEPS = 4 the weights agree to PARAM_ATOL = 1e-9. A document that
leaked into another would move losses by ~1e-2 and weights by ~lr: each test also runs
the packed rows without document attention and checks that differs by far more.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import numpy as np
import pytest
import torch

from kdcache.storage.tokens.format import IGNORE_INDEX, Rows, TokenData
from kdcache.storage.tokens.writer import write_documents
from kdcache.train import document_attention_mask
from kdcache.train.attention import document_causal_mask, document_ids, needs_mask, packs_documents
from kdcache.train.batches import Batch, rows_to_batch
from kdcache.train.config import ModelConfig
from kdcache.train.evaluate import evaluate
from kdcache.train.kd_losses import DistillLoss
from kdcache.train.losses import NextTokenLoss
from kdcache.train.model import build_model
from kdcache.train.online import OnlineTeacherBatches
from kdcache.train.student import FamilyStudent, HFStudent
from kdcache.train.trainer import LoopConfig, Trainer
from tests.train.conftest import CHAT_EOS, CHAT_SEQ_LEN, CHAT_VOCAB, chat_splits, word_tokenizer

LOSS_RTOL, PARAM_ATOL = 1e-12, 1e-9
FORWARD_ATOL = 1e-12  # float64 hidden states of one document, packed or alone
# transformers' eager attention takes its softmax in float32 whatever the model's dtype, over
# rows of different lengths packed and alone (so summed in another order): eps = 6e-8 times
# <= 32 keys gives ~2e-6 on the attention weights, hence hidden states to 1e-5, step losses
# to 1e-6 relative and, through Adam's slope lr / 1e-8 on gradients a float32 rounding apart
# (~1e-7 relative of |g| ~ 1e-3), weights to 1e-6.
EAGER = {"forward": 1e-5, "loss": 1e-6, "param": 1e-6}
SDPA = {"forward": FORWARD_ATOL, "loss": LOSS_RTOL, "param": PARAM_ATOL}
# The family in float32, as `kdcache train` runs it: step losses to n * eps = 300 * 6e-8 ~ 2e-5
# relative; a weight moves by lr times its gradient's relative error (~2e-5: 6e-8 per step), or,
# with a gradient within Adam's eps of 0, by up to lr / 1e-8 times its absolute error (~1e-11
# here: 3e-6 per step); 4 steps stay under 1e-5, so 1e-4 (a leak moves weights by ~3e-2).
FLOAT32 = {"loss": 2e-5, "param": 1e-4}
STEPS, PACKED_ROWS = 4, 3


def test_the_mask_is_block_diagonal_and_causal() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    seg = document_ids(positions)
    assert seg.tolist() == [[1, 1, 1, 2, 2, 3, 3, 3], [1] * 8]
    mask = document_attention_mask(positions, torch.float64)
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.float64
    for b in range(2):
        for q in range(8):
            for k in range(8):
                allowed = k <= q and seg[b, q] == seg[b, k]
                assert mask[b, 0, q, k].item() == (0.0 if allowed else torch.finfo(torch.float64).min)
    assert torch.equal(document_causal_mask(positions), mask == 0)
    assert packs_documents(positions) and not packs_documents(positions[1:]) and not packs_documents(None)
    assert needs_mask("sdpa") and needs_mask("eager") and not needs_mask("flash_attention_2")


def _two_documents(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = (7, 9, 5)
    ids = torch.randint(0, CHAT_VOCAB, (1, sum(lengths)), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    bounds = np.cumsum((0, *lengths)).tolist()
    return ids, positions, [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _family(seed: int = 0) -> torch.nn.Module:
    cfg = ModelConfig(layers=2, vocab_size=CHAT_VOCAB, rho=32, head_dim=16, max_position=64)
    return build_model(cfg, seed=seed).double()


def _llama(attn: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=CHAT_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).double()


def test_the_family_runs_each_packed_document_as_if_alone() -> None:
    model = _family()
    ids, positions, docs = _two_documents()
    with torch.no_grad():
        packed = model.hidden_states(ids, positions)
        alone = torch.cat([model.hidden_states(ids[:, d]) for d in docs], 1)
        leaky = model.hidden_states(ids)
    assert (packed - alone).abs().max().item() < FORWARD_ATOL
    assert (leaky - alone).abs().max().item() > 1e-3  # the comparison has teeth


@pytest.mark.slow  # importing transformers takes seconds
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_an_hf_student_runs_each_packed_document_as_if_alone(attn: str) -> None:
    student = HFStudent(_llama(attn), CHAT_VOCAB)
    ids, positions, docs = _two_documents()
    with torch.no_grad():
        packed = student(ids, positions)
        alone = torch.cat([student(ids[:, d]) for d in docs], 1)
        positions_only = student.lm.base_model(input_ids=ids, position_ids=positions).last_hidden_state
    assert (packed - alone).abs().max().item() < (EAGER if attn == "eager" else SDPA)["forward"]
    # What the mask is for: with its default KV cache, transformers' attention ignores the
    # document boundaries that position ids alone imply.
    assert (positions_only - alone).abs().max().item() > 1e-3


# ---- packed == unpacked, step for step ----


class Listed:
    """A batch source over fixed batches, in order."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.at = batches, 0

    def next_batch(self) -> Batch:
        self.at += 1
        return self.batches[self.at - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"at": self.at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.at = int(state["at"])


def documents_per_row(rows: Rows) -> list[int]:
    """How many documents each packed row holds (padding is a segment with nothing trained)."""
    assert rows.position_ids is not None and rows.loss_mask is not None
    counts = []
    for positions, mask in zip(rows.position_ids, rows.loss_mask, strict=True):
        seg = np.cumsum(positions == 0)
        counts.append(sum(bool(mask[seg == s].any()) for s in np.unique(seg)))
    return counts


@pytest.fixture(scope="module")
def packed_and_unpacked(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Batch], list[Batch]]:
    """STEPS batches of PACKED_ROWS packed rows, and the same documents one per row."""
    docs = {"student": chat_splits()["student"][:60]}
    root = tmp_path_factory.mktemp("packing")
    data = {packing: write_documents(root / packing, word_tokenizer(), CHAT_SEQ_LEN, docs, packing=packing,
                                     eos_token_id=CHAT_EOS) for packing in ("documents", "none")}
    packed = data["documents"].read_rows("student", slice(0, STEPS * PACKED_ROWS))
    per_row = documents_per_row(packed)
    assert max(per_row) > 1  # rows really pack several documents
    first = np.cumsum([0, *per_row])[:: PACKED_ROWS]
    unpacked = data["none"].read_rows("student", slice(0, int(first[-1])))
    assert documents_per_row(unpacked) == [1] * int(first[-1])
    a = [rows_to_batch(_rows(packed, slice(i * PACKED_ROWS, (i + 1) * PACKED_ROWS))) for i in range(STEPS)]
    b = [rows_to_batch(_rows(unpacked, slice(int(first[i]), int(first[i + 1])))) for i in range(STEPS)]
    assert sum(y.inputs.shape[0] for y in b) > sum(x.inputs.shape[0] for x in a)
    for x, y in zip(a, b, strict=True):
        assert x.tokens == y.tokens
        assert sorted(x.targets[x.targets != IGNORE_INDEX].tolist()) == sorted(
            y.targets[y.targets != IGNORE_INDEX].tolist())
    return a, b


def _rows(rows: Rows, index: slice) -> Rows:
    assert rows.loss_mask is not None and rows.position_ids is not None
    return Rows(rows.tokens[index], rows.loss_mask[index], rows.position_ids[index])


def _train(model: torch.nn.Module, source: Any, loss: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
    result = Trainer(model, source, loss, LoopConfig(steps=STEPS), progress=False).run()
    return result.history, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _compare(a: tuple[list[float], dict], b: tuple[list[float], dict], leaky: tuple[list[float], dict],
             tolerance: dict[str, float] = SDPA) -> None:
    np.testing.assert_allclose(a[0], b[0], rtol=tolerance["loss"], atol=0)
    worst = max((a[1][k] - b[1][k]).abs().max().item() for k in a[1])
    assert worst < tolerance["param"], worst
    leak = max((leaky[1][k] - b[1][k]).abs().max().item() for k in b[1])
    assert leak > 1e-4 and abs(leaky[0][0] - b[0][0]) > 1e-4


def _no_documents(batches: list[Batch]) -> list[Batch]:
    return [Batch(x.inputs, x.targets, x.extras) for x in batches]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_family_trains_on_packed_rows_as_on_one_document_a_row(packed_and_unpacked: Any,
                                                                   dtype: torch.dtype) -> None:
    packed, unpacked = packed_and_unpacked
    runs = [_train(_family().to(dtype), Listed(batches), NextTokenLoss())
            for batches in (packed, unpacked, _no_documents(packed))]
    _compare(*runs, SDPA if dtype == torch.float64 else FLOAT32)


def test_online_distillation_keeps_documents_apart_in_the_teacher_too(packed_and_unpacked: Any) -> None:
    packed, unpacked = packed_and_unpacked
    teacher = _family(seed=5)
    loss = DistillLoss(kind="full", lam=0.5)

    def online(batches: list[Batch]) -> OnlineTeacherBatches:
        return OnlineTeacherBatches(Listed(batches), teacher, temperature=1.0, vocab=CHAT_VOCAB)  # type: ignore[arg-type]

    runs = [_train(_family(), online(batches), loss) for batches in (packed, unpacked, _no_documents(packed))]
    _compare(*runs)


@pytest.mark.slow  # importing transformers takes seconds
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_an_hf_student_trains_on_packed_rows_as_on_one_document_a_row(attn: str,
                                                                      packed_and_unpacked: Any) -> None:
    packed, unpacked = packed_and_unpacked
    first = _llama(attn)
    runs = [_train(HFStudent(copy.deepcopy(first), CHAT_VOCAB), Listed(batches), NextTokenLoss())
            for batches in (packed, unpacked, _no_documents(packed))]
    _compare(*runs, EAGER if attn == "eager" else SDPA)


# ---- evaluation ----


def test_evaluation_is_over_trained_tokens_with_documents_apart(chat_data: TokenData) -> None:
    """The valid loss equals each valid document's cross-entropy over its trained targets, run
    alone (float32 forward: 1e-5 relative covers its rounding; a leak moves it by ~1e-2)."""
    model = _family().float()
    got = evaluate(model, chat_data, batch_size=4)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for ids, mask in chat_splits()["valid"]:
            logits = model(torch.from_numpy(ids[None, :-1]).long()).double()
            logprobs = torch.log_softmax(logits[0], -1)
            trained = torch.from_numpy(mask[1:].astype(bool))
            nll -= logprobs[trained, torch.from_numpy(ids[1:]).long()[trained]].sum().item()
            tokens += int(trained.sum())
    assert got.tokens == tokens == chat_data.trained_tokens("valid")
    assert got.loss == pytest.approx(nll / tokens, rel=1e-5)
    assert 0 <= got.ece <= 1


def test_a_student_without_positions_is_the_old_causal_model(chat_data: TokenData) -> None:
    """Stream rows (no position ids) run plain causal attention, as before documents existed."""
    model = _family()
    ids = torch.randint(0, CHAT_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model.hidden_states(ids)
        counted = model.hidden_states(ids, torch.arange(12).repeat(2, 1))
    assert (plain - counted).abs().max().item() < FORWARD_ATOL
    assert FamilyStudent(model, CHAT_VOCAB)(ids).shape == (2, 12, model.config.d_model)
