"""Settings of one `kdcache train` run (kept free of torch so the CLI loads fast).

A run's settings fall into four groups, and one rule says what identifies a run:

- `student` (what is trained), `loop` (how: budget, optimiser, data order) and
  `distillation` (from what teacher) identify it. Resuming needs the same three
  (`fingerprint`, where paths are replaced by what they hold: the data's and the
  teacher's fingerprints), and a sweep names its runs by them (`identity`).
- `runtime` (where it writes, on what hardware, over how many ranks, how it reports)
  never changes what a run computes, so it is in neither. In particular one rank and
  many ranks train the same model (`--batch-size` is the global batch).

On the command line and in sweep files the groups are flat: every field is its own flag
(`--layers`, `--lr`, `--lambda`, `--workers`); `TrainJobConfig.from_flat` builds the
groups and `flat()` goes back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.train.errors import TrainError

TRAIN_SPLITS = ("teacher", "student")
DIVERGENCES = ("kl_forward", "kl_reverse")
"""The distillation divergences (`kd_losses.DIVERGENCES` is keyed by these)."""
TAILS = ("tail", "renormalize", "none")
"""The top-k tail modes (`kd_losses.TAIL_MODES` is keyed by these)."""
TOKENS_PER_PARAM = 20  # the paper's default budget D = 20 N
LOGS = ("jsonl", "tensorboard")
LORA_SAVES = ("merged", "adapter")


def _at_least_one(owner: object, names: tuple[str, ...], *, optional: bool = False) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is None and optional:
            continue
        if value < 1:
            when = " when given" if optional else ""
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1{when}, got {value}")


@dataclass(frozen=True, kw_only=True)
class StudentSettings:
    """What is trained: the family's shape, or a Hugging Face model."""

    layers: int | None = None
    """Transformer blocks of the family's model; the width follows as d_model = rho * layers."""
    student: str | None = field(default=None, metadata={"path": "model"})
    """Fine-tune this pretrained Hugging Face causal LM: a local directory or a Hub id (instead of
    --layers)."""
    student_config: str | None = field(default=None, metadata={"path": "local"})
    """Train a Hugging Face model of this transformers config.json from scratch (instead of --layers)."""
    rho: int = 64
    """Aspect ratio d_model / layers (family)."""
    head_dim: int = 32
    """Attention head size (family)."""
    qk_norm: bool = False
    """QK-norm in attention (family; exports as Qwen3, since Llama has none)."""
    lora_rank: int | None = None
    """Fine-tune a pretrained --student through LoRA adapters of this rank (peft); only they train."""
    lora_alpha: float | None = None
    """LoRA scaling alpha (the update is alpha / rank * B A; default 2 * --lora-rank)."""
    lora_targets: list[str] | None = None
    """Module names LoRA adapts, as a list: '[q_proj, v_proj]' (default: every linear layer of the
    decoder blocks, i.e. the attention and MLP projections)."""

    def __post_init__(self) -> None:
        given = [n for n in ("layers", "student", "student_config") if getattr(self, n) is not None]
        if len(given) != 1:
            flags = " / ".join(f"--{n.replace('_', '-')}" for n in ("layers", "student", "student_config"))
            raise TrainError(f"give exactly one of {flags}" + (f", got {len(given)}" if given else ""))
        _at_least_one(self, ("rho", "head_dim"))
        _at_least_one(self, ("layers", "lora_rank"), optional=True)
        if self.lora_rank is None and (self.lora_alpha is not None or self.lora_targets is not None):
            raise TrainError("--lora-alpha and --lora-targets need --lora-rank")
        if self.lora_rank is not None and self.student is None:
            raise TrainError("--lora-rank adapts a pretrained --student DIR; the "
                             f"{'family (--layers)' if self.family else '--student-config'} student is "
                             "trained from scratch, every weight (drop --lora-rank)")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise TrainError(f"--lora-alpha must be positive, got {self.lora_alpha}")

    @property
    def family(self) -> bool:
        return self.layers is not None

    @property
    def pretrained(self) -> bool:
        """Trained on from pretrained weights (`--student DIR`): fine-tuning defaults apply."""
        return self.student is not None


@dataclass(frozen=True)
class Recipe:
    """The optimiser settings a run uses: `LoopSettings`' flags, each defaulted by the kind of student."""

    lr: float
    warmup_frac: float
    final_lr_frac: float
    weight_decay: float
    z_loss: float
    grad_clip: float = 1.0


SCRATCH = Recipe(lr=3e-3, warmup_frac=0.05, final_lr_frac=0.1, weight_decay=1e-4, z_loss=1e-4)
"""Students trained from scratch (`--layers`, `--student-config`): the muP family's tuned settings
(the learning rate is at the muP base width, d_model 128, and muP rescales it per width; decoupled
weight decay 1e-4 per step and z-loss 1e-4 as in the scaling-law study this recipe comes from)."""
FINE_TUNE = Recipe(lr=2e-5, warmup_frac=0.03, final_lr_frac=0.0, weight_decay=0.0, z_loss=0.0)
"""Pretrained students (`--student DIR`): the usual supervised fine-tuning recipe of the Hugging Face
stack. 2e-5 is TRL's `SFTConfig` default learning rate and the one DistillKit's example configs use;
a 3% warmup and a cosine decay to zero are the Alpaca/FastChat recipe; no weight decay (Hugging
Face's default; kdcache's decay is per step, not scaled by the learning rate, so 1e-4 would shrink
a pretrained model's weights by 10% over 1,000 steps) and no z-loss (a pretrained model's log-partition
is not near zero, and pulling it there is not what fine-tuning is for)."""
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True, kw_only=True)
class LoopSettings:
    """How it is trained: the split, the budget, the optimiser and the data order.

    The optimiser's flags default by the kind of student (`recipe`): `SCRATCH` for students
    trained from scratch, `FINE_TUNE` for a pretrained `--student DIR`; a flag given wins.
    The budget is one of `--tokens`, `--epochs` and `--max-steps`; without any, a student trained
    from scratch gets 20 tokens per non-embedding parameter and a pretrained one one epoch.
    """

    split: str = "student"
    """Token split to train on: teacher | student (a --distill store brings its own rows)."""
    tokens: int | None = None
    """Training budget in trained tokens (default: 20 per non-embedding parameter from scratch,
    one epoch for a pretrained --student)."""
    epochs: float | None = None
    """Training budget in passes over the split's (or the store's) rows (instead of --tokens)."""
    max_steps: int | None = None
    """Training budget in optimiser steps (instead of --tokens or --epochs)."""
    batch_size: int = 16
    """Sequences per optimizer step, over all ranks and accumulated micro-batches."""
    lr: float | None = None
    """Peak learning rate (default 3e-3 from scratch, at the muP base width d_model 128 for the family,
    which muP rescales per width; 2e-5 for a pretrained --student)."""
    warmup_frac: float | None = None
    """Fraction of steps spent warming up linearly (default 0.05 from scratch, 0.03 fine-tuning)."""
    final_lr_frac: float | None = None
    """Cosine schedule ends at this fraction of the peak learning rate (default 0.1 from scratch,
    0 fine-tuning)."""
    weight_decay: float | None = None
    """Decoupled weight decay per step, independent of the learning rate (default 1e-4 from
    scratch, 0 fine-tuning)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this."""
    z_loss: float | None = None
    """Weight of the z-loss log(Z)^2 (default 1e-4 from scratch, 0 fine-tuning)."""
    precision: str = "fp32"
    """fp32 | bf16: bf16 runs the student's forward and backward under bf16 autocast, with float32
    weights, optimiser state, checkpoints and losses."""
    seed: int = 0
    """Seed for init and data order."""

    def __post_init__(self) -> None:
        if self.split not in TRAIN_SPLITS:
            raise TrainError(f"--split must be one of {TRAIN_SPLITS}, got {self.split!r}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        _at_least_one(self, ("batch_size",))
        _at_least_one(self, ("tokens", "max_steps"), optional=True)
        budgets = [f"--{n.replace('_', '-')}" for n in ("tokens", "epochs", "max_steps")
                   if getattr(self, n) is not None]
        if len(budgets) > 1:
            raise TrainError(f"give one training budget, not {' and '.join(budgets)}")
        if self.epochs is not None and not self.epochs > 0:
            raise TrainError(f"--epochs must be positive, got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise TrainError(f"--lr must be positive, got {self.lr}")
        if self.warmup_frac is not None and not 0 <= self.warmup_frac <= 1:
            raise TrainError(f"--warmup-frac must lie in [0, 1], got {self.warmup_frac}")
        if not self.grad_clip > 0:
            raise TrainError(f"--grad-clip must be positive, got {self.grad_clip}")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise TrainError(f"--weight-decay must be non-negative, got {self.weight_decay}")
        if self.z_loss is not None and not self.z_loss >= 0:
            raise TrainError(f"--z-loss must be non-negative, got {self.z_loss}")
        if self.final_lr_frac is not None and not 0 <= self.final_lr_frac <= 1:
            raise TrainError(f"--final-lr-frac must lie in [0, 1], got {self.final_lr_frac}")

    def recipe(self, *, pretrained: bool) -> Recipe:
        """The optimiser settings in effect: the flags given, the student kind's defaults for the rest."""
        base = FINE_TUNE if pretrained else SCRATCH
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(Recipe)
                 if getattr(self, f.name) is not None}
        return dataclasses.replace(base, **given)


@dataclass(frozen=True, kw_only=True)
class DistillSettings:
    """From what teacher, if any: a logit store or a live model, and the loss's options."""

    distill: str | None = field(default=None, metadata={"path": "local"})
    """Distil offline from this logit STORE (kdcache cache) instead of supervised training: a path,
    or an object-store URL (s3://bucket/prefix; credentials from the AWS_* environment)."""
    online_teacher: str | None = field(default=None, metadata={"path": "model"})
    """Distil online from this teacher MODEL (a local directory or a Hub id), run in-process every
    step (for comparison)."""
    lam: float = field(default=1.0, metadata={"flag": "lambda"})
    """Distillation weight: loss = (1 - lambda) * NTP + lambda * KD + z_loss * Z."""
    temperature: float | None = None
    """Distillation temperature tau (default: the store's, else 1.0; with a store, its own or one
    of the further `temperatures` it was cached with)."""
    divergence: str = "kl_forward"
    """Distillation divergence: kl_forward | kl_reverse."""
    tail: str = "tail"
    """Top-k stores: tail (the rest of the mass as one category) | renormalize | none."""

    def __post_init__(self) -> None:
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


@dataclass(frozen=True, kw_only=True)
class RuntimeSettings:
    """Where it writes, on what hardware and ranks, how it reports: never what it computes."""

    runs: str | None = field(default=None, metadata={"path": "local"})
    """Runs table (Parquet) to append this run's row to."""
    run_id: str | None = None
    """Row id in the runs table (default: the output directory's name)."""
    eval_rows: int | None = None
    """Validation rows to evaluate (default all)."""
    checkpoint_every: int = 200
    """Steps between resumable checkpoints (0: none)."""
    eval_every: int = 0
    """Steps between validation evaluations recorded in the metrics log (0: only at the end)."""
    log: str = "jsonl"
    """Where step metrics go besides OUT/metrics.jsonl: jsonl (that file alone) | tensorboard
    (also OUT/tensorboard, through the tensorboard package)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step on each rank: the global --batch-size is split into
    world size x --grad-accum micro-batches (memory, not the result, changes)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder block in backward instead of keeping its activations."""
    lora_save: str = "merged"
    """With --lora-rank: merged (OUT is the full model, adapters folded in) | adapter (OUT is a
    peft adapter directory over the --student)."""
    device: str = "cpu"
    """torch device to train on ("cpu", "cuda"; under torchrun each rank takes cuda:LOCAL_RANK)."""
    threads: int | None = None
    """torch CPU threads per rank (default: torch's choice)."""
    workers: int = 1
    """Data-parallel ranks started through Ray Train (TorchTrainer); 1 trains in this process."""
    ray_address: str | None = None
    """Ray cluster for --workers (default: start a local one)."""
    init_timeout: int = 60
    """Seconds a rank launched by environment variables alone (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT; no torchrun) waits for the others to join its group before it gives up."""
    fsdp: bool = False
    """Shard the student over the ranks with FSDP2 (needs torchrun or --workers N > 1)."""
    quiet: bool = False
    """Hide the progress bar and the lines saying, at the start, what the run will do."""
    json: bool = False
    """Print the result as JSON."""

    def __post_init__(self) -> None:
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise TrainError(f"--device must be cpu or cuda[:N], got {self.device!r}")
        if self.checkpoint_every < 0:
            raise TrainError("--checkpoint-every must be >= 0")
        _at_least_one(self, ("workers", "grad_accum", "init_timeout"))
        if self.eval_every < 0:
            raise TrainError(f"--eval-every must be >= 0, got {self.eval_every}")
        if self.log not in LOGS:
            raise TrainError(f"--log must be one of {LOGS}, got {self.log!r}")
        if self.lora_save not in LORA_SAVES:
            raise TrainError(f"--lora-save must be one of {LORA_SAVES}, got {self.lora_save!r}")
        # Checked here, not where used: evaluation and threads come after hours of training.
        _at_least_one(self, ("eval_rows", "threads"), optional=True)


GROUPS: dict[str, type] = {
    "student": StudentSettings, "loop": LoopSettings, "distillation": DistillSettings,
    "runtime": RuntimeSettings,
}
IDENTITY_GROUPS = ("student", "loop", "distillation")
"""The groups that identify a run; `runtime` never does."""
_GROUP_OF = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
_PATHS = tuple(f.name for name in IDENTITY_GROUPS for f in dataclasses.fields(GROUPS[name])
               if "path" in f.metadata)
"""Identity fields that are paths: the fingerprint holds what they contain instead."""


@dataclass(frozen=True, kw_only=True)
class TrainJobConfig:
    """One training run: its data and MODEL directory, and the four groups of settings."""

    data: str = field(metadata={"path": "local"})
    """DATA directory written by `kdcache prepare`."""
    out: str = field(metadata={"path": "local"})
    """MODEL directory to write (Hugging Face format); rerunning resumes it."""
    student: StudentSettings
    loop: LoopSettings = field(default_factory=LoopSettings)
    distillation: DistillSettings = field(default_factory=DistillSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    @classmethod
    def from_flat(cls, **flags: Any) -> TrainJobConfig:
        """Build the groups from flat settings (flag names, `lam` for --lambda, or `lambda`)."""
        groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        top: dict[str, Any] = {}
        for key, value in flags.items():
            name = "lam" if key == "lambda" else key
            if name in ("data", "out"):
                top[name] = value
            elif name in _GROUP_OF:
                groups[_GROUP_OF[name]][name] = value
            else:
                raise TrainError(f"unknown train setting {key!r}")
        missing = [n for n in ("data", "out") if n not in top]
        if missing:
            raise TrainError(f"missing train setting {missing[0]!r}")
        built = {name: GROUPS[name](**values) for name, values in groups.items()}
        return cls(**top, **built)

    def flat(self) -> dict[str, Any]:
        """The settings as flat names (what `from_flat` takes); JSON-able."""
        out: dict[str, Any] = {"data": self.data, "out": self.out}
        for name in GROUPS:
            out |= dataclasses.asdict(getattr(self, name))
        return out

    def replace(self, **flags: Any) -> TrainJobConfig:
        return TrainJobConfig.from_flat(**{**self.flat(), **flags})

    @classmethod
    def path_flags(cls) -> dict[str, str]:
        """Every setting that names a path (its field's `metadata["path"]`), flat name -> its kind:
        "local" (a path on this machine) or "model" (a local directory, else a Hub id)."""
        fields = [*dataclasses.fields(cls),
                  *(f for group in GROUPS.values() for f in dataclasses.fields(group))]
        return {f.name: f.metadata["path"] for f in fields if "path" in f.metadata}

    def absolute(self) -> TrainJobConfig:
        """Every path made absolute against this process's working directory.

        Whoever starts ranks or tasks elsewhere ships this: Ray Train runs each rank in a
        folder of its own, where a relative --out would land in Ray's session directory and a
        relative --data would not be found. A model flag naming nothing here is a Hub id and
        stays as given, and so does an object-store URL (`--distill s3://bucket/store`): it
        names the same place from every node, and a path would mangle it (`s3:/bucket/...`).
        """
        from kdcache.storage.location import is_url  # here: this module stays light for the CLI

        flags = {name: str(Path(value).absolute()) for name, kind in self.path_flags().items()
                 if (value := self.flat()[name]) and not is_url(value)
                 and (kind == "local" or Path(value).exists())}
        return self.replace(**flags)

    @property
    def kind(self) -> str:
        """The runs table's `kind`: supervised | distill | online."""
        d = self.distillation
        return "distill" if d.distill else "online" if d.online_teacher else "supervised"

    @property
    def recipe(self) -> Recipe:
        """The optimiser settings in effect (`LoopSettings.recipe` for this kind of student)."""
        return self.loop.recipe(pretrained=self.student.pretrained)

    def identity(self) -> dict[str, Any]:
        """What the run computes, as settings: the identity groups (paths as given)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in IDENTITY_GROUPS}

    def fingerprint(
        self, data_fingerprint: str, teacher_fingerprint: str = "", student_fingerprint: str = ""
    ) -> str:
        """Identifies what the run computes: resuming requires the same fingerprint.

        The identity groups with their paths replaced by what those hold: the data, the
        teacher (a store's identity or a model's weights) and an HF student's weights or
        config.
        """
        values = self.identity()
        for group in values.values():
            for name in _PATHS:
                group.pop(name, None)
        blob = json.dumps({"config": values, "data": data_fingerprint, "kind": self.kind,
                           "teacher": teacher_fingerprint, "student": student_fingerprint},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()
