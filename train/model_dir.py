"""MODEL directories: Hugging Face format on disk, so transformers and vLLM load them unchanged.

A directory holds `config.json` (LlamaConfig fields; Qwen3 when QK-norm is on),
`model.safetensors` (the state dict under transformers' names), `tokenizer.json`,
`tokenizer_config.json` (the data's own when it has one, with its special tokens and chat
template, and `special_tokens_map.json` and `chat_template.jinja` when the data has those: so
`AutoTokenizer`'s `apply_chat_template` works on a student as on its teacher),
`generation_config.json` (the data's, else its bos, eos and pad ids), and `kdcache.json`
(`kdcache.storage.model_record`: the model config, N, the weights' fingerprint, how it was
trained). `kdcache.json` is written last, so its presence marks a complete directory.
Plain Hugging Face Llama directories without it load too, when their shape fits the family.

Loading hashes the weights and compares the fingerprint `kdcache.json` records: that
fingerprint is what a logit store names its teacher by, so a directory whose weights were
replaced (or damaged) under an old record would otherwise resume a store with another
teacher's targets. The hash costs about a second per 600 MB of weights on one core
(sha256, measured at 0.9 s for SmolLM2-135M's 540 MB float32 file), once per load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import GenerationConfig

from kdcache.storage.errors import StoreError
from kdcache.storage.model_record import (
    MODEL_RECORD,
    ModelRecord,
    check_model_files,
    read_model_record,
    remove_model_record,
    write_json,
    write_model_record,
)
from kdcache.storage.tokens.format import TOKENIZER_FILES
from kdcache.train.config import ModelConfig
from kdcache.train.errors import TrainError
from kdcache.train.model import Transformer

WEIGHTS = "model.safetensors"
SUPPORTED_TYPES = ("llama", "qwen3")
SPECIAL_IDS = ("bos", "eos", "pad")
"""The special tokens a generation config names by id."""


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A model read from a MODEL directory, in eval mode, float32."""

    model: Transformer
    config: ModelConfig
    path: Path
    fingerprint: str
    """sha256 of model.safetensors: identifies the teacher in a logit store."""
    record: ModelRecord | None = None
    """kdcache.json (None for a plain Hugging Face directory)."""

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def copy_tokenizer(tokenizer: Path, out: Path, *, eos_token_id: int | None = None) -> None:
    """Make `out` a drop-in model's tokenizer: tokenizer.json and the `TOKENIZER_FILES` beside it.

    Without a tokenizer_config.json there (a tokenizer `kdcache prepare` trained), write one that
    loads tokenizer.json as a fast tokenizer, naming the end-of-text token (`eos_token_id`) as its
    end and padding token. Without a generation_config.json there, write one naming the bos, eos
    and pad ids of the tokenizer config, so `generate` stops where the tokenizer ends a turn.
    Files a save wrote before (transformers' own generation config) are replaced: the data's
    tokenizer is the one the model was trained on.
    """
    shutil.copyfile(tokenizer, out / "tokenizer.json")
    for name in TOKENIZER_FILES:
        if (tokenizer.parent / name).is_file():
            shutil.copyfile(tokenizer.parent / name, out / name)
    config_path = out / TOKENIZER_FILES[0]
    if not (tokenizer.parent / TOKENIZER_FILES[0]).is_file():
        tok_cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        if eos_token_id is not None:
            eos = Tokenizer.from_file(str(tokenizer)).id_to_token(eos_token_id)
            if eos is not None:
                tok_cfg |= {"eos_token": eos, "pad_token": eos}
        write_json(config_path, tok_cfg)
    if not (tokenizer.parent / "generation_config.json").is_file():
        _write_generation_config(out, json.loads(config_path.read_text()))


def _write_generation_config(out: Path, tok_cfg: dict[str, Any]) -> None:
    vocab = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids: dict[str, int] = {}
    for name in SPECIAL_IDS:
        token = tok_cfg.get(f"{name}_token")
        content = token.get("content") if isinstance(token, dict) else token
        found = vocab.token_to_id(content) if isinstance(content, str) else None
        if found is not None:
            ids[f"{name}_token_id"] = found
    GenerationConfig(**ids).save_pretrained(str(out))


def save_model_dir(
    model: Transformer,
    out: str | os.PathLike[str],
    *,
    tokenizer: str | os.PathLike[str],
    eos_token_id: int | None = None,
    training: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> str:
    """Write `model` as a Hugging Face directory at `out`; returns the weights' fingerprint.

    `state` (default `model.state_dict()`) gives the weights, e.g. gathered from FSDP shards;
    `training` and `data` go into its record (`ModelRecord`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_model_record(out)  # the directory is incomplete until the end
    cfg = model.config
    state = {k: v.detach().cpu().float().contiguous()
             for k, v in (model.state_dict() if state is None else state).items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS)
    write_json(out / "config.json", cfg.hf_config(eos_token_id=eos_token_id))
    copy_tokenizer(Path(tokenizer), out, eos_token_id=eos_token_id)
    fingerprint = file_sha256(out / WEIGHTS)
    write_model_record(out, ModelRecord(
        fingerprint=fingerprint, nonembedding_params=cfg.non_embedding_params(), model=cfg.to_dict(),
        embedding_params=cfg.embedding_params(), training=training, data=data,
    ))
    return fingerprint


def _config_from_hf(hf: dict[str, Any], where: Path) -> ModelConfig:
    """Map a plain Hugging Face config onto the family, refusing what it cannot express."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise TrainError(f"{where}: field 'model_type' is {model_type!r}; supported: {SUPPORTED_TYPES}")
    layers, d, heads = (positive_size(hf, name, where) for name in ("num_hidden_layers", "hidden_size",
                                                             "num_attention_heads"))
    head_dim = positive_size(hf, "head_dim", where) if hf.get("head_dim") is not None else d // heads
    checks = {
        "num_key_value_heads": hf.get("num_key_value_heads", heads) == heads,
        "head_dim": head_dim * heads == d,
        "hidden_size": d % layers == 0,
        "tie_word_embeddings": not hf.get("tie_word_embeddings", False),
        "attention_bias": not hf.get("attention_bias", False),
        "mlp_bias": not hf.get("mlp_bias", False),
        "hidden_act": hf.get("hidden_act", "silu") == "silu",
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise TrainError(f"{where}: field '{bad[0]}' does not fit the kdcache model family")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise TrainError(f"{where}: field 'rope_parameters' uses scaling kdcache does not implement")
    cfg = ModelConfig(
        layers=layers,
        vocab_size=positive_size(hf, "vocab_size", where),
        rho=d // layers,
        head_dim=head_dim,
        qk_norm=model_type == "qwen3",
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position=int(hf.get("max_position_embeddings", 2048)),
    )
    if cfg.ffn_hidden != positive_size(hf, "intermediate_size", where):
        raise TrainError(f"{where}: field 'intermediate_size' is not the family's 8/3 ratio")
    return cfg


def positive_size(hf: dict[str, Any], name: str, where: str | os.PathLike[str]) -> int:
    """A config's size field, refusing anything but a positive integer, naming the field."""
    value = hf.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TrainError(f"{where}: field '{name}' is {value!r}; it must be a positive integer")
    return value


def load_model_dir(path: str | os.PathLike[str]) -> LoadedModel:
    """Read a MODEL directory (kdcache-trained, or a Hugging Face Llama that fits the family),
    refusing weights that differ from the fingerprint its record names."""
    path = Path(path)
    for name in ("config.json", WEIGHTS):
        if not (path / name).is_file():
            raise TrainError(f"{path}: missing {name} (not a model directory)")
    try:
        hf = check_model_files(path)
        record = read_model_record(path)
    except StoreError as exc:
        raise TrainError(str(exc)) from exc
    fingerprint = file_sha256(path / WEIGHTS)
    if record is not None and record.fingerprint != fingerprint:
        raise TrainError(
            f"{path / WEIGHTS}: sha256 {fingerprint[:16]}... does not match field 'fingerprint' "
            f"{record.fingerprint[:16]}... of {path / MODEL_RECORD}: the weights were replaced or damaged "
            "after the model was written")
    if record is not None and record.model is not None:
        cfg = ModelConfig.from_dict(record.model, where=str(path / MODEL_RECORD))
    else:  # a plain Hugging Face directory, or a Hugging Face student kdcache trained
        cfg = _config_from_hf(hf, path / "config.json")
    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise TrainError(f"{path / WEIGHTS}: unreadable weights ({exc})") from exc
    model = Transformer(cfg)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise TrainError(
            f"{path / WEIGHTS}: weights do not match config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(model.state_dict()[name].shape):
            raise TrainError(f"{path / WEIGHTS}: tensor '{name}' has shape {tuple(tensor.shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.eval()
    return LoadedModel(model=model, config=cfg, path=path, fingerprint=fingerprint, record=record)
