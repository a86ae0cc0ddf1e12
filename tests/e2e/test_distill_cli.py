"""Distillation through the CLI: teacher -> stores -> students offline and online, the runs table.

The fidelity test is the contract between a cache and a live teacher: along a training
trajectory, same seed and row order, the loss from a `full` store equals the loss from
the same teacher run online at every step, up to the fp16 rounding of the stored
log-probs (the bound is computed per step from the distributions themselves).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kdcache.pipeline.cli import main
from kdcache.storage import read_meta
from kdcache.storage.tokens.format import open_token_data
from kdcache.train.batches import TokenBatches
from kdcache.train.config import ModelConfig
from kdcache.train.kd_losses import DistillLoss
from kdcache.train.model import build_model
from kdcache.train.model_dir import load_model_dir
from kdcache.train.online import OnlineTeacherBatches
from kdcache.train.store_batches import StoreBatches

torch.set_num_threads(1)
pytestmark = [pytest.mark.slow, pytest.mark.ray]

BATCH, SEED, STEPS = 8, 3, 24


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Token data, a trained teacher, and its full, top-k and sampled stores."""
    root = tmp_path_factory.mktemp("distill")
    paths = {name: root / name for name in ("data", "teacher", "full", "topk", "sampled")}
    assert main(["prepare", "--out", str(paths["data"]), "--vocab-size", "384", "--seq-len", "32",
                 "--max-tokens", "60000", "--quiet"]) == 0
    assert main(["train", "--data", str(paths["data"]), "--split", "teacher", "--out", str(paths["teacher"]),
                 "--layers", "2", "--rho", "32", "--tokens", "30000", "--quiet", "--threads", "1"]) == 0
    for kind, extra in (("full", []), ("topk", ["--k", "16"]), ("sampled", ["--draws", "32", "--k", "32"])):
        assert main(["cache", "--teacher", str(paths["teacher"]), "--data", str(paths["data"]),
                     "--out", str(paths[kind]), "--kind", kind, "--shard-rows", "32", *extra]) == 0
    return paths


def _train(world: dict[str, Path], out: Path, *extra: str) -> dict:
    argv = ["train", "--data", str(world["data"]), "--out", str(out), "--layers", "1", "--rho", "32",
            "--tokens", str(STEPS * BATCH * 32), "--batch-size", str(BATCH), "--seed", str(SEED),
            "--quiet", "--threads", "1", "--runs", str(out.parent / "runs.parquet"), *extra]
    assert main(argv) == 0
    return json.loads((out / "kdcache.json").read_text())["training"]


def _valid_cross_entropy(world: dict[str, Path]) -> float:
    """The teacher's mean next-token NLL over the whole valid split, log-softmax in float64."""
    data = open_token_data(world["data"])
    teacher = load_model_dir(world["teacher"]).model.eval()
    rows = torch.from_numpy(np.asarray(data.read("valid", slice(0, data.rows("valid")))))
    with torch.no_grad():
        logits = teacher(rows[:, :-1]).double()
    nll = -torch.log_softmax(logits, -1).gather(-1, rows[:, 1:].unsqueeze(-1))
    return float(nll.mean())


def _rounding_bound(lp: torch.Tensor, ls: torch.Tensor) -> float:
    """Worst-case change of the mean KD loss from rounding the teacher's log-probs to fp16.

    The KD term per position is sum_a p_a (lp_a - ls_a); moving lp_a by d changes it by
    p_a (1 + lp_a - ls_a) d to first order, and fp16 rounding moves lp_a by at most
    2^-11 |lp_a| (half an ulp, relative). Summed worst case, averaged over positions.
    """
    lp, ls = lp.double(), ls.double()
    return (lp.exp() * (1 + lp - ls).abs() * lp.abs() * 2.0**-11).sum(-1).mean().item()


def test_full_store_gives_the_live_teachers_loss_at_every_step(world: dict[str, Path]) -> None:
    """Along a real training trajectory, each step's loss from the store equals the online loss."""
    data = open_token_data(world["data"])
    teacher = load_model_dir(world["teacher"]).model
    student = build_model(ModelConfig(layers=1, vocab_size=data.vocab_size, rho=32, head_dim=32,
                                      max_position=2048), seed=SEED)
    store = StoreBatches(str(world["full"]), batch_size=BATCH, seed=SEED)
    online = OnlineTeacherBatches(TokenBatches(data, "student", batch_size=BATCH, seed=SEED), teacher,
                                  temperature=1.0, vocab=data.vocab_size)
    loss_fn = DistillLoss(kind="full")
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    for _ in range(STEPS):
        cached, live = store.next_batch(), online.next_batch()
        assert torch.equal(cached.inputs, live.inputs)
        logits = student(live.inputs)
        on = loss_fn(logits, live)
        with torch.no_grad():
            off = loss_fn(logits, cached)
            bound = _rounding_bound(live.extras["logprobs"], torch.log_softmax(logits, -1))
        assert 1e-6 < bound < 1e-2  # a real, small bound, not a vacuous one
        assert abs(off.total.item() - on.total.item()) / on.tokens <= bound
        opt.zero_grad()
        (on.total / on.tokens).backward()
        opt.step()
    store.close()


def test_full_store_and_online_teacher_runs(world: dict[str, Path], tmp_path: Path) -> None:
    """The CLI runs: same first step; then Adam amplifies the fp16-sized gradient differences
    (its update m / sqrt(v) magnifies coordinates whose gradients are near zero), so the
    trajectories separate slowly; their validation losses agree to 0.01 nats."""
    offline = _train(world, tmp_path / "offline", "--distill", str(world["full"]))
    online = _train(world, tmp_path / "online", "--online-teacher", str(world["teacher"]))
    a, b = np.array(offline["loss_history"]), np.array(online["loss_history"])
    assert len(a) == len(b) == STEPS
    assert abs(a[0] - b[0]) < 1e-4  # identical weights at step 1: fp16 rounding only

    # A top-k store (k = 16 of 384) is a different objective, and shows from step 1.
    topk = _train(world, tmp_path / "topk", "--distill", str(world["topk"]))
    assert abs(topk["loss_history"][0] - b[0]) > 1e-2

    rows = {r["run_id"]: r for r in pq.read_table(tmp_path / "runs.parquet").to_pylist()}
    store = read_meta(world["full"])
    assert rows["offline"]["kind"] == "distill" and rows["online"]["kind"] == "online"
    # One L_T per teacher: its cross-entropy on the valid split, the same for every store of it
    # and for the online run (measured there by another code path), against a float64 reference.
    reference = _valid_cross_entropy(world)
    for kind in ("full", "topk", "sampled"):
        assert read_meta(world[kind]).valid_loss == pytest.approx(reference, rel=1e-5)
    assert store.valid_tokens == open_token_data(world["data"]).rows("valid") * 32
    assert rows["offline"]["teacher_loss"] == store.valid_loss
    assert rows["online"]["teacher_loss"] == pytest.approx(reference, rel=1e-5)
    assert store.teacher_loss != pytest.approx(reference, rel=1e-3)  # the cached-split NLL is another figure
    n_t = store.teacher.nonembedding_params
    assert rows["offline"]["teacher_params"] == rows["online"]["teacher_params"] == n_t
    assert rows["offline"]["store"] == str(world["full"].resolve()) and rows["offline"]["k"] == 384
    assert rows["online"]["flops"] > rows["offline"]["flops"]  # the teacher's forward passes
    assert rows["offline"]["loss"] == pytest.approx(rows["online"]["loss"], abs=1e-2)


@pytest.mark.parametrize("extra", [["--tail", "renormalize"], ["--tail", "none", "--lambda", "0.7"],
                                   ["--divergence", "kl_reverse"]])
def test_topk_variants_train(world: dict[str, Path], tmp_path: Path, extra: list[str]) -> None:
    row = _train(world, tmp_path / "m", "--distill", str(world["topk"]), *extra)
    assert row["kind"] == "distill" and row["k"] == 16 and np.isfinite(row["loss"])
    assert row["loss_history"][-1] < row["loss_history"][0]


def test_sampled_store_trains(world: dict[str, Path], tmp_path: Path) -> None:
    row = _train(world, tmp_path / "m", "--distill", str(world["sampled"]))
    assert row["kind"] == "distill" and row["loss_history"][-1] < row["loss_history"][0]


def test_distill_user_errors(world: dict[str, Path], tmp_path: Path, capsys) -> None:
    base = ["train", "--data", str(world["data"]), "--out", str(tmp_path / "m"), "--layers", "1",
            "--rho", "32", "--tokens", "1000"]
    other = tmp_path / "other"
    assert main(["prepare", "--out", str(other), "--vocab-size", "300", "--seq-len", "32",
                 "--max-tokens", "20000", "--quiet"]) == 0
    cases = [
        (["--distill", str(world["full"]), "--temperature", "2.0"],
         "the store holds targets at 1.0 and no other temperature, not at 2.0"),
        (["--distill", str(world["full"]), "--online-teacher", str(world["teacher"])], "exclude each other"),
        (["--distill", str(tmp_path / "nope")], "not a kdcache store"),
        (["--distill", str(world["full"]), "--lambda", "1.5"], "--lambda must lie in [0, 1]"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["train", "--data", str(other), "--out", str(tmp_path / "m"), "--layers", "1", "--rho", "32",
                 "--distill", str(world["full"])]) == 1
    assert "field 'vocab_size' is 384" in capsys.readouterr().err
    assert main(["train", "--data", str(other), "--out", str(tmp_path / "m"), "--layers", "1", "--rho", "32",
                 "--online-teacher", str(world["teacher"])]) == 1
    # 384 output rows over 300 ids would be a padded teacher; its tokenizer is what differs.
    assert f"the teacher was trained with another tokenizer than {other}/tokenizer.json" in \
        capsys.readouterr().err
    assert not (tmp_path / "m").exists()
