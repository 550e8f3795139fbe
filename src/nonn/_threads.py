"""Thread control for nonn's compiled work, in one place.

numba's pool runs nonn's kernels; a kernel that calls the BLAS or LAPACK
from its tasks (each task one product) must keep those libraries to one
thread, or the two pools oversubscribe the cores.
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
