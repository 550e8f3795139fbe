"""Batched neighbourhood eigen-decompositions and the Eq. 2 projection.

Layout: the training data are stored with their D columns re-ordered (not
padded; search backends see plain D-dimensional rows). Set s holds columns
``s*L .. s*L + sizes[s]``. A shorter last set of ``r < L`` features is
decomposed on its own ``r x r`` covariance; its eigenvectors sit in the
top-left ``r x r`` block of an ``L x L`` block whose padding is zero, and its
padded eigenvalue slots count for nothing. The numpy reference path below
zero-pads to S*L columns on the fly so that sets form a regular (S, L) grid.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np


def permute(X, order):
    """``X[:, order]`` as a C-contiguous array."""
    return np.ascontiguousarray(X[:, order])


def pad(A, width):
    """Zero-pad the last axis of ``A`` to ``width``."""
    d = A.shape[-1]
    if d == width:
        return A
    out = np.zeros(A.shape[:-1] + (width,), dtype=A.dtype)
    out[..., :d] = A
    return out


def floor_scale(Xg, sizes, set_size):
    """Per-set reference variance for the relative eigenvalue floor: the mean
    variance of the set's features over the training set. Falls back to the
    mean over all features for a constant set, and to 1 for constant data."""
    n_sets = len(sizes)
    var = pad(Xg.astype(np.float64).var(axis=0), n_sets * set_size).reshape(n_sets, set_size)
    per_set = var.sum(axis=1) / sizes
    total = var.sum() / sizes.sum()
    if total <= 0:
        total = 1.0
    return np.where(per_set > 0, per_set, total)


def batched_eigh(C, n_jobs=1):
    """``np.linalg.eigh`` over a stack of small symmetric matrices, split over
    threads (LAPACK releases the GIL)."""
    if n_jobs <= 1 or C.shape[0] < 4096:
        return np.linalg.eigh(C)
    parts = np.array_split(C, n_jobs * 4)
    with ThreadPoolExecutor(n_jobs) as ex:
        res = list(ex.map(np.linalg.eigh, parts))
    return np.concatenate([r[0] for r in res]), np.concatenate([r[1] for r in res])


def have_kernels():
    """Whether the compiled (numba) kernels are available."""
    try:
        from . import _kernels  # noqa: F401
    except ImportError:  # pragma: no cover - numba is a dependency
        return False
    return True


def neighbourhood_eigen(Xg, groups, sizes, set_size, n_jobs=1, engine="auto"):
    """Eigen-state of each neighbourhood's covariance, per feature set.

    ``engine="numba"`` uses the compiled kernels, ``"numpy"`` the reference
    path below (LAPACK), ``"auto"`` the kernels when available.
    """
    if engine == "auto":
        engine = "numba" if have_kernels() else "numpy"
    if engine == "numba":
        return _neighbourhood_eigen_numba(Xg, groups, sizes, set_size, n_jobs)
    return _neighbourhood_eigen_numpy(Xg, groups, sizes, set_size, n_jobs)


def _neighbourhood_eigen_numba(Xg, groups, sizes, set_size, n_jobs):
    import numba

    from . import _kernels

    n_sets, L = len(sizes), set_size
    c = groups.shape[0]
    groups = np.ascontiguousarray(groups, dtype=np.int64)
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    prev = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n_jobs, numba.config.NUMBA_NUM_THREADS)))
    try:
        C = np.empty((c, n_sets, L, L))
        _kernels.covariances(Xg, groups, sizes, L, C)
        evals = np.zeros((c, n_sets, L), dtype=Xg.dtype)
        evecs = np.zeros((c, n_sets, L, L), dtype=Xg.dtype)
        full = int(np.sum(sizes == L))
        for lo, hi, r in ((0, full, L), (full, n_sets, int(sizes[-1]))):
            if hi <= lo:
                continue
            # float32 data are diagonalised in float32 (twice the SIMD lanes),
            # as LAPACK's ssyevd would; float64 data in float64
            block = np.ascontiguousarray(C[:, lo:hi, :r, :r], dtype=Xg.dtype).reshape(-1, r, r)
            w = np.empty(block.shape[:2], dtype=Xg.dtype)
            v = np.empty(block.shape, dtype=Xg.dtype)
            _kernels.eigh_batched(block, w, v)
            evals[:, lo:hi, :r] = w.reshape(c, hi - lo, r)
            evecs[:, lo:hi, :r, :r] = v.reshape(c, hi - lo, r, r)
    finally:
        numba.set_num_threads(prev)
    return evals, evecs


def _neighbourhood_eigen_numpy(Xg, groups, sizes, set_size, n_jobs=1):
    """Eigen-state of the covariance of each neighbourhood, per feature set.

    Parameters
    ----------
    Xg : (N, S*L) training data on the padded grid.
    groups : (c, M) int64 — row ``p`` lists the M points of one neighbourhood.
    sizes : (S,) sizes of the sets.

    Returns
    -------
    eigenvalues : (c, S, L), ascending within a set; padded slots are 0.
    eigenvectors : (c, S, L, L), column ``j`` is eigenvector ``j``.
    """
    n_sets = len(sizes)
    L = set_size
    c, m = groups.shape
    G = pad(Xg[groups], n_sets * L).reshape(c, m, n_sets, L)
    G -= G.mean(axis=1, keepdims=True)
    G = np.ascontiguousarray(G.transpose(0, 2, 1, 3))  # (c, S, M, L)
    # Covariance with divisor M (maximum likelihood). The divisor is only a
    # constant factor sqrt(M/(M-1)) on every score, and M = 1 stays defined.
    C = np.matmul(G.transpose(0, 1, 3, 2), G)
    C /= m
    evals = np.zeros((c, n_sets, L), dtype=Xg.dtype)
    evecs = np.zeros((c, n_sets, L, L), dtype=Xg.dtype)
    full = int(np.sum(sizes == L))
    if full:
        w, v = batched_eigh(C[:, :full].reshape(-1, L, L), n_jobs)
        evals[:, :full] = w.reshape(c, full, L)
        evecs[:, :full] = v.reshape(c, full, L, L)
    if full < n_sets:  # the shorter last set, on its own r x r covariance
        r = int(sizes[-1])
        w, v = batched_eigh(C[:, -1, :r, :r], n_jobs)
        evals[:, -1, :r] = w
        evecs[:, -1, :r, :r] = v
    np.maximum(evals, 0, out=evals)
    return evals, evecs


def score_eq2(Qg, idx, Xg, evecs, evals, sizes, floor, n_jobs=1, engine="auto"):
    """Eq. 2 for grid queries ``Qg`` (q, S*L) whose neighbours are ``idx``
    (q, k), from the stored eigen-state of the training points."""
    if engine == "auto":
        engine = "numba" if have_kernels() else "numpy"
    if engine == "numba":
        import numba

        from . import _kernels

        out = np.empty(idx.shape[0], dtype=Qg.dtype)
        prev = numba.get_num_threads()
        numba.set_num_threads(max(1, min(n_jobs, numba.config.NUMBA_NUM_THREADS)))
        try:
            _kernels.score_eq2(Qg, np.ascontiguousarray(idx, dtype=np.int64), Xg, evecs, evals,
                               np.asarray(sizes, dtype=np.int64),
                               np.asarray(floor, dtype=np.float64), out)
        finally:
            numba.set_num_threads(prev)
        return out
    L = evecs.shape[-1]
    diff = pad(Qg[:, None, :] - Xg[idx], len(sizes) * L).reshape(idx.shape + (len(sizes), L))
    return project_l1(diff, evecs[idx], evals[idx], sizes, floor).sum(axis=1)


def project_l1(diff, evecs, evals, sizes, floor):
    """Eq. 2's inner sums for a batch: sum_s sum_j |diff_s . v_j,s| / sqrt(e_j,s).

    Eigenvalues at or below the set's floor are raised to it. Those floored
    directions share one weight, so they span a degenerate eigenspace in
    which Eq. 2's L1 sum depends on an arbitrary choice of basis (LAPACK's
    rounding noise, in practice). nonn evaluates it in the eigenbasis of that
    subspace aligned with the difference, where the sum is
    ``|P_F diff|_2 / sqrt(floor)``: a valid eigenbasis, and the only choice
    that makes scores deterministic and invariant to translating or
    rescaling the data. Where no eigenvalue is floored this is exactly Eq. 2.

    diff : (..., S, L), evecs : (..., S, L, L), evals : (..., S, L)
    sizes : (S,) set sizes (padded slots count for nothing), floor : (S,)
    returns (...,)
    """
    L = evals.shape[-1]
    valid = np.arange(L)[None, :] < np.asarray(sizes)[:, None]  # (S, L)
    floor = np.asarray(floor, dtype=evals.dtype)
    floored = evals <= floor[:, None]
    proj = np.matmul(diff[..., None, :], evecs)[..., 0, :]
    free = valid & ~floored
    w = np.where(free, 1.0 / np.sqrt(np.where(free, evals, 1)), 0).astype(proj.dtype, copy=False)
    sq = np.where(floored & valid, proj * proj, 0).sum(axis=-1)  # (..., S)
    np.abs(proj, out=proj)
    proj *= w
    out = proj.sum(axis=(-2, -1))
    out += (np.sqrt(sq) / np.sqrt(floor)).sum(axis=-1)
    return out
