"""The one executor seam for parallel work.

Everything in NeuroAtrophy that runs in parallel goes through :func:`parallel_map`,
so that moving a job from local threads or processes onto a Dask cluster is a
backend switch (``backend="dask"`` with a ``dask.distributed.Client`` running),
not a rewrite.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Sequence

__all__ = ["Cancelled", "parallel_map", "default_n_jobs", "scaled_progress", "BACKENDS"]

BACKENDS = ("joblib", "sequential", "dask")


class Cancelled(RuntimeError):
    """Raised (typically from a progress callback) to stop a long computation."""


def scaled_progress(progress, start: float, stop: float):
    """A progress callback that maps a sub-task's 0..1 onto ``start..stop`` of ``progress``.

    Returns None when ``progress`` is None, so it can be passed on unconditionally.
    """
    if progress is None:
        return None
    return lambda fraction, message: progress(start + (stop - start) * fraction, message)


def default_n_jobs() -> int:
    """Number of workers used when ``n_jobs`` is None (``NEUROATROPHY_N_JOBS`` or the CPU count)."""
    value = os.environ.get("NEUROATROPHY_N_JOBS")
    if value:
        try:
            return max(1, int(value))
        except ValueError:
            raise ValueError(f"NEUROATROPHY_N_JOBS must be an integer, got {value!r}") from None
    return os.cpu_count() or 1


def parallel_map(
    func: Callable,
    items: Iterable,
    n_jobs: int | None = None,
    backend: str | None = None,
    prefer: str = "threads",
    on_result: Callable[[int, object], None] | None = None,
    collect: bool = True,
) -> list:
    """Apply ``func`` to every item, in parallel, and return the results in order.

    Parameters
    ----------
    func : callable
        Function of one argument.
    items : iterable
        Work items.
    n_jobs : int, optional
        Number of workers; defaults to :func:`default_n_jobs`.
    backend : {"joblib", "sequential", "dask"}, optional
        ``"joblib"`` (default, or ``NEUROATROPHY_BACKEND``) runs local threads or processes;
        ``"sequential"`` runs in the calling thread; ``"dask"`` sends the work to the
        active ``dask.distributed`` client through joblib's Dask backend.
    prefer : {"threads", "processes"}
        Local worker kind for joblib. numpy-heavy work releases the GIL: threads are right.
    on_result : callable, optional
        Called in the calling thread as ``on_result(index, result)`` when each result is in,
        in order; it may raise :class:`Cancelled` to stop the remaining work.
    collect : bool
        Keep and return the results (default). ``False`` drops each result after
        ``on_result`` has seen it (a streaming reduction) and returns an empty list.
    """
    items = list(items)
    backend = backend or os.environ.get("NEUROATROPHY_BACKEND", "joblib")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    n_jobs = default_n_jobs() if n_jobs is None else int(n_jobs)
    if n_jobs < 1:
        raise ValueError(f"n_jobs must be >= 1, got {n_jobs}")

    if backend == "sequential" or n_jobs == 1 or len(items) <= 1:
        results = _run_sequential(func, items, on_result, collect)
    else:
        results = _run_joblib(func, items, n_jobs, backend, prefer, on_result, collect)
    return results


def _run_sequential(func: Callable, items: Sequence, on_result, collect=True) -> list:
    results = []
    for index, item in enumerate(items):
        result = func(item)
        if collect:
            results.append(result)
        if on_result is not None:
            on_result(index, result)
    return results


def _run_joblib(func, items, n_jobs, backend, prefer, on_result, collect=True) -> list:
    import joblib

    if backend == "dask":
        context = joblib.parallel_backend("dask")
        parallel = joblib.Parallel(return_as="generator")
    else:
        context = _nullcontext()
        parallel = joblib.Parallel(n_jobs=n_jobs, prefer=prefer, return_as="generator")
    results = []
    with context:
        generator = parallel(joblib.delayed(func)(item) for item in items)
        try:
            for index, result in enumerate(generator):
                if collect:
                    results.append(result)
                if on_result is not None:
                    on_result(index, result)
        finally:
            # Closing the generator cancels the work not yet started (e.g. after Cancelled).
            generator.close()
    return results


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
