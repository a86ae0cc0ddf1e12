"""Settings of one supervised `kdcache train` run (kept free of torch so the CLI loads fast)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from kdcache.train.errors import TrainError

TRAIN_SPLITS = ("teacher", "student")
DIVERGENCES = ("kl_forward", "kl_reverse")
TAILS = ("tail", "renormalize", "none")
TOKENS_PER_PARAM = 20  # the paper's default budget D = 20 N


@dataclass(frozen=True, kw_only=True)
class TrainJobConfig:
    """One supervised training run: data, model shape, budget and optimisation."""

    data: str
    """DATA directory written by `kdcache prepare`."""
    out: str
    """MODEL directory to write (Hugging Face Llama format); rerunning resumes it."""
    layers: int
    """Transformer blocks; the width follows as d_model = rho * layers."""
    split: str = "student"
    """Token split to train on: teacher | student (a --distill store brings its own rows)."""
    distill: str | None = None
    """Distil offline from this logit STORE (kdcache cache) instead of supervised training."""
    online_teacher: str | None = None
    """Distil online from this teacher MODEL, run in-process every step (for comparison)."""
    lam: float = field(default=1.0, metadata={"flag": "lambda"})
    """Distillation weight: loss = (1 - lambda) * NTP + lambda * KD + z_loss * Z."""
    temperature: float | None = None
    """Distillation temperature tau (default: the store's, else 1.0; must equal the store's)."""
    divergence: str = "kl_forward"
    """Distillation divergence: kl_forward | kl_reverse."""
    tail: str = "tail"
    """Top-k stores: tail (the rest of the mass as one category) | renormalize | none."""
    tokens: int | None = None
    """Training tokens D (default 20 per non-embedding parameter)."""
    rho: int = 64
    """Aspect ratio d_model / layers."""
    head_dim: int = 32
    """Attention head size."""
    qk_norm: bool = False
    """QK-norm in attention (exports as Qwen3, since Llama has none)."""
    batch_size: int = 16
    """Sequences per step."""
    lr: float = 3e-3
    """Peak learning rate at the muP base width (d_model 128); muP rescales it per width."""
    warmup_frac: float = 0.05
    """Fraction of steps spent warming up linearly."""
    final_lr_frac: float = 0.1
    """Cosine schedule ends at this fraction of the peak learning rate."""
    weight_decay: float = 1e-4
    """Decoupled weight decay per step (independent of the learning rate)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this."""
    z_loss: float = 1e-4
    """Weight of the z-loss log(Z)^2."""
    seed: int = 0
    """Seed for init and data order."""
    runs: str | None = None
    """Runs table (Parquet) to append this run's row to."""
    run_id: str | None = None
    """Row id in the runs table (default: the output directory's name)."""
    eval_rows: int | None = None
    """Validation rows to evaluate (default all)."""
    checkpoint_every: int = 200
    """Steps between resumable checkpoints (0: none)."""
    device: str = "cpu"
    """torch device to train on ("cpu", "cuda", "cuda:1"); bit-exact resume is checked on CPU."""
    threads: int | None = None
    """torch CPU threads (default: torch's choice)."""
    quiet: bool = False
    """Hide the progress bar."""
    json: bool = False
    """Print the result as JSON."""

    def __post_init__(self) -> None:
        if self.split not in TRAIN_SPLITS:
            raise TrainError(f"--split must be one of {TRAIN_SPLITS}, got {self.split!r}")
        positive = ("layers", "rho", "head_dim", "batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.tokens is not None and self.tokens < 1:
            raise TrainError(f"--tokens must be >= 1, got {self.tokens}")
        if not self.lr > 0:
            raise TrainError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_frac <= 1:
            raise TrainError(f"--warmup-frac must lie in [0, 1], got {self.warmup_frac}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise TrainError(f"--device must be cpu or cuda[:N], got {self.device!r}")
        if self.distill and self.online_teacher:
            raise TrainError("--distill and --online-teacher exclude each other")
        if not 0 <= self.lam <= 1:
            raise TrainError(f"--lambda must lie in [0, 1], got {self.lam}")
        if self.temperature is not None and not self.temperature > 0:
            raise TrainError(f"--temperature must be positive, got {self.temperature}")
        if self.divergence not in DIVERGENCES:
            raise TrainError(f"--divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.tail not in TAILS:
            raise TrainError(f"--tail must be one of {TAILS}, got {self.tail!r}")
        if self.checkpoint_every < 0:
            raise TrainError("--checkpoint-every must be >= 0")
        # Checked here, not where used: evaluation and threads come after hours of training.
        for name in ("eval_rows", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be >= 1 when given, got {value}")

    @property
    def kind(self) -> str:
        """The runs table's `kind`: supervised | distill | online."""
        return "distill" if self.distill else "online" if self.online_teacher else "supervised"

    def fingerprint(self, data_fingerprint: str, teacher_fingerprint: str = "") -> str:
        """Identifies what the run computes: resuming requires the same fingerprint.

        Paths are not part of it; the teacher (a store's identity or a model's weights) is.
        """
        runtime = {"runs", "run_id", "checkpoint_every", "threads", "quiet", "json", "out", "data",
                   "eval_rows", "device", "distill", "online_teacher"}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in runtime}
        blob = json.dumps({"config": values, "data": data_fingerprint, "kind": self.kind,
                           "teacher": teacher_fingerprint}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()
