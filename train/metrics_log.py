"""A run's metrics as it trains: `OUT/metrics.jsonl`, and TensorBoard with `--log tensorboard`.

One JSON object a line, as trackers and `pandas.read_json(lines=True)` read them:

- a step: `{"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", ...}` plus the loss's
  own terms (`ce`, `z`, and `kd` for distillation), each a mean over the step's trained tokens;
- an evaluation (`--eval-every N`, and always at the end): `{"step", "eval_loss", "eval_ece",
  "eval_tokens"}`.

Rank 0 writes, appending and flushing each line, so a killed run keeps every step it logged. A
resumed run first drops the lines of steps after its checkpoint, which it is about to train
again, so the file holds each step once. TensorBoard gets the same scalars under `train/` and
`eval/` through the `tensorboard` package's own writer (`torch.utils.tensorboard`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kdcache.train.errors import TrainError

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def check_tensorboard() -> None:
    """Refuse `--log tensorboard` up front when the package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise TrainError("--log tensorboard needs the tensorboard package "
                         "(pip install 'kdcache[tensorboard]')") from None


def _finite(value: Any) -> Any:
    return value if not isinstance(value, float) or math.isfinite(value) else None


class MetricsLog:
    """Appends step and evaluation records to `out/metrics.jsonl` (and TensorBoard)."""

    def __init__(self, out: Path, *, start_step: int, tensorboard: bool = False) -> None:
        self.path = out / METRICS
        kept = []
        if self.path.is_file():  # a resumed run: keep what the checkpoint's steps logged
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if isinstance(record, dict) and int(record.get("step", 0)) <= start_step:
                    kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))
        self.writer: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD), purge_step=start_step + 1)

    def write(self, record: dict[str, Any], group: str) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps({k: _finite(v) for k, v in record.items()}) + "\n")
        if self.writer is not None:
            step = int(record["step"])
            for name, value in record.items():
                if name != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.writer.add_scalar(f"{group}/{name.removeprefix('eval_')}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
