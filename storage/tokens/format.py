"""Reader for the token data that `kdcache prepare` writes (layout in docs/token-data.md).

A DATA directory is a Zarr v3 group with one int32 array per split (`teacher`,
`student`, `valid`, each `[rows, seq_len + 1]`, stored as Zarr shard files of whole
inner chunks) and `tokenizer.json` beside them. The
group attribute `kdcache` records the format, source, fingerprints, vocab size and
seq_len. Row r predicts `tokens[r, 1:]` from `tokens[r, :-1]`.

Data packed by document (chat and completion data, or text prepared with `--packing
documents|none`) has two more arrays per split, row-aligned with its tokens:
`<split>.loss_mask` (uint8) and `<split>.position_ids` (int32). Both describe tokens,
not targets: `loss_mask[r, j]` is 1 when token j is trained as the target of position
j - 1, and `position_ids` restart at 0 at each document's first token (padding at a
row's end is a segment of its own). A document's first token is never trained, so no
target crosses a document boundary, and the one shift from tokens to targets happens
in `Rows.labels`.

Integrity: opening checks what is cheap (every split array's metadata, shape and dtype,
and the tokenizer's hash); every read checks its chunks' crc32c and that the ids lie in
the vocabulary, so corrupt data stops training with one line instead of silently
changing tokens. Data written before checksums were added (no crc32c codec, fill value
0) still opens and reads, but a flipped byte or a deleted chunk there can only be found
by `kdcache verify`, which recomputes every split's fingerprint.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from kdcache.storage.errors import StoreError
from kdcache.storage.location import LocalDir, Location, locate, open_group

FORMAT = "kdcache.tokens/1"
ATTR = "kdcache"
CHECKSUMS = "crc32c"  # the split metadata's "checksums" value when chunks carry a crc32c
IGNORE_INDEX = -100
"""The label of an untrained position: PyTorch's `ignore_index`, Hugging Face's convention."""
FORMATS = ("text", "chat", "completion")
"""The records' shape (attribute `input_format`; `format` names this file format)."""
PACKINGS = ("stream", "documents", "none")
"""`stream`: documents back to back, cut into rows anywhere (text only, no mask arrays);
`documents`: whole documents per row, each attending only to itself; `none`: one per row."""
MASK = "loss_mask"
POSITIONS = "position_ids"
DOCUMENT_ARRAYS = {MASK: np.dtype(np.uint8), POSITIONS: np.dtype(np.int32)}
"""The per-split arrays of data packed by document, and their dtypes."""
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
"""What DATA keeps beside tokenizer.json when prepared with a given tokenizer (its own files, byte
for byte, the first holding its special tokens and chat template), and students carry on, so a
student is a drop-in model for its teacher."""


def document_array(split: str, name: str) -> str:
    """The array name of a split's `loss_mask` or `position_ids`: `teacher.loss_mask`."""
    return f"{split}.{name}"


def sha256_parts(*parts: bytes) -> str:
    """sha256 over the sha256 digest of each part: the one definition of every token data
    fingerprint, shared by `prepare` (which writes them) and `verify` (which recomputes them)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def split_fingerprint(shape: tuple[int, ...], body_digest: bytes) -> str:
    """A split's fingerprint from its shape and the sha256 digest of its token bytes
    (`<i4`, row-major; a mask's `|u1`): equal to `sha256_parts(str(shape).encode(), bytes)`,
    but the bytes can be hashed streaming, row by row, by `prepare` and by `verify` alike."""
    return hashlib.sha256(hashlib.sha256(str(tuple(shape)).encode()).digest() + body_digest).hexdigest()


def data_fingerprint(tokenizer_fingerprint: str, seq_len: int, splits: dict[str, str]) -> str:
    """The overall fingerprint from its parts (array name -> its fingerprint, in order: each
    split, followed by its `loss_mask` and `position_ids` when it has them)."""
    return sha256_parts(
        tokenizer_fingerprint.encode(), str(seq_len).encode(),
        *(f"{name}:{fp}".encode() for name, fp in splits.items()),
    )


def is_token_data(path: str | os.PathLike[str] | Location) -> bool:
    """Whether `path` claims to be token data (its group attribute names our format), so
    `kdcache verify` can tell a DATA directory from a logit store; never raises."""
    try:
        root = json.loads(locate(path).read_text("zarr.json"))
        return bool(root["attributes"][ATTR]["format"] == FORMAT)
    except (OSError, ValueError, KeyError, TypeError, StoreError):
        return False


def fingerprint_parts(splits: dict[str, Any]) -> dict[str, str]:
    """Array name -> fingerprint, in the order `data_fingerprint` hashes them, from the
    `splits` attribute: stream data gives exactly its split names, as before masks existed."""
    parts: dict[str, str] = {}
    for split, info in splits.items():
        parts[split] = str(info["fingerprint"])
        for name in DOCUMENT_ARRAYS:
            if name in info:
                parts[document_array(split, name)] = str(info[name]["fingerprint"])
    return parts


@dataclass(frozen=True)
class Rows:
    """Rows of a split as read for training: tokens, and which tokens are trained targets."""

    tokens: np.ndarray
    """int64 [n, T + 1]."""
    loss_mask: np.ndarray | None = None
    """bool [n, T + 1]: token j is trained as the target of position j - 1 (None: all are)."""
    position_ids: np.ndarray | None = None
    """int64 [n, T + 1], restarting at 0 per document (None: one stream, `arange`)."""

    def trained(self) -> np.ndarray:
        """bool [n, T]: which target positions are trained."""
        if self.loss_mask is None:
            return np.ones((self.tokens.shape[0], self.tokens.shape[1] - 1), dtype=bool)
        return self.loss_mask[:, 1:]

    def labels(self) -> np.ndarray:
        """int64 [n, T]: the next token, or IGNORE_INDEX where it is not trained."""
        targets = self.tokens[:, 1:]
        if self.loss_mask is None:
            return targets.copy()
        return np.where(self.loss_mask[:, 1:], targets, IGNORE_INDEX)

    def input_positions(self) -> np.ndarray | None:
        """int64 [n, T]: the position of each input token within its document."""
        return None if self.position_ids is None else self.position_ids[:, :-1]


@dataclass(frozen=True)
class TokenData:
    """An opened DATA directory. Attribute access is cheap; rows are read on demand."""

    path: Location
    meta: dict[str, Any]
    arrays: dict[str, zarr.Array] = field(default_factory=dict, repr=False, compare=False)
    """The split arrays, opened (and checked) once by `open_token_data`."""

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
        """tokenizer.json as a local file, its `TOKENIZER_FILES` beside it (data in an object
        store: copies in a folder of this process's, fetched once)."""
        return local_tokenizer(self.path)

    @property
    def format(self) -> str:
        """`text`, `chat` or `completion` (data written before formats existed: `text`)."""
        return str(self.meta.get("input_format", "text"))

    @property
    def packing(self) -> str:
        """How rows were cut: one of PACKINGS (data written before packing modes: `stream`)."""
        return str(self.meta.get("packing", "stream"))

    @property
    def documents(self) -> bool:
        """Whether the splits carry `loss_mask` and `position_ids`."""
        return self.packing != "stream"

    def mask_fingerprint(self, split: str) -> str:
        """Hash of the split's `loss_mask` and `position_ids` ("" for stream data): what a
        store cached from this split records, so a student can refuse another mask."""
        if not self.documents:
            return ""
        info = self.meta["splits"][self._check(split)]
        return sha256_parts(*(str(info[name]["fingerprint"]).encode() for name in DOCUMENT_ARRAYS))

    def trained_tokens(self, split: str) -> int:
        """Target positions of the split that are trained (every one for stream data)."""
        info = self.meta["splits"][self._check(split)]
        return int(info.get("trained_tokens", int(info["rows"]) * self.seq_len))

    def split_fingerprint(self, split: str) -> str:
        return str(self.meta["splits"][self._check(split)]["fingerprint"])

    def rows(self, split: str) -> int:
        return int(self.meta["splits"][self._check(split)]["rows"])

    def array(self, split: str) -> zarr.Array:
        """The split as a Zarr array `[rows, seq_len + 1]` (int32). Slicing it checks chunk
        checksums but not the id range; `read` checks both."""
        self._check(split.split(".")[0])
        if split not in self.arrays:
            self.arrays[split] = open_split(self.path, self.meta, split)
        return self.arrays[split]

    def read_rows(self, split: str, index: slice | np.ndarray) -> Rows:
        """Rows of a split with their loss mask and position ids (checked like `read`)."""
        tokens = self.read(split, index)
        if not self.documents:
            return Rows(tokens)
        mask = self._read_checked(document_array(split, MASK), index)
        positions = self._read_checked(document_array(split, POSITIONS), index)
        problem = document_problem(mask, positions, self.seq_len + 1)
        if problem is not None:
            rows = (np.arange(*index.indices(self.rows(split))) if isinstance(index, slice)
                    else np.asarray(index))
            where = f"{int(rows.min())}..{int(rows.max())}" if rows.size else "-"
            raise StoreError(f"{self.path}: split {split!r} rows {where}: {problem} (corrupt data); "
                             "re-run kdcache prepare")
        return Rows(tokens, mask.astype(bool), positions.astype(np.int64))

    def _read_checked(self, name: str, index: slice | np.ndarray) -> np.ndarray:
        arr = self.array(name)
        if isinstance(index, slice):
            rows = np.arange(*index.indices(arr.shape[0]))
            return self._decode(name, rows, lambda: arr[index])
        rows = np.asarray(index)
        order = np.argsort(rows, kind="stable")
        got = self._decode(name, rows, lambda: arr.get_orthogonal_selection((rows[order], slice(None))))
        out = np.empty_like(got)
        out[order] = got
        return out

    def read(self, split: str, index: slice | np.ndarray) -> np.ndarray:
        """Rows of a split as int64 numpy (a slice, or an array of row indices).

        Raises StoreError naming the split and rows when a chunk fails its checksum,
        is missing, or holds an id outside the vocabulary: training on such rows would
        silently learn the wrong tokens or crash deep inside the model.
        """
        arr = self.array(split)
        if isinstance(index, slice):
            rows = np.arange(*index.indices(arr.shape[0]))
            got = self._decode(split, rows, lambda: arr[index])
            self._check_ids(split, rows, got)
            return got.astype(np.int64)
        rows = np.asarray(index)
        order = np.argsort(rows, kind="stable")
        # One orthogonal read decodes each touched chunk once; undo the sort after.
        got = self._decode(split, rows, lambda: arr.get_orthogonal_selection((rows[order], slice(None))))
        out = np.empty(got.shape, dtype=np.int64)
        out[order] = got
        self._check_ids(split, rows, out)
        return out

    def _decode(self, split: str, rows: np.ndarray, read: Any) -> np.ndarray:
        """Run one zarr read, turning a decode failure into a StoreError naming the chunk."""
        try:
            return np.asarray(read())
        except IndexError:
            raise  # a row index out of range is the caller's bug, not corrupt data
        except Exception as exc:  # zarr raises several types for bad chunk bytes
            lo, hi, exc = _first_bad_chunk(self.array(split), rows, exc)
            raise StoreError(
                f"{self.path}: split {split!r} rows {lo}..{hi}: corrupt chunk, it fails its checksum "
                f"or cannot be decoded ({_one_line(exc)}); run kdcache verify, then re-run kdcache prepare"
            ) from exc

    def _check_ids(self, split: str, rows: np.ndarray, got: np.ndarray) -> None:
        """One min/max over the block; the per-row search runs only when an id is bad."""
        if got.size == 0:
            return
        lo, hi = int(got.min()), int(got.max())
        if lo < 0:
            where = _row_span(rows, got < 0)
            raise StoreError(
                f"{self.path}: split {split!r} rows {where}: missing data (ids read as {lo}, the fill "
                "value of an unwritten chunk: a chunk file was deleted); re-run kdcache prepare"
            )
        if hi >= self.vocab_size:
            where = _row_span(rows, got >= self.vocab_size)
            raise StoreError(
                f"{self.path}: split {split!r} rows {where}: token id {hi} >= vocab_size "
                f"{self.vocab_size} (corrupt data); re-run kdcache prepare"
            )

    def _check(self, split: str) -> str:
        if split not in self.meta["splits"]:
            raise StoreError(
                f"{self.path}: no split {split!r} (has {sorted(self.meta['splits'])})"
            )
        return split


def document_problem(mask: np.ndarray, positions: np.ndarray, width: int) -> str | None:
    """What is wrong with a block of `loss_mask` and `position_ids` rows, or None: values in
    range, positions that restart at 0 or step by 1, and no trained document-first token."""
    if mask.size == 0:
        return None
    if int(mask.max()) > 1:
        return f"loss_mask holds {int(mask.max())}, not 0 or 1"
    if int(positions.min()) < 0 or int(positions.max()) >= width:
        return f"position_ids outside 0..{width - 1} (a missing chunk reads as -1)"
    starts = positions == 0
    if not starts[:, 0].all():
        return "a row does not start a document (position_ids[:, 0] != 0)"
    steps = (positions[:, 1:] == positions[:, :-1] + 1) | starts[:, 1:]
    if not steps.all():
        return "position_ids neither restart at 0 nor step by 1"
    if (mask.astype(bool) & starts).any():
        return "a document's first token is marked trained (its target would cross documents)"
    return None


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def _row_span(rows: np.ndarray, bad_ids: np.ndarray) -> str:
    """'first..last' of the rows (row numbers of the split) holding a bad id."""
    hit = np.sort(rows[bad_ids.any(axis=1)])
    return f"{int(hit[0])}..{int(hit[-1])}"


def _first_bad_chunk(arr: zarr.Array, rows: np.ndarray, exc: Exception) -> tuple[int, int, Exception]:
    """Re-read the touched chunks one by one (only after a failure) to name the bad one;
    falls back to the whole requested range when each chunk alone reads fine."""
    step = arr.chunks[0]
    for chunk in np.unique(rows // step).tolist():
        lo, hi = chunk * step, min((chunk + 1) * step, arr.shape[0])
        try:
            arr[lo:hi]
        except Exception as again:  # the same failure, now pinned to one chunk
            return lo, hi - 1, again
    return (int(rows.min()), int(rows.max()), exc) if rows.size else (0, 0, exc)


def read_token_meta(path: str | os.PathLike[str] | Location) -> dict[str, Any]:
    """The group attribute, checked for the fields every reader relies on."""
    path = locate(path)
    if not path.is_file("zarr.json"):
        path.check()  # a missing bucket or a refused listing says so, rather than "no zarr.json"
        raise StoreError(f"{path}: not a token data directory (no zarr.json; run kdcache prepare)")
    try:
        group = open_group(path)
    except Exception as exc:  # zarr raises several types for a corrupt group
        raise StoreError(f"{path}/zarr.json: unreadable token data ({_one_line(exc)})") from exc
    meta = group.attrs.get(ATTR)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{path}/zarr.json: attribute '{ATTR}.format' is not {FORMAT!r}")
    for key, kind in (("vocab_size", int), ("seq_len", int), ("tokenizer_fingerprint", str),
                      ("fingerprint", str), ("splits", dict)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise StoreError(f"{path}/zarr.json: attribute '{ATTR}.{key}' is missing or not {kind.__name__}")
    documents = meta.get("packing", "stream") != "stream"
    for split, info in meta["splits"].items():
        if not isinstance(info, dict) or not isinstance(info.get("rows"), int):
            attr = f"'{ATTR}.splits.{split}.rows'"
            raise StoreError(f"{path}/zarr.json: attribute {attr} is missing or not int")
        for name in DOCUMENT_ARRAYS if documents else ():
            if not isinstance(info.get(name), dict) or not isinstance(info[name].get("fingerprint"), str):
                attr = f"'{ATTR}.splits.{split}.{name}.fingerprint'"
                raise StoreError(f"{path}/zarr.json: attribute {attr} is missing or not str "
                                 f"(packing {meta['packing']!r} needs it)")
    return dict(meta)


def tokenizer_problem(path: Location, meta: dict[str, Any]) -> str | None:
    """Why tokenizer.json does not belong to this data (None when it does): an edited
    tokenizer silently maps the same ids to other text."""
    tok = f"{path}/tokenizer.json"
    if not path.is_file("tokenizer.json"):
        return f"{tok}: missing tokenizer.json"
    if sha256_parts(path.read("tokenizer.json")) != meta["tokenizer_fingerprint"]:
        return (f"{tok}: sha256 does not match '{ATTR}.tokenizer_fingerprint' in {path}/zarr.json "
                "(edited or corrupt; re-run kdcache prepare)")
    return None


def open_split(path: Location, meta: dict[str, Any], split: str) -> zarr.Array:
    """Open one split array, checking its metadata against the group's: cheap, reads no chunk."""
    where = f"{path}/{split}/zarr.json"
    base, _, doc = split.partition(".")
    if not path.is_file(f"{split}/zarr.json"):
        what = f"the {doc} of split {base!r}" if doc else f"split {split!r}"
        raise StoreError(f"{where}: missing ({what} of the token data)")
    try:
        arr = zarr.open_array(store=(path / split).zarr_store(read_only=True), mode="r")
    except Exception as exc:  # zarr raises several types for corrupt array metadata
        raise StoreError(f"{where}: unreadable array metadata ({_one_line(exc)})") from exc
    want = (int(meta["splits"][base]["rows"]), int(meta["seq_len"]) + 1)
    if tuple(arr.shape) != want:
        raise StoreError(
            f"{where}: field 'shape' is {list(arr.shape)} but {path}/zarr.json says "
            f"[rows, seq_len + 1] = {list(want)}"
        )
    dtype = DOCUMENT_ARRAYS[doc] if doc else np.dtype(np.int32)
    if arr.dtype != dtype:
        raise StoreError(f"{where}: field 'data_type' is {arr.dtype}, not {dtype}")
    if meta["splits"][base].get("checksums") == CHECKSUMS and not any(
        isinstance(c, Crc32cCodec) for c in arr.compressors
    ):
        raise StoreError(f"{where}: field 'codecs' lacks crc32c but {path}/zarr.json says it has one")
    return arr


def open_token_data(path: str | os.PathLike[str] | Location) -> TokenData:
    """Open a DATA directory, checking it is complete token data of our format (cheap
    checks only: metadata, shapes and the tokenizer hash; `kdcache verify` reads every chunk)."""
    path = locate(path)
    meta = read_token_meta(path)
    problem = tokenizer_problem(path, meta)
    if problem is not None:
        raise StoreError(problem)
    arrays = {name: open_split(path, meta, name) for name in fingerprint_parts(meta["splits"])}
    return TokenData(path=path, meta=meta, arrays=arrays)


_TOKENIZERS: dict[str, Path] = {}
_TOKENIZERS_LOCK = threading.Lock()


def local_tokenizer(path: Location) -> Path:
    """`path`'s tokenizer.json as a local file with the `TOKENIZER_FILES` it has beside it: the
    data's own on disk; for data in an object store, copies fetched once per process into a
    temporary folder (removed when the process exits)."""
    if isinstance(path, LocalDir):
        return path.path / "tokenizer.json"
    with _TOKENIZERS_LOCK:
        if str(path) not in _TOKENIZERS:
            folder = Path(tempfile.mkdtemp(prefix="kdcache-tokenizer-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            for name in ("tokenizer.json", *TOKENIZER_FILES):
                try:
                    (folder / name).write_bytes(path.read(name))
                except FileNotFoundError:
                    continue
            _TOKENIZERS[str(path)] = folder / "tokenizer.json"
        return _TOKENIZERS[str(path)]
