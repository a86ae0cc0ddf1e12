"""Catalogue cases: Hugging Face students (`--student DIR`, `--student-config FILE`) and the
files of a teacher directory: each refused in one line naming the file and the field.

`_student` writes a tiny Llama directory, as `save_pretrained` writes one, with the data's
own tokenizer; each case then damages one thing about it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from tests.e2e.catalogue import CACHE, HF, SEQ_LEN, TRAIN, VOCAB, Case, _write

LLAMA = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64}
GPT2 = {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 16, "n_layer": 1, "n_head": 2,
        "n_positions": SEQ_LEN // 2, "bos_token_id": 0, "eos_token_id": 0}
AUTO_MAP = {"AutoConfig": "modeling_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
STUDENT = HF + " --student {w}/hf --out {w}/s"
CONFIG = HF + " --student-config {w}/c.json --out {w}/s"


def _config(**changes: object) -> Callable[[Path], None]:
    return _write("c.json", json.dumps({**LLAMA, **changes}))


def _student(w: Path) -> Path:
    """A tiny pretrained Llama at w/hf (safetensors weights, the data's tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in LLAMA.items() if k != "model_type"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **values))
    model.save_pretrained(str(w / "hf"))
    shutil.copyfile(w / "data" / "tokenizer.json", w / "hf" / "tokenizer.json")
    return w / "hf"


def _swapped_tokenizer(w: Path) -> None:
    """The student's tokenizer maps ids 7 and 8 to each other's tokens (pretrained on other ids)."""
    path = _student(w) / "tokenizer.json"
    doc = json.loads(path.read_text())
    vocab = doc["model"]["vocab"]
    a, b = (token for token, i in vocab.items() if i in (7, 8))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(doc))


def _truncated_weights(at: int) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        path = _student(w) / "model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: at if at >= 0 else len(data) + at])
    return apply


def _garbled_header(w: Path) -> None:
    path = _student(w) / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF  # inside the JSON header: no longer UTF-8
    path.write_bytes(bytes(data))


def _pickle_only(w: Path) -> None:
    """Only pytorch_model.bin: its bytes are never read, so these need not be a pickle at all."""
    student = _student(w)
    (student / "model.safetensors").unlink()
    (student / "pytorch_model.bin").write_bytes(b"\x80\x04not read")


def _student_config(**changes: object) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        path = _student(w) / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return apply


def _teacher_copy(w: Path) -> Path:
    shutil.copytree(w / "teacher", w / "t2")
    return w / "t2"


def _teacher_truncated(name: str) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        path = _teacher_copy(w) / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return apply


def _teacher_config(**changes: object) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        path = _teacher_copy(w) / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return apply


def _teacher_weights_replaced(w: Path) -> None:
    """The teacher's weights change under its kdcache.json (another teacher of the same shape)."""
    from safetensors.torch import load_file, save_file

    path = w / "teacher" / "model.safetensors"
    state = load_file(str(path))
    state["lm_head.weight"] = state["lm_head.weight"] * 0.5
    save_file(state, str(path), metadata={"format": "pt"})


T2 = CACHE.replace("{w}/teacher", "{w}/t2") + " --out {w}/s2.zarr"

CASES: list[Case] = [
    # 1. a student pretrained on other token ids
    Case("train-hf-student-other-tokenizer", STUDENT,
         r"hf/tokenizer.json: differs from the data's tokenizer \(.*data/tokenizer.json\) at id 7",
         _swapped_tokenizer),
    # 2. weights replaced under a recorded fingerprint: a resumed cache, an online teacher
    Case("cache-teacher-weights-replaced", CACHE + " --out {w}/store.zarr",
         r"teacher/model.safetensors: sha256 \S+ does not match field 'fingerprint' \S+ of .*kdcache.json",
         _teacher_weights_replaced),
    Case("train-hf-online-teacher-weights-replaced", TRAIN + " --out {w}/s --online-teacher {w}/teacher",
         r"teacher/model.safetensors: sha256 \S+ does not match field 'fingerprint'",
         _teacher_weights_replaced),
    # 3. config sizes, before anything is allocated
    Case("train-hf-config-negative-hidden", CONFIG, r"c.json: field 'hidden_size' is -16; it must be a pos",
         _config(hidden_size=-16)),
    Case("train-hf-config-string-hidden", CONFIG, r"c.json: field 'hidden_size' is '16'; it must be a pos",
         _config(hidden_size="16")),
    Case("train-hf-config-vocab-float", CONFIG, r"c.json: field 'vocab_size' is 1000000000000.0; it must be",
         _config(vocab_size=1e12)),
    Case("train-hf-config-vocab-huge", CONFIG,
         r"c.json: the model needs [\d,.]+ GiB of float32 weights, more than this machine's .*"
         r"field 'vocab_size' is 1000000000000", _config(vocab_size=10**12)),
    Case("train-hf-config-n-positions", CONFIG,
         rf"c.json: field 'n_positions' is {SEQ_LEN // 2}, fewer positions than the data's rows of {SEQ_LEN}",
         _write("c.json", json.dumps(GPT2))),
    Case("train-hf-student-max-positions", STUDENT,
         rf"hf/config.json: field 'max_position_embeddings' is 8, fewer positions than .* {SEQ_LEN} tokens",
         _student_config(max_position_embeddings=8)),
    # 4. truncated or garbled weights
    Case("train-hf-student-weights-empty", STUDENT, r"hf/model.safetensors: unreadable safetensors weights",
         _truncated_weights(0)),
    Case("train-hf-student-weights-in-header", STUDENT, r"hf/model.safetensors: unreadable safetensors",
         _truncated_weights(100)),
    Case("train-hf-student-weights-short", STUDENT, r"hf/model.safetensors: unreadable safetensors",
         _truncated_weights(-1)),
    Case("train-hf-student-weights-garbled", STUDENT, r"hf/model.safetensors: unreadable safetensors",
         _garbled_header),
    # 5. pickle
    Case("train-hf-student-pickle-only", STUDENT,
         r"hf/pytorch_model.bin: kdcache reads safetensors weights only, never pickle; convert",
         _pickle_only),
    # 6. custom code
    Case("train-hf-student-auto-map", STUDENT, r"hf/config.json: field 'auto_map' names custom model code",
         _student_config(auto_map=AUTO_MAP)),
    Case("train-hf-config-auto-map", CONFIG, r"c.json: field 'auto_map' names custom model code",
         _config(auto_map=AUTO_MAP)),
    Case("cache-teacher-auto-map", T2 + " --backend hf", r"t2/config.json: field 'auto_map' names custom",
         _teacher_config(auto_map=AUTO_MAP)),
    # 7. a teacher's truncated files, named
    Case("cache-teacher-config-truncated", T2 + " --backend hf", r"t2/config.json: unreadable JSON",
         _teacher_truncated("config.json")),
    Case("cache-teacher-config-truncated-native", T2, r"t2/config.json: unreadable JSON",
         _teacher_truncated("config.json")),
    Case("cache-teacher-record-truncated", T2, r"t2/kdcache.json: unreadable JSON",
         _teacher_truncated("kdcache.json")),
    Case("cache-teacher-weights-truncated", T2 + " --backend hf",
         r"t2/model.safetensors: unreadable safetensors weights, truncated or corrupt",
         _teacher_truncated("model.safetensors")),
]
