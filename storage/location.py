"""Where a store or token data lives: a local directory, or a prefix in an object store.

Every verb that names a data directory or a store takes either a path or a URL
(`s3://bucket/prefix`; `gs://`, `az://` and `abfs://` through the same library). `locate`
turns the name into a `Location`, and the formats in `storage/` read and write through
it: whole objects, byte ranges of them, listings, and a Zarr store over the same place.

Object stores are reached through `obstore` (chosen by measurement over s3fs:
benchmarks/store_io.py). Credentials, region and endpoint come from the standard
environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_REGION`, `AWS_ENDPOINT_URL`; `AWS_ALLOW_HTTP=true` for a plain-http endpoint), never
from flags, and `str(location)` is the URL alone, so they are never printed or recorded.

An object store has no rename, but a single PUT is atomic: readers see a whole object or
none. `publish` is that atomic write (a temporary file and a rename on local disk);
`write` is a plain write (in place on local disk, where a torn file is never committed:
see ledger.py). Transient failures (5xx, dropped connections, timeouts) are retried with
exponential backoff for at most `retry_seconds()` in all (180 s; `KDCACHE_RETRY_SECONDS`
sets it); anything else, and a failure that outlasts the retries, is a StoreError naming
the URL and the reason in one line (a missing bucket, refused credentials, denied access).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from kdcache.paths import check_writable
from kdcache.storage.errors import StoreError

SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "azure")
"""URL schemes of the object stores `obstore` reaches (Amazon S3 and S3-compatible servers,
Google Cloud Storage, Azure Blob Storage)."""
IO_THREADS = 16
"""Requests to an object store in flight at once per process (each waits on the network)."""
_IO_POOLS: dict[int, ThreadPoolExecutor] = {}
T = TypeVar("T")
R = TypeVar("R")
RETRY_SECONDS = 180.0
"""How long a request is retried, in all, before it fails (`KDCACHE_RETRY_SECONDS`)."""
MAX_RETRIES = 100_000
"""Not the bound: `retry_seconds()` is. obstore waits a random time between 0.1 s and twice its
last wait (at most 15 s) before each retry, so ten retries can be spent in two seconds, and a
count would end a retry long before an outage of a minute does."""


def io_pool() -> ThreadPoolExecutor:
    """This process's threads for object-store requests (one pool per process id: a forked
    process inherits its parent's executor without its threads)."""
    pid = os.getpid()
    if pid not in _IO_POOLS:
        _IO_POOLS[pid] = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="kdcache-io")
    return _IO_POOLS[pid]


def is_url(where: str | os.PathLike[str]) -> bool:
    """Whether `where` names an object-store prefix rather than a local path."""
    text = os.fspath(where)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def locate(where: str | os.PathLike[str] | Location) -> Location:
    """The Location a path or URL names."""
    if isinstance(where, Location):
        return where
    if is_url(where):
        return ObjectPrefix(os.fspath(where))
    return LocalDir(Path(where))


def retry_seconds() -> float:
    raw = os.environ.get("KDCACHE_RETRY_SECONDS")
    if raw is None:
        return RETRY_SECONDS
    try:
        value = float(raw)
    except ValueError:
        raise StoreError(f"environment variable KDCACHE_RETRY_SECONDS: {raw!r} is not a number of seconds") \
            from None
    if not 0 < value <= 86400:
        raise StoreError(f"environment variable KDCACHE_RETRY_SECONDS: {raw!r} is not in (0, 86400]")
    return value


class Location(ABC):
    """A folder of objects named by relative keys (`ids/c/0/0/0`, `ledger/shard-000001/zarr.json`)."""

    remote: bool

    @abstractmethod
    def __truediv__(self, name: str) -> Location:
        """The location of a folder inside this one."""

    @property
    @abstractmethod
    def name(self) -> str:
        """The last component of the path or URL."""

    @abstractmethod
    def read(self, key: str) -> bytes:
        """A whole object; FileNotFoundError when there is none."""

    def read_text(self, key: str) -> str:
        return self.read(key).decode()

    @abstractmethod
    def is_file(self, key: str) -> bool:
        """Whether an object `key` exists."""

    @abstractmethod
    def stamp(self, key: str) -> Hashable:
        """A value that changes when object `key` is replaced (None: it is never replaced
        while a reader holds it: see shardio.RowSource)."""

    @abstractmethod
    def read_tail(self, key: str, length: int) -> bytes:
        """The last `length` bytes of object `key`."""

    @abstractmethod
    def read_ranges(self, key: str, spans: list[tuple[int, int]]) -> list[bytes]:
        """The (offset, length) spans of object `key`, in order."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Write object `key` whole (on local disk in place: readers may see it torn)."""

    @abstractmethod
    def publish(self, key: str, data: bytes) -> None:
        """Write object `key` whole, atomically: readers see the old object or the new one."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove object `key` (nothing when it is absent)."""

    @abstractmethod
    def objects(self, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix` (recursively): key -> size in bytes."""

    @abstractmethod
    def zarr_store(self, *, read_only: bool) -> Any:
        """A Zarr store over this location (what `zarr.open_group(store=...)` takes)."""

    def exists(self) -> bool:
        """Whether anything is stored here."""
        return bool(self.objects())

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`[fn(x) for x in items]`: inline on disk, concurrently on an object store, where each
        call waits on a request (the first exception is raised)."""
        items = list(items)
        if not self.remote or len(items) < 2:
            return [fn(x) for x in items]
        return list(io_pool().map(fn, items))

    def present(self, keys: Iterable[str]) -> set[str]:
        """Which of `keys` exist (a stat, or a HEAD, each; the HEADs in flight together)."""
        keys = list(keys)
        return {key for key, found in zip(keys, self.map(self.is_file, keys), strict=True) if found}

    def check(self) -> None:
        """Raise a StoreError now if this place cannot be reached (a missing bucket, refused
        credentials, denied listing); nothing on local disk, whose checks are paths.py's."""
        return None

    @abstractmethod
    def remove(self) -> None:
        """Delete everything here; on an object store the root `zarr.json` first, so no reader
        ever finds a store or token data with parts missing."""


class LocalDir(Location):
    """A directory on a local (or shared POSIX) file system."""

    remote = False

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"LocalDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def __truediv__(self, name: str) -> LocalDir:
        return LocalDir(self.path / name)

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, key: str) -> Path:
        return self.path / key if key else self.path

    def read(self, key: str) -> bytes:
        return self.file(key).read_bytes()

    def is_file(self, key: str) -> bool:
        return self.file(key).is_file()

    def _name(self, key: str) -> str:
        """file(key) as a string, without pathlib (the hot read path calls it per array)."""
        return f"{self.path}/{key}" if key else str(self.path)

    def stamp(self, key: str) -> Hashable:
        st = os.stat(self._name(key))
        return st.st_ino, st.st_mtime_ns, st.st_size

    def read_tail(self, key: str, length: int) -> bytes:
        with open(self.file(key), "rb") as f:
            f.seek(-length, os.SEEK_END)
            return f.read(length)

    def read_ranges(self, key: str, spans: list[tuple[int, int]]) -> list[bytes]:
        fd = os.open(self._name(key), os.O_RDONLY)
        try:
            return [os.pread(fd, length, offset) for offset, length in spans]
        finally:
            os.close(fd)

    def write(self, key: str, data: bytes) -> None:
        path = self.file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def publish(self, key: str, data: bytes) -> None:
        path = self.file(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def delete(self, key: str) -> None:
        path = self.file(key)
        path.unlink(missing_ok=True)
        if path.parent != self.path and path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()

    def objects(self, prefix: str = "") -> dict[str, int]:
        root = self.file(prefix)
        found = {}
        for folder, _, names in os.walk(root):
            for name in names:
                path = Path(folder, name)
                try:  # a writer's temporary file may be renamed away between listing and stat
                    st = path.stat()
                except FileNotFoundError:
                    continue
                found[path.relative_to(self.path).as_posix()] = st.st_size
        return found

    def zarr_store(self, *, read_only: bool) -> Any:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


_STORES: dict[tuple[str, ...], Any] = {}
_STORES_LOCK = threading.Lock()
_CODE = re.compile(r"<Code>([^<]+)</Code>")
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_", "KDCACHE_RETRY")


class ObjectPrefix(Location):
    """A prefix (`s3://bucket/prefix`) in an object store, reached through obstore.

    Holds only its URL (so it pickles to Ray workers); the client is built once per process
    for each URL and environment."""

    remote = True

    def __init__(self, url: str) -> None:
        scheme, _, rest = url.partition("://")
        self.url = f"{scheme.lower()}://{rest.strip('/')}"
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise StoreError(f"{url}: no bucket in the URL (expected {scheme}://BUCKET/PREFIX)")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPrefix({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPrefix) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, name: str) -> ObjectPrefix:
        return ObjectPrefix(f"{self.url}/{name.strip('/')}")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def store(self) -> Any:
        """The obstore client for this prefix (keys are relative to it)."""
        env = tuple(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES))
        cache_key = (self.url, *env)
        with _STORES_LOCK:
            if cache_key not in _STORES:
                from obstore.store import from_url

                seconds = retry_seconds()
                retry = {"max_retries": MAX_RETRIES, "retry_timeout": timedelta(seconds=seconds),
                         "backoff": {"init_backoff": timedelta(milliseconds=100),
                                     "max_backoff": timedelta(seconds=min(15.0, seconds)), "base": 2}}
                try:
                    _STORES[cache_key] = from_url(self.url, retry_config=retry)  # type: ignore[call-overload]
                except Exception as exc:  # obstore raises its own types for bad URLs and config
                    raise StoreError(f"{self.url}: cannot reach the object store ({reason(exc)})") from exc
            return _STORES[cache_key]

    def _call(self, key: str, what: Any) -> Any:
        """Run one obstore call; not-found stays FileNotFoundError, anything else is one line."""
        try:
            return what()
        except FileNotFoundError as exc:
            if "NoSuchBucket" in str(exc):
                raise StoreError(f"{self.url}: the bucket does not exist") from exc
            raise
        except Exception as exc:  # obstore's errors (permission, auth, generic after retries)
            where = f"{self.url}/{key}" if key else self.url
            raise StoreError(f"{where}: {reason(exc)}") from exc

    def read(self, key: str) -> bytes:
        import obstore

        return bytes(self._call(key, lambda: obstore.get(self.store, key).bytes()))

    def is_file(self, key: str) -> bool:
        import obstore

        try:
            self._call(key, lambda: obstore.head(self.store, key))
        except FileNotFoundError:
            return False
        return True

    def stamp(self, key: str) -> Hashable:
        return None

    def read_tail(self, key: str, length: int) -> bytes:
        import obstore

        got = self._call(key, lambda: obstore.get(self.store, key, options={"range": {"suffix": length}}))
        return bytes(got.bytes())

    def read_ranges(self, key: str, spans: list[tuple[int, int]]) -> list[bytes]:
        import obstore

        if not spans:
            return []
        starts = [offset for offset, _ in spans]
        lengths = [length for _, length in spans]
        got = self._call(key, lambda: obstore.get_ranges(self.store, key, starts=starts, lengths=lengths))
        return [bytes(b) for b in got]

    def write(self, key: str, data: bytes) -> None:
        self.publish(key, data)

    def publish(self, key: str, data: bytes) -> None:
        import obstore

        self._call(key, lambda: obstore.put(self.store, key, data))

    def delete(self, key: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError):
            self._call(key, lambda: obstore.delete(self.store, key))

    def objects(self, prefix: str = "") -> dict[str, int]:
        import obstore

        def listing() -> dict[str, int]:
            found: dict[str, int] = {}
            for batch in obstore.list(self.store, prefix or None):
                for meta in batch:
                    found[meta["path"]] = int(meta["size"])
            return found

        try:
            return dict(self._call(prefix, listing))
        except FileNotFoundError:
            return {}

    def exists(self) -> bool:
        return bool(self._first_page())

    def check(self) -> None:
        self._first_page()

    def _first_page(self) -> list[Any]:
        """One listing request: the first object under this prefix, if any."""
        import obstore

        def first() -> list[Any]:
            for page in obstore.list(self.store, None, chunk_size=1):
                return list(page)
            return []

        try:
            return list(self._call("", first))
        except FileNotFoundError:
            return []

    def remove(self) -> None:
        keys = sorted(self.objects(), key=lambda k: k != "zarr.json")  # the root first
        for key in keys:
            self.delete(key)

    def fetch(self, key: str, dest: Path) -> Path:
        """Object `key` streamed into the local file `dest`."""
        import obstore

        dest.parent.mkdir(parents=True, exist_ok=True)
        got = self._call(key, lambda: obstore.get(self.store, key))
        with open(dest, "wb") as f:
            for piece in got.stream(min_chunk_size=8 << 20):
                f.write(piece)
        return dest

    def zarr_store(self, *, read_only: bool) -> Any:
        from zarr.storage import ObjectStore

        return ObjectStore(self.store, read_only=read_only)


def reason(exc: BaseException) -> str:
    """One line saying why an object-store request failed, without the request's headers."""
    text = str(exc)
    code = _CODE.search(text)
    name = type(exc).__name__
    if name == "PermissionDeniedError" or (code and code.group(1) in ("AccessDenied", "AllAccessDisabled")):
        return "access denied" + (f" ({code.group(1)})" if code else "")
    if name == "UnauthenticatedError" or (code and code.group(1) in (
            "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken")):
        return "the credentials were refused" + (f" ({code.group(1)})" if code else "")
    if code and code.group(1) == "NoSuchBucket":
        return "the bucket does not exist"
    if code:
        return code.group(1)
    first = text.strip().splitlines()[0] if text.strip() else name
    return f"{name}: {first}"[:300]


def upload(src: LocalDir, dst: Location) -> None:
    """Copy every file of `src` to `dst`, the root `zarr.json` last: a reader that finds the
    root finds everything under it (the commit of a new store or token data on object storage)."""
    for key in sorted(src.objects()):
        if key != "zarr.json":
            dst.publish(key, src.read(key))
    dst.publish("zarr.json", src.read("zarr.json"))


def resolved(where: str | os.PathLike[str]) -> str:
    """How records name a place (runs tables, model records): a URL as given, normalised; a
    local path absolute, so it means the same from any working directory."""
    return str(locate(where)) if is_url(where) else str(Path(where).resolve())


def check_output(where: str | os.PathLike[str], flag: str) -> None:
    """Refuse an output folder (a path or URL) that cannot be written, before any work starts."""
    if is_url(where):
        locate(where).check()  # the bucket exists and the credentials are accepted
    else:
        check_writable(where, flag)


def download(src: Location, dest: Path) -> Path:
    """The objects under `src` as local files under `dest` (a source corpus in an object
    store, read by tools that read files); `src` naming one object gives `dest/NAME`. Streamed
    in pieces, so memory does not grow with an object's size."""
    if not isinstance(src, ObjectPrefix):
        raise StoreError(f"{src}: not an object-store URL")
    keys = src.objects()
    if not keys:  # one object: the URL's last part is its name
        parent, _, name = src.url.rpartition("/")
        with contextlib.suppress(FileNotFoundError):
            if parent.partition("://")[2]:  # not the bucket itself
                return ObjectPrefix(parent).fetch(name, dest / name)
        raise StoreError(f"{src}: no object, and no objects under it")
    for key in sorted(keys):
        if ".." in key.split("/"):
            raise StoreError(f"{src}/{key}: an object key with '..' cannot be a local file name")
        src.fetch(key, dest / key)
    return dest


def open_group(loc: Location, *, write: bool = False) -> Any:
    """The Zarr v3 group at `loc`, on disk or in an object store (v3 named: zarr then reads
    `zarr.json` alone instead of also probing for version 2's files, three requests fewer)."""
    import zarr

    return zarr.open_group(loc.zarr_store(read_only=not write), mode="r+" if write else "r", zarr_format=3)
