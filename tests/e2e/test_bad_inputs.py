"""A catalogue of bad inputs and detected faults across the verbs.

Each case gets its own copy of a small world (token data, a teacher, a cache built by
the real job, a runs table, a sweep file), optionally damages it, runs one command and
asserts three things: exit status 1, one line on stderr that says what is wrong, and
not one file of the world added, removed or changed. The README reports the count per
verb from `CASES`: the cases below, then each area's `cases_<area>.py`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdcache.pipeline.cli import main
from kdcache.storage.runs import RunRow, append_run
from tests.e2e import cases_distributed, cases_prepare, cases_runs, cases_storage, cases_students
from tests.e2e.catalogue import (
    _FIT_AT_BOUND,
    _HELD,
    CACHE,
    CHAT,
    CHATML,
    COST,
    HF,
    LAW,
    SEQ_LEN,
    TRAIN,
    VOCAB,
    Case,
    _append,
    _bad_tokenizer_config,
    _break_split_json,
    _chat,
    _delete_shard_file,
    _edit_json,
    _edit_store,
    _flip,
    _flip_token_chunk,
    _hold_lock,
    _parquet,
    _store_shard_file,
    _sweep,
    _uncommit_but_complete,
    _write,
)
from tests.pipeline.conftest import make_teacher
from tests.storage.conftest import tree_digest

torch.set_num_threads(1)

CASES = [
    # prepare
    Case("prepare-empty-source", "prepare --source {w}/empty --out {w}/d2 --vocab-size 300 --quiet",
         r"source is empty", _write("empty/a.txt", "")),
    Case("prepare-vocab-too-small", "prepare --out {w}/d2 --vocab-size 100",
         r"--vocab-size 100 is too small"),
    Case("prepare-seq-len", "prepare --out {w}/d2 --seq-len 1", r"--seq-len 1 must be at least 2"),
    Case("prepare-out-exists", "prepare --out {w}/data --vocab-size 300 --quiet", r"output already exists"),
    Case("prepare-fractions", "prepare --out {w}/d2 --teacher-frac 0.5 --student-frac 0.5 --valid-frac 0.5",
         r"must be positive and sum to 1"),
    Case("prepare-no-tokenizer", "prepare --out {w}/d2 --tokenizer {w}/nope.json",
         r"nope.json: no such tokenizer"),
    Case("prepare-non-utf8", "prepare --source {w}/bin --out {w}/d2 --vocab-size 300 --quiet",
         r"bin/a.txt.*UTF-8", _write("bin/a.txt", b"\xff\xfe\xfa not text")),
    Case("prepare-no-text-column", "prepare --source {w}/c.jsonl --out {w}/d2 --vocab-size 300 --quiet",
         r"c.jsonl.*'text'", _write("c.jsonl", '{"body": "x"}\n')),
    Case("prepare-out-below-file", "prepare --out {w}/afile/d2 --vocab-size 300 --quiet",
         r"afile", _write("afile", "x")),
    Case("prepare-bad-flag-type", "prepare --out {w}/d2 --seq-len many",
         r"--seq-len: expected int, got many"),
    Case("prepare-record-not-utf8", "prepare --source {w}/r.jsonl --out {w}/d2 --vocab-size 300 --quiet",
         r"r.jsonl:2: record is not UTF-8", _write("r.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')),
    Case("prepare-column-wrong-type", "prepare --source {w}/t.jsonl --out {w}/d2 --vocab-size 300 --quiet",
         r"t.jsonl:1: column 'text' is list, not a string", _write("t.jsonl", '{"text": ["a"]}\n')),
    Case("prepare-parquet-column", "prepare --source {w}/p.parquet --out {w}/d2 --vocab-size 300 --quiet",
         r"p.parquet: column 'text' is int64, not a string column", _parquet("p.parquet", {"text": [1, 2]})),
    Case("prepare-datasets-no-info", "prepare --source {w}/ds --out {w}/d2 --vocab-size 300 --quiet",
         r"ds: a datasets save_to_disk directory without dataset_info.json",
         _write("ds/state.json", '{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')),
    Case("prepare-workers", "prepare --out {w}/d2 --workers 0", r"--workers must be >= 1"),
    Case("prepare-chat-no-messages", CHAT, r"chat.jsonl:1: missing column 'messages'", _chat({"text": "hi"})),
    Case("prepare-chat-not-a-list", CHAT, r"chat.jsonl#0: field 'messages'", _chat({"messages": "hi"})),
    Case("prepare-chat-unknown-role", CHAT, r"chat.jsonl#0: field 'messages'\[0\].role is 'bot'",
         _chat({"messages": [{"role": "bot", "content": "x"}]})),
    Case("prepare-chat-content-type", CHAT, r"chat.jsonl#0: field 'messages'\[0\].content",
         _chat({"messages": [{"role": "user", "content": 3}]})),
    Case("prepare-chat-no-assistant", CHAT, r"chat.jsonl#0: .*no assistant",
         _chat({"messages": [{"role": "user", "content": "x"}]})),
    Case("prepare-chat-no-template", CHAT.replace("chattok/", "data/"),
         r"data/tokenizer.json: .*chat template",
         _chat({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})),
    Case("prepare-chat-text-source", CHAT.replace("chat.jsonl", "a.txt"),
         r"a.txt: a text file, but --format chat",
         _write("a.txt", "plain text")),
    # train
    Case("train-no-data", TRAIN.replace("{w}/data", "{w}/nodata") + " --out {w}/s",
         r"nodata: not a token data"),
    Case("train-bad-split", TRAIN + " --out {w}/s --split valid", r"--split must be one of"),
    Case("train-distill-and-online",
         TRAIN + " --out {w}/s --distill {w}/store.zarr --online-teacher {w}/teacher",
         r"--distill and --online-teacher exclude each other"),
    Case("train-lambda", TRAIN + " --out {w}/s --lambda 2", r"--lambda must lie in \[0, 1\]"),
    Case("train-layers-type", TRAIN.replace("--layers 1", "--layers x") + " --out {w}/s",
         r"--layers: expected int or null, got x"),
    Case("train-unknown-flag", TRAIN + " --out {w}/s --lern-rate 3", r"unrecognized arguments: --lern-rate"),
    Case("train-config-broken", TRAIN + " --out {w}/s --config {w}/c.yaml", r"c.yaml: not valid YAML",
         _write("c.yaml", "lr: [1\n")),
    Case("train-config-unknown-key", TRAIN + " --out {w}/s --config {w}/c.yaml", r"c.yaml: .*'lern_rate'",
         _write("c.yaml", "lern_rate: 1\n")),
    Case("train-out-is-file", TRAIN + " --out {w}/afile", r"afile.*file", _write("afile", "x")),
    Case("train-out-finished", TRAIN + " --out {w}/teacher", r"teacher: already holds a finished model"),
    Case("train-no-online-teacher", TRAIN + " --out {w}/s --online-teacher {w}/noteacher", r"noteacher"),
    Case("train-missing-store-file", TRAIN + " --out {w}/s --distill {w}/store.zarr",
         r"store.zarr: shard 1 array 'ids': shard file is missing", _delete_shard_file("ids")),
    Case("train-missing-counts-free-file", TRAIN + " --out {w}/s --distill {w}/store.zarr",
         r"shard 1 array 'tail_logmass': shard file is missing", _delete_shard_file("tail_logmass")),
    Case("train-edited-temperature", TRAIN + " --out {w}/s --distill {w}/store.zarr",
         r"written under other metadata", _edit_store(temperature=2.0)),
    Case("train-edited-k", TRAIN + " --out {w}/s --distill {w}/store.zarr",
         r"array 'ids': shape .* does not match", _edit_store(k=4)),
    Case("train-edited-rows", TRAIN + " --out {w}/s --distill {w}/store.zarr",
         r"array 'tokens': shape .* does not match", _edit_store(**{"data.rows": 99})),
    Case("train-edited-teacher-loss", TRAIN + " --out {w}/s --distill {w}/store.zarr",
         r"field 'teacher_loss' is -1.0 but the ledger", _edit_store(teacher_loss=-1.0)),
    Case("train-complete-but-uncommitted", TRAIN + " --out {w}/s --distill {w}/store.zarr",
         r"field 'complete' is true but only", _uncommit_but_complete),
    Case("train-store-k-not-int", TRAIN + " --out {w}/s --distill {w}/store.zarr",
         r"field 'k' must be an integer, got 8.5", _edit_store(k=8.5)),
    Case("train-store-temperature-mismatch", TRAIN + " --out {w}/s --distill {w}/store.zarr --temperature 2",
         r"--temperature 2.0: field 'temperatures': the store holds targets at 1.0 and no other "
         r"temperature, not at 2.0"),
    Case("train-token-chunk-flipped", TRAIN + " --out {w}/s", r"data.*student.*rows", _flip_token_chunk),
    Case("train-split-json-broken", TRAIN + " --out {w}/s", r"student/zarr.json", _break_split_json),
    # cache
    Case("cache-no-config", CACHE.replace("{w}/teacher", "{w}/empty") + " --out {w}/s2.zarr",
         r"empty: missing config.json", _write("empty/.keep", "")),
    Case("cache-other-vocab", CACHE.replace("{w}/teacher", "{w}/teacher-v256") + " --out {w}/s2.zarr",
         r"output layer has 256 rows, fewer than the data.s tokenizer vocabulary 300"),
    Case("cache-bad-split", CACHE + " --out {w}/s2.zarr --split nosplit", r"no split 'nosplit'"),
    Case("cache-k-zero", CACHE + " --out {w}/s2.zarr --k 0", r"field 'k' must be >= 1"),
    Case("cache-kind", CACHE + " --out {w}/s2.zarr --kind best", r"--kind: .*best"),
    Case("cache-other-settings", CACHE.replace("--k 8", "--k 4") + " --out {w}/store.zarr",
         r"store was made with different settings .*k: 8 != 4"),
    Case("cache-out-is-file", CACHE + " --out {w}/afile", r"afile: --out is a file", _write("afile", "x")),
    Case("cache-out-below-file", CACHE + " --out {w}/afile/s.zarr", r"lies below .*afile, which is a file",
         _write("afile", "x")),
    Case("cache-draws", CACHE + " --out {w}/s2.zarr --kind sampled --draws 300", r"'draws' must be <= 255"),
    Case("cache-vllm-full", CACHE + " --out {w}/s2.zarr --backend vllm --kind full",
         r"vllm backend caches kind=topk"),
    Case("cache-temperature", CACHE + " --out {w}/s2.zarr --temperature 0", r"'temperature' must be > 0"),
    Case("cache-lossy-values-not-topk", CACHE + " --out {w}/s2.zarr --kind full --values sqrt8",
         r"field 'values' is 'sqrt8', but only --kind topk has a lossy mode"),
    Case("cache-values-unknown", CACHE + " --out {w}/s2.zarr --values sqrt4", r"--values: .*sqrt4"),
    Case("cache-temperatures-repeat", CACHE + " --out {w}/s2.zarr --temperatures [2,2]",
         r"field 'temperatures' must hold distinct values > 0 other than 'temperature'"),
    Case("cache-split-json-broken", CACHE + " --out {w}/s2.zarr", r"student/zarr.json", _break_split_json),
    Case("cache-broken-store", CACHE + " --out {w}/store.zarr", r"store.zarr: attribute 'kdcache': field 'k'",
         _edit_store(k="eight")),
    # inspect, verify
    Case("inspect-not-a-store", "inspect {w}/data", r"data: not a kdcache store|attribute 'kdcache'"),
    Case("inspect-missing-file", "inspect {w}/store.zarr", r"store.zarr: damaged \(1 problem",
         _delete_shard_file("logprobs")),
    Case("verify-a-file", "verify {w}/afile", r"afile: is a file", _write("afile", "x")),
    Case("verify-edited-k", "verify {w}/store.zarr", r"0 bad shard\(s\) \[\], 3 store problem",
         _edit_store(k=4)),
    Case("verify-flipped-byte", "verify {w}/store.zarr", r"bad shard", lambda w: _flip(_store_shard_file(w))),
    Case("verify-data-flipped", "verify {w}/data", r"1 problem\(s\), bad split\(s\) \['student'\]",
         _flip_token_chunk),
    Case("verify-data-chunk-deleted", "verify {w}/data", r"bad split\(s\) \['valid'\]",
         lambda w: next(p for p in (w / "data" / "valid" / "c").rglob("*") if p.is_file()).unlink()),
    Case("verify-data-fingerprint", "verify {w}/data", r"the token data is corrupt",
         lambda w: _edit_json(w / "data" / "zarr.json", "splits.student.fingerprint", "0" * 64)),
    Case("verify-data-repair", "verify {w}/data --repair", r"--repair works on logit stores only"),
    Case("train-runs-corrupt", TRAIN + " --out {w}/s --runs {w}/bad.parquet",
         r"bad.parquet: not a readable Parquet runs table", _write("bad.parquet", "PAR1 garbage")),
    Case("train-runs-string-column", TRAIN + " --out {w}/s --runs {w}/sr.parquet",
         r"sr.parquet: column 'loss' must hold numbers",
         _parquet("sr.parquet", {"run_id": ["a"], "params": [1], "tokens": [2], "loss": ["abc"]})),
    Case("train-runs-unknown-column", TRAIN + " --out {w}/s --runs {w}/uc.parquet",
         r"unknown runs-table column 'colour'", _parquet("uc.parquet", {"run_id": ["a"], "colour": ["red"]})),
    Case("train-runs-csv", TRAIN + " --out {w}/s --runs {w}/r.csv",
         r"r.csv: --runs tables are appended as Parquet"),
    Case("train-runs-below-file", TRAIN + " --out {w}/s --runs {w}/afile/runs.parquet",
         r"--runs lies below .*afile, which is a file", _write("afile", "x")),
    Case("train-runs-is-dir", TRAIN + " --out {w}/s --runs {w}/data",
         r"data: --runs is a directory, not a file"),
    Case("train-out-below-file", TRAIN + " --out {w}/afile/m", r"--out lies below .*afile, which is a file",
         _write("afile", "x")),
    Case("train-eval-rows-zero", TRAIN + " --out {w}/s --eval-rows 0",
         r"--eval-rows must be >= 1 when given"),
    Case("train-threads-zero", TRAIN.replace("--threads 1", "--threads 0") + " --out {w}/s",
         r"--threads must be >= 1 when given"),
    Case("train-out-locked", TRAIN + " --out {w}/s", r"another kdcache train is writing .*/s", _hold_lock),
    Case("train-tokenizer-edited", TRAIN + " --out {w}/s", r"tokenizer.json: sha256 does not match",
         _append("data/tokenizer.json", " ")),
    # train: Hugging Face students and ranks
    Case("train-student-no-config", HF + " --student {w}/hf --out {w}/s",
         r"hf: --student has no config.json", _write("hf/model.safetensors", b"")),
    Case("train-student-vocab-small", HF + " --student-config {w}/small.json --out {w}/s",
         r"small.json: field 'vocab_size' is 10, smaller than the tokenizer's \d+ ids",
         _write("small.json", '{"model_type": "llama", "vocab_size": 10, "hidden_size": 16, '
                '"intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}')),
    Case("train-student-config-no-type", HF + " --student-config {w}/c.json --out {w}/s",
         r"c.json: field 'model_type' is missing", _write("c.json", '{"vocab_size": 1000}')),
    Case("train-two-students", TRAIN + " --student-config {w}/c.json --out {w}/s",
         r"give exactly one of --layers / --student / --student-config, got 2"),
    Case("train-no-student", HF + " --out {w}/s",
         r"give exactly one of --layers / --student / --student-config"),
    Case("train-batch-not-divisible",
         TRAIN.replace("--batch-size 4", "--batch-size 3") + " --workers 2 --out {w}/s",
         r"--batch-size 3 is not divisible by the world size 2"),
    Case("train-fsdp-alone", TRAIN + " --fsdp --out {w}/s", r"--fsdp needs a distributed launch"),
    # train: fine-tuning
    Case("train-lora-family", TRAIN + " --out {w}/s --lora-rank 8",
         r"--lora-rank adapts a pretrained --student DIR; the family \(--layers\) student is trained"),
    Case("train-grad-accum-zero", TRAIN + " --out {w}/s --grad-accum 0", r"--grad-accum must be >= 1, got 0"),
    Case("train-grad-accum-uneven", TRAIN + " --out {w}/s --grad-accum 3",
         r"--batch-size 4 does not split into 1 ranks x --grad-accum 3 equal micro-batches"),
    Case("train-bf16-no-device", TRAIN + " --out {w}/s --precision bf16 --device cuda",
         r"--device cuda: no CUDA device is available"),
    Case("train-precision", TRAIN + " --out {w}/s --precision fp8", r"--precision must be one of"),
    Case("train-epochs-and-tokens", TRAIN + " --out {w}/s --epochs 1",
         r"give one training budget, not --tokens and --epochs"),
    Case("train-hub-id-not-cached", HF + " --student nobody-kdcache/no-such-model --out {w}/s",
         r"--student nobody-kdcache/no-such-model: no such local path, and"),
    Case("cache-hub-id-not-cached",
         "cache --teacher nobody-kdcache/no-such-model --data {w}/data --out {w}/s",
         r"--teacher nobody-kdcache/no-such-model: no such local path, and"),
    Case("prepare-hub-dataset-not-cached", "prepare --source nobody-kdcache/no-such-data --out {w}/x",
         r"--source nobody-kdcache/no-such-data: no such local path, and"),
    Case("prepare-tokenizer-config-broken", "prepare --tokenizer {w}/badtok/tokenizer.json --out {w}/x",
         r"badtok/tokenizer_config.json: not valid JSON", _bad_tokenizer_config),
    Case("train-student-not-a-path-or-id", HF + " --student {w}/no/such/dir --out {w}/s",
         r"no/such/dir: no such file or directory \(--student\), and not a Hugging Face Hub id"),
    # fit, plan, cost
    Case("fit-no-runs", "fit --runs {w}/none.parquet --law supervised", r"none.parquet: no such runs table"),
    Case("fit-missing-column", "fit --runs {w}/r.csv --law supervised", r"r.csv: missing column 'params'",
         _write("r.csv", "tokens,loss\n1,2\n")),
    Case("fit-law", "fit --runs {w}/runs.parquet --law chinchilla", r"--law"),
    Case("fit-plot-below-file", "fit --runs {w}/runs.parquet --law supervised --plot {w}/afile/p.png",
         r"--plot lies below", _write("afile", "x")),
    Case("fit-corrupt-runs", "fit --runs {w}/runs.parquet --law supervised", r"runs.parquet: not a readable",
         _write("runs.parquet", "PAR1 garbage")),
    Case("train-store-of-another-mask",
         TRAIN.replace("{w}/data", "{w}/cdata-last") + " --out {w}/s --distill {w}/cstore.zarr",
         r"cstore.zarr: field 'data.mask_fingerprint' is .* but the student's data .*cdata-last has"),
    Case("fit-string-in-loss", "fit --runs {w}/x.csv --law supervised",
         r"x.csv: column 'loss' must hold numbers",
         _write("x.csv", "kind,params,tokens,loss\nsupervised,1e8,2e9,3.1\nsupervised,2e8,4e9,abc\n")),
    Case("plan-bound-student-tokens", "plan --law paper --student-params 1e9 --compute 1e10",
         r"compute 1e\+?10 buys the student 1.36 tokens, fewer than the bound D_S >= 1e6"),
    Case("plan-bound-inference", "plan --law paper --student-params 1e9 --compute 1e12 --scenario inference",
         r"fewer than the bound D_S >= 1e6"),
    Case("plan-bound-too-many-tokens", "plan --law paper --student-params 1e9 --compute 1e28 --no-crossover",
         r"more than the bound D_S <= 1e17"),
    Case("plan-bound-teacher", "plan --law paper --student-params 1e12 --compute 1e25 --no-crossover",
         r"more than the bound 1e17"),
    Case("plan-scenario", f"plan {LAW} --scenario worst", r"worst"),
    Case("plan-law-file", "plan --law {w}/nofit.json --student-params 1e8 --compute 1e20", r"nofit.json"),
    Case("plan-teacher-tokens-or-loss", "plan --teacher-params 7e9 --student-params 1e9 --compute 1e21",
         r"with --teacher-params give exactly one of --teacher-tokens D_T .* or --teacher-loss L_T"),
    Case("plan-law-not-identified", "plan --law {w}/fit.json --student-params 1e9 --compute 1e21",
         r"fit.json: no recipe: the law is not identified for it: f1 is on its search bound .*"
         r"--extrapolate plans anyway", _write("fit.json", _FIT_AT_BOUND)),
    Case("cost-students", f"{COST} --students 0", r"--students"),
    Case("cost-store", f"{COST} --store {{w}}/data", r"data: not a kdcache store|attribute 'kdcache'"),
    Case("cost-tokens-or-compute", "cost --teacher-params 1e9 --student-params 1e8",
         r"give one of --tokens D .* or --compute C"),
    Case("cost-gpus", f"{COST} --gpus 0", r"--gpus must be >= 1"),
    # sweep, run, import-teacher
    Case("sweep-empty-grid", "sweep --config {w}/sweep.yaml", r"field 'grid' must be a non-empty list",
         _sweep([])),
    Case("sweep-grid-type", "sweep --config {w}/sweep.yaml",
         r"sweep.yaml: grid\[0\]: field 'layers' must be int",
         _sweep([{"layers": ["two", 1]}])),
    Case("sweep-grid-range", "sweep --config {w}/sweep.yaml", r"grid\[0\]: --layers must be >= 1",
         _sweep([{"layers": 0}])),
    Case("run-preset", "run --preset huge --out {w}/o", r"--preset must be one of"),
    Case("run-out-is-file", "run --out {w}/afile", r"afile: --out is a file", _write("afile", "x")),
    Case("import-teacher-no-gguf", "import-teacher --gguf {w}/m.gguf --out {w}/m", r"m.gguf"),
]

CASES += [*cases_prepare.CASES, *cases_students.CASES, *cases_distributed.CASES, *cases_storage.CASES,
          *cases_runs.CASES]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("world") / "w"
    assert main(["prepare", "--out", str(w / "data"), "--vocab-size", str(VOCAB), "--seq-len", str(SEQ_LEN),
                 "--max-tokens", "8000", "--quiet"]) == 0
    (w / "chattok").mkdir()
    shutil.copy(w / "data" / "tokenizer.json", w / "chattok" / "tokenizer.json")
    (w / "chattok" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    turns = [("user", "question {}?"), ("assistant", "yes"), ("user", "and?"), ("assistant", "answer {}")]
    _chat(*({"messages": [{"role": r, "content": c.format(i)} for r, c in turns]} for i in range(60)))(w)
    for name, train_on in (("cdata", "all"), ("cdata-last", "last")):  # one data, two masks
        argv = CHAT.format(w=w).replace(f"{w}/d2", str(w / name)).split()
        assert main([*argv, "--seq-len", "256", "--train-on", train_on]) == 0
    (w / "chat.jsonl").unlink()
    make_teacher(w / "teacher", w / "data")
    make_teacher(w / "teacher-v256", w / "data", vocab=256)
    assert main([*CACHE.format(w=w).split(), "--out", str(w / "store.zarr")]) == 0
    assert main([*CACHE.format(w=w).replace("/data", "/cdata").split(), "--out", str(w / "cstore.zarr")]) == 0
    for i in range(3):
        append_run(w / "runs.parquet", RunRow(run_id=f"r{i}", kind="supervised", params=1000 * (i + 1),
                                              tokens=20000, loss=4.0 - i / 10))
    return w


@pytest.fixture
def fresh(world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    # Hub ids resolve offline, from an empty cache of the case's own: the same answer with or
    # without a network (huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, at import).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    copy = tmp_path / "w"
    shutil.copytree(world, copy)
    # The store is built once with absolute paths inside `world`; nothing in it names them.
    return copy


def _tree(path: Path) -> dict[str, str]:
    """Every file and folder under `path`, with file contents' digests."""
    folders = {str(p.relative_to(path)) + "/": "" for p in path.rglob("*") if p.is_dir()}
    return {**tree_digest(path), **folders}


def test_catalogue_covers_every_verb() -> None:
    from kdcache.pipeline.cli import build_parser

    _, verbs = build_parser()
    counts = Counter(case.verb for case in CASES)
    assert set(verbs) <= set(counts), set(verbs) - set(counts)
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_exit_1_and_changes_nothing(case: Case, fresh: Path, capsys) -> None:
    if case.setup:
        case.setup(fresh)
    before = _tree(fresh)
    try:
        status = main(case.argv.format(w=fresh).split())
    finally:
        while _HELD:
            _HELD.pop().release()
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1, (case.id, err)
    one_line = len(err) == 1 and err[0].startswith(f"kdcache {case.verb}: error: ")
    # inspect and verify are reports: a line per problem, then the verdict, each naming the path.
    report = case.verb in ("inspect", "verify") and err and all(e.startswith(str(fresh)) for e in err)
    assert one_line or report, err
    assert re.search(case.match, err[-1]), (case.match, err)
    assert _tree(fresh) == before, case.id


def test_exit_status_of_the_process(tmp_path: Path) -> None:
    """Through the installed entry point, not `main`: the status the shell sees."""
    proc = subprocess.run([sys.executable, "-m", "kdcache.pipeline.cli", "inspect", str(tmp_path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith(f"kdcache inspect: error: {tmp_path}: not a kdcache store")


def test_runs_table_with_a_string_column_is_named(tmp_path: Path, capsys) -> None:
    table = pa.table({"params": [1000, 2000], "tokens": [1, 2], "loss": ["abc", "2.0"]})
    pq.write_table(table, tmp_path / "r.parquet")
    assert main(["fit", "--runs", str(tmp_path / "r.parquet"), "--law", "supervised"]) == 1
    assert "column 'loss'" in capsys.readouterr().err
