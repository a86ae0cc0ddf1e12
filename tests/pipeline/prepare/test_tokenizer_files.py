"""A given tokenizer's files travel into DATA for every format: text data prepared with a
teacher's tokenizer loads (AutoTokenizer) as the teacher's tokenizer does, byte for byte
the same files, read once so that a Ray run writes what a serial run writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from kdcache.pipeline.cli import main
from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.job import PrepareConfig, prepare
from kdcache.pipeline.prepare.tokenizer import train_tokenizer
from kdcache.pipeline.prepare.tokenizer_files import CARRIED

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "mu"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "alpha beta"}, {"role": "user", "content": "gamma delta?"},
                {"role": "assistant", "content": "epsilon zeta eta"}, {"role": "user", "content": "mu"}]


def documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(WORDS[j] for j in rng.integers(0, len(WORDS), 120)) for _ in range(n)]


def teacher_tokenizer(out: Path) -> Path:
    """A teacher's tokenizer directory as transformers saves one (tokenizer.json,
    tokenizer_config.json with special tokens, chat_template.jinja), plus the
    special_tokens_map.json older checkpoints carry and a generation_config.json."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    tok = train_tokenizer(documents(20, seed=1), 300, progress=False)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML, model_max_length=64)
    fast.save_pretrained(out)
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    GenerationConfig(bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                     pad_token_id=fast.pad_token_id).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return teacher_tokenizer(tmp_path_factory.mktemp("teacher") / "teacher")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(documents(30)):
        (root / f"{i:03d}.txt").write_text(text)
    return root


def _cfg(corpus: Path, out: Path, tokenizer: Path | str, **kw) -> PrepareConfig:
    return PrepareConfig(source=str(corpus), out=str(out), tokenizer=str(tokenizer), seq_len=16, quiet=True,
                         **kw)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_every_file_is_present_in_the_teacher(teacher_dir: Path) -> None:
    """The fixture holds every carried file, so the tests below cover each of them."""
    assert all((teacher_dir / name).is_file() for name in CARRIED)


def test_text_data_carries_the_tokenizer_files(teacher_dir: Path, corpus: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    prepare(_cfg(corpus, tmp_path / "d", teacher_dir / "tokenizer.json"))
    for name in CARRIED:
        assert (tmp_path / "d" / name).read_bytes() == (teacher_dir / name).read_bytes(), name
    # tokenizer.json is the same tokenizer, serialised compactly as the data's fingerprint hashes it.
    assert (tmp_path / "d" / "tokenizer.json").read_text() == Tokenizer.from_file(
        str(teacher_dir / "tokenizer.json")).to_str()
    ours, theirs = AutoTokenizer.from_pretrained(tmp_path / "d"), AutoTokenizer.from_pretrained(teacher_dir)
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.all_special_ids == theirs.all_special_ids
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    text = (corpus / "000.txt").read_text()
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    for prompt in (False, True):
        rendered = ours.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=prompt)
        assert rendered == theirs.apply_chat_template(CONVERSATION, tokenize=False,
                                                      add_generation_prompt=prompt)
        assert rendered.startswith("<|im_start|>system\nalpha beta<|im_end|>\n")
        ids = ours.apply_chat_template(CONVERSATION, add_generation_prompt=prompt)
        assert ids == theirs.apply_chat_template(CONVERSATION, add_generation_prompt=prompt)
    generation = GenerationConfig.from_pretrained(tmp_path / "d")
    assert generation.eos_token_id == theirs.eos_token_id == ours.eos_token_id


def test_a_model_directory_is_its_tokenizer_json(teacher_dir: Path, corpus: Path, tmp_path: Path) -> None:
    prepare(_cfg(corpus, tmp_path / "file", teacher_dir / "tokenizer.json"))
    prepare(_cfg(corpus, tmp_path / "dir", teacher_dir))
    assert _tree(tmp_path / "dir") == _tree(tmp_path / "file")


def test_only_the_files_present_travel(teacher_dir: Path, corpus: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(teacher_dir / "tokenizer.json", bare / "tokenizer.json")
    shutil.copy(teacher_dir / "generation_config.json", bare / "generation_config.json")
    prepare(_cfg(corpus, tmp_path / "d", bare))
    carried = sorted(p.name for p in (tmp_path / "d").iterdir() if p.is_file())
    assert carried == ["generation_config.json", "tokenizer.json", "zarr.json"]


def test_a_chat_template_flag_travels_with_text_data(teacher_dir: Path, corpus: Path, tmp_path: Path) -> None:
    override = tmp_path / "other.jinja"
    override.write_bytes(b"{% for m in messages %}[{{ m['content'] }}]{% endfor %}\r\n")
    prepare(_cfg(corpus, tmp_path / "d", teacher_dir, chat_template=str(override)))
    assert (tmp_path / "d" / "chat_template.jinja").read_bytes() == override.read_bytes()
    assert (tmp_path / "d" / "tokenizer_config.json").read_bytes() == (
        teacher_dir / "tokenizer_config.json").read_bytes()


@pytest.mark.parametrize("name", [n for n in CARRIED if n.endswith(".json")])
def test_a_broken_json_file_is_one_line(teacher_dir: Path, corpus: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], name: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(teacher_dir, broken)
    (broken / name).write_text('{"eos_token": "<|im_end|>",')
    out = tmp_path / "d"
    assert main(["prepare", "--source", str(corpus), "--out", str(out), "--tokenizer", str(broken),
                 "--seq-len", "16", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kdcache prepare: error: {broken / name}: not valid JSON")
    assert not out.exists() and not list(tmp_path.glob(".d.tmp-*"))
    with pytest.raises(PipelineError, match=f"{name}: not valid JSON"):
        prepare(_cfg(corpus, out, broken / "tokenizer.json"))


def test_a_directory_without_tokenizer_json(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match=r"empty: no tokenizer.json in the directory \(field 'tokenizer'"):
        _cfg(corpus, tmp_path / "d", tmp_path / "empty")


@pytest.mark.slow
@pytest.mark.ray
def test_ray_workers_write_the_same_files(teacher_dir: Path, corpus: Path, tmp_path: Path, ray_local) -> None:
    prepare(_cfg(corpus, tmp_path / "one", teacher_dir))
    prepare(_cfg(corpus, tmp_path / "two", teacher_dir, workers=2))
    assert _tree(tmp_path / "two") == _tree(tmp_path / "one")
    assert set(CARRIED) <= set(_tree(tmp_path / "two"))
