"""The order in which training visits rows: seeded, chunk-local, split across ranks.

Every batch source (token split, logit store, online teacher) visits rows in the same
order for the same seed, so a supervised, an offline-distilled and an online-distilled
run of one student see exactly the same data, step for step.

Each epoch permutes aligned blocks of `block_rows` rows, cuts the resulting sequence
into windows of `window_batches` batches and shuffles rows within each window. A
window touches only a few blocks, so a reader fetches it with a few chunk reads and
serves its batches from memory; the shuffle is still global at block granularity.
Window w goes to rank w % world. A position is (epoch, batch within the rank's
epoch), two integers, so resuming mid-epoch reproduces the order exactly.
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
    seed: int
    rank: int = 0
    world: int = 1
    block_rows: int = BLOCK_ROWS
    window_batches: int = WINDOW_BATCHES

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise TrainError(f"rank {self.rank} must lie in [0, world={self.world})")
        if self.batches_per_epoch() < 1:
            raise TrainError(
                f"{self.n_rows} rows give rank {self.rank} of {self.world} no full batch of "
                f"{self.batch_size} (lower --batch-size or use more data)"
            )

    @property
    def window_rows(self) -> int:
        return self.window_batches * self.batch_size

    def _window_sizes(self) -> list[int]:
        """Batches in each of this rank's windows (the last global window may be short)."""
        n_windows = -(-self.n_rows // self.window_rows)
        sizes = []
        for w in range(self.rank, n_windows, self.world):
            rows = min(self.window_rows, self.n_rows - w * self.window_rows)
            sizes.append(rows // self.batch_size)
        return [s for s in sizes if s]

    def batches_per_epoch(self) -> int:
        return sum(self._window_sizes())

    def windows(self, epoch: int) -> list[np.ndarray]:
        """This rank's windows for `epoch`: row indices [batches, batch_size] each."""
        blocks = np.random.default_rng([self.seed, epoch]).permutation(
            -(-self.n_rows // self.block_rows)
        )
        starts = blocks * self.block_rows
        seq = np.concatenate([np.arange(s, min(s + self.block_rows, self.n_rows)) for s in starts])
        out = []
        for w in range(self.rank, -(-self.n_rows // self.window_rows), self.world):
            rows = seq[w * self.window_rows : (w + 1) * self.window_rows]
            rows = np.random.default_rng([self.seed, epoch, w]).permutation(rows)
            usable = len(rows) // self.batch_size * self.batch_size
            if usable:
                out.append(rows[:usable].reshape(-1, self.batch_size))
        return out
