"""Thread control, in one place: nonn's own ``n_jobs``, numba's pool (which
runs nonn's kernels), the BLAS, and the pools of the libraries a search
backend drives (FAISS's OpenMP, torch).

A kernel that calls the BLAS or LAPACK from its tasks (each task one
product) must keep those libraries to one thread, or the two pools
oversubscribe the cores.
"""

from __future__ import annotations

import contextlib
import os


def resolve_n_jobs(n_jobs):
    """Threads for nonn's own batched work; None or -1 = all cores,
    -2 = all but one, and so on."""
    cpus = os.cpu_count() or 1
    if n_jobs is None or n_jobs == -1:
        return cpus
    if n_jobs < 0:
        return max(cpus + 1 + n_jobs, 1)
    return int(n_jobs)


def library_threads(n_jobs):
    """Thread count for a library's own pool; None = leave the library's
    setting alone, -1 = all cores, -2 = all but one, and so on."""
    if n_jobs is None:
        return None
    cpus = os.cpu_count() or 1
    if n_jobs < 0:
        return max(cpus + 1 + int(n_jobs), 1)
    return max(int(n_jobs), 1)


@contextlib.contextmanager
def pool_threads(get, set_, n_jobs):
    """A library's thread count (read with ``get()``, written with
    ``set_(n)``) set to :func:`library_threads` of ``n_jobs`` for a block,
    then restored; None leaves it alone."""
    n = library_threads(n_jobs)
    if n is None:
        yield
        return
    prev = get()
    set_(n)
    try:
        yield
    finally:
        set_(prev)


def numba_pool_size():
    """Threads numba's pool was started with: the bound of
    ``numba.get_thread_id()`` (per-thread buffers are sized by it)."""
    import numba

    return numba.config.NUMBA_NUM_THREADS


#: operations below which a kernel runs on one thread: waking numba's pool
#: costs more than the work (tens of milliseconds on a loaded machine)
SMALL_WORK = 1 << 22


@contextlib.contextmanager
def numba_threads(n, work=None):
    """numba's thread count set to ``n`` (capped at its pool; None keeps it)
    for a block, then restored; yields the count in use. ``work`` (an
    operation count) below :data:`SMALL_WORK` means one thread."""
    import numba

    prev = numba.get_num_threads()
    if work is not None and work < SMALL_WORK:
        n = 1
    if n is not None:
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield numba.get_num_threads()
    finally:
        numba.set_num_threads(prev)


_CONTROLLER = []


def single_thread_blas():
    """Limit the BLAS/LAPACK libraries (those numba's ``np.dot`` and
    ``np.linalg`` call included) to one thread for a block. The libraries
    are looked up once per process (a lookup costs milliseconds)."""
    if not _CONTROLLER:
        import scipy.linalg.cython_blas  # noqa: F401  (the BLAS the kernels call)
        from threadpoolctl import ThreadpoolController

        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=1, user_api="blas")
