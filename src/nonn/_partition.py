"""Feature re-ordering and partition into sets (paper Sec. 3).

Pure functions on arrays; no estimator state.
"""

from __future__ import annotations

import numpy as np

from ._local_eigen import column_variance, floor_scale_from_variance


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
    rel = max(float(eig_floor), 10 * np.finfo(dtype).eps)
    floors = (rel * floor_scale_from_variance(var[order], sizes, set_size)).astype(dtype)
    return order, sizes, floors


def set_sizes(n_features, set_size):
    """Sizes of the consecutive feature sets; the last one may be shorter
    (it is kept: no feature is ever dropped)."""
    L = min(int(set_size), n_features)
    full, rest = divmod(n_features, L)
    return np.array([L] * full + ([rest] if rest else []), dtype=np.int64)
