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

from ._threads import SMALL_WORK


def permute(X, order):
    """``X[:, order]`` as a C-contiguous array (``np.take`` along the rows:
    several times faster than fancy indexing of the columns)."""
    return np.ascontiguousarray(np.take(X, order, axis=1))


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
    return floor_scale_from_variance(column_variance(Xg), sizes, set_size)


def floor_scale_from_variance(var, sizes, set_size):
    """:func:`floor_scale` from the per-column variances ``var`` of the grid
    data (for statistics summed over data partitions)."""
    n_sets = len(sizes)
    var = pad(var, n_sets * set_size).reshape(n_sets, set_size)
    per_set = var.sum(axis=1) / sizes
    total = var.sum() / sizes.sum()
    if total <= 0:
        total = 1.0
    return np.where(per_set > 0, per_set, total)


def column_variance(X, block=4096):
    """``X.var(axis=0)`` in float64, two-pass, without a float64 copy of
    ``X``: centred blocks of rows in X's dtype, squares summed in float64."""
    mean = X.mean(axis=0, dtype=np.float64)
    return variance_from_sums(squared_deviations(X, mean, block), X.shape[0], mean, X.dtype)


def squared_deviations(X, mean, block=4096):
    """Float64 column sums of ``(X - mean)**2``, the deviations taken in X's
    dtype from ``mean`` rounded to it (summed over row partitions with the
    global mean, the sums of the whole matrix)."""
    mu = np.asarray(mean, dtype=np.float64).astype(X.dtype)
    acc = np.zeros(X.shape[1])
    for start in range(0, X.shape[0], block):
        dev = X[start:start + block] - mu
        acc += np.einsum("ij,ij->j", dev, dev, dtype=np.float64)
    return acc


def variance_from_sums(sq, n, mean, dtype):
    """Column variances from :func:`squared_deviations` over ``n`` rows."""
    mean = np.asarray(mean, dtype=np.float64)
    # the rounding of the mean to dtype: E[(x - mu)^2] = var + (mean - mu)^2
    shift = mean - mean.astype(dtype)
    return np.maximum(np.asarray(sq) / max(n, 1) - shift * shift, 0.0)


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


def neighbourhood_eigen(Xg, groups, sizes, set_size, n_jobs=1, engine="auto", out=None):
    """Eigen-state of each neighbourhood's covariance, per feature set.

    ``engine="numba"`` uses the compiled kernel, ``"numpy"`` the reference
    path below (LAPACK), ``"auto"`` the kernel when available. ``out``, a
    pair of arrays ``(eigenvalues (c, S, L), eigenvectors (c, S, L, L))`` in
    ``Xg``'s dtype, receives the result (the kernel writes straight into
    them, C-contiguous ones without any copy); they are returned.
    """
    if engine == "auto":
        engine = "numba" if have_kernels() else "numpy"
    if engine == "numba":
        return _neighbourhood_eigen_numba(Xg, groups, sizes, set_size, n_jobs, out)
    w, v = _neighbourhood_eigen_numpy(Xg, groups, sizes, set_size, n_jobs)
    if out is None:
        return w, v
    out[0][...] = w
    out[1][...] = v
    return out


#: Jacobi stops when the squared off-diagonal norm is below this share of the
#: squared diagonal norm, per dtype: 1e-12 relative in norm for float64, the
#: float32 machine epsilon for float32 (its working precision; about one
#: sweep in five less than 1e-12 on embedding-like data).
JACOBI_TOL = {np.dtype(np.float64): 1e-24,
              np.dtype(np.float32): float(np.finfo(np.float32).eps) ** 2}


def _neighbourhood_eigen_numba(Xg, groups, sizes, set_size, n_jobs, out=None):
    import numba

    from . import _kernels

    n_sets, L = len(sizes), set_size
    c = groups.shape[0]
    groups = np.ascontiguousarray(groups, dtype=np.int64)
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    if out is None:
        out = (np.empty((c, n_sets, L), dtype=Xg.dtype),
               np.empty((c, n_sets, L, L), dtype=Xg.dtype))
    w, v = out
    # the kernel writes C-contiguous arrays of the data's dtype in place
    ww = w if w.flags.c_contiguous and w.dtype == Xg.dtype else np.empty(w.shape, Xg.dtype)
    vv = v if v.flags.c_contiguous and v.dtype == Xg.dtype else np.empty(v.shape, Xg.dtype)
    prev = numba.get_num_threads()
    if c * groups.shape[1] * Xg.shape[1] * L < SMALL_WORK:
        n_jobs = 1  # waking the pool costs more than the work
    numba.set_num_threads(max(1, min(n_jobs, numba.config.NUMBA_NUM_THREADS)))
    try:
        _kernels.neighbourhood_eigen(Xg, groups, sizes, L, JACOBI_TOL[Xg.dtype], ww, vv)
    finally:
        numba.set_num_threads(prev)
    if ww is not w:
        w[...] = ww
    if vv is not v:
        v[...] = vv
    return w, v


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


def aggregate_terms(terms, how):
    """Combine per-neighbour Eq. 2 sums ``terms`` (q, k) into one score per
    query: ``"sum"`` is the paper's Eq. 2, ``"min"`` the smallest of the k
    (the query is as normal as its most fitting neighbour says)."""
    if how == "sum":
        return terms.sum(axis=1)
    if how == "min":
        return terms.min(axis=1)
    raise ValueError(f"aggregate must be 'sum' or 'min'; got {how!r}.")


def score_eq2(Qg, idx, Xg, evecs, evals, sizes, floor, n_jobs=1, engine="auto",
              aggregate="sum"):
    """Eq. 2 for grid queries ``Qg`` (q, S*L) whose neighbours are ``idx``
    (q, k), from the eigen-state of the training points (rows ``idx`` of
    ``Xg``, ``evecs`` and ``evals``). ``aggregate`` combines the k
    per-neighbour sums: "sum" (Eq. 2), "min", or None for the (q, k) terms."""
    if engine == "auto":
        engine = "numba" if have_kernels() else "numpy"
    if engine == "numba":
        import numba

        from . import _kernels

        terms = np.empty(idx.shape, dtype=Qg.dtype)
        prev = numba.get_num_threads()
        if idx.size * Qg.shape[1] * evecs.shape[-1] < SMALL_WORK:
            n_jobs = 1  # waking the pool costs more than the work
        numba.set_num_threads(max(1, min(n_jobs, numba.config.NUMBA_NUM_THREADS)))
        try:
            _kernels.score_eq2(Qg, np.ascontiguousarray(idx, dtype=np.int64), Xg, evecs, evals,
                               np.asarray(sizes, dtype=np.int64),
                               np.asarray(floor, dtype=np.float64), terms)
        finally:
            numba.set_num_threads(prev)
    else:
        L = evecs.shape[-1]
        diff = pad(Qg[:, None, :] - Xg[idx], len(sizes) * L).reshape(
            idx.shape + (len(sizes), L))
        terms = project_l1(diff, evecs[idx], evals[idx], sizes, floor).astype(
            Qg.dtype, copy=False)
    return terms if aggregate is None else aggregate_terms(terms, aggregate)


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
