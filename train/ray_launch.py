"""`kdcache train --workers N`: the run's ranks as Ray Train workers (`TorchTrainer`).

Ray Train starts N workers (on this machine's Ray, or the cluster at `--ray-address`),
each with `--threads` CPUs (and a GPU under `--device cuda`), sets up their process
group (gloo on CPU, NCCL on GPU) and RANK / WORLD_SIZE / LOCAL_RANK; each worker then
runs the same rank code torchrun's processes run (`run.py`, which passes it in). Rank 0
writes OUT and the runs-table row; the driver reads the row back from OUT's kdcache.json.

A rank's error (a bad input found late, a killed worker) ends the run, and the driver
raises it as the one line it is: Ray Train's failure policy cannot tell the two apart,
and retrying a bad input would train again for nothing. Rerunning the same command
resumes from the last checkpoint, so a killed worker loses at most `--checkpoint-every`
steps.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from kdcache.errors import KdcacheError
from kdcache.ray_session import ray_session
from kdcache.train.errors import TrainError
from kdcache.train.job import TrainJobConfig

MAX_FAILURES = 0
"""Ray Train would retry a rank's own errors too (a bad input found late, a non-finite
loss), training again each time; a killed worker's run is resumed by rerunning instead."""


def run_on_ray_train(cfg: TrainJobConfig, rank: Callable[[dict[str, Any]], None]) -> None:
    """Run `rank(cfg.flat())` on each of `--workers` Ray Train workers, to the end of the run.

    `rank` must be a module-level function (Ray sends it to the workers by name).
    """
    rt = cfg.runtime
    with ray_session(rt.ray_address, log_to_driver=not rt.quiet):
        gpu = rt.device.startswith("cuda")
        storage = tempfile.mkdtemp(prefix="kdcache-ray-train-")
        try:
            trainer = TorchTrainer(
                rank,
                train_loop_config=cfg.flat(),
                scaling_config=ScalingConfig(num_workers=rt.workers, use_gpu=gpu,
                                             resources_per_worker={"CPU": rt.threads or 1}),
                torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
                run_config=RunConfig(name=Path(cfg.out).name or "kdcache-train", storage_path=storage,
                                     failure_config=FailureConfig(max_failures=MAX_FAILURES)),
            )
            try:
                trainer.fit()
            except Exception as exc:
                raise _rank_error(exc) from None
        finally:
            shutil.rmtree(storage, ignore_errors=True)


def _rank_error(exc: BaseException) -> BaseException:
    """The first rank's own error out of Ray Train's wrapping, else a one-line TrainError."""
    seen: list[BaseException] = []
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        if isinstance(e, KdcacheError):
            cause = getattr(e, "cause", None)
            return cause if isinstance(cause, KdcacheError) else e
        stack.extend(getattr(e, "worker_failures", {}).values())
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    text = [line for line in str(exc).splitlines() if line.strip()]
    return TrainError(f"Ray Train failed: {text[-1] if text else type(exc).__name__}")


