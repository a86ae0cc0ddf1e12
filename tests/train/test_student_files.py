"""A model directory's files, checked before they load: weights that no longer match their
recorded fingerprint, custom code (`auto_map`), pickled weights, truncated safetensors, a
student config that cannot fit the data or the machine, and a student pretrained on other
token ids. Each is refused in one line naming the file (and the field)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from kdcache.pipeline.cache.teachers import check_teacher_files, load_teacher
from kdcache.pipeline.errors import PipelineError
from kdcache.storage.errors import StoreError
from kdcache.storage.model_record import check_safetensors, read_model_record
from kdcache.storage.tokens.format import TokenData
from kdcache.train.config import ModelConfig
from kdcache.train.errors import TrainError
from kdcache.train.model import build_model
from kdcache.train.model_dir import WEIGHTS, file_sha256, load_model_dir, save_model_dir
from kdcache.train.student import check_student_tokenizer, load_hf_student, new_hf_student

LLAMA = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 2, "max_position_embeddings": 128}
GPT2 = {"model_type": "gpt2", "n_embd": 16, "n_layer": 1, "n_head": 2, "bos_token_id": 0, "eos_token_id": 0}
AUTO_MAP = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
CUSTOM_CODE = "from pathlib import Path\nPath(__file__).with_name('ran').touch()\n"
"""A repository's modeling file that leaves a mark when imported."""


@pytest.fixture
def family_dir(tmp_path: Path, tiny_data: TokenData) -> Path:
    model = build_model(ModelConfig(layers=1, vocab_size=tiny_data.vocab_size, rho=32, head_dim=16), seed=0)
    save_model_dir(model, tmp_path / "m", tokenizer=tiny_data.tokenizer_path)
    return tmp_path / "m"


@pytest.fixture
def hf_dir(tmp_path: Path, tiny_data: TokenData) -> Path:
    """A tiny pretrained Llama with the data's tokenizer, as `--student DIR` finds one."""
    values = {k: v for k, v in LLAMA.items() if k != "model_type"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=tiny_data.vocab_size,
                                                                  **values))
    model.save_pretrained(str(tmp_path / "hf"))
    shutil.copyfile(tiny_data.tokenizer_path, tmp_path / "hf" / "tokenizer.json")
    return tmp_path / "hf"


def _load(directory: Path, data: TokenData):
    return load_hf_student(str(directory), vocab=data.vocab_size, data=str(data.path))


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# --- weights against the recorded fingerprint ----------------------------------------------


def test_intact_weights_load_with_their_recorded_fingerprint(family_dir: Path) -> None:
    loaded = load_model_dir(family_dir)
    record = read_model_record(family_dir)
    assert record is not None
    assert loaded.fingerprint == file_sha256(family_dir / WEIGHTS) == record.fingerprint


def test_replaced_weights_are_refused_not_trusted(family_dir: Path, tmp_path: Path) -> None:
    """Another teacher of the same shape under the old kdcache.json: its record would name the
    first teacher's weights, and a resumed store would mix the two."""
    other = build_model(ModelConfig(layers=1, vocab_size=load_model_dir(family_dir).config.vocab_size, rho=32,
                                    head_dim=16), seed=1)
    save_model_dir(other, tmp_path / "other", tokenizer=family_dir / "tokenizer.json")
    shutil.copyfile(tmp_path / "other" / WEIGHTS, family_dir / WEIGHTS)
    match = rf"{family_dir / WEIGHTS}: sha256 \S+ does not match field 'fingerprint' \S+ of .*kdcache.json"
    with pytest.raises(TrainError, match=match):
        load_model_dir(family_dir)
    with pytest.raises(PipelineError, match=match):  # the cache's native backend, in each worker
        load_teacher("native", str(family_dir))


def test_a_flipped_byte_in_the_tensors_is_caught_by_the_hash(family_dir: Path) -> None:
    """The header still parses (safetensors cannot tell): only the hash sees the damage."""
    raw = bytearray((family_dir / WEIGHTS).read_bytes())
    raw[-5] ^= 0x01
    (family_dir / WEIGHTS).write_bytes(bytes(raw))
    check_safetensors(family_dir / WEIGHTS)
    with pytest.raises(TrainError, match="does not match field 'fingerprint'"):
        load_model_dir(family_dir)


# --- truncated and garbled safetensors --------------------------------------------------


def _offsets(path: Path) -> list[int]:
    """Cuts at every part of the format: the 8-byte length, the JSON header, the tensor bytes."""
    size, header = path.stat().st_size, 8 + int.from_bytes(path.read_bytes()[:8], "little")
    return [0, 4, 8, 20, header - 1, header, header + 10, size // 2, size - 1]


def test_truncated_safetensors_are_refused_at_every_offset(family_dir: Path, hf_dir: Path,
                                                           tiny_data: TokenData) -> None:
    for directory, load in ((family_dir, load_model_dir), (hf_dir, lambda d: _load(d, tiny_data))):
        whole = (directory / WEIGHTS).read_bytes()
        for cut in _offsets(directory / WEIGHTS):
            (directory / WEIGHTS).write_bytes(whole[:cut])
            with pytest.raises(StoreError, match=rf"{directory / WEIGHTS}: unreadable safetensors weights"):
                check_safetensors(directory / WEIGHTS)
            with pytest.raises(TrainError, match=rf"{directory / WEIGHTS}: unreadable safetensors weights"):
                load(directory)
            with pytest.raises(PipelineError, match=rf"{directory / WEIGHTS}: unreadable safetensors"):
                check_teacher_files(str(directory))
        (directory / WEIGHTS).write_bytes(whole)
        load(directory)  # whole again: it loads


def test_a_garbled_header_is_refused(hf_dir: Path, tiny_data: TokenData) -> None:
    raw = bytearray((hf_dir / WEIGHTS).read_bytes())
    raw[20] ^= 0xFF
    (hf_dir / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(TrainError, match=r"model.safetensors: unreadable safetensors weights.*UTF-8"):
        _load(hf_dir, tiny_data)


# --- pickle and custom code -------------------------------------------------------------


def test_pickled_weights_are_refused_unread(hf_dir: Path, tiny_data: TokenData) -> None:
    (hf_dir / WEIGHTS).unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle: an unpickler would fail on it")
    match = r"pytorch_model.bin: kdcache reads safetensors weights only, never pickle; convert it"
    with pytest.raises(TrainError, match=match):
        _load(hf_dir, tiny_data)
    with pytest.raises(PipelineError, match=match):
        check_teacher_files(str(hf_dir))


def test_pickled_weights_beside_safetensors_are_never_read(hf_dir: Path, tiny_data: TokenData) -> None:
    """use_safetensors=True: transformers reads model.safetensors and leaves the .bin alone."""
    (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle")
    saved = load_file(str(hf_dir / WEIGHTS))
    loaded = _load(hf_dir, tiny_data).lm.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in saved.items())


def _with_custom_code(directory: Path) -> Path:
    (directory / "custom.py").write_text(CUSTOM_CODE)
    _edit_json(directory / "config.json", auto_map=AUTO_MAP)
    return directory / "ran"


def test_custom_code_is_refused_and_never_runs(hf_dir: Path, family_dir: Path, tiny_data: TokenData,
                                               tmp_path: Path) -> None:
    ran = _with_custom_code(hf_dir)
    match = r"config.json: field 'auto_map' names custom model code \(AutoConfig=custom.Config"
    with pytest.raises(TrainError, match=match):
        _load(hf_dir, tiny_data)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({**LLAMA, "vocab_size": tiny_data.vocab_size, "auto_map": AUTO_MAP}))
    with pytest.raises(TrainError, match=rf"{config}: field 'auto_map'"):
        new_hf_student(str(config), vocab=tiny_data.vocab_size, data=str(tiny_data.path), seed=0)
    teacher_ran = _with_custom_code(family_dir)
    for backend in ("native", "hf", "vllm"):
        with pytest.raises(PipelineError, match=rf"{family_dir}/config.json: field 'auto_map'"):
            load_teacher(backend, str(family_dir))
    assert not ran.exists() and not teacher_ran.exists()


# --- a teacher's files, before any worker -----------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "kdcache.json"])
def test_a_teacher_with_a_truncated_json_file_is_named(family_dir: Path, name: str) -> None:
    raw = (family_dir / name).read_bytes()
    (family_dir / name).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PipelineError, match=rf"{family_dir / name}: unreadable JSON \(.*line \d+ column \d+"):
        check_teacher_files(str(family_dir))


# --- a student config that cannot fit -------------------------------------------------


@pytest.mark.parametrize(("changes", "match"), [
    ({"hidden_size": -16}, r"field 'hidden_size' is -16; it must be a positive integer"),
    ({"hidden_size": "16"}, r"field 'hidden_size' is '16'; it must be a positive integer"),
    ({"num_hidden_layers": True}, r"field 'num_hidden_layers' is True; it must be a positive integer"),
    ({"vocab_size": 1e12}, r"field 'vocab_size' is 1000000000000.0; it must be a positive integer"),
    ({"vocab_size": 10**12}, r"the model needs [\d,.]+ GiB of float32 weights, more than this machine's "
                             r"[\d,.]+ GiB of memory \(field 'vocab_size' is 1000000000000: tensor"),
    ({"vocab_size": 100}, r"field 'vocab_size' is 100, smaller than the tokenizer's 512 ids"),
    ({"max_position_embeddings": 32}, r"field 'max_position_embeddings' is 32, fewer positions than the "
                                      r"data's rows of 64 tokens"),
    ({**GPT2, "n_positions": 32}, r"field 'n_positions' is 32, fewer positions"),
    ({**GPT2, "n_embd": 0}, r"field 'n_embd' is 0; it must be a positive integer"),
])
def test_a_config_that_cannot_fit_is_refused_before_allocation(tmp_path: Path, tiny_data: TokenData,
                                                               changes: dict, match: str) -> None:
    config = tmp_path / "c.json"
    base = GPT2 if changes.get("model_type") == "gpt2" else LLAMA
    config.write_text(json.dumps({**base, "vocab_size": tiny_data.vocab_size, **changes}))
    with pytest.raises(TrainError, match=rf"^{config}: {match}"):
        new_hf_student(str(config), vocab=tiny_data.vocab_size, data=str(tiny_data.path), seed=0)


def test_the_default_positions_are_named_as_the_default(tmp_path: Path, tiny_data: TokenData) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({**GPT2, "vocab_size": tiny_data.vocab_size}))
    student = new_hf_student(str(config), vocab=tiny_data.vocab_size, data=str(tiny_data.path), seed=0)
    assert student.lm.config.max_position_embeddings == 1024  # GPT-2's default covers 64 tokens


def test_a_student_directory_config_is_checked_too(hf_dir: Path, tiny_data: TokenData) -> None:
    _edit_json(hf_dir / "config.json", max_position_embeddings=16)
    with pytest.raises(TrainError, match=rf"{hf_dir}/config.json: field 'max_position_embeddings' is 16"):
        _load(hf_dir, tiny_data)


# --- a student pretrained on other token ids -------------------------------------------


def _tokenizer_with(path: Path, swap: tuple[int, int] | None = None, extra: int = 0) -> None:
    doc = json.loads(path.read_text())
    vocab = doc["model"]["vocab"]
    if swap:
        a, b = (token for token, i in vocab.items() if i in swap)
        vocab[a], vocab[b] = vocab[b], vocab[a]
    top = max(vocab.values()) + 1 + len(doc.get("added_tokens", []))
    vocab.update({f"<extra{i}>": top + i for i in range(extra)})
    path.write_text(json.dumps(doc))


def test_a_student_tokenizer_with_other_ids_is_refused(hf_dir: Path, tiny_data: TokenData) -> None:
    _tokenizer_with(hf_dir / "tokenizer.json", swap=(40, 41))
    match = (rf"{hf_dir}/tokenizer.json: differs from the data's tokenizer \({tiny_data.tokenizer_path}\) "
             r"at id 40: ")
    with pytest.raises(TrainError, match=match):
        _load(hf_dir, tiny_data)


def test_a_student_tokenizer_with_more_ids_is_accepted(hf_dir: Path, tiny_data: TokenData) -> None:
    """Ids past the data's are never seen (a padded vocabulary, or tokens the data does not use)."""
    _tokenizer_with(hf_dir / "tokenizer.json", extra=3)
    check_student_tokenizer(hf_dir, tiny_data.tokenizer_path, tiny_data.vocab_size)
    (hf_dir / "tokenizer.json").unlink()  # none at all: nothing to compare, as for a teacher
    check_student_tokenizer(hf_dir, tiny_data.tokenizer_path, tiny_data.vocab_size)


def test_an_unreadable_student_tokenizer_is_named(hf_dir: Path, tiny_data: TokenData) -> None:
    raw = (hf_dir / "tokenizer.json").read_bytes()
    (hf_dir / "tokenizer.json").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TrainError, match=rf"{hf_dir}/tokenizer.json: not a readable tokenizer.json"):
        _load(hf_dir, tiny_data)


def test_weights_saved_by_the_family_survive_a_round_trip(family_dir: Path) -> None:
    """Loading changes nothing on disk, and the loaded tensors are the saved ones."""
    before = (family_dir / WEIGHTS).read_bytes()
    state = load_model_dir(family_dir).model.state_dict()
    assert (family_dir / WEIGHTS).read_bytes() == before
    saved = load_file(str(family_dir / WEIGHTS))
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    save_file(saved, str(family_dir / "copy.safetensors"))  # another valid shard beside it passes
    check_teacher_files(str(family_dir))
