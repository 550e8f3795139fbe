"""The k-NNN operator (Nizan & Tal, Eq. 2): neighborhood eigen-states and
the anomaly score.

For a query ``f`` and its k nearest training points ``f_i``, with the
features cut into sets ``s`` (:mod:`nonn._layout`) and ``e_{i,j,s}``,
``v_{i,j,s}`` the eigenvalues and eigenvectors of the covariance (divisor
K') of ``f_i``'s neighborhood (``f_i`` and its K' - 1 nearest training
points) in set ``s``::

    AS_i(f) = sum_s sum_j |(f_s - f_{i,s}) . v_{i,j,s}| / sqrt(e_{i,j,s})

and the score aggregates the k per-neighbor sums: their sum (the paper's
Eq. 2) or their minimum. The difference is taken to the neighbor ``f_i``,
not to its neighborhood's mean.

Floored subspace. Neighborhoods are often singular (duplicates, constant
columns, K' <= L, low-rank data), so every eigenvalue at or below the set's
floor (relative to the data's scale, see :mod:`nonn._layout`) is raised to
it. Those directions then share the weight ``1 / sqrt(floor)`` and span a
degenerate eigenspace, in which the L1 sum depends on an arbitrary choice
of basis (the eigen-solver's rounding noise, in practice). nonn takes it in
the eigenbasis of that subspace aligned with the difference, where the sum
is ``|P_F d|_2 / sqrt(floor)`` (``P_F`` the projection on the floored
subspace): a valid eigenbasis, and the only choice that makes scores
deterministic and invariant to translating or rescaling the data. Where no
eigenvalue is floored this is Eq. 2 exactly. The floor is a multiple of
either the data's mean variance per feature (one floor per set) or, per
neighbor, of its own neighborhood's (:func:`neighbor_floors`): the latter
follows the local scale where the data's clusters differ in spread.

Two forms of the same eigen-state, chosen by the set size L against K':

* ``"primal"`` (L <= K'): the L x L covariance of each set is decomposed;
  state per point and set: L eigenvalues (ascending; the padding of a
  shorter last set is 0) and an L x L eigenvector matrix (columns).
* ``"dual"`` (L > K'): the covariance has rank at most K' - 1, and its
  non-zero eigen-pairs come from the K' x K' Gram matrix of the centred
  neighborhood; state per point and set: K' eigenvalues and a K' x K'
  matrix, whatever L is; scoring re-reads the neighborhood's rows.
  Directions outside the span are floored.

Both give the same scores (up to rounding); the dual form makes any set
size, up to all features in one set, cost O(K'^2 L) per point and set.
The compiled kernels, and how they compute this, are in
:mod:`nonn._eq2_kernels`.
"""

from __future__ import annotations

import numpy as np

from ._threads import numba_threads, single_thread_blas

PRIMAL, DUAL = "primal", "dual"

#: Jacobi stops when the squared off-diagonal norm is below this share of the
#: squared diagonal norm, per dtype: 1e-12 relative in norm for float64, the
#: float32 machine epsilon for float32 (its working precision).
JACOBI_TOL = {np.dtype(np.float64): 1e-24,
              np.dtype(np.float32): float(np.finfo(np.float32).eps) ** 2}


def eigen_form(set_size, n_neighbors_of_neighbors):
    """``"dual"`` when a set has more features than a neighborhood has
    points (its covariance is rank-deficient), else ``"primal"``."""
    return DUAL if set_size > n_neighbors_of_neighbors else PRIMAL


def eigen_width(set_size, n_neighbors_of_neighbors):
    """Eigen-pairs stored per point and set: L (primal) or K' (dual)."""
    if eigen_form(set_size, n_neighbors_of_neighbors) == DUAL:
        return min(set_size, n_neighbors_of_neighbors)
    return set_size


def eigen_row_bytes(itemsize, n_sets, set_size, n_neighbors_of_neighbors):
    """Working memory per point of :func:`neighborhood_eigen` (outputs and
    temporaries), for chunking under a budget."""
    Kp = n_neighbors_of_neighbors
    if eigen_form(set_size, Kp) == DUAL:
        return itemsize * n_sets * Kp * (Kp + 1) + 8 * Kp * (set_size + 2 * Kp)
    return itemsize * n_sets * set_size * (2 * Kp + 4 * set_size)


def neighborhood_eigen(Xg, groups, sizes, set_size, n_jobs=1, out=None, form=None):
    """Eigen-state ``(eigenvalues, eigenvectors)`` of the neighborhoods
    ``groups`` (c, M) of the grid data ``Xg``, per feature set.

    ``form`` (default: :func:`eigen_form` of L and M) picks the shapes:
    primal (c, S, L) and (c, S, L, L); dual (c, S, M) and (c, S, M, M).
    Eigenvalues ascending, clipped at 0; eigenvectors as columns. ``out``
    (a pair of arrays of those shapes, ``Xg``'s dtype) receives the result.
    """
    from . import _eq2_kernels

    groups = np.ascontiguousarray(groups, dtype=np.int64)
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    (c, m), n_sets, L = groups.shape, len(sizes), int(set_size)
    form = eigen_form(L, m) if form is None else form
    r = L if form == PRIMAL else m
    if out is None:
        out = (np.empty((c, n_sets, r), dtype=Xg.dtype),
               np.empty((c, n_sets, r, r), dtype=Xg.dtype))
    w, v = out
    # the kernels write C-contiguous arrays of the data's dtype in place
    ww = w if w.flags.c_contiguous and w.dtype == Xg.dtype else np.empty(w.shape, Xg.dtype)
    vv = v if v.flags.c_contiguous and v.dtype == Xg.dtype else np.empty(v.shape, Xg.dtype)
    if form == PRIMAL:
        with numba_threads(n_jobs, c * m * Xg.shape[1] * L):
            _eq2_kernels.primal_eigen(Xg, groups, sizes, L, JACOBI_TOL[Xg.dtype], ww, vv)
    else:  # each point's Gram matrix is one BLAS product: no second thread pool
        with numba_threads(n_jobs, c * n_sets * m * m * L), single_thread_blas():
            _eq2_kernels.dual_eigen(Xg, groups, sizes, L, ww, vv)
    if ww is not w:
        w[...] = ww
    if vv is not v:
        v[...] = vv
    return w, v


def neighbor_floors(evals, sizes, floor, local=None):
    """The eigenvalue floor of each eigen-state row and set, (..., S): the
    set's absolute ``floor`` (S,), raised to ``local`` (S,) times the
    neighborhood's mean variance per feature (``evals`` (..., S, r) summed
    over the set's directions, divided by its size) where ``local`` > 0.
    The kernels compute the same value inline."""
    floor = np.asarray(floor, dtype=np.float64)
    if local is None or not np.any(np.asarray(local) > 0):
        return np.broadcast_to(floor, np.shape(evals)[:-1])
    trace = np.asarray(evals, dtype=np.float64).sum(axis=-1) / np.asarray(sizes)
    return np.maximum(floor, np.asarray(local, dtype=np.float64) * trace)


def score_terms(Qg, idx, Xg, evecs, evals, sizes, set_size, floor, n_jobs=1, rows=None,
                groups=None, local=None):
    """Eq. 2's per-neighbor sums ``AS_i``, (q, k), for grid queries ``Qg``.

    ``idx`` (q, k) indexes the eigen-state rows of ``evecs``/``evals``. The
    neighbor of eigen-state row ``t`` is training row ``rows[t]`` of ``Xg``
    (``rows=None``: row ``t`` itself, the eigen-state of every training
    point); the dual form also needs ``groups[t]``, the neighborhood that
    eigen-state was computed from. ``floor`` (S,) is each set's absolute
    eigenvalue floor; ``local`` (S,), when given, raises it per neighbor to
    that multiple of the neighborhood's mean variance per feature
    (:func:`neighbor_floors`).
    """
    from . import _eq2_kernels

    idx = np.ascontiguousarray(idx, dtype=np.int64)
    floor = np.ascontiguousarray(floor, dtype=np.float64)
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    local = np.zeros(len(sizes)) if local is None else np.ascontiguousarray(
        np.broadcast_to(np.asarray(local, dtype=np.float64), (len(sizes),)))
    terms = np.empty(idx.shape, dtype=Qg.dtype)
    if evecs.shape[-1] >= set_size:  # primal: L x L per set
        X_rows = Xg if rows is None else Xg[rows]
        with numba_threads(n_jobs, idx.size * Qg.shape[1] * evecs.shape[-1]):
            _eq2_kernels.primal_score(Qg, idx, X_rows, evecs, evals, sizes, floor, local,
                                      terms)
        return terms
    if groups is None:
        raise ValueError("the dual eigen-state needs the neighborhoods it was computed from")
    rows = np.arange(evecs.shape[0], dtype=np.int64) if rows is None else rows
    with numba_threads(n_jobs, idx.size * groups.shape[1] * Xg.shape[1]):
        _eq2_kernels.dual_score(np.ascontiguousarray(Qg, dtype=Xg.dtype), idx,
                                np.ascontiguousarray(rows, dtype=np.int64), Xg,
                                np.ascontiguousarray(groups, dtype=np.int64), evecs, evals,
                                sizes, int(set_size), floor, local, terms)
    return terms


def shared_score_terms(Qg, idx, Xg, evecs, evals, sizes, set_size, floor, n_jobs=1):
    """Eq. 2's sums (q, k) of each grid query ``Qg[u]`` against its
    neighbors ``idx[u]`` (rows of ``Xg``), all k under one primal
    eigen-state per query, ``evecs[u]``/``evals[u]`` (the local
    eigen-normalised baseline's operator, Eq. 3 per feature set)."""
    q, k = idx.shape
    local = np.arange(q * k, dtype=np.int64).reshape(q, k)
    return score_terms(Qg, local, Xg, np.repeat(evecs, k, axis=0), np.repeat(evals, k, axis=0),
                       sizes, set_size, floor, n_jobs, rows=np.asarray(idx).reshape(-1))


def aggregate_terms(terms, how):
    """Combine per-neighbor sums ``terms`` (q, k): ``"sum"`` is the paper's
    Eq. 2, ``"min"`` the smallest of the k (the query is as normal as its
    best-fitting neighbor says)."""
    if how == "sum":
        return terms.sum(axis=1)
    if how == "min":
        return terms.min(axis=1)
    raise ValueError(f"aggregate must be 'sum' or 'min'; got {how!r}.")
