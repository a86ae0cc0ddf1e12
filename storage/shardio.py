"""Whole Zarr shard files read and written directly, for the codec chains kdcache stores use.

Zarr-python spends ~0.5 ms of Python and event-loop round trips per inner chunk, which
made it the bottleneck of every read and write (benchmarks/store_io.py: ~140k tokens/s
read, ~100k written, where the codec alone runs at millions). A store's arrays use one of
a few fixed chains inside the sharding codec: an optional numcodecs `delta` filter, the
little-endian `bytes` serializer, `blosc`, then `crc32c`; or one of kdcache's own
serializers (codecs.py), then `crc32c`; the shard index (offset and
length per inner chunk, then its own crc32c) sits at the end of the file. For those
chains this module decodes and encodes inner chunks with numcodecs and crc32c itself, on
a thread pool (Blosc releases the GIL), and writes each shard file whole. Any other
chain (`ShardPlan.of` returns None) stays on zarr-python.

The files are ordinary Zarr v3 shards: plain zarr reads what this writes, and this reads
what zarr wrote (including inner chunks zarr skipped as all fill value).

The same code serves object storage (location.py): a shard file is one object, written
with one PUT; a read fetches the shard index (one ranged GET of the file's tail, once per
reader), then the inner chunks a batch needs as byte ranges of one request per array and
shard (obstore coalesces nearby ranges and runs them concurrently), the arrays' requests
issued together on I/O threads.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import crc32c
import numpy as np
import zarr
from numcodecs import Blosc, Delta
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from kdcache.storage.codecs import Decoder, KdcacheCodec
from kdcache.storage.errors import StoreError
from kdcache.storage.location import Location

_EMPTY = np.uint64(2**64 - 1)  # offset and length of an inner chunk that was never written
_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
_POOLS: dict[int, ThreadPoolExecutor] = {}


def pool() -> ThreadPoolExecutor:
    """This process's threads for coding chunks (numcodecs' Blosc runs unthreaded off the
    main thread). One per process id: a forked DataLoader worker inherits its parent's
    executor without its threads, and jobs sent to that one would never run."""
    pid = os.getpid()
    if pid not in _POOLS:
        _POOLS[pid] = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                         thread_name_prefix="kdcache-shardio")
    return _POOLS[pid]


class ChunkError(StoreError):
    """An inner chunk or shard index failed its checksum or could not be decoded."""


@dataclass(frozen=True)
class ShardPlan:
    """How one array's shard files are laid out and coded."""

    folder: Location
    dtype: np.dtype  # the stored dtype
    shape: tuple[int, ...]  # of the whole array
    shard_rows: int
    chunk_rows: int
    delta: bool
    blosc: Blosc | None  # None: `serializer` codes the chunk
    fill: Any
    key: Any  # shard index -> file key, zarr's chunk key encoding
    serializer: Any = None  # a kdcache codec (codecs.py) in place of bytes + Blosc
    keys: dict[int, str] = field(default_factory=dict, compare=False, repr=False)  # path()'s

    @classmethod
    def of(cls, array: zarr.Array, folder: Location) -> ShardPlan | None:
        """The plan for `array`, or None when its codecs are not a chain this module codes."""
        meta = array.metadata
        codecs: tuple[Any, ...] = tuple(getattr(meta, "codecs", ()))
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        inner: list[Any] = list(sharding.codecs)
        index = sharding.index_codecs
        if (sharding.index_location != ShardingCodecIndexLocation.end or len(index) != 2
                or not isinstance(index[1], Crc32cCodec) or not _little(index[0])):
            return None
        shard, chunk = array.shards, sharding.chunk_shape
        if shard is None or tuple(shard[1:]) != tuple(chunk[1:]) or tuple(shard[1:]) != array.shape[1:]:
            return None
        common = dict(folder=folder, dtype=np.dtype(array.dtype), shape=tuple(array.shape),
                      shard_rows=shard[0], chunk_rows=chunk[0], fill=array.fill_value,
                      key=lambda s, n=array.ndim: meta.encode_chunk_key((s, *([0] * (n - 1)))))
        if len(inner) == 2 and isinstance(inner[0], KdcacheCodec) and isinstance(inner[1], Crc32cCodec):
            return cls(delta=False, blosc=None, serializer=inner[0], **common)
        delta = bool(inner) and getattr(inner[0], "codec_name", "") == "numcodecs.delta"
        if delta and np.dtype(inner[0].codec_config["dtype"]) != array.dtype:
            return None
        inner = inner[1:] if delta else inner
        if (len(inner) != 3 or not _little(inner[0]) or not isinstance(inner[1], BloscCodec)
                or not isinstance(inner[2], Crc32cCodec)):
            return None
        b = inner[1]
        blosc = Blosc(cname=b.cname.value, clevel=b.clevel, shuffle=_SHUFFLE[b.shuffle.value],
                      blocksize=b.blocksize)
        return cls(delta=delta, blosc=blosc, **common)

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    def path(self, shard: int) -> str:
        """The shard file's key in `folder` (zarr's key encoding costs ~5 us, per array and read)."""
        known = self.keys.get(shard)
        if known is None:
            known = self.keys[shard] = str(self.key(shard))
        return known

    def _chunk_shape(self) -> tuple[int, ...]:
        return (self.chunk_rows, *self.shape[1:])

    # ---- reading -------------------------------------------------------------------

    def read_index(self, shard: int) -> np.ndarray:
        """[chunks_per_shard, 2] uint64 (offset, length) of each inner chunk, checked."""
        size = self.chunks_per_shard * 16 + 4
        raw = self.folder.read_tail(self.path(shard), size)
        _check(raw, f"array '{self.folder.name}' shard {shard} index")
        return np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)

    def read_chunks(self, shard: int, index: np.ndarray, chunks: list[int]) -> list[bytes | None]:
        """The raw bytes of the inner chunks `chunks` of a shard (None: never written)."""
        written = [c for c in chunks if index[c][0] != _EMPTY]
        spans = [(int(index[c][0]), int(index[c][1])) for c in written]
        got = dict(zip(written, self.folder.read_ranges(self.path(shard), spans), strict=True))
        return [got.get(c) for c in chunks]

    def decode(self, raw: bytes | None, where: str) -> np.ndarray:
        """One inner chunk as an array of the stored dtype (fill values when never written)."""
        if raw is None:
            return np.full(self._chunk_shape(), self.fill, dtype=self.dtype)
        if self.serializer is not None:
            return self.decoder(raw, where)()
        _check(raw, where)
        assert self.blosc is not None
        data = np.empty(self._chunk_shape(), dtype=self.dtype)  # writable, as zarr's reads are
        try:
            self.blosc.decode(memoryview(raw)[:-4], out=data)
        except Exception as exc:  # numcodecs raises RuntimeError/ValueError on bad frames
            raise ChunkError(f"{where} is corrupt (cannot be decoded: {exc})") from exc
        if self.delta:
            flat = data.reshape(-1)
            np.cumsum(flat, dtype=self.dtype, out=flat)  # wraps modulo 2**bits, as encoding did
        return data

    def decoder(self, raw: bytes, where: str) -> Decoder:
        """A kdcache codec's inner chunk, checked and read now; decoded when the returned
        decoder is called (`codecs.Decoder`: `decoder(out=None)`, GIL released)."""
        _check(raw, where)
        try:
            decode = self.serializer.chunk_decoder(memoryview(raw)[:-4], self._chunk_shape(), self.dtype)
        except StoreError as exc:
            raise ChunkError(f"{where} is corrupt (cannot be decoded: {exc})") from exc

        def checked(out: np.ndarray | None = None) -> np.ndarray:
            try:
                return decode(out)
            except StoreError as exc:
                raise ChunkError(f"{where} is corrupt (cannot be decoded: {exc})") from exc

        return checked

    # ---- writing -------------------------------------------------------------------

    def encode(self, chunk: np.ndarray) -> bytes:
        """One inner chunk (already of chunk shape and stored dtype) as stored bytes."""
        if self.serializer is not None:
            body = self.serializer.chunk_encode(chunk)
            return body + _crc(body)
        assert self.blosc is not None
        flat = chunk.reshape(-1)
        if self.delta:
            flat = Delta(dtype=self.dtype).encode(flat).view(self.dtype)
        body = self.blosc.encode(flat)
        return bytes(body) + _crc(body)

    def split(self, data: np.ndarray) -> list[np.ndarray]:
        """A shard's rows (`data`, stored dtype) as its inner chunks, the last padded with fill."""
        if len(data) < self.shard_rows:
            padded = np.full((self.shard_rows, *self.shape[1:]), self.fill, dtype=self.dtype)
            padded[: len(data)] = data
            data = padded
        return np.split(data, self.chunks_per_shard)

    def write_pieces(self, shard: int, pieces: list[bytes]) -> None:
        """Assemble encoded inner chunks, C order, with their index, into the shard file."""
        lengths = np.array([len(p) for p in pieces], dtype="<u8")
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype("<u8")
        index = np.stack([offsets, lengths], axis=1).astype("<u8").tobytes()
        # In place on disk, as zarr writes: a torn file is never committed (the ledger entry
        # comes after it) and is rewritten whole; a rename per file costs ~1.5 ms on overlay
        # disks. One PUT on an object store.
        self.folder.write(self.path(shard), b"".join(pieces) + index + _crc(index))


def distinct(ascending: np.ndarray) -> np.ndarray:
    """np.unique of a sorted array, without its sort (np.unique costs ~0.3 ms on tiny inputs)."""
    keep = np.ones(ascending.size, dtype=bool)
    keep[1:] = ascending[1:] != ascending[:-1]
    return ascending[keep]


def _little(codec: Any) -> bool:
    return isinstance(codec, BytesCodec) and (codec.endian is None or codec.endian.value == "little")


def _crc(data: Any) -> bytes:
    return np.uint32(crc32c.crc32c(data)).astype("<u4").tobytes()


def _check(raw: bytes, where: str) -> None:
    if len(raw) < 4 or _crc(memoryview(raw)[:-4]) != raw[-4:]:
        raise ChunkError(f"{where} is corrupt (crc32c does not match its bytes)")


class RowSource:
    """Reads sorted unique rows of several arrays of one store straight from their shards.

    Shard indexes are cached per file and re-read when the file changes (a repaired shard
    is rewritten by a later cache run), so a long-lived reader never pairs an old index
    with new chunks.
    """

    def __init__(self, plans: dict[str, ShardPlan]) -> None:
        self.plans = plans
        self._index: dict[tuple[str, int], tuple[Hashable, np.ndarray]] = {}
        self.remote = any(p.folder.remote for p in plans.values())
        # kdcache's codecs decode at ~0.5 us/token per array (Blosc: ~0.05): worth a thread each
        self.heavy = any(p.serializer is not None for p in plans.values())

    def index(self, name: str, shard: int) -> np.ndarray:
        """The shard's index, re-read when the file changed. An object store's objects are not
        re-checked (a HEAD per read would double the requests): a committed shard's bytes are a
        function of its rows, so a rewritten shard (after `verify --repair`) has the same index."""
        plan = self.plans[name]
        hit = self._index.get((name, shard))
        stamp = plan.folder.stamp(plan.path(shard)) if hit is None or hit[0] is not None else None
        if hit is None or hit[0] != stamp:
            hit = (stamp, plan.read_index(shard))
            self._index[(name, shard)] = hit
        return hit[1]

    def read(self, unique: np.ndarray, where: str) -> dict[str, np.ndarray]:
        """Every array's `unique` rows (sorted, unique), in the stored dtypes."""
        any_plan = next(iter(self.plans.values()))
        c, per = any_plan.chunk_rows, any_plan.chunks_per_shard
        chunks = distinct(unique // c)
        bounds = np.searchsorted(unique, np.stack([chunks * c, (chunks + 1) * c]))
        if chunks.size == 1 and unique.size == c and not (self.remote or self.heavy):  # no pool, no copy
            chunk = int(chunks[0])
            return {name: plan.decode(plan.read_chunks(chunk // per, self.index(name, chunk // per),
                                                       [chunk % per])[0],
                                      f"array '{name}' in {where}, inner chunk {chunk},")
                    for name, plan in self.plans.items()}
        out = {name: np.empty((unique.size, *p.shape[1:]), dtype=p.dtype) for name, p in self.plans.items()}
        # kdcache's codecs first, their decodes on the pool but the last, which this thread
        # runs itself rather than wait (a thread wakes slowly here) once it has read the
        # other arrays and handed their (small) decodes to the pool as one job.
        names = sorted(self.plans, key=lambda name: self.plans[name].serializer is None)
        fetches = [(name, shard, np.flatnonzero(chunks // per == shard))
                   for name in names for shard in distinct(chunks // per).tolist()]

        def fetch(f: tuple[str, int, np.ndarray]) -> list[bytes | None]:
            return self._fetch(f[0], f[1], (chunks[f[2]] % per).tolist())

        # Over the network every array's request is in flight at once; on disk, one by one.
        got = any_plan.folder.map(fetch, fetches) if self.remote else map(fetch, fetches)
        jobs, light, last = [], [], None
        coded = sum(f[2].size for f in fetches if self.plans[f[0]].serializer is not None)
        for (name, _, mine), raws in zip(fetches, got, strict=True):
            for i, raw in zip(mine.tolist(), raws, strict=True):
                plan, at = self.plans[name], f"array '{name}' in {where}, inner chunk {chunks[i]},"
                args = (name, raw, int(chunks[i]), bounds[:, i], unique, out[name], at)
                if not self.heavy:
                    jobs.append(pool().submit(self._fill, *args))
                    continue
                if plan.serializer is None or raw is None:
                    light.append(args)
                    continue
                coded -= 1  # checked and read here, decoded on the pool (one GIL release per chunk)
                decode = (plan.decoder(raw, at), *args[2:6], plan.chunk_rows)
                if coded:
                    jobs.append(pool().submit(_place, *decode))
                else:
                    last = decode
        if light:
            jobs.append(pool().submit(self._fill_all, light))
        if last is not None:
            _place(*last)
        for job in jobs:
            job.result()
        return out

    def _fetch(self, name: str, shard: int, chunks: list[int]) -> list[bytes | None]:
        plan = self.plans[name]
        return plan.read_chunks(shard, self.index(name, shard), chunks)

    def _fill_all(self, fills: list[tuple[Any, ...]]) -> None:
        for args in fills:
            self._fill(*args)

    def _fill(self, name: str, raw: bytes | None, chunk: int, bounds: np.ndarray, unique: np.ndarray,
              out: np.ndarray, where: str) -> None:
        plan = self.plans[name]
        _place(lambda _=None: plan.decode(raw, where), chunk, bounds, unique, out, plan.chunk_rows)


def _place(decode: Decoder, chunk: int, bounds: np.ndarray, unique: np.ndarray,
           out: np.ndarray, chunk_rows: int) -> None:
    """Put the rows unique[bounds[0]:bounds[1]] of inner chunk `chunk` in place in `out`; a
    whole chunk is decoded straight into it where `decode` can (`codecs.Decoder`)."""
    lo, hi = int(bounds[0]), int(bounds[1])
    rows = unique[lo:hi] - chunk * chunk_rows
    if rows.size == chunk_rows:
        dest = out[lo:hi]
        got = decode(dest)
        if got is not dest:
            dest[...] = got
    else:
        out[lo:hi] = decode()[rows]
