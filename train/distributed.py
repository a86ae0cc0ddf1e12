"""Data parallelism: one student over many ranks, launched by torchrun or Ray Train.

`kdcache train` runs as one rank of a process group when it finds one:

- `torchrun --nproc-per-node N kdcache train ...` sets RANK / WORLD_SIZE / LOCAL_RANK
  (and MASTER_ADDR / MASTER_PORT); `World.start` joins that group, gloo on CPU and
  NCCL on GPU, each rank on `cuda:LOCAL_RANK`.
- `kdcache train --workers N [--ray-address ADDR]` starts N Ray Train workers
  (`TorchTrainer`), which set up the group and the same variables, across nodes.

Every rank reads only its slice of each global batch (`row_order.py`), so 1 and N ranks
with the same flags train the same model up to floating-point reduction order.
Gradients are averaged by DDP, or the model is sharded with FSDP2 (`fully_shard`, one
unit per decoder layer plus the root) under `--fsdp`. Rank 0 alone writes: checkpoints,
the MODEL directory and the runs-table row (`main_only`: its error stops every rank). Rank 0's
checkpoint is read by every rank on resume, so OUT must be on a filesystem every node
sees (as it must for the MODEL directory anyway).

Ranks started with different flags, or with the same flags over different files (another
node's copy of the data, store or student), would train garbage without an error, so each
rank hashes its settings and what its inputs hold at start, and the group compares the
hashes first, naming the input that differs.

Ranks launched by environment variables alone (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
no torchrun agent) meet at a TCP store rank 0 serves on MASTER_PORT. Rank 0 refuses a port in
use, naming it; the others give up after `--init-timeout` seconds, also where what holds the
port is no store and torch's client would wait for its answer forever: a watchdog then prints
the error line and ends the process.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from kdcache.train.errors import TrainError

T = TypeVar("T")
TIMEOUT = timedelta(minutes=30)
"""How long a rank waits at a collective (rank 0 may be saving a big checkpoint)."""


@dataclass(frozen=True)
class World:
    """This process's place in the group: rank, world size, and the device it trains on."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        return self.size > 1 or dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def start(device: str, *, init_timeout: int = 60) -> World:
        """Join the launcher's process group (torchrun, Ray Train, environment variables), or run alone.

        A group already initialised (Ray Train does it) is used as it is; otherwise the
        environment the launcher set starts one, gloo on CPU and NCCL on CUDA.
        """
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if not dist.is_initialized() and size <= 1:
            return World(device=device)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise TrainError(f"--device {device}: no CUDA device is available")
            device = f"cuda:{local}"
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's agent serves the store
                dist.init_process_group(backend, timeout=TIMEOUT)
            else:
                _join_by_env(backend, size, init_timeout)
        return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local, device=device)

    def check_same(self, inputs: dict[str, str]) -> None:
        """Refuse ranks whose inputs differ: `inputs` names each (the flags, "--data", ...) and
        gives what identifies it, compared as sha256 digests. Every rank passes the same names."""
        if not self.distributed:
            return
        names = sorted(inputs)
        digests = [list(hashlib.sha256(inputs[n].encode()).digest()) for n in names]
        mine = torch.tensor(digests, dtype=torch.uint8).to(self._collective_device())
        gathered = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(gathered, mine)
        for rank, theirs in enumerate(gathered):
            differ = [n for n, a, b in zip(names, theirs, gathered[0], strict=True) if not torch.equal(a, b)]
            if differ:
                raise TrainError(
                    f"ranks disagree on {differ[0]}: rank {rank}'s differs from rank 0's (start every rank "
                    "with the same command, over the same files)"
                )

    def mean(self, value: float) -> float:
        """The mean of a float over ranks (every rank gets it)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return float(t.item()) / self.size

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce a tensor's sum in place (a no-op alone); returns it."""
        if self.distributed:
            moved = t.to(self._collective_device())
            dist.all_reduce(moved)
            t.copy_(moved)
        return t

    def first_error(self, error: BaseException | None) -> None:
        """Raise on every rank when any rank failed, so none waits forever at a collective."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        flag = torch.tensor([0 if error is None else 1], device=self._collective_device())
        dist.all_reduce(flag)
        if error is not None:
            raise error
        if flag.item():
            raise TrainError("another rank failed (its error is printed above)")

    def main_only(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 alone; its error is raised on every rank (the others get None).

        Every rank-0-only step (the lock, a write) goes through here, so a failure there
        stops the whole group instead of leaving the other ranks at their next collective.
        """
        result: T | None = None
        error: BaseException | None = None
        if self.main:
            try:
                result = fn()
            except BaseException as exc:
                error = exc
        self.first_error(error)
        return result

    def decide(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank (what rank 0 found decides what all of them do)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], device=self._collective_device())
        dist.broadcast(t, src=0)
        return bool(t.item())

    def _collective_device(self) -> torch.device:
        backend = dist.get_backend() if dist.is_initialized() else "gloo"
        return torch.device(self.device) if backend == "nccl" else torch.device("cpu")


def _join_by_env(backend: str, size: int, init_timeout: int) -> None:
    """Form the group from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, within `init_timeout` s."""
    missing = [n for n in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
    if missing:
        raise TrainError(f"WORLD_SIZE is {size} but {missing[0]} is not set (launch the ranks with torchrun, "
                         "or set RANK, MASTER_ADDR and MASTER_PORT for each)")
    rank, addr, port = int(os.environ["RANK"]), os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    wait = timedelta(seconds=init_timeout)
    late = (f"rank {rank}: the group at MASTER_ADDR {addr}, MASTER_PORT {port} did not form within "
            f"--init-timeout {init_timeout} s (is every rank started, and MASTER_PORT free on rank 0's "
            "host?)")
    try:
        with _deadline(init_timeout + 10, late):
            store = dist.TCPStore(addr, int(port), size, is_master=rank == 0, timeout=wait)
            dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=TIMEOUT)
    except dist.DistNetworkError as exc:
        if rank == 0 and "EADDRINUSE" in str(exc):
            raise TrainError(f"MASTER_PORT {port} is in use on {addr} (another process holds it; choose a "
                             "free port for every rank)") from None
        raise TrainError(f"{late} ({str(exc).splitlines()[0]})") from None
    except dist.DistError as exc:
        raise TrainError(f"{late} ({str(exc).splitlines()[0]})") from None
    store.set_timeout(TIMEOUT)  # from here on rank 0 may keep the others waiting while it saves


@contextmanager
def _deadline(seconds: float, message: str) -> Iterator[None]:
    """End the process with `message` as train's error line if the block outlasts `seconds`.

    torch's store client waits without a bound for the answer of whatever accepted its
    connection, in C++, where no Python exception reaches it; exiting is the only way out.
    """

    def expire() -> None:
        print(f"kdcache train: error: {message}", file=sys.stderr, flush=True)
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def wrap(module: nn.Module, world: World, *, fsdp: bool, layers: list[nn.Module]) -> nn.Module:
    """The module each step runs: DDP over the group, FSDP2 shards with `fsdp`, else itself."""
    if fsdp:
        if not world.distributed:
            raise TrainError("--fsdp needs a distributed launch (torchrun, or --workers N)")
        for layer in layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    if not world.distributed:
        return module
    ids = [torch.device(world.device)] if world.device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=ids)
