"""Reader for the token data that `kdcache prepare` writes (layout in DESIGN.md).

A DATA directory is a Zarr v3 group with one int32 array per split (`teacher`,
`student`, `valid`, each `[rows, seq_len + 1]`) and `tokenizer.json` beside them. The
group attribute `kdcache` records the format, source, fingerprints, vocab size and
seq_len. Row r predicts `tokens[r, 1:]` from `tokens[r, :-1]`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from kdcache.train.errors import TrainError

FORMAT = "kdcache.tokens/1"
ATTR = "kdcache"


@dataclass(frozen=True)
class TokenData:
    """An opened DATA directory. Attribute access is cheap; rows are read on demand."""

    path: Path
    meta: dict[str, Any]

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    @property
    def fingerprint(self) -> str:
        """Hash of the tokenizer and every split's token bytes."""
        return str(self.meta["fingerprint"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.meta["tokenizer_fingerprint"])

    @property
    def eos_token_id(self) -> int | None:
        eos = self.meta.get("eos_token_id")
        return None if eos is None else int(eos)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    def split_fingerprint(self, split: str) -> str:
        return str(self.meta["splits"][self._check(split)]["fingerprint"])

    def rows(self, split: str) -> int:
        return int(self.meta["splits"][self._check(split)]["rows"])

    def array(self, split: str) -> zarr.Array:
        """The split as a Zarr array `[rows, seq_len + 1]` (int32); slice it to read."""
        self._check(split)
        return zarr.open_array(store=str(self.path / split), mode="r")

    def read(self, split: str, index: slice | np.ndarray) -> np.ndarray:
        """Rows of a split as int64 numpy (a slice, or an array of row indices)."""
        arr = self.array(split)
        if isinstance(index, slice):
            return np.asarray(arr[index], dtype=np.int64)
        order = np.argsort(index, kind="stable")
        # One orthogonal read decodes each touched chunk once; undo the sort after.
        got = np.asarray(arr.get_orthogonal_selection((np.asarray(index)[order], slice(None))))
        out = np.empty(got.shape, dtype=np.int64)
        out[order] = got
        return out

    def _check(self, split: str) -> str:
        if split not in self.meta["splits"]:
            raise TrainError(
                f"{self.path}: no split {split!r} (has {sorted(self.meta['splits'])})"
            )
        return split


def open_token_data(path: str | os.PathLike[str]) -> TokenData:
    """Open a DATA directory, checking it is complete token data of our format."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise TrainError(f"{path}: not a token data directory (no zarr.json; run kdcache prepare)")
    try:
        group = zarr.open_group(store=str(path), mode="r")
    except Exception as exc:  # zarr raises several types for a corrupt group
        raise TrainError(f"{path}: unreadable token data ({exc})") from exc
    meta = group.attrs.get(ATTR)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TrainError(f"{path}/zarr.json: attribute '{ATTR}.format' is not {FORMAT!r}")
    if not (path / "tokenizer.json").is_file():
        raise TrainError(f"{path}: missing tokenizer.json")
    return TokenData(path=path, meta=dict(meta))
