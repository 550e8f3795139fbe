"""The k-NNN operator (Nizan & Tal, Eq. 2): neighbourhood eigen-states and
the anomaly score, for small and large feature sets alike.

For a query ``f`` and its k nearest training points ``f_i``, with the
features cut into sets ``s`` and ``e_{i,j,s}``, ``v_{i,j,s}`` the
eigenvalues and eigenvectors of the covariance of ``f_i``'s neighbourhood
(``f_i`` and its K' - 1 nearest training points) in set ``s``::

    AS_i(f) = sum_s sum_j |(f_s - f_{i,s}) . v_{i,j,s}| / sqrt(e_{i,j,s})

and the score aggregates the k per-neighbour sums: their sum (the paper) or
their minimum.

Eigenvalues at or below the set's floor share the weight
``1 / sqrt(floor)``; they span a degenerate eigenspace in which the L1 sum
depends on an arbitrary basis, so it is taken in the basis aligned with the
difference: the L2 norm of the difference's projection on that subspace,
divided by ``sqrt(floor)``. Where nothing is floored this is Eq. 2 exactly.

Two forms of the same eigen-state, chosen by the set size L against K':

* ``"primal"`` (L <= K'): the L x L covariance of each set is decomposed
  (compiled cyclic Jacobi in :mod:`nonn._kernels`); state per point and set:
  L eigenvalues and an L x L eigenvector matrix.
* ``"dual"`` (L > K'): the covariance has rank at most K' - 1, and its
  non-zero eigen-pairs come from the K' x K' Gram matrix of the centred
  neighbourhood (:mod:`nonn._eq2_kernels`); state per point and set: K'
  eigenvalues and a K' x K' matrix, whatever L is; scoring re-reads the
  neighbourhood's rows. Directions outside the span are floored.

Both give the same scores (up to rounding); the dual form makes any set
size, up to all features in one set, cost O(K'^2 L) per point and set.
"""

from __future__ import annotations

import numpy as np

from . import _local_eigen
from ._threads import numba_threads, single_thread_blas

PRIMAL, DUAL = "primal", "dual"


def eigen_form(set_size, n_neighbors_of_neighbors):
    """``"dual"`` when a set has more features than a neighbourhood has
    points (its covariance is rank-deficient), else ``"primal"``."""
    return DUAL if set_size > n_neighbors_of_neighbors else PRIMAL


def eigen_width(set_size, n_neighbors_of_neighbors):
    """Eigen-pairs stored per point and set."""
    return min(set_size, n_neighbors_of_neighbors) if eigen_form(
        set_size, n_neighbors_of_neighbors) == DUAL else set_size


def eigen_row_bytes(itemsize, n_sets, set_size, n_neighbors_of_neighbors):
    """Working memory per point of :func:`neighborhood_eigen` (outputs and
    temporaries), for chunking under a budget."""
    Kp = n_neighbors_of_neighbors
    if eigen_form(set_size, Kp) == DUAL:
        return itemsize * n_sets * Kp * (Kp + 1) + 8 * Kp * (set_size + 2 * Kp)
    # the numpy reference path's gather + copies bound the kernels' needs
    return itemsize * n_sets * set_size * (2 * Kp + 4 * set_size)


def neighborhood_eigen(Xg, groups, sizes, set_size, n_jobs=1, out=None):
    """Eigen-state ``(eigenvalues, eigenvectors)`` of the neighbourhoods
    ``groups`` (c, K') of the grid data ``Xg``, per feature set.

    Shapes: primal (c, S, L) and (c, S, L, L); dual (c, S, K') and
    (c, S, K', K'). Eigenvalues ascending, clipped at 0; eigenvectors as
    columns. ``out`` (a pair of arrays of those shapes, ``Xg``'s dtype)
    receives the result in place.
    """
    groups = np.ascontiguousarray(groups, dtype=np.int64)
    Kp = groups.shape[1]
    if eigen_form(set_size, Kp) == PRIMAL:
        return _local_eigen.neighbourhood_eigen(Xg, groups, sizes, set_size, n_jobs, out=out)
    from . import _eq2_kernels

    c, n_sets = groups.shape[0], len(sizes)
    if out is None:
        out = (np.empty((c, n_sets, Kp), dtype=Xg.dtype),
               np.empty((c, n_sets, Kp, Kp), dtype=Xg.dtype))
    w, v = out
    ww = w if w.flags.c_contiguous and w.dtype == Xg.dtype else np.empty(w.shape, Xg.dtype)
    vv = v if v.flags.c_contiguous and v.dtype == Xg.dtype else np.empty(v.shape, Xg.dtype)
    with numba_threads(n_jobs, c * n_sets * Kp * Kp * set_size), single_thread_blas():
        _eq2_kernels.dual_eigen(Xg, groups, np.ascontiguousarray(sizes, dtype=np.int64),
                                int(set_size), ww, vv)
    if ww is not w:
        w[...] = ww
    if vv is not v:
        v[...] = vv
    return w, v


def score_terms(Qg, idx, Xg, evecs, evals, sizes, set_size, floor, n_jobs=1, rows=None,
                groups=None):
    """Eq. 2's per-neighbour sums, (q, k), for grid queries ``Qg``.

    ``idx`` (q, k) indexes the eigen-state rows of ``evecs``/``evals``. The
    neighbour of eigen-state row ``t`` is training row ``rows[t]`` of ``Xg``
    (``rows=None``: row ``t`` itself, the eigen-state of every training
    point); the dual form also needs ``groups[t]``, the neighbourhood that
    eigen-state was computed from.
    """
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    floor = np.ascontiguousarray(floor, dtype=np.float64)
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    if evecs.shape[-1] >= set_size:  # primal: L x L per set
        X_rows = Xg if rows is None else Xg[rows]
        return _local_eigen.score_eq2(Qg, idx, X_rows, evecs, evals, sizes, floor, n_jobs,
                                      aggregate=None)
    from . import _eq2_kernels

    if groups is None:
        raise ValueError("the dual eigen-state needs the neighbourhoods it was computed from")
    if rows is None:
        rows = np.arange(evecs.shape[0], dtype=np.int64)
    terms = np.empty(idx.shape, dtype=Qg.dtype)
    with numba_threads(n_jobs, idx.size * groups.shape[1] * Xg.shape[1]):
        _eq2_kernels.dual_score(np.ascontiguousarray(Qg, dtype=Xg.dtype), idx,
                                np.ascontiguousarray(rows, dtype=np.int64), Xg,
                                np.ascontiguousarray(groups, dtype=np.int64), evecs, evals,
                                sizes, int(set_size), floor, terms)
    return terms


def aggregate_terms(terms, how):
    """Combine per-neighbour sums ``terms`` (q, k): ``"sum"`` is the paper's
    Eq. 2, ``"min"`` the smallest of the k (the query is as normal as its
    best-fitting neighbour says)."""
    if how == "sum":
        return terms.sum(axis=1)
    if how == "min":
        return terms.min(axis=1)
    raise ValueError(f"aggregate must be 'sum' or 'min'; got {how!r}.")
