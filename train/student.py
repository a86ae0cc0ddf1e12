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
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from kdcache.storage.model_record import ModelRecord, remove_model_record, write_model_record
from kdcache.train.attention import document_attention_mask, needs_mask, packs_documents
from kdcache.train.errors import TrainError
from kdcache.train.model_dir import WEIGHTS, copy_tokenizer, file_sha256


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
    """A config.json as a dict, refusing a missing or broken file in one line."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: {flag} has no config file")
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path}: not a readable JSON config ({exc})") from exc
    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise TrainError(f"{path}: field 'model_type' is missing (not a transformers config)")
    return values


def load_hf_student(directory: str, *, vocab: int, data: str) -> HFStudent:
    """`--student DIR`: a local Hugging Face causal-LM directory, loaded with its weights, float32."""
    path = Path(directory)
    if not (path / "config.json").is_file():
        raise TrainError(f"{path}: --student has no config.json (not a Hugging Face model directory)")
    hf_config_file(path / "config.json", "--student")
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise TrainError(f"{path}: --student cannot be loaded by transformers ({_first_line(exc)})") from exc
    return _hf_student(lm, vocab, str(path / "config.json"), data)


def new_hf_student(config_file: str, *, vocab: int, data: str, seed: int) -> HFStudent:
    """`--student-config FILE.json`: any transformers config, initialised from `seed`."""
    values = hf_config_file(config_file, "--student-config")
    model_type = values.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **values)
        torch.manual_seed(seed)
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainError(f"{config_file}: --student-config is not a causal-LM config "
                         f"({_first_line(exc)})") from exc
    return _hf_student(lm, vocab, config_file, data)


def _hf_student(lm: Any, vocab: int, where: str, data: str) -> HFStudent:
    _refuse_unsupported_head(lm, where)
    _check_rows(lm, vocab, where, data)
    lm.config.use_cache = False
    return HFStudent(lm, vocab)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
