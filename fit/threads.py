"""Run the fitter with single-threaded BLAS.

The fitter's linear algebra is tiny (9 parameters, ~1000 runs). With OpenBLAS's default
of one thread per core, L-BFGS-B's small BLAS calls spend their time waking threads:
on a busy 2-core machine a fit ran 10x slower with 2 threads than with 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from threadpoolctl import threadpool_limits


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    with threadpool_limits(limits=1, user_api="blas"):
        yield
