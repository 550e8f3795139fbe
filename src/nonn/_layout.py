"""The paper's Sec. 3 layout: feature re-ordering, partition into sets,
the grid the Eq. 2 kernels index by, and the relative eigenvalue floors.

The training data are stored with their D columns re-ordered (not padded;
search backends see plain D-dimensional rows). Set s holds columns
``s*L .. s*L + sizes[s]``; only the last set may be shorter. A shorter last
set of ``r < L`` features is decomposed on its own ``r x r`` covariance; its
eigenvectors sit in the top-left ``r x r`` block of an ``L x L`` block whose
padding is zero, and its padded eigenvalue slots count for nothing.

Pure functions on arrays, plus :func:`fit_grid`, which stores a fitted
layout on an estimator (the attributes of :data:`GRID_STATE_SPEC`).
"""

from __future__ import annotations

import numpy as np

from ._state import Array, Int, permutation
from ._state import set_sizes as valid_set_sizes


def abs_correlation(X):
    """|Pearson correlation| between the columns of ``X`` (float64).

    Constant columns have no correlation; it is taken as 0 (and 1 on the
    diagonal) so they stay usable and nothing is divided by zero.

    float32 data are centred and multiplied (one GEMM, no float64 copy of
    the data) in float32; the Gram matrix is then normalised in float64
    (about 4e-6 from the float64 result on embedding-like data). Any other
    dtype is computed in float64.
    """
    X = np.asarray(X)
    return abs_correlation_from_gram(centred_gram(X, X.mean(axis=0, dtype=np.float64)))


def centred_gram(X, mean):
    """``(X - mean).T @ (X - mean)`` as float64, the product taken in float32
    for float32 data (see :func:`abs_correlation`), else in float64. Summed
    over row blocks with the global ``mean``, it is the Gram matrix of the
    whole matrix (to rounding)."""
    X = np.asarray(X)
    dt = np.float32 if X.dtype == np.float32 else np.float64
    Xc = X.astype(dt, copy=False) - np.asarray(mean, dtype=np.float64).astype(dt)
    return (Xc.T @ Xc).astype(np.float64, copy=False)


def abs_correlation_from_gram(G):
    """|Pearson correlation| from the Gram matrix ``G`` of centred columns
    (float64); constant columns as in :func:`abs_correlation`. Lets
    statistics summed over data partitions give the same order."""
    std = np.sqrt(np.maximum(np.diag(G), 0.0))
    safe = np.where(std > 0, std, 1.0)
    C = np.abs(G)
    C /= safe[:, None]
    C /= safe[None, :]
    C[std == 0, :] = 0.0
    C[:, std == 0] = 0.0
    np.fill_diagonal(C, 1.0)
    return C


def greedy_order(corr, set_size):
    """The paper's greedy correlation order of the columns.

    The first column stays first. Inside a set, the next column is the
    remaining one with the highest mean |corr| to the previous two columns
    of the set (to the only one when the set has one so far). A new set
    starts with the remaining column with the lowest mean |corr| to the last
    two columns placed. Ties go to the lowest column index.

    Returns a permutation ``order`` such that ``X[:, order]`` is reordered.
    """
    corr = np.asarray(corr, dtype=np.float64)
    d = corr.shape[0]
    L = int(set_size)
    order = [0]
    remaining = np.ones(d, dtype=bool)
    remaining[0] = False
    # Greedy choice is sequential by nature: one step per column, each step
    # vectorised over the remaining columns (D steps of O(D) work).
    for pos in range(1, d):
        set_start = (pos // L) * L
        if pos == set_start:
            ref = order[-2:]
            crit = corr[ref].mean(axis=0)
            crit = np.where(remaining, crit, np.inf)
            nxt = int(np.argmin(crit))
        else:
            ref = order[max(set_start, pos - 2):pos]
            crit = corr[ref].mean(axis=0)
            crit = np.where(remaining, crit, -np.inf)
            nxt = int(np.argmax(crit))
        order.append(nxt)
        remaining[nxt] = False
    return np.asarray(order, dtype=np.int64)


def feature_order(X, set_size, reorder):
    """Column permutation for ``reorder`` in {"greedy", "none"}."""
    d = X.shape[1]
    if reorder == "none" or d <= 2:
        return np.arange(d, dtype=np.int64)
    return greedy_order(abs_correlation(X), set_size)


def needs_order(n_features, set_size, reorder):
    """Whether the fit re-orders the columns: the greedy order with more
    than two columns and more than one set (one set holding every feature
    scores alike in any order)."""
    return reorder != "none" and n_features > 2 and set_size < n_features


def grid_statistics(X, set_size, reorder):
    """The column statistics :func:`grid_from_statistics` needs, from the
    whole training matrix: the centred Gram matrix (None when the columns
    keep their order) and the column variances, float64."""
    gram = None
    if needs_order(X.shape[1], set_size, reorder):
        gram = centred_gram(X, X.mean(axis=0, dtype=np.float64))
    return gram, column_variance(X)


def grid_from_statistics(gram, var, set_size, reorder, eig_floor, dtype):
    """The layout of a fit: ``(feature_order, set_sizes, eig_floor_)``.

    ``gram`` and ``var`` are the training columns' centred Gram matrix and
    variances (in the input's column order; from one matrix, or summed over
    row partitions), ``set_size`` the resolved L, ``eig_floor`` the
    relative floor. The absolute floor of a set is the relative one times
    the mean variance of its features, so that duplicates, constant
    columns, K' <= L or low-rank data give finite scores and a uniform
    rescaling of the data leaves every score unchanged; 10 machine epsilons
    of ``dtype`` at least, so that ``eig_floor=0`` stays finite.
    """
    var = np.asarray(var, dtype=np.float64)
    d = len(var)
    if needs_order(d, set_size, reorder):
        order = greedy_order(abs_correlation_from_gram(gram), set_size)
    else:
        order = np.arange(d, dtype=np.int64)
    sizes = set_sizes(d, set_size)
    floors = absolute_floors(eig_floor, floor_scale_from_variance(var[order], sizes, set_size),
                             dtype)
    return order, sizes, floors


def absolute_floors(eig_floor, scale, dtype):
    """Each set's absolute floor: the relative ``eig_floor`` (10 machine
    epsilons of ``dtype`` at least) times the set's reference variance
    ``scale`` (:func:`floor_scale_from_variance`)."""
    rel = max(float(eig_floor), 10 * np.finfo(dtype).eps)
    return (rel * np.asarray(scale, dtype=np.float64)).astype(dtype)


def set_sizes(n_features, set_size):
    """Sizes of the consecutive feature sets; the last one may be shorter
    (it is kept: no feature is ever dropped)."""
    L = min(int(set_size), n_features)
    full, rest = divmod(n_features, L)
    return np.array([L] * full + ([rest] if rest else []), dtype=np.int64)


#: an estimator's fitted layout (see BaseDetector._state_spec)
GRID_STATE_SPEC = {
    "feature_order_": Array("D", dtype="int64", check=permutation),
    "set_sizes_": Array("S", dtype="int64", check=valid_set_sizes),
    "eig_floor_": Array("S", positive=True),
    "set_size_": Int(1, "D", binds="L"),
}


def fit_grid(det, X, set_size, eig_floor):
    """Learn the layout of ``X`` for the set size ``set_size`` (resolved:
    at most the number of features) with the estimator's ``reorder``, store
    it on ``det`` (``set_size_``, ``feature_order_``, ``set_sizes_``,
    ``eig_floor_``; see :func:`grid_from_statistics`) and return ``X`` on
    it."""
    det.set_size_ = int(set_size)
    gram, var = grid_statistics(X, det.set_size_, det.reorder)
    det.feature_order_, det.set_sizes_, det.eig_floor_ = grid_from_statistics(
        gram, var, det.set_size_, det.reorder, eig_floor, X.dtype)
    # the sets' reference variances, for a floor decided later in the fit
    det._floor_scale = floor_scale_from_variance(np.asarray(var, dtype=np.float64)[
        det.feature_order_], det.set_sizes_, det.set_size_)
    return permute(X, det.feature_order_)


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


def diff_grid(Qg, Xg, idx, sizes, set_size):
    """(q, k, S, L) differences between grid queries ``Qg`` and their
    neighbors ``idx`` (q, k), rows of ``Xg``; padding 0."""
    diff = pad(Qg[:, None, :] - Xg[idx], len(sizes) * set_size)
    return diff.reshape(idx.shape + (len(sizes), set_size))


# ---------------------------------------------------- the eigenvalue floors
def floor_scale_from_variance(var, sizes, set_size):
    """Per-set reference variance for the relative eigenvalue floor, from
    the per-column variances ``var`` of the grid data: the mean variance of
    the set's features over the training set. Falls back to the mean over
    all features for a constant set, and to 1 for constant data."""
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
