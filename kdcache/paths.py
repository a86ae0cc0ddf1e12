"""Checks on output paths, made before any work starts so that no work is lost to them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kdcache.errors import KdcacheError


class OutputPathError(KdcacheError):
    """An output path that is a file, or whose folder cannot be written."""


def check_writable(path: str | os.PathLike[str], flag: str, *, directory: bool = True) -> None:
    """Refuse `path` (a directory when `directory`, else a file) if it cannot be written.

    Tries a real write in the nearest existing folder: permission bits say nothing for
    root, and a read-only mount or a path below a regular file shows only on writing.
    """
    path = Path(path)
    if directory and path.is_file():
        raise OutputPathError(f"{path}: {flag} is a file, not a directory")
    if not directory and path.is_dir():
        raise OutputPathError(f"{path}: {flag} is a directory, not a file")
    folder = path if directory and path.is_dir() else path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputPathError(f"{path}: {flag} lies below {folder}, which is a file")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".kdcache-write-test-"):
            pass
    except OSError as exc:
        raise OutputPathError(f"{path}: {flag} cannot be written ({exc.strerror} in {folder})") from exc
