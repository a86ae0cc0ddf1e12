"""Shared fixtures for the fit tests: single-threaded BLAS (the machine is shared)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kdcache.fit.threads import single_threaded_blas


@pytest.fixture(autouse=True)
def _one_blas_thread() -> Iterator[None]:
    with single_threaded_blas():
        yield
