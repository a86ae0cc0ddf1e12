"""Hugging Face Hub ids (`kdcache.hub`), offline, against a cache this module writes in the
layout huggingface_hub documents (`models--owner--name/refs/main` holding a commit hash,
`snapshots/<commit>/<file>` linking into `blobs/`) with real files: a tiny Llama saved by
transformers with a tokenizer, and a parquet dataset.

huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, when first imported: the
command line runs in a subprocess with them in its environment, and in-process calls (the
quick checks) see the module's constants set as that import would have set them. Nothing here reaches a
network: offline mode, or a Hub endpoint on a closed local port.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from kdcache.errors import HubError
from kdcache.hub import is_hub_id, resolve_dataset, resolve_model, resolve_tokenizer
from kdcache.pipeline.cli import main
from kdcache.pipeline.prepare.tokenizer_files import CARRIED
from tests.pipeline.prepare.test_tokenizer_files import documents, teacher_tokenizer

ROOT = Path(__file__).resolve().parents[1]
MAIN, TAGGED = hashlib.sha1(b"main").hexdigest(), hashlib.sha1(b"v1").hexdigest()
MODEL, CORPUS = "own/tiny", "own/corpus"


def publish(cache: Path, repo_type: str, repo: str, files: dict[str, bytes], commit: str,
            ref: str = "main") -> Path:
    """Put `files` (path in the repository -> bytes) in the cache as a download leaves them."""
    folder = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    for name, body in files.items():
        blob = folder / "blobs" / hashlib.sha256(body).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(body)
        link = folder / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return folder / "snapshots" / commit


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf")
    source = teacher_tokenizer(root / "source")
    vocab = Tokenizer.from_file(str(source / "tokenizer.json")).get_vocab_size()
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(source)
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    cache = root / "hub"
    publish(cache, "model", MODEL, files, MAIN)
    publish(cache, "model", MODEL, files, TAGGED, ref="v1")
    pickled = {"config.json": files["config.json"], "pytorch_model.bin": b"x"}
    publish(cache, "model", "own/pickled", pickled, MAIN)
    table = pa.table({"text": documents(60, seed=2), "id": np.arange(60)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=25)
    publish(cache, "dataset", CORPUS, {"data/train-00000-of-00001.parquet": sink.getvalue().to_pybytes(),
                                       "README.md": b"# corpus\n"}, MAIN)
    publish(cache, "dataset", "own/csv", {"README.md": b"# csv\n", "train.csv": b"text\nhello\n"}, MAIN)
    return cache


@pytest.fixture
def offline(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    for name, value in _env(cache).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _env(cache: Path, offline: bool = True) -> dict[str, str]:
    return {"HF_HOME": str(cache.parent / "home"), "HF_HUB_CACHE": str(cache),
            "HF_HUB_OFFLINE": "1" if offline else "0"}


def _snapshot(cache: Path, repo: str, commit: str = MAIN, kind: str = "models") -> str:
    return str(cache / f"{kind}--{repo.replace('/', '--')}" / "snapshots" / commit)


def _kdcache(cache: Path, *argv: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **_env(cache)}
    return subprocess.run([sys.executable, "-m", "kdcache.pipeline.cli", *argv], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout, check=False)


def test_what_reads_as_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    for ref in ("own/tiny", "Own-1/ti_ny.v2", "own/tiny@main", f"own/tiny@{MAIN}", "own/tiny@refs/pr/1"):
        assert is_hub_id(ref), ref
    for ref in ("models/tiny", "stdlib", "stdlib-chat", "tiny", "a/b/c", "/abs/path", "own/ti--ny",
                "own/tiny@", "data/*.parquet", "own/.tiny", "", "~/own/tiny"):
        assert not is_hub_id(ref), ref


def test_ids_resolve_to_their_snapshots(offline: Path, tmp_path: Path) -> None:
    snapshot = _snapshot(offline, MODEL)
    assert resolve_model(MODEL, "--teacher") == snapshot
    assert resolve_model(f"{MODEL}@main", "--teacher") == snapshot
    assert resolve_model(f"{MODEL}@{MAIN}", "--teacher") == snapshot
    assert resolve_model(f"{MODEL}@v1", "--teacher") == _snapshot(offline, MODEL, TAGGED)
    assert resolve_tokenizer(MODEL, "--tokenizer") == f"{snapshot}/tokenizer.json"
    assert resolve_dataset(CORPUS, "--source") == _snapshot(offline, CORPUS, kind="datasets")


def test_local_paths_stay_as_given(offline: Path, tmp_path: Path) -> None:
    model = Path(_snapshot(offline, MODEL))
    assert resolve_model(str(model), "--teacher") == str(model)
    assert resolve_tokenizer(str(model), "--tokenizer") == str(model / "tokenizer.json")
    assert resolve_tokenizer(str(model / "tokenizer.json"), "--tokenizer") == str(model / "tokenizer.json")
    for ref in ("stdlib", "stdlib-chat", f"{tmp_path}/*.txt", str(tmp_path / "missing")):
        assert resolve_dataset(ref, "--source") == ref


def test_refused_ids_are_one_line(offline: Path, tmp_path: Path) -> None:
    cases = [
        (lambda: resolve_model("own/missing", "--teacher"),
         f"--teacher own/missing: no such local path, and the Hugging Face model is not in the cache at "
         f"{offline} (HF_HUB_OFFLINE=1); set HF_HUB_OFFLINE=0 with a network, or fetch it with "
         "`hf download own/missing`"),
        (lambda: resolve_dataset("own/missing@v2", "--source"),
         "fetch it with `hf download own/missing --repo-type dataset --revision v2`"),
        (lambda: resolve_model(f"{MODEL}@v9", "--student"), f"--student {MODEL}@v9: no such local path"),
        (lambda: resolve_model("own/pickled", "--teacher"),
         "--teacher own/pickled: the repository has no *.safetensors weights (kdcache never loads *.bin "
         "pickles)"),
        (lambda: resolve_dataset("own/csv", "--source"),
         "--source own/csv: the Hugging Face dataset has no .parquet, .jsonl, .arrow files"),
        (lambda: resolve_model(str(tmp_path / "none"), "--teacher"),
         f"{tmp_path / 'none'}: no such file or directory (--teacher), and not a Hugging Face Hub id"),
        (lambda: resolve_tokenizer(str(tmp_path), "--tokenizer"),
         f"{tmp_path}: no tokenizer.json in the directory (--tokenizer)"),
    ]
    for call, message in cases:
        with pytest.raises(HubError) as caught:
            call()
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_an_unreachable_hub_falls_back_to_the_cache(cache: Path) -> None:
    """Online mode with no Hub to reach (a closed local port): the cached snapshot, or one line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import json; from kdcache.hub import resolve_model\n"
            f"found = resolve_model({MODEL!r}, '--teacher')\n"
            "try:\n    resolve_model('own/missing', '--teacher')\n"
            "except Exception as exc:\n    print(json.dumps([found, type(exc).__name__, str(exc)]))\n")
    env = {**os.environ, **_env(cache, offline=False), "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found, kind, message = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == _snapshot(cache, MODEL) and kind == "HubError"
    assert message.startswith("--teacher own/missing: no such local path, and the Hugging Face model is not "
                              f"in the cache at {cache} (the Hub cannot be reached: ")


@pytest.mark.slow
def test_prepare_from_hub_ids(cache: Path, tmp_path: Path) -> None:
    from kdcache.storage.tokens.format import open_token_data, sha256_parts

    out = tmp_path / "data"
    proc = _kdcache(cache, "prepare", "--source", CORPUS, "--tokenizer", MODEL, "--out", str(out),
                    "--seq-len", "16", "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not proc.stderr  # nothing fetched, nothing said about it
    assert json.loads(proc.stdout)["documents"] == 60  # the parquet's records; README.md is no document
    data = open_token_data(out)
    snapshot = Path(_snapshot(cache, MODEL))
    assert data.meta["source"] == CORPUS
    assert data.tokenizer_fingerprint == sha256_parts(
        Tokenizer.from_file(str(snapshot / "tokenizer.json")).to_str().encode())
    for name in CARRIED:
        assert (out / name).read_bytes() == (snapshot / name).read_bytes()


@pytest.mark.parametrize("argv", [
    ["prepare", "--source", "own/missing"],
    ["prepare", "--tokenizer", "own/missing"],
    ["prepare", "--source", CORPUS, "--tokenizer", "own/missing"],
    ["cache", "--teacher", "own/missing", "--data", "{data}"],
])
def test_a_missing_id_offline_is_one_line_and_writes_nothing(offline: Path, tmp_path: Path, argv: list[str],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").mkdir()
    out = tmp_path / "out"
    assert main([*(a.format(data=tmp_path / "data") for a in argv), "--out", str(out), "--quiet"]) == 1
    flag = argv[argv.index("own/missing") - 1]
    kind, option = ("dataset", " --repo-type dataset") if flag == "--source" else ("model", "")
    assert capsys.readouterr().err.strip().splitlines() == [
        f"kdcache {argv[0]}: error: {flag} own/missing: no such local path, and the Hugging Face {kind} is "
        f"not in the cache at {offline} (HF_HUB_OFFLINE=1); set HF_HUB_OFFLINE=0 with a network, or fetch it "
        f"with `hf download own/missing{option}`"]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.slow
@pytest.mark.ray
def test_cache_runs_a_hub_teacher(cache: Path, tmp_path: Path) -> None:
    from kdcache.pipeline.cache.teachers.hf import weights_fingerprint
    from kdcache.storage import StoreReader, verify_store

    data, store = tmp_path / "data", tmp_path / "topk"
    proc = _kdcache(cache, "prepare", "--source", CORPUS, "--tokenizer", MODEL, "--out", str(data),
                    "--seq-len", "16", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _kdcache(cache, "cache", "--teacher", MODEL, "--backend", "hf", "--data", str(data),
                    "--out", str(store), "--k", "8", "--shard-rows", "16", "--max-rows", "32", "--quiet",
                    timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert verify_store(store) == []
    meta = StoreReader(store).meta
    assert meta.complete and meta.rows == 32 and meta.k == 8
    assert meta.teacher.fingerprint == weights_fingerprint(Path(_snapshot(cache, MODEL)))


@pytest.mark.slow
def test_a_hub_student_fine_tunes_into_a_drop_in_model(offline: Path, tmp_path: Path, capsys) -> None:
    """`--student owner/name` from the cache; the output carries the teacher's tokenizer files, so
    `AutoTokenizer` gives the teacher's ids, special tokens and chat template."""
    from transformers import AutoTokenizer, GenerationConfig

    data, out = tmp_path / "data", tmp_path / "student"
    assert main(["prepare", "--source", CORPUS, "--tokenizer", MODEL, "--out", str(data), "--seq-len", "16",
                 "--quiet"]) == 0
    assert main(["train", "--data", str(data), "--student", MODEL, "--max-steps", "2", "--batch-size", "4",
                 "--out", str(out), "--threads", "1"]) == 0
    assert "fine-tuning defaults (pretrained --student)" in capsys.readouterr().err
    snapshot = Path(_snapshot(offline, MODEL))
    teacher, student = AutoTokenizer.from_pretrained(snapshot), AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x  # ünïcode"
    assert student(text)["input_ids"] == teacher(text)["input_ids"]
    assert student.special_tokens_map == teacher.special_tokens_map
    assert (student.eos_token_id, student.pad_token_id) == (teacher.eos_token_id, teacher.pad_token_id)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert student.chat_template == teacher.chat_template
    assert student.apply_chat_template(chat) == teacher.apply_chat_template(chat)
    assert (GenerationConfig.from_pretrained(out).to_dict()
            == GenerationConfig.from_pretrained(snapshot).to_dict())
    record = json.loads((out / "kdcache.json").read_text())
    assert record["training"]["recipe"]["lr"] == 2e-5 and record["training"]["steps"] == 2
