"""Chat and completion records to token ids and per-token loss masks, for `kdcache prepare`.

Rendering is transformers' own: the template goes through `render_jinja_template`, the
sandboxed Jinja environment `apply_chat_template` uses (its `tojson`, `raise_exception`,
`strftime_now`, compiled once per process and template by its cache), with the same
variables (`messages`, `add_generation_prompt`, the tokenizer's special-token strings),
and the text is tokenised with `add_special_tokens=False`. So a conversation's ids equal
`AutoTokenizer.apply_chat_template(messages, tokenize=True)`.

The mask trains exactly the text each assistant message adds: for assistant message i,
P = render(messages[:i], add_generation_prompt=True) ends with its role header and
S = render(messages[:i + 1]) ends with its content and end-of-turn marker, so the turn is
S[len(P):] less the whitespace after the marker (ChatML trains "content<|im_end|>", not
the "\\n" after it). This holds for any template that renders a conversation turn by turn;
a template that rewrites earlier turns once later ones follow (some reasoning templates
drop old thinking) breaks it, and such a record is refused rather than guessed. Characters
become tokens by the rule of transformers' `return_assistant_tokens_mask`: a token is
trained when any of its characters is, so a token straddling the header and the content
is trained rather than losing the content's first characters. The mask describes tokens:
mask[j] = 1 when token j is a trained target; a document's first token never is.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from transformers.utils.chat_template_utils import render_jinja_template

from kdcache.pipeline.errors import PipelineError

ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("all", "last")
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
Document = tuple[np.ndarray, np.ndarray]  # int32 token ids, uint8 loss mask (per token)


@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer's chat template, the special-token strings it may use, and the files a
    DATA directory carries so that a student saved from it renders chats the same way."""

    text: str
    special_tokens: dict[str, str]
    files: dict[str, bytes]  # name -> bytes: tokenizer_config.json as found, the template used

    @classmethod
    def find(cls, tokenizer_json: str | Path, override: str | None) -> ChatTemplate:
        """`override` (--chat-template), else chat_template.jinja beside the tokenizer, else
        `chat_template` in tokenizer_config.json beside it: the order transformers loads them."""
        where = Path(tokenizer_json).parent
        config_path = where / CONFIG_FILE
        raw = config_path.read_bytes() if config_path.is_file() else None
        config = json_object(config_path, raw) if raw is not None else {}
        text: str | None
        if override is not None:
            source, text = Path(override), _read_template(Path(override))
        elif (where / TEMPLATE_FILE).is_file():
            source, text = where / TEMPLATE_FILE, _read_template(where / TEMPLATE_FILE)
        else:
            source = config_path
            text = _config_template(config_path, config.get("chat_template"))
        if text is None:
            raise PipelineError(f"{tokenizer_json}: tokenizer has no chat template (neither {TEMPLATE_FILE} "
                                f"nor 'chat_template' in {CONFIG_FILE}): pass --chat-template FILE.jinja")
        files = {TEMPLATE_FILE: text.encode()} | ({CONFIG_FILE: raw} if raw is not None else {})
        template = cls(text=text, special_tokens=_special_tokens(config_path, config), files=files)
        try:
            template.render([], add_generation_prompt=False)  # compiles it, renders nothing
        except jinja2.TemplateSyntaxError as exc:
            raise PipelineError(f"{source}: not a valid Jinja chat template (line {exc.lineno}: "
                                f"{exc.message}) (field 'chat_template')") from exc
        return template

    def render(self, conversations: list[list[dict[str, Any]]], *, add_generation_prompt: bool) -> list[str]:
        """Each conversation rendered exactly as `apply_chat_template(tokenize=False)` renders it."""
        variables: dict[str, Any] = {**self.special_tokens, "add_generation_prompt": add_generation_prompt}
        # Annotated as returning str, it returns (rendered texts, generation indices).
        result: Any = render_jinja_template(conversations, chat_template=self.text, **variables)
        return list(result[0])

    def to_json(self) -> str:
        files = {name: base64.b64encode(data).decode() for name, data in self.files.items()}
        return json.dumps({"text": self.text, "special_tokens": self.special_tokens, "files": files})

    @classmethod
    def from_json(cls, s: str) -> ChatTemplate:
        """The template back from `to_json` (how Ray workers receive it)."""
        doc = json.loads(s)
        files = {name: base64.b64decode(data) for name, data in doc["files"].items()}
        return cls(text=doc["text"], special_tokens=dict(doc["special_tokens"]), files=files)


def json_object(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise PipelineError(f"{path}: not a JSON object")
    return doc


def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: cannot read the chat template ({exc}) (field 'chat_template')") from exc


def _config_template(path: Path, value: Any) -> str | None:
    """tokenizer_config.json's `chat_template`: a string, or a list of {name, template}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= set(t) for t in value):
        named = {t["name"]: t["template"] for t in value}
        if isinstance(named.get("default"), str):
            return str(named["default"])
        raise PipelineError(f"{path}: field 'chat_template' has no 'default' template (names: "
                            f"{', '.join(map(str, named))}); pass --chat-template FILE.jinja")
    raise PipelineError(f"{path}: field 'chat_template' is {type(value).__name__}, "
                        "not a string or a list of {name, template}")


def _special_tokens(path: Path, config: dict[str, Any]) -> dict[str, str]:
    """The strings transformers passes the template: the named special tokens (a string or
    a serialised AddedToken), other `*_token` strings (model-specific ones such as
    `image_token`, not flags such as `add_bos_token`) and a dict of `extra_special_tokens`."""
    tokens: dict[str, str] = {}
    for key in NAMED_TOKENS:
        value = _content(config.get(key))
        if value is not None and not isinstance(value, str):
            raise PipelineError(f"{path}: field '{key}' is not a string or a {{\"content\": ...}} object")
        if value is not None:
            tokens[key] = value
    extra = config.get("extra_special_tokens")
    others = {k: v for k, v in config.items() if k.endswith("_token") and k not in NAMED_TOKENS}
    others |= extra if isinstance(extra, dict) else {}
    return tokens | {k: v for k, v in ((k, _content(v)) for k, v in others.items()) if isinstance(v, str)}


def _content(value: Any) -> Any:
    return value.get("content") if isinstance(value, dict) else value


def encode_documents(tok: Any, template: ChatTemplate | None, fmt: str, records: Sequence[Any],
                     names: Sequence[str], *, train_on: str, eos: int | None,
                     column: str = "messages") -> list[Document]:
    """(int32 ids, uint8 mask) per record. `fmt` "chat": a record is its messages column's
    value (named `column` in errors); "completion": a (prompt, completion) pair of strings
    (ids of both, then `eos`; trained: the completion and `eos`) or of message lists
    (rendered as one conversation; trained: the completion's assistant turns); "text": a
    string (its ids, then `eos`; all trained but the first)."""
    if train_on not in TRAIN_ON:
        raise PipelineError(f"train_on is {train_on!r}; choose from {', '.join(TRAIN_ON)} (field 'train_on')")
    chats: dict[int, tuple[str, list[tuple[int, int]]]] = {}
    plain: dict[int, tuple[str, str, str]] = {}  # name, prompt, completion (or text)
    for i, (record, name) in enumerate(zip(records, names, strict=True)):
        if fmt == "chat":
            chats[i] = _chat_text(template, _messages(record, name, column), 0, name, column, train_on)
        elif fmt == "completion":
            _completion(template, record, name, train_on, i, chats, plain)
        elif fmt == "text":
            plain[i] = (name, "", _string(record, name, "text"))
        else:
            raise PipelineError(f"format is {fmt!r}; choose from chat, completion, text (field 'format')")
    out: dict[int, Document] = {}
    out |= _encode_chats(tok, chats)
    out |= _encode_plain(tok, plain, eos, completion=fmt == "completion")
    return [out[i] for i in range(len(records))]


def _completion(template: ChatTemplate | None, record: Any, name: str, train_on: str, i: int,
                chats: dict[int, tuple[str, list[tuple[int, int]]]],
                plain: dict[int, tuple[str, str, str]]) -> None:
    prompt, completion = record
    if isinstance(prompt, str) and isinstance(completion, str):
        plain[i] = (name, prompt, completion)
    elif isinstance(prompt, list | tuple) and isinstance(completion, list | tuple):
        head = _messages(prompt, name, "prompt", need_assistant=False)
        tail = _messages(completion, name, "completion")
        chats[i] = _chat_text(template, head + tail, len(head), name, "completion", train_on)
    else:
        for field, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str | list | tuple):
                raise PipelineError(f"{name}: field '{field}' is {type(value).__name__}, "
                                    "not a string or a list of messages")
        raise PipelineError(f"{name}: fields 'prompt' and 'completion' must both be strings "
                            "or both lists of messages")


def _string(value: Any, name: str, field: str) -> str:
    if not isinstance(value, str):
        raise PipelineError(f"{name}: field '{field}' is {type(value).__name__}, not a string")
    return value


def _messages(value: Any, name: str, field: str, *, need_assistant: bool = True) -> list[dict[str, Any]]:
    """The record's messages, checked: a list of {role, content} objects, known roles,
    string content, and (unless it is a prompt) at least one assistant turn."""
    if not isinstance(value, list | tuple):
        raise PipelineError(f"{name}: field '{field}' is {type(value).__name__}, "
                            "not a list of {role, content} objects")
    for j, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise PipelineError(f"{name}: field '{field}'[{j}] is not a {{role, content}} object")
        if message["role"] not in ROLES:
            raise PipelineError(f"{name}: field '{field}'[{j}].role is {message['role']!r}; "
                                f"known roles: {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise PipelineError(f"{name}: field '{field}'[{j}].content is "
                                f"{type(message['content']).__name__}, not a string")
    if need_assistant and not any(m["role"] == "assistant" for m in value):
        raise PipelineError(f"{name}: field '{field}' has no assistant turn to train on")
    return list(value)


def _chat_text(template: ChatTemplate | None, messages: list[dict[str, Any]], first: int, name: str,
               field: str, train_on: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained turns: the
    assistant messages from index `first` on (only the last of them for train_on "last")."""
    if template is None:
        raise PipelineError(f"{name}: field '{field}' holds messages, which need a chat template")
    turns = [i for i, m in enumerate(messages) if i >= first and m["role"] == "assistant"]
    turns = turns[-1:] if train_on == "last" else turns
    try:
        # A conversation ending on a trained turn is that turn's S: one render fewer.
        upto = [messages[: i + 1] for i in turns if i + 1 < len(messages)]
        full, *ends = template.render([messages, *upto], add_generation_prompt=False)
        ends += [full] * (len(turns) - len(ends))
        heads = template.render([messages[:i] for i in turns], add_generation_prompt=True)
    except jinja2.TemplateError as exc:  # raise_exception() in the template, or a missing variable
        raise PipelineError(f"{name}: the chat template refused field '{field}' ({exc})") from exc
    spans = []
    for i, head, end in zip(turns, heads, ends, strict=True):
        if not (end.startswith(head) and full.startswith(end)):
            why = "its header is not a prefix of it" if not end.startswith(head) else "later turns rewrite it"
            raise PipelineError(f"{name}: field '{field}'[{i}]: the chat template does not render assistant "
                                f"turns incrementally ({why}), so its trained tokens cannot be found")
        stop = len(end[len(head):].rstrip())
        if stop == 0:
            raise PipelineError(f"{name}: field '{field}'[{i}]: the chat template renders no text for it")
        spans.append((len(head), len(head) + stop))
    return full, spans


def _encode_chats(tok: Any, chats: dict[int, tuple[str, list[tuple[int, int]]]]) -> dict[int, Document]:
    keys = list(chats)
    encodings = tok.encode_batch([chats[k][0] for k in keys], add_special_tokens=False)
    out = {}
    for k, enc in zip(keys, encodings, strict=True):
        text, spans = chats[k]
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        out[k] = (np.asarray(enc.ids, dtype=np.int32), token_mask(offsets, spans, len(text)))
    return out


def token_mask(offsets: np.ndarray, spans: list[tuple[int, int]], n_chars: int) -> np.ndarray:
    """uint8 per token: 1 when any character of the token ([start, end) in `offsets`) lies in
    a trained span; a token of no characters counts when its position does. Token 0 is 0."""
    if n_chars == 0:
        return np.zeros(len(offsets), np.uint8)
    edges = np.zeros(n_chars + 1, np.int64)
    for a, b in spans:
        edges[a] += 1
        edges[b] -= 1
    trained = np.cumsum(edges)[:-1] > 0  # per character
    before = np.concatenate([[0], np.cumsum(trained)])  # trained characters before each place
    start, end = offsets[:, 0], offsets[:, 1]
    hit = (before[end] > before[start]) | ((end == start) & trained[np.minimum(start, n_chars - 1)])
    mask = hit.astype(np.uint8)
    mask[:1] = 0  # the first token has no position before it to predict it
    return mask


def _encode_plain(tok: Any, plain: dict[int, tuple[str, str, str]], eos: int | None, *,
                  completion: bool) -> dict[int, Document]:
    """Prompt ids, completion (or text) ids, then `eos`; trained from the completion on,
    never token 0. A completion with nothing to train is refused; a one-token text is not."""
    keys = list(plain)
    prompts = tok.encode_batch_fast([plain[k][1] for k in keys], add_special_tokens=False)
    bodies = tok.encode_batch_fast([plain[k][2] for k in keys], add_special_tokens=False)
    tail = [] if eos is None else [eos]
    out = {}
    for k, p, c in zip(keys, prompts, bodies, strict=True):
        ids = np.asarray(p.ids + c.ids + tail, dtype=np.int32)
        mask = np.zeros(len(ids), np.uint8)
        mask[max(len(p.ids), 1):] = 1
        if completion and not mask.any():
            raise PipelineError(f"{plain[k][0]}: field 'completion' leaves no token to train on")
        out[k] = (ids, mask)
    return out
