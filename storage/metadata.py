"""The store's `kdcache` group attribute: what was cached, from which teacher and data.

Everything except `complete` and `teacher_loss` is the store's identity: a writer that
reopens a store with a different identity is refused, field by field, so a cache can
never silently mix two teachers, tokenizers, k values or temperatures.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from kdcache.storage.errors import StoreError

FORMAT = "kdcache.logits/1"
KINDS = ("topk", "full", "sampled")
Kind = Literal["topk", "full", "sampled"]
MAX_DRAWS = 255  # `counts` is uint8


@dataclass(frozen=True, kw_only=True)
class TeacherInfo:
    """The teacher that produced the targets."""

    name: str
    fingerprint: str
    params: int
    nonembedding_params: int


@dataclass(frozen=True, kw_only=True)
class DataInfo:
    """The token split the targets are row-aligned with."""

    fingerprint: str
    split: str
    rows: int
    tokenizer: str = ""


@dataclass(frozen=True, kw_only=True)
class StoreMeta:
    """Contents of the `kdcache` attribute (DESIGN.md, "The logit store")."""

    kind: Kind
    k: int
    vocab_size: int
    seq_len: int
    temperature: float
    teacher: TeacherInfo
    data: DataInfo
    shard_rows: int
    chunk_rows: int = 1
    draws: int | None = None
    seed: int = 0  # of the sampled kind's draws
    format: str = FORMAT
    complete: bool = False
    teacher_loss: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StoreError(f"field 'kind' must be one of {KINDS}, got {self.kind!r}")
        if self.format != FORMAT:
            raise StoreError(f"field 'format' is {self.format!r}; this kdcache reads {FORMAT!r}")
        for name in ("k", "vocab_size", "seq_len", "shard_rows", "chunk_rows"):
            if int(getattr(self, name)) < 1:
                raise StoreError(f"field '{name}' must be >= 1, got {getattr(self, name)}")
        if self.data.rows < 1:
            raise StoreError(f"field 'data.rows' must be >= 1, got {self.data.rows}")
        if self.k > self.vocab_size:
            raise StoreError(f"field 'k' ({self.k}) exceeds 'vocab_size' ({self.vocab_size})")
        if self.kind == "full" and self.k != self.vocab_size:
            raise StoreError(f"a full store needs k == vocab_size, got k={self.k}")
        if self.kind == "sampled":
            if self.draws is None or not 1 <= self.draws <= MAX_DRAWS:
                raise StoreError(f"field 'draws' must be in 1..{MAX_DRAWS} for a sampled store")
            if self.k > self.draws:
                raise StoreError(f"field 'k' ({self.k}) exceeds 'draws' ({self.draws})")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise StoreError(f"field 'temperature' must be > 0, got {self.temperature}")
        if self.shard_rows % self.chunk_rows:
            raise StoreError(
                f"field 'chunk_rows' ({self.chunk_rows}) must divide 'shard_rows' ({self.shard_rows})"
            )

    @property
    def rows(self) -> int:
        return self.data.rows

    @property
    def num_shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """Row range [start, stop) of a shard."""
        if not 0 <= shard < self.num_shards:
            raise StoreError(f"shard index {shard} out of range 0..{self.num_shards - 1}")
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.rows)

    def identity(self) -> dict[str, Any]:
        """The fields a reopening writer must match."""
        out = self.to_json()
        del out["complete"], out["teacher_loss"]
        return out

    def differences(self, other: StoreMeta) -> list[str]:
        """Human-readable identity fields that differ, `name: ours != theirs`."""
        a, b = _flatten(self.identity()), _flatten(other.identity())
        return [f"{key}: {a.get(key)!r} != {b.get(key)!r}" for key in sorted(a.keys() | b.keys())
                if a.get(key) != b.get(key)]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: Any, where: str) -> StoreMeta:
        """Parse the attribute, naming `where` (the store path) in any error."""
        if not isinstance(value, dict):
            raise StoreError(f"{where}: not a kdcache store (no 'kdcache' group attribute)")
        try:
            fields = dict(value)
            fields["teacher"] = TeacherInfo(**fields["teacher"])
            fields["data"] = DataInfo(**fields["data"])
            return cls(**fields)
        except (KeyError, TypeError) as exc:
            raise StoreError(f"{where}: malformed 'kdcache' attribute ({exc})") from exc
        except StoreError as exc:
            raise StoreError(f"{where}: attribute 'kdcache': {exc}") from exc


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
