"""Batched neighbourhood eigen-decompositions and the Eq. 2 projection.

Layout: after re-ordering, the D columns are zero-padded to S*L so that the
feature sets form a regular ``(S, L)`` grid. A shorter last set of ``r < L``
features is decomposed on its own ``r x r`` covariance; its eigenvectors sit
in the top-left ``r x r`` block of an ``L x L`` block whose padding is zero,
and its padded eigenvalue slots carry weight 0. Padded coordinates of every
difference vector are zero, so padding contributes exactly nothing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np


def to_grid(X, order, n_sets, set_size):
    """``X[:, order]`` zero-padded to ``n_sets * set_size`` columns."""
    n, d = X.shape
    out = np.zeros((n, n_sets * set_size), dtype=X.dtype)
    out[:, :d] = X[:, order]
    return out


def floor_scale(Xg, sizes, set_size):
    """Per-set reference variance for the relative eigenvalue floor: the mean
    variance of the set's features over the training set. Falls back to the
    mean over all features for a constant set, and to 1 for constant data."""
    n_sets = len(sizes)
    var = Xg.astype(np.float64).var(axis=0).reshape(n_sets, set_size)
    per_set = var.sum(axis=1) / sizes
    total = var.sum() / sizes.sum()
    if total <= 0:
        total = 1.0
    return np.where(per_set > 0, per_set, total)


def _eigh_sorted(C):
    w, v = np.linalg.eigh(C)
    return w, v


def batched_eigh(C, n_jobs=1):
    """``np.linalg.eigh`` over a stack of small symmetric matrices, split over
    threads (LAPACK releases the GIL)."""
    if n_jobs <= 1 or C.shape[0] < 4096:
        return np.linalg.eigh(C)
    parts = np.array_split(C, n_jobs * 4)
    with ThreadPoolExecutor(n_jobs) as ex:
        res = list(ex.map(np.linalg.eigh, parts))
    return np.concatenate([r[0] for r in res]), np.concatenate([r[1] for r in res])


def neighbourhood_eigen(Xg, groups, sizes, set_size, n_jobs=1):
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
    G = Xg[groups].reshape(c, m, n_sets, L)
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
