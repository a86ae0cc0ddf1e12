"""`kdcache prepare` on chat, completion and document-packed text: whole documents per row,
masks on the assistant's tokens only, every record source, Ray and serial alike.

The tokenizer is a small BPE trained here with ChatML's markers as special tokens and a
ChatML template beside it (the layout of a Hugging Face tokenizer directory), so these
tests run in seconds; the real SmolLM2 tokenizer and template are checked token for token
against `transformers` in test_chat.py.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.job import PrepareConfig, prepare
from kdcache.storage.tokens.format import open_token_data
from kdcache.storage.tokens.verify import verify_token_data

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()  # noqa: SIM905


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def _conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "You are terse."}] if i % 3 == 0 else []
        for _ in range(1 + i % 2):
            messages.append({"role": "user", "content": f"q{i} " + _sentence(rng, 4)})
            messages.append({"role": "assistant", "content": f"a{i} " + _sentence(rng, 6)})
        out.append(messages)
    return out


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chattok")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [m["content"] for c in _conversations(200, seed=9) for m in c] + ["user assistant system"] * 20
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(root / "tokenizer.json"))
    config = {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>",
              "pad_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root / "tokenizer.json"


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cfg(source: Path | str, out: Path, tokenizer: Path, **kw) -> PrepareConfig:
    kw = {"format": "chat", "seq_len": 95, **kw}
    return PrepareConfig(source=str(source), out=str(out), tokenizer=str(tokenizer), quiet=True, **kw)


def _segments(positions: np.ndarray) -> list[tuple[int, int]]:
    starts = [*np.flatnonzero(positions == 0).tolist(), len(positions)]
    return list(itertools.pairwise(starts))


def test_chat_rows_hold_whole_conversations_and_train_only_the_assistant(chat_tokenizer: Path,
                                                                          tmp_path: Path) -> None:
    convs = _conversations(120)
    source = _jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    result = prepare(_cfg(source, tmp_path / "d", chat_tokenizer))
    data = open_token_data(tmp_path / "d")
    assert (data.format, data.packing, data.documents) == ("chat", "documents", True)
    assert result.dropped == 0 and result.documents == len(convs)
    tok = Tokenizer.from_file(str(chat_tokenizer))
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    seen_docs, answers = 0, set()
    for split in ("teacher", "student", "valid"):
        rows = data.read_rows(split, slice(None))
        assert rows.loss_mask is not None and rows.position_ids is not None
        for tokens, mask, pos in zip(rows.tokens, rows.loss_mask, rows.position_ids, strict=True):
            for lo, hi in _segments(pos):
                doc = tokens[lo:hi].tolist()
                if not mask[lo:hi].any():  # padding: never trained
                    assert lo > 0 and all(t == data.eos_token_id for t in doc)
                    continue
                seen_docs += 1
                assert doc[0] == start and doc[-2] == end  # whole: ChatML opens and closes each turn
                text = tok.decode(doc, skip_special_tokens=False)
                trained = tok.decode([t for t, m in zip(doc, mask[lo:hi], strict=True) if m],
                                     skip_special_tokens=False)
                # Exactly the assistant turns, each closed by its end-of-turn token.
                want = "".join(m["content"] + "<|im_end|>" for m in _conv_of(text, convs)
                               if m["role"] == "assistant")
                assert trained == want
                answers.add(trained)
    assert seen_docs == len(convs) and len(answers) == len(convs)
    assert sum(result.trained_tokens.values()) == sum(data.trained_tokens(s) for s in data.meta["splits"])
    assert verify_token_data(tmp_path / "d") == []


def _conv_of(text: str, convs: list[list[dict[str, str]]]) -> list[dict[str, str]]:
    marker = text.split("q", 1)[1].split(" ", 1)[0]  # every user turn starts "q<i> "
    return convs[int(marker)]


def test_train_on_last_and_packing_none(chat_tokenizer: Path, tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in _conversations(60)])
    prepare(_cfg(source, tmp_path / "all", chat_tokenizer))
    prepare(_cfg(source, tmp_path / "last", chat_tokenizer, train_on="last", packing="none"))
    every, last = open_token_data(tmp_path / "all"), open_token_data(tmp_path / "last")
    assert last.packing == "none"
    rows = last.read_rows("student", slice(None))
    assert rows.position_ids is not None and rows.loss_mask is not None
    for pos in rows.position_ids:
        assert len(_segments(pos)) <= 2  # one conversation, then its padding
    # Two-turn conversations lose their first answer: fewer trained tokens, same documents.
    assert sum(last.trained_tokens(s) for s in ["teacher", "student", "valid"]) < sum(
        every.trained_tokens(s) for s in ["teacher", "student", "valid"])
    assert every.mask_fingerprint("student") != last.mask_fingerprint("student")


def test_overlong_conversations_are_dropped_or_cut_never_split(chat_tokenizer: Path, tmp_path: Path) -> None:
    convs = _conversations(40)
    convs[5] = convs[5] + [{"role": "user", "content": "more " * 80}, {"role": "assistant", "content": "ok"}]
    source = _jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    dropped = prepare(_cfg(source, tmp_path / "drop", chat_tokenizer))
    cut = prepare(_cfg(source, tmp_path / "cut", chat_tokenizer, overlong="truncate"))
    assert (dropped.dropped, dropped.truncated, dropped.documents) == (1, 0, 40)
    assert (cut.dropped, cut.truncated) == (0, 1)
    splits = open_token_data(tmp_path / "cut").meta["splits"]
    assert sum(info["truncated"] for info in splits.values()) == 1


def test_every_record_source_and_ray_give_the_same_bytes(chat_tokenizer: Path, tmp_path: Path,
                                                         ray_local) -> None:
    convs = _conversations(80)
    jsonl = _jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    table = pa.table({"messages": convs})
    pq.write_table(table, tmp_path / "chat.parquet", row_group_size=30)
    with pa.OSFile(str(tmp_path / "chat.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    documents, prints = [], set()
    for name, source, workers in (("j", jsonl, 1), ("p", tmp_path / "chat.parquet", 1),
                                  ("a", tmp_path / "chat.arrow", 1), ("r", jsonl, 2)):
        out = tmp_path / f"d-{name}"
        prepare(_cfg(source, out, chat_tokenizer, workers=workers))
        data = open_token_data(out)
        docs = []
        for split in data.meta["splits"]:
            rows = data.read_rows(split, slice(None))
            assert rows.position_ids is not None and rows.loss_mask is not None
            for tokens, mask, pos in zip(rows.tokens, rows.loss_mask, rows.position_ids, strict=True):
                docs += [(tuple(tokens[lo:hi]), tuple(mask[lo:hi])) for lo, hi in _segments(pos)
                         if mask[lo:hi].any()]
        documents.append(sorted(docs))
        if name in ("j", "r"):
            prints.add(data.fingerprint)  # the same file: one process or Ray, the same bytes
    # A document's split hangs on its file's name, so the formats differ in which split holds
    # a conversation, never in its tokens or mask.
    assert len(documents[0]) == len(convs) and all(d == documents[0] for d in documents)
    assert len(prints) == 1


def test_completion_trains_the_completion_and_its_end(chat_tokenizer: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    records = [{"prompt": f"p{i} " + _sentence(rng, 5), "completion": " c" + _sentence(rng, 4)}
               for i in range(50)]
    source = _jsonl(tmp_path / "c.jsonl", records)
    prepare(_cfg(source, tmp_path / "d", chat_tokenizer, format="completion"))
    data = open_token_data(tmp_path / "d")
    tok = Tokenizer.from_file(str(chat_tokenizer))
    completions = {r["completion"] for r in records}
    rows = data.read_rows("teacher", slice(None))
    assert rows.loss_mask is not None and rows.position_ids is not None
    for tokens, mask, pos in zip(rows.tokens, rows.loss_mask, rows.position_ids, strict=True):
        for lo, hi in _segments(pos):
            trained = [t for t, m in zip(tokens[lo:hi], mask[lo:hi], strict=True) if m]
            if trained:
                assert trained[-1] == tok.token_to_id("<|endoftext|>")
                assert tok.decode(trained[:-1]) in completions


def test_text_packed_by_document(tmp_path: Path) -> None:
    root = tmp_path / "txt"
    root.mkdir()
    for i in range(60):
        (root / f"{i}.txt").write_text(f"document {i} " + "words and more words " * (i % 7 + 4))
    stream = prepare(PrepareConfig(source=str(root), out=str(tmp_path / "s"), vocab_size=300, seq_len=63,
                                   quiet=True))
    docs = prepare(PrepareConfig(source=str(root), out=str(tmp_path / "d"), vocab_size=300, seq_len=63,
                                 quiet=True, packing="documents"))
    s, d = open_token_data(tmp_path / "s"), open_token_data(tmp_path / "d")
    assert not s.documents and d.documents and s.read_rows("teacher", slice(None)).loss_mask is None
    assert docs.documents == stream.documents == 60
    rows = d.read_rows("teacher", slice(None))
    assert rows.position_ids is not None and rows.loss_mask is not None
    eos = d.eos_token_id
    for tokens, mask, pos in zip(rows.tokens, rows.loss_mask, rows.position_ids, strict=True):
        for lo, hi in _segments(pos):
            if mask[lo:hi].any():  # a document: every token but its first trained, ends with eos
                assert mask[lo] == 0 and mask[lo + 1 : hi].all() and tokens[hi - 1] == eos


def test_stdlib_chat_corpus(chat_tokenizer: Path, tmp_path: Path) -> None:
    result = prepare(_cfg("stdlib-chat", tmp_path / "d", chat_tokenizer, max_tokens=20_000, seq_len=255))
    data = open_token_data(tmp_path / "d")
    assert result.documents > 10 and 0 < sum(result.trained_tokens.values()) < sum(result.tokens.values())
    assert data.meta["source"] == "stdlib-chat" and (tmp_path / "d" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize(("records", "match"), [
    ([{"text": "hi"}], r"chat.jsonl:1: missing column 'messages'"),
    ([{"messages": "hi"}], r"chat.jsonl#0"),
    ([{"messages": [{"role": "bot", "content": "x"}]}], r"chat.jsonl#0.*bot"),
    ([{"messages": [{"role": "user", "content": 3}]}], r"chat.jsonl#0.*content"),
    ([{"messages": [{"role": "user", "content": "x"}]}], r"chat.jsonl#0.*assistant"),
])
def test_bad_chat_records(chat_tokenizer: Path, tmp_path: Path, records: list[dict], match: str) -> None:
    source = _jsonl(tmp_path / "chat.jsonl", records)
    with pytest.raises(PipelineError, match=match):
        prepare(_cfg(source, tmp_path / "d", chat_tokenizer))
    assert not (tmp_path / "d").exists()


def test_refused_settings(chat_tokenizer: Path, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain text")
    with pytest.raises(PipelineError, match=r"a.txt: a text file, but --format chat"):
        prepare(_cfg(tmp_path / "a.txt", tmp_path / "d", chat_tokenizer))
    with pytest.raises(PipelineError, match=r"--format chat needs --tokenizer"):
        PrepareConfig(out=str(tmp_path / "d"), format="chat")
    with pytest.raises(PipelineError, match=r"--packing stream would cut chat documents"):
        _cfg(tmp_path / "a.txt", tmp_path / "d", chat_tokenizer, packing="stream")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes(chat_tokenizer.read_bytes())
    source = _jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in _conversations(3)])
    with pytest.raises(PipelineError, match=r"bare.*chat.template"):
        prepare(_cfg(source, tmp_path / "d", bare / "tokenizer.json"))
    assert not (tmp_path / "d").exists()
