"""Data parallelism: 2 gloo ranks (torchrun, FSDP2, Ray Train) train the 1-rank model.

Every rank reads its slice of each global batch, so with the same flags 1 and 2 ranks
differ only in floating-point reduction order: the 2-rank loss of a step is the mean of
two half-batch means where 1 rank takes one mean, and DDP averages two half-batch
gradients. Each such sum of n float32 terms carries a relative error of at most about
n * eps (eps = 2^-24 ~ 6e-8, n <= 512 positions per half batch here, so ~3e-5 in the
worst case and ~sqrt(n) eps ~ 1.4e-6 typically). Adam divides updates by the gradients'
RMS, so a relative gradient error moves every weight by about lr * that error per step
and the differences add up over steps: across 24 steps the per-step losses stay within
PER_STEP_RTOL = 24 * 3e-5 ~ 1e-3 relative, and the final validation losses within the
1e-3 the contract asks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.storage.tokens.format import TokenData
from kdcache.train.job import TrainJobConfig
from kdcache.train.run import run_training

pytestmark = pytest.mark.slow

STEPS, BATCH = 24, 8
PER_STEP_RTOL = 1e-3
FINAL_RTOL = 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _flags(data: TokenData, out: Path, **extra) -> dict:
    flags = {"data": str(data.path), "out": str(out), "layers": 1, "rho": 32, "batch_size": BATCH,
             "tokens": STEPS * BATCH * data.seq_len, "seed": 0, "checkpoint_every": 0, "eval_rows": 64,
             "threads": 1, "quiet": True}
    return {**flags, **extra}


def _argv(flags: dict) -> list[str]:
    argv = ["train"]
    for key, value in flags.items():
        flag = "--" + ("lambda" if key == "lam" else key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def torchrun(flags: dict, ranks: int = 2, *, wait: bool = True, script: Path | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    cmd += [str(script)] if script else ["-m", "kdcache.pipeline.cli", *_argv(flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks (each rank runs in a session of its own), then wait for them."""
    import psutil

    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    proc.wait()


def _training(out: Path) -> dict:
    return json.loads((out / "kdcache.json").read_text())["training"]


@pytest.fixture(scope="module")
def one_rank(tiny_data: TokenData, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("one-rank") / "m"
    run_training(TrainJobConfig.from_flat(**_flags(tiny_data, out)))
    return _training(out)


def _assert_same_run(ours: dict, reference: dict) -> None:
    assert ours["tokens"] == reference["tokens"] and ours["steps"] == reference["steps"] == STEPS
    np.testing.assert_allclose(ours["loss_history"], reference["loss_history"], rtol=PER_STEP_RTOL)
    assert ours["loss"] == pytest.approx(reference["loss"], rel=FINAL_RTOL)


def test_two_torchrun_ranks_train_the_one_rank_model(
    tiny_data: TokenData, one_rank: dict, tmp_path: Path
) -> None:
    out = tmp_path / "m"
    done = torchrun(_flags(tiny_data, out, runs=str(tmp_path / "runs.parquet")))
    assert done.returncode == 0, done.stderr[-3000:]
    ours = _training(out)
    assert ours["world"] == 2
    _assert_same_run(ours, one_rank)
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "runs.parquet").to_pylist()
    assert len(rows) == 1 and rows[0]["tokens"] == one_rank["tokens"]  # one row, by rank 0
    # What rank 0 finds decides for every rank: a finished OUT is refused by all, and with its
    # row lost, rank 0 appends it once while the other rank trains nothing.
    again = torchrun(_flags(tiny_data, out, runs=str(tmp_path / "runs.parquet")))
    assert again.returncode != 0 and "already holds a finished model" in again.stderr
    (tmp_path / "runs.parquet").unlink()
    healed = torchrun(_flags(tiny_data, out, runs=str(tmp_path / "runs.parquet")))
    assert healed.returncode == 0, healed.stderr[-3000:]
    assert healed.stdout.count("added the missing runs-table row") == 1
    assert pq.read_table(tmp_path / "runs.parquet").to_pylist() == rows


def test_two_ranks_on_chat_data_weigh_every_trained_token_alike(chat_data: TokenData, tmp_path: Path) -> None:
    """Chat rows hold different numbers of trained tokens, so the two ranks' halves of a batch
    do too: each rank's sum is divided by the global count (not its own), and the 2-rank run
    is the 1-rank run up to reduction order, as for text (the bounds above)."""
    from kdcache.train.run import trained_per_row

    tokens = int(STEPS * BATCH * trained_per_row(chat_data, "student"))
    one = _flags(chat_data, tmp_path / "one", tokens=tokens, eval_rows=None)
    run_training(TrainJobConfig.from_flat(**one))
    done = torchrun(_flags(chat_data, tmp_path / "two", tokens=tokens, eval_rows=None))
    assert done.returncode == 0, done.stderr[-3000:]
    reference, ours = _training(tmp_path / "one"), _training(tmp_path / "two")
    assert ours["world"] == 2 and reference["tokens"] < STEPS * BATCH * chat_data.seq_len
    assert ours["eval_tokens"] == reference["eval_tokens"] == chat_data.trained_tokens("valid")
    _assert_same_run(ours, reference)


def test_fsdp_over_two_ranks_trains_the_one_rank_model(tiny_data: TokenData, one_rank: dict,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "m"
    done = torchrun(_flags(tiny_data, out, fsdp=True))
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_run(_training(out), one_rank)
    from kdcache.train.model_dir import load_model_dir

    assert load_model_dir(out).config.layers == 1  # full weights were gathered and saved


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_ranks_accumulating_micro_batches_train_the_one_rank_model(
    tiny_data: TokenData, one_rank: dict, tmp_path: Path, fsdp: bool
) -> None:
    """Each rank runs its 4 rows of a global batch of 8 as 2 micro-batches of 2, synchronising
    gradients on the last only: the same steps as one rank taking all 8 at once."""
    out = tmp_path / "m"
    done = torchrun(_flags(tiny_data, out, grad_accum=2, fsdp=fsdp))
    assert done.returncode == 0, done.stderr[-3000:]
    ours = _training(out)
    assert ours["world"] == 2 and ours["grad_accum"] == 2
    _assert_same_run(ours, one_rank)


def test_two_ranks_fine_tune_a_lora_student_as_one_rank_does(tiny_data: TokenData, tmp_path: Path) -> None:
    """DDP over a student whose base weights are frozen: only the adapters' gradients are reduced,
    and the 2-rank (accumulating) run is the 1-rank run up to reduction order."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = tmp_path / "pretrained"
    LlamaForCausalLM(LlamaConfig(vocab_size=tiny_data.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128)).save_pretrained(base)
    flags = {k: v for k, v in _flags(tiny_data, tmp_path / "one").items() if k not in ("layers", "rho")}
    lora = {**flags, "student": str(base), "lora_rank": 4, "lr": 1e-2}
    run_training(TrainJobConfig.from_flat(**lora))
    done = torchrun({**lora, "out": str(tmp_path / "two"), "grad_accum": 2})
    assert done.returncode == 0, done.stderr[-3000:]
    reference, ours = _training(tmp_path / "one"), _training(tmp_path / "two")
    assert ours["world"] == 2 and ours["lora"]["trainable"] == reference["lora"]["trainable"] == 4096
    _assert_same_run(ours, reference)
    one, two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(
        str(tmp_path / "two" / "model.safetensors"))
    assert one.keys() == two.keys()
    for name, tensor in one.items():  # the merged outputs agree as the losses do
        torch.testing.assert_close(two[name], tensor, rtol=PER_STEP_RTOL, atol=1e-6, msg=name)


def test_a_two_rank_checkpoint_resumes_on_one_rank(
    tiny_data: TokenData, one_rank: dict, tmp_path: Path
) -> None:
    """Killed after a 2-rank checkpoint, the run finishes on 1 rank with the uninterrupted model."""
    out = tmp_path / "m"
    proc = torchrun(_flags(tiny_data, out, checkpoint_every=4), wait=False)
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    _kill_all(proc)
    assert state.is_file() and not (out / "kdcache.json").exists(), "ended before a checkpoint"
    step = json.loads(state.read_text())["step"]
    assert json.loads(state.read_text())["info"]["world"] == 2
    run_training(TrainJobConfig.from_flat(**_flags(tiny_data, out, checkpoint_every=4)))
    ours = _training(out)
    assert len(ours["loss_history"]) == STEPS - step  # the steps after the checkpoint ran on 1 rank
    np.testing.assert_allclose(ours["loss_history"], one_rank["loss_history"][step:], rtol=PER_STEP_RTOL)
    assert ours["loss"] == pytest.approx(one_rank["loss"], rel=FINAL_RTOL)


def test_ranks_with_different_flags_are_refused(tiny_data: TokenData, tmp_path: Path) -> None:
    out = tmp_path / "m"
    script = tmp_path / "disagree.py"
    argv = _argv(_flags(tiny_data, out))
    script.write_text(
        "import os, sys\nfrom kdcache.pipeline.cli import main\n"
        f"sys.exit(main({argv!r} + ['--seed', os.environ['RANK']]))\n"
    )
    done = torchrun({}, script=script)
    assert done.returncode != 0
    assert "ranks disagree on the flags: rank 1's differs from rank 0's" in done.stderr
    assert not out.exists()


def test_ranks_with_the_same_flags_over_different_data_are_refused(
    tiny_data: TokenData, chat_data: TokenData, tmp_path: Path
) -> None:
    """The same command in two folders whose `data` are different token data (as on two nodes
    whose copies differ): the ranks compare what the data holds, not its path."""
    out = tmp_path / "m"
    for rank, data in enumerate((tiny_data, chat_data)):
        (tmp_path / f"rank{rank}").mkdir()
        (tmp_path / f"rank{rank}" / "data").symlink_to(data.path)
    argv = _argv({**_flags(tiny_data, out), "data": "data"})
    script = tmp_path / "elsewhere.py"
    script.write_text(
        "import os, sys\nfrom kdcache.pipeline.cli import main\n"
        f"os.chdir({str(tmp_path)!r} + '/rank' + os.environ['RANK'])\nsys.exit(main({argv!r}))\n"
    )
    done = torchrun({}, script=script)
    assert done.returncode != 0
    assert "kdcache train: error: ranks disagree on --data: rank 1's differs from rank 0's" in done.stderr
    assert not out.exists()


def test_a_batch_the_ranks_cannot_split_is_refused(tiny_data: TokenData, tmp_path: Path) -> None:
    out = tmp_path / "m"
    done = torchrun(_flags(tiny_data, out, batch_size=3))
    assert done.returncode != 0
    assert "kdcache train: error: --batch-size 3 is not divisible by the world size 2" in done.stderr
    assert not out.exists()
