"""The order in which training visits rows: seeded, chunk-local, the same at any world size.

Every batch source (token split, logit store, online teacher) visits rows in the same
order for the same seed, so a supervised, an offline-distilled and an online-distilled
run of one student see exactly the same data, step for step.

Each epoch permutes aligned blocks of `block_rows` rows, cuts the resulting sequence
into windows of `window_batches` global batches and shuffles rows within each window.
A window touches only a few blocks, so a reader fetches it with a few chunk reads and
serves its batches from memory; the shuffle is still global at block granularity.

`batch_size` is the global batch: the sequences one optimizer step sees, summed over
ranks. Every rank computes the same global order and rank r of `world` takes rows
[r * b, (r + 1) * b) of each global batch, b = batch_size // world, reading only those
(a rank's share of a window still lies in that window's few blocks). So the data a run
sees does not depend on how many ranks it runs on: one rank with batch 8 and four
ranks with 2 rows each take the same steps on the same rows, and a position, (epoch,
global batch within the epoch), means the same data at any world size. A checkpoint
written by a run on one world size resumes exactly on another, and a single-rank run
is what it always was.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcache.train.errors import TrainError

BLOCK_ROWS = 16
WINDOW_BATCHES = 4


@dataclass(frozen=True, kw_only=True)
class RowOrder:
    n_rows: int
    batch_size: int
    """The global batch; each rank takes `local_batch` = batch_size // world rows of it."""
    seed: int
    rank: int = 0
    world: int = 1
    block_rows: int = BLOCK_ROWS
    window_batches: int = WINDOW_BATCHES

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise TrainError(f"rank {self.rank} must lie in [0, world={self.world})")
        if self.batch_size < 1:
            raise TrainError(f"--batch-size {self.batch_size} must be at least 1")
        if self.batch_size % self.world:
            raise TrainError(
                f"--batch-size {self.batch_size} is not divisible by the world size {self.world}"
            )
        if self.batches_per_epoch() < 1:
            raise TrainError(
                f"{self.n_rows} rows give no full batch of {self.batch_size} "
                "(lower --batch-size or use more data)"
            )

    @property
    def local_batch(self) -> int:
        """Rows of each global batch this rank reads."""
        return self.batch_size // self.world

    @property
    def window_rows(self) -> int:
        return self.window_batches * self.batch_size

    def batches_per_epoch(self) -> int:
        """Global batches in an epoch, the same on every rank (a short last window keeps
        its full batches, so only the last n_rows % batch_size rows of an epoch drop)."""
        return self.n_rows // self.batch_size

    def global_windows(self, epoch: int) -> list[np.ndarray]:
        """Every rank's windows for `epoch`: row indices [batches, batch_size] each."""
        blocks = np.random.default_rng([self.seed, epoch]).permutation(
            -(-self.n_rows // self.block_rows)
        )
        starts = blocks * self.block_rows
        seq = np.concatenate([np.arange(s, min(s + self.block_rows, self.n_rows)) for s in starts])
        out = []
        for w in range(-(-self.n_rows // self.window_rows)):
            rows = seq[w * self.window_rows : (w + 1) * self.window_rows]
            rows = np.random.default_rng([self.seed, epoch, w]).permutation(rows)
            usable = len(rows) // self.batch_size * self.batch_size
            if usable:
                out.append(rows[:usable].reshape(-1, self.batch_size))
        return out

    def windows(self, epoch: int) -> list[np.ndarray]:
        """This rank's share of each window for `epoch`: row indices [batches, local_batch].

        Batch j of the concatenated windows is this rank's slice of global batch j.
        """
        lo = self.rank * self.local_batch
        return [np.ascontiguousarray(w[:, lo : lo + self.local_batch]) for w in self.global_windows(epoch)]
