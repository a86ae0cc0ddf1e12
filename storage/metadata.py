"""The store's `kdcache` group attribute: what was cached, from which teacher and data.

Everything except the MEASURED fields (set by the cache job, not chosen) is the store's
identity: a writer that reopens a store with a different identity is refused, field by field, so a cache can
never silently mix two teachers, tokenizers, k values or temperatures.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from kdcache.storage.codecs import VALUE_MODES
from kdcache.storage.errors import StoreError

FORMAT = "kdcache.logits/1"
Kind = Literal["topk", "full", "sampled"]
"""What a store keeps per position; `layout.ARRAYS_BY_KIND` says which arrays each kind holds."""
KINDS: tuple[Kind, ...] = typing.get_args(Kind)
MAX_DRAWS = 255  # `counts` is uint8
MEASURED = ("complete", "teacher_loss", "padded_mass", "valid_loss", "valid_tokens")
"""Set by the cache job on completion, not chosen: not the identity."""


@dataclass(frozen=True, kw_only=True)
class TeacherInfo:
    """The teacher that produced the targets."""

    name: str
    fingerprint: str
    params: int
    nonembedding_params: int
    output_rows: int | None = None
    """Rows of its output layer; more than `vocab_size` when padded (None: stores before v0.2)."""
    dtype: str = "float32"
    """Weights' dtype it ran in: a store made in another dtype is another store."""


@dataclass(frozen=True, kw_only=True)
class DataInfo:
    """The token split the targets are row-aligned with."""

    fingerprint: str
    split: str
    rows: int
    tokenizer: str = ""
    mask_fingerprint: str = ""
    """The split's `loss_mask` and `position_ids` fingerprint when the data packs documents
    (the store then holds both arrays); "" for stream-packed text and stores made before."""


@dataclass(frozen=True, kw_only=True)
class StoreMeta:
    """Contents of the `kdcache` attribute (docs/store-format.md)."""

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
    values: str = "exact"
    """How top-k log-probs are kept: `exact` (float16) or a lossy mode (codecs.VALUE_MODES)."""
    temperatures: list[float] = dataclasses.field(default_factory=list)
    """Further temperatures a top-k store can be read at, on the same ids: it holds each one's
    log-normaliser and tail (arrays `tau_logz`, `tau_tail_logmass`; docs/store-format.md)."""
    format: str = FORMAT
    complete: bool = False
    teacher_loss: float | None = None
    """Mean teacher NLL of the true next token over the rows cached here (the cached-split NLL)."""
    valid_loss: float | None = None
    """L_T, the teacher loss the scaling law uses: the teacher's cross-entropy on the token data's
    `valid` split, the rows students are scored on (None: a store made before it was recorded)."""
    valid_tokens: int | None = None
    """Tokens `valid_loss` was measured over."""
    padded_mass: float | None = None
    """Mean probability the teacher's padded output rows held (0 without padding; None when
    the backend cannot see it, as vLLM, which is asked for the real ids only)."""

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
        if self.values not in VALUE_MODES:
            raise StoreError(f"field 'values' must be one of {VALUE_MODES}, got {self.values!r}")
        if self.values != "exact" and self.kind != "topk":
            raise StoreError(f"field 'values' is {self.values!r}, but only a topk store has a lossy mode")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise StoreError(f"field 'temperature' must be > 0, got {self.temperature}")
        if self.temperatures and self.kind != "topk":
            raise StoreError("field 'temperatures' is set, but only a topk store can hold other temperatures")
        for tau in self.temperatures:
            if not (math.isfinite(tau) and tau > 0) or tau == self.temperature:
                raise StoreError(f"field 'temperatures' must hold values > 0 other than 'temperature' "
                                 f"({self.temperature}), got {tau}")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise StoreError(f"field 'temperatures' repeats a value: {self.temperatures}")
        if self.teacher.output_rows is not None and self.teacher.output_rows < self.vocab_size:
            raise StoreError(f"field 'teacher.output_rows' ({self.teacher.output_rows}) is below "
                             f"'vocab_size' ({self.vocab_size})")
        if self.shard_rows % self.chunk_rows:
            raise StoreError(
                f"field 'chunk_rows' ({self.chunk_rows}) must divide 'shard_rows' ({self.shard_rows})"
            )

    @property
    def rows(self) -> int:
        return self.data.rows

    @property
    def documents(self) -> bool:
        """Whether the rows pack documents: the store holds `loss_mask` and `position_ids`,
        and only the positions the mask trains hold targets."""
        return bool(self.data.mask_fingerprint)

    @property
    def num_shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """Row range [start, stop) of a shard."""
        if not 0 <= shard < self.num_shards:
            raise StoreError(f"shard index {shard} out of range 0..{self.num_shards - 1}")
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.rows)

    def temperature_index(self, tau: float) -> int | None:
        """Where `tau` is in `temperatures` (None: it is `temperature`, the stored log-probs'),
        or a StoreError naming the temperatures the store can be read at."""
        if tau == self.temperature:
            return None
        if tau not in self.temperatures:
            raise StoreError(f"field 'temperatures': the store holds targets at {self.temperature} and "
                             f"{self.temperatures or 'no other temperature'}, not at {tau} (cache again "
                             "with --temperatures to add it)")
        return self.temperatures.index(tau)

    def identity(self) -> dict[str, Any]:
        """The fields a reopening writer must match."""
        return identity_of(self.to_json())

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
            for name, sub in (("teacher", TeacherInfo), ("data", DataInfo)):
                if not isinstance(fields.get(name), dict):
                    raise StoreError(f"field '{name}' must be an object, got {fields.get(name)!r}")
                _check_types(sub, fields[name], f"{name}.")
                fields[name] = sub(**fields[name])
            _check_types(cls, fields)
            return cls(**fields)
        except StoreError as exc:
            raise StoreError(f"{where}: attribute 'kdcache': {exc}") from exc


def identity_of(attrs: dict[str, Any]) -> dict[str, Any]:
    """The identity fields of a `kdcache` attribute: everything but what completion sets."""
    return {key: value for key, value in attrs.items() if key not in MEASURED}


def identity_digest(attrs: dict[str, Any]) -> str:
    """sha256 of the identity fields exactly as stored, so that shard entries can pin them.

    It is taken over the attribute as it is on disk, not over a `StoreMeta`, so a later
    kdcache that adds a defaulted field still computes the digest old stores were written with.
    """
    blob = json.dumps(identity_of(attrs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_types(cls: type, values: dict[str, Any], prefix: str = "") -> None:
    """Refuse missing, unknown or wrongly typed fields by name (JSON has no int/float split)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise StoreError(f"unknown field '{prefix}{unknown[0]}'")
    for name, f in fields.items():
        if name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise StoreError(f"missing field '{prefix}{name}'")
            continue
        if not _is_a(values[name], hints[name]):
            want = _type_name(hints[name])
            raise StoreError(f"field '{prefix}{name}' must be {want}, got {values[name]!r}")


def _is_a(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_is_a(v, typing.get_args(hint)[0]) for v in value)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_is_a(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return isinstance(value, str)  # the allowed values are checked in __post_init__
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "a string"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(hint, str(hint))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
