"""Students: kdcache's own model family, or any Hugging Face causal LM.

`kdcache train` trains one of three kinds of student, all behind one small interface
(`Student`): the final hidden states [B, T, d] and the output layer's weight [rows, d].
The losses project hidden states to logits in chunks of positions themselves (see
`losses.py`), so no student ever materialises [B, T, V] logits.

- the family (`--layers L`): kdcache's muP Llama (`model.py`), the default;
- `--student DIR`: a local Hugging Face directory, trained on from its weights;
- `--student-config FILE.json`: any `transformers` config, trained from scratch.

Rows that pack documents come with position ids (restarting at 0 per document): the
family turns them into RoPE positions and a block-diagonal mask itself; an HF student
gets them as `position_ids` plus the 4D additive mask (`attention.py`: `sdpa` and
`eager` need it), or the position ids alone under flash attention, which reads them.

A student's output layer may pad the tokenizer's vocabulary (Qwen rounds 151,646 ids
up to 151,936 rows): losses and evaluation read only the first `vocab` rows, the real
ids, so padded rows never receive probability mass or gradient. A student with fewer
input or output rows than the tokenizer is refused. Heads the hidden-state path cannot
express (a bias, a logit scale or soft-capping) are refused too, naming the field.

`params` (the runs table's N) is the non-embedding count for every kind: all
parameters but the input embedding and an untied output layer.

A Hugging Face student is checked before a byte of it is allocated, each refusal one line
naming the file and the field. Its config must fit the data: the size fields every
transformers config shares (`SIZE_FIELDS`, under an architecture's own names through its
`attribute_map`, e.g. GPT-2's `n_embd`) are positive integers, the vocabulary covers the
tokenizer's ids, the maximum positions cover a row, and the model, built first on the
`meta` device, fits the machine's memory in float32. A directory's files must be safe and
whole (`storage.model_record`: no `auto_map` custom code, safetensors only, headers that
parse), and its tokenizer.json, when it has one, must map every id of the data to the same
token, the rule the cache applies to a teacher: the saved student carries the data's
tokenizer, which would otherwise hide that it was pretrained on other ids. transformers is
always called with `trust_remote_code=False` and `use_safetensors=True`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from torch import Tensor, nn
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig

from kdcache.storage.errors import StoreError
from kdcache.storage.location import locate
from kdcache.storage.model_record import (
    ModelRecord,
    read_model_config,
    remove_model_record,
    weight_files,
    write_model_record,
)
from kdcache.storage.tokens.format import is_token_data, local_tokenizer, read_token_meta
from kdcache.storage.tokens.vocab import first_difference, token_ids
from kdcache.train.attention import document_attention_mask, needs_mask, packs_documents
from kdcache.train.errors import TrainError
from kdcache.train.model_dir import WEIGHTS, copy_tokenizer, file_sha256, positive_size

SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")
"""Size fields transformers' configs share; None (unset) is left to the architecture's default."""
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, StrictDataclassError, SafetensorError)
"""What transformers raises for a config or weights it cannot build a model from."""


class Student(nn.Module):
    """A trainable causal LM: `forward(input_ids, position_ids=None) -> hidden [B, T, d]`,
    `head() -> [rows, d]`.

    The wrapped model (`lm`) is a submodule, so DDP and FSDP wrap a `Student` (or a module
    holding one) as they would the model itself.
    """

    family: bool = False
    lm: Any  # a transformers model's attributes (config, base_model, ...) are dynamic

    def __init__(self, lm: nn.Module, vocab: int) -> None:
        super().__init__()
        self.lm = lm
        self.vocab = vocab

    def head(self) -> Tensor:
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        """Keep only each decoder block's input for backward, which reruns the block."""
        raise NotImplementedError

    def non_embedding_params(self) -> int:
        raise NotImplementedError


class FamilyStudent(Student):
    """kdcache's own model (`model.Transformer`): muP init and learning rates."""

    family = True

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        return self.lm.hidden_states(input_ids, position_ids)

    def head(self) -> Tensor:
        return self.lm.lm_head.weight

    def enable_gradient_checkpointing(self) -> None:
        self.lm.model.gradient_checkpointing = True

    def non_embedding_params(self) -> int:
        return int(self.lm.non_embedding_params())


class HFStudent(Student):
    """A `transformers` causal LM: hidden states from its base model, its output embeddings."""

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        mask = None
        if packs_documents(position_ids) and needs_mask(self.lm.config._attn_implementation):
            assert position_ids is not None
            mask = document_attention_mask(position_ids, self.head().dtype)
        out = self.lm.base_model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                                 use_cache=False)
        return out.last_hidden_state

    def head(self) -> Tensor:
        return self.lm.get_output_embeddings().weight

    def enable_gradient_checkpointing(self) -> None:
        # Non-reentrant: it works with frozen inputs (LoRA) and under DDP's and FSDP's hooks.
        self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def non_embedding_params(self) -> int:
        embed = self.lm.get_input_embeddings().weight
        out = self.lm.get_output_embeddings().weight
        skip = {id(embed), id(out)}
        return sum(p.numel() for p in self.lm.parameters() if id(p) not in skip)


def _refuse_unsupported_head(lm: Any, where: str) -> None:
    cfg = lm.config
    if getattr(cfg, "final_logit_softcapping", None):
        raise TrainError(f"{where}: field 'final_logit_softcapping' is set; kdcache's chunked losses "
                         "project hidden states with a plain linear head")
    if getattr(cfg, "logit_scale", 1.0) not in (None, 1.0):
        raise TrainError(f"{where}: field 'logit_scale' is {cfg.logit_scale}; kdcache's chunked losses "
                         "project hidden states with a plain linear head")
    out = lm.get_output_embeddings()
    if out is None or not isinstance(getattr(out, "weight", None), Tensor):
        raise TrainError(f"{where}: the model has no output embedding matrix (not a causal LM head)")
    if getattr(out, "bias", None) is not None:
        raise TrainError(f"{where}: the output layer has a bias, which the chunked losses do not apply")


def _check_rows(lm: Any, vocab: int, where: str, data: str) -> None:
    rows = {
        "vocab_size": int(getattr(lm.config, "vocab_size", 0) or 0),
        "input embedding rows": lm.get_input_embeddings().weight.shape[0],
        "output layer rows": lm.get_output_embeddings().weight.shape[0],
    }
    for name, n in rows.items():
        if n < vocab:
            field = f"field '{name}'" if name == "vocab_size" else name
            raise TrainError(f"{where}: {field} is {n}, smaller than the tokenizer's {vocab} ids ({data})")


def hf_config_file(path: str | os.PathLike[str], flag: str) -> dict[str, Any]:
    """A config.json as a dict, refusing a missing, broken or unsafe file, or size fields that
    are not positive integers, in one line."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: {flag} has no config file")
    try:
        values = read_model_config(path)
    except StoreError as exc:
        raise TrainError(str(exc)) from exc
    if not isinstance(values.get("model_type"), str):
        raise TrainError(f"{path}: field 'model_type' is missing (not a transformers config)")
    for key in _size_keys(values):
        if values[key] is not None:  # unset: the architecture's default
            positive_size(values, key, path)
    return values


def _size_keys(values: dict[str, Any]) -> list[str]:
    """The keys of `values` that set a `SIZE_FIELDS` entry, under either of its names."""
    aliases = _aliases(values["model_type"])
    return [key for name in SIZE_FIELDS for key in dict.fromkeys((name, aliases.get(name, name)))
            if key in values]


def _aliases(model_type: str) -> dict[str, str]:
    """An architecture's own names for the shared fields (`attribute_map`, e.g. GPT-2's n_embd)."""
    try:  # a lazy mapping: its `get` does not import the class
        cls = CONFIG_MAPPING[model_type]
    except KeyError:
        return {}
    return dict(getattr(cls, "attribute_map", None) or {})


def _field(values: dict[str, Any], name: str) -> str:
    """How the config file names the shared field `name` (or that it left it to the default)."""
    for key in (name, _aliases(values["model_type"]).get(name, name)):
        if key in values:
            return f"field '{key}'"
    return f"field '{name}' (its default)"


def load_hf_student(directory: str, *, vocab: int, data: str) -> HFStudent:
    """`--student DIR`: a local Hugging Face causal-LM directory, loaded with its weights, float32.
    `data` is the token data it trains on (its rows and tokenizer bound the student)."""
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise TrainError(f"{path}: --student has no config.json (not a Hugging Face model directory)")
    values = hf_config_file(path / "config.json", "--student")
    try:
        weight_files(path)
    except StoreError as exc:
        raise TrainError(str(exc)) from exc
    seq_len, tokenizer = _data_facts(data)
    if tokenizer is not None:
        check_student_tokenizer(path, tokenizer, vocab)
    where = str(path / "config.json")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except _LOAD_ERRORS as exc:
        raise TrainError(f"{where}: not a transformers config ({_one_line(exc)})") from exc
    _check_fits(config, values, vocab=vocab, seq_len=seq_len, where=where, data=data)
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=torch.float32,
                                                  local_files_only=True, trust_remote_code=False,
                                                  use_safetensors=True)
    except _LOAD_ERRORS as exc:
        raise TrainError(f"{path}: --student cannot be loaded by transformers ({_one_line(exc)})") from exc
    return _hf_student(lm, vocab, where, data)


def new_hf_student(config_file: str, *, vocab: int, data: str, seed: int) -> HFStudent:
    """`--student-config FILE.json`: any transformers config, initialised from `seed`."""
    values = hf_config_file(config_file, "--student-config")
    settings = {k: v for k, v in values.items() if k != "model_type"}
    try:
        config = AutoConfig.for_model(values["model_type"], **settings)
    except _LOAD_ERRORS as exc:
        raise TrainError(f"{config_file}: --student-config is not a causal-LM config "
                         f"({_one_line(exc)})") from exc
    seq_len, _ = _data_facts(data)
    _check_fits(config, values, vocab=vocab, seq_len=seq_len, where=config_file, data=data)
    try:
        torch.manual_seed(seed)
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    except _LOAD_ERRORS as exc:
        raise TrainError(f"{config_file}: --student-config is not a causal-LM config "
                         f"({_one_line(exc)})") from exc
    return _hf_student(lm, vocab, config_file, data)


def _data_facts(data: str) -> tuple[int | None, Path | None]:
    """The row length and tokenizer.json of the token data at `data` (None, None elsewhere)."""
    if not is_token_data(data):
        return None, None
    try:
        seq_len = int(read_token_meta(data)["seq_len"])
    except StoreError as exc:
        raise TrainError(str(exc)) from exc
    return seq_len, local_tokenizer(locate(data))


def _check_fits(config: PretrainedConfig, values: dict[str, Any], *, vocab: int, seq_len: int | None,
                where: str, data: str) -> None:
    """Refuse, before allocating it, a model that cannot train on the data or on this machine."""
    rows = getattr(config, "vocab_size", None)
    if isinstance(rows, int) and rows < vocab:
        raise TrainError(f"{where}: {_field(values, 'vocab_size')} is {rows}, smaller than the tokenizer's "
                         f"{vocab} ids ({data})")
    positions = getattr(config, "max_position_embeddings", None)
    if seq_len is not None and isinstance(positions, int) and positions < seq_len:
        raise TrainError(f"{where}: {_field(values, 'max_position_embeddings')} is {positions}, fewer "
                         f"positions than the data's rows of {seq_len} tokens ({data})")
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            shell = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except _LOAD_ERRORS as exc:
        raise TrainError(f"{where}: not a causal-LM config transformers can build "
                         f"({_one_line(exc)})") from exc
    need, memory = 4 * sum(p.numel() for p in shell.parameters()), _physical_memory()
    if memory is not None and need > memory:
        name, biggest = max(shell.named_parameters(), key=lambda item: item[1].numel())
        fields = ", ".join(f"{_field(values, f)} is {getattr(config, f)}" for f in SIZE_FIELDS
                           if getattr(config, f, None) == max(biggest.shape))
        raise TrainError(f"{where}: the model needs {need / 2**30:,.1f} GiB of float32 weights, more than "
                         f"this machine's {memory / 2**30:,.1f} GiB of memory ({fields or 'its shape'}: "
                         f"tensor '{name}' is {list(biggest.shape)})")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_student_tokenizer(directory: Path, data_tokenizer: Path, vocab: int) -> None:
    """Refuse a student whose tokenizer.json maps one of the data's `vocab` ids to another token
    than the data's tokenizer (`storage.tokens.vocab`, the rule the cache applies to a teacher);
    a directory without a tokenizer.json is not checked."""
    own = directory / "tokenizer.json"
    if not own.is_file():
        return
    differs = first_difference(_token_ids(own), _token_ids(data_tokenizer), vocab)
    if differs:
        raise TrainError(f"{own}: differs from the data's tokenizer ({data_tokenizer}) {differs}")


def _token_ids(path: Path) -> dict[str, str]:
    try:
        return token_ids(path.read_bytes())
    except (OSError, ValueError, AttributeError, KeyError, TypeError, IndexError) as exc:
        raise TrainError(f"{path}: not a readable tokenizer.json ({_one_line(exc)})") from exc


def _hf_student(lm: Any, vocab: int, where: str, data: str) -> HFStudent:
    _refuse_unsupported_head(lm, where)
    _check_rows(lm, vocab, where, data)
    lm.config.use_cache = False
    return HFStudent(lm, vocab)


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (strict config validation spreads it over two)."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines())
    return text or type(exc).__name__


def save_hf_student(
    student: HFStudent,
    state: dict[str, Tensor],
    out: Path,
    *,
    tokenizer: str | os.PathLike[str],
    training: dict[str, Any],
    data: dict[str, Any],
    eos_token_id: int | None = None,
    params: int | None = None,
    lora_save: str | None = None,
) -> str:
    """Write an HF student with `save_pretrained` (one safetensors file), its tokenizer (with
    the tokenizer config, chat template and generation config found beside `tokenizer`:
    `model_dir.copy_tokenizer`), then kdcache.json last (its presence marks the directory
    finished); returns the weights' fingerprint.

    A LoRA student (`lora.apply_lora`) is saved merged (`lora_save="merged"`: the adapters
    folded into the weights, a plain model of the student's class) or as peft's adapter
    directory over the pretrained student (`"adapter"`). `params` is the record's N (default:
    the student's own count, which for a LoRA student includes the adapters).
    """
    out.mkdir(parents=True, exist_ok=True)
    remove_model_record(out)
    if lora_save == "adapter":
        from kdcache.train.lora import ADAPTER_WEIGHTS, save_adapter

        save_adapter(student, state, out)
        weights = out / ADAPTER_WEIGHTS
    else:
        if lora_save == "merged":
            from kdcache.train.lora import lora_output_state

            state = lora_output_state(student, state)
        student.lm.save_pretrained(str(out), state_dict=state, safe_serialization=True,
                                   max_shard_size="1000GB")
        weights = out / WEIGHTS
    copy_tokenizer(Path(tokenizer), out, eos_token_id=eos_token_id)
    fingerprint = file_sha256(weights)
    write_model_record(out, ModelRecord(
        fingerprint=fingerprint,
        nonembedding_params=student.non_embedding_params() if params is None else params,
        student=type(student.lm).__name__, training=training, data=data,
    ))
    return fingerprint
