"""`kdcache prepare`: text source -> tokenizer + document-disjoint token splits (Zarr).

Streaming: documents flow in bounded batches (read, assign to a split, tokenize, pack,
write) and nothing holds the corpus. A document's split is a keyed hash of its name and
the seed (`tokenizer.split_of`), so the teacher never sees a student document
and no global list is needed. A byte-level BPE is trained on at most
`--tokenizer-sample-bytes` of teacher documents (or an existing tokenizer.json is used).
With `--teacher-frac 0` (a teacher trained elsewhere) no teacher split is written and
the BPE learns from student documents instead.
Each split is packed in document order into rows of seq_len + 1 tokens and written as
Zarr shards (`kdcache.storage.tokens.writer`): text by default as one stream cut
anywhere, documents separated by the end-of-text token; chat and completion records
(rendered with the tokenizer's chat template, `chat.py`) and text with `--packing
documents|none` as whole documents per row, with the loss mask and position ids that
keep them apart.

`--source` and `--tokenizer` may be Hugging Face Hub ids (`kdcache.hub`): they are
fetched (or found in the cache) when the job starts, before any work, and the metadata
records the source as given. A given tokenizer's config, special tokens, chat template
and generation config travel into the output beside it (`tokenizer_files.py`).

`--workers 1` runs in this process; `--workers N` runs on Ray Data (`ray_data.py`) and
writes the same bytes. Output is built in a hidden temporary directory and renamed into
place at the end: a row's position depends on every earlier document, so an
interrupted build cannot be resumed shard by shard; rerunning rebuilds it, byte for
byte the same. An `--out` in an object store (`s3://...`) is built in a local temporary
directory and uploaded with its root `zarr.json` last, so no reader finds it half-written;
a `--source` there is fetched into a temporary directory first.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdcache.hub import resolve_dataset, resolve_tokenizer
from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.build import build
from kdcache.pipeline.prepare.chat import ChatTemplate
from kdcache.pipeline.prepare.config import PrepareConfig, PrepareResult
from kdcache.pipeline.prepare.corpus import read_unit, read_units
from kdcache.pipeline.prepare.ray_data import LOCAL_OBJECT_STORE, quiet_ray_logs, ray_pieces
from kdcache.pipeline.prepare.records import Columns
from kdcache.pipeline.prepare.tokenizer import (
    SPLITS,
    Encoding,
    eos_id,
    load_tokenizer,
    split_of,
    teacher_sample,
    tokenize_batch,
    train_tokenizer,
)
from kdcache.pipeline.prepare.tokenizer_files import carried
from kdcache.ray_session import ray_session
from kdcache.storage.location import LocalDir, Location, download, is_url, locate, upload
from kdcache.storage.tokens.writer import CHUNK_TOKENS, SplitWriter

BYTES_PER_TOKEN_CAP = 8  # with --max-tokens, the tokenizer sample is at most this many bytes per token
BATCH_BYTES = 1 << 20  # text per tokenize call: tokenizers' encodings take ~50x the text

__all__ = ["CHUNK_TOKENS", "SPLITS", "PrepareConfig", "PrepareResult", "SplitWriter", "prepare",
           "split_of"]


def _columns(cfg: PrepareConfig) -> Columns:
    return Columns(cfg.columns, text=cfg.format == "text", max_bytes=cfg.max_record_bytes)


def _template(cfg: PrepareConfig) -> ChatTemplate | None:
    """The chat template chat data needs; completion data uses one when there is one (its
    conversational records need it, plain prompt/completion strings do not)."""
    if cfg.format == "text" or cfg.tokenizer is None:
        return None
    try:
        return ChatTemplate.find(cfg.tokenizer, cfg.chat_template)
    except PipelineError:
        if cfg.format == "chat" or cfg.chat_template is not None:
            raise
        return None


def _encoding(cfg: PrepareConfig, template: ChatTemplate | None) -> Encoding:
    return Encoding(fmt=cfg.format, documents=cfg.row_packing != "stream",
                    template=None if template is None else template.to_json(), train_on=cfg.train_on,
                    column=cfg.messages_column)


def _tokenizer(cfg: PrepareConfig, units: list[Any]) -> Any:
    """The given tokenizer, or a BPE trained on a bounded sample of the teacher split (of
    the student split when there is no teacher split)."""
    if cfg.tokenizer is not None:
        return load_tokenizer(cfg.tokenizer, cfg.vocab_size)
    name = cfg.sample_split
    cap = cfg.tokenizer_sample_bytes
    if cfg.max_tokens is not None:
        cap = min(cap, max(1, int(cfg.max_tokens * BYTES_PER_TOKEN_CAP * cfg.fractions[name])))
    batches = (b for u in units for b in read_unit(u, _columns(cfg), BATCH_BYTES))
    sample = teacher_sample(batches, cfg.seed, list(cfg.fractions.values()), cap, SPLITS.index(name))
    if not sample:
        raise PipelineError(f"{cfg.source}: source is empty (no non-empty documents in the {name} split)")
    return train_tokenizer(sample, cfg.vocab_size or 8192, not cfg.quiet)


def _serial_pieces(cfg: PrepareConfig, units: list[Any], tok: Any, encoding: Encoding) -> Iterator[Any]:
    fractions = list(cfg.fractions.values())
    for unit in units:
        for names, values, nbytes in read_unit(unit, _columns(cfg), BATCH_BYTES):
            yield from tokenize_batch(tok, eos_id(tok), names, values, nbytes, cfg.seed, fractions,
                                      encoding).pieces()


def _remove_stale(out: Path) -> None:
    """Temporary directories of killed runs (their pid is gone) would never be removed."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Build the DATA directory `cfg.out`; see the module docstring."""
    if is_url(cfg.out):
        return _prepare_remote(cfg, locate(cfg.out))
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise PipelineError(f"{out}: output already exists (pass --overwrite to replace it)")
    if is_url(cfg.source):
        with tempfile.TemporaryDirectory(prefix="kdcache-source-") as src:
            return _prepare_local(cfg, out, read_units(str(download(locate(cfg.source), Path(src)))))
    return _prepare_local(cfg, out)


def _prepare_remote(cfg: PrepareConfig, out: Location) -> PrepareResult:
    out.check()
    if out.exists() and not cfg.overwrite:
        what = "output already exists" if out.is_file("zarr.json") else (
            "holds objects but no token data (an interrupted upload, or someone else's objects)")
        raise PipelineError(f"{out}: {what} (pass --overwrite to replace it)")
    with tempfile.TemporaryDirectory(prefix="kdcache-prepare-") as tmp:
        result = prepare(dataclasses.replace(cfg, out=str(Path(tmp) / "data"), overwrite=False))
        out.remove()  # --overwrite: the old root goes first, so nothing reads a mix
        upload(LocalDir(Path(tmp) / "data"), out)
    return dataclasses.replace(result, out=str(out))


def _prepare_local(cfg: PrepareConfig, out: Path, units: list[Any] | None = None) -> PrepareResult:
    if cfg.tokenizer is not None:
        cfg = dataclasses.replace(cfg, tokenizer=resolve_tokenizer(cfg.tokenizer, "--tokenizer"))
    if units is None:
        units = read_units(resolve_dataset(cfg.source, "--source"))
    tok = _tokenizer(cfg, units)
    template = _template(cfg)
    files = {} if cfg.tokenizer is None else carried(cfg.tokenizer, template, cfg.chat_template)
    if out.parent.is_dir():
        _remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = _build(cfg, units, tok, template, tmp, files)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # the only moment the output appears: complete or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _build(cfg: PrepareConfig, units: list[Any], tok: Any, template: ChatTemplate | None,
           tmp: Path, files: dict[str, bytes]) -> PrepareResult:
    encoding = _encoding(cfg, template)
    if cfg.workers == 1:
        return build(cfg, units, tok, template, tmp, _serial_pieces(cfg, units, tok, encoding), files)

    with quiet_ray_logs(cfg.quiet), ray_session(cfg.ray_address, object_store_memory=LOCAL_OBJECT_STORE):
        pieces = ray_pieces(units, tok, eos_id(tok), workers=cfg.workers, columns=_columns(cfg),
                            seed=cfg.seed, fractions=list(cfg.fractions.values()),
                            batch_bytes=BATCH_BYTES, encoding=encoding)
        return build(cfg, units, tok, template, tmp, pieces, files)

