"""Per-column scaling of tabular data, learned at fit (the ``scale`` option).

``scale="standard"``, ``"minmax"`` and ``"robust"`` are scikit-learn's
:class:`~sklearn.preprocessing.StandardScaler`, :class:`MinMaxScaler` and
:class:`RobustScaler`: their statistics are what those scalers learn (mean
and standard deviation; minimum and range; median and inter-quartile
range, a constant column getting a factor of 1 so nothing is divided by
zero). A detector stores them as two plain arrays, ``scale_center_`` and
``scale_factor_``, and transforms training rows and queries alike::

    X_scaled = (X - scale_center_) / scale_factor_

Two details keep this exact at every magnitude a float can hold:

* the statistics are learned on each column divided by a power of two
  near its largest magnitude (exact), so that the scalers' "constant
  column" tests are relative to the column, not absolute, and squares
  cannot overflow (data at 1e300 scale as data at 1);
* the transform divides by a power of two before subtracting (exact too),
  so ``X - scale_center_`` cannot overflow either.
"""

from __future__ import annotations

import numpy as np

from ._chunks import chunk_rows

#: the ``scale`` options, besides None
SCALINGS = ("standard", "minmax", "robust")


def _pow2_at_most(values):
    """The largest power of two <= each positive value; 1 where the value is 0."""
    v = np.asarray(values, dtype=np.float64)
    out = np.ones_like(v)
    pos = v > 0
    # frexp: v = m * 2**e with m in [0.5, 1), so 2**(e - 1) <= v exactly
    _, e = np.frexp(v[pos])
    out[pos] = np.ldexp(1.0, e - 1)
    return out


def _row_chunks(n, d, working_memory):
    # the float64 copy of a chunk and its scaled result
    step = chunk_rows(16 * max(d, 1), working_memory)
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def fit_column_scaling(X, method, working_memory=None):
    """The center and factor of each column of ``X`` for ``method``.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), float32 or float64, finite
    method : {"standard", "minmax", "robust"}
    working_memory : float, optional
        MiB for one chunk of the float64 work (None: scikit-learn's setting).

    Returns
    -------
    center, factor : ndarray of shape (n_features,), float64
        ``factor`` is positive and finite; a constant column gets 1.
    """
    from sklearn.preprocessing import RobustScaler

    n, d = X.shape
    unit = column_units(X.max(axis=0), X.min(axis=0))
    if method in ("standard", "minmax"):
        center, factor, constant = scaler_statistics(
            method, partial_scaler(X, method, unit, working_memory))
    elif method == "robust":
        # RobustScaler has no partial_fit; its quantiles are per column, so
        # blocks of columns bound the memory instead of blocks of rows
        center, factor = np.empty(d), np.empty(d)
        constant = np.zeros(d, dtype=bool)
        step = max(1, chunk_rows(16 * max(n, 1), working_memory))
        for j in range(0, d, step):
            cols = slice(j, min(j + step, d))
            block = X[:, cols].astype(np.float64) / unit[cols]
            sc = RobustScaler().fit(block)
            center[cols], factor[cols] = sc.center_, sc.scale_
            # RobustScaler puts 1 for an inter-quartile range under 10
            # machine epsilons; tell those apart from a range of exactly 1
            for i in np.flatnonzero(sc.scale_ == 1.0):
                q = np.percentile(block[:, i], sc.quantile_range)
                constant[j + i] = (q[1] - q[0]) != 1.0
    else:  # pragma: no cover - the estimators validate the option first
        raise ValueError(f"Unknown scale {method!r}; expected one of {SCALINGS}.")
    return scaling_from_statistics(method, center, factor, constant, unit)


def column_units(maxima, minima):
    """Per column, the power of two near its largest magnitude (from its
    largest and smallest values) that the statistics are learned in."""
    top = np.maximum(np.abs(np.asarray(maxima)), np.abs(np.asarray(minima)))
    return _pow2_at_most(top.astype(np.float64))


def partial_scaler(X, method, unit, working_memory=None):
    """scikit-learn's StandardScaler or MinMaxScaler (``method``) fitted on
    ``X / unit``, in row chunks (a float64 copy of one chunk at a time)."""
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    scaler = StandardScaler() if method == "standard" else MinMaxScaler()
    for rows in _row_chunks(X.shape[0], X.shape[1], working_memory):
        scaler.partial_fit(X[rows].astype(np.float64) / unit)
    return scaler


def scaler_statistics(method, scaler):
    """``(center, factor, constant)`` in units of a fitted StandardScaler or
    MinMaxScaler (``method``)."""
    if method == "standard":
        # where StandardScaler found a constant column it put 1 for the
        # standard deviation
        return scaler.mean_, scaler.scale_, scaler.scale_ != np.sqrt(scaler.var_)
    # MinMaxScaler's rule for a constant column (its _handle_zeros_in_scale):
    # a range under 10 machine epsilons
    return scaler.data_min_, scaler.data_range_, scaler.data_range_ < 10 * np.finfo(
        np.float64).eps


def merged_scaler_statistics(method, scalers):
    """:func:`scaler_statistics` of the scalers of row partitions (fitted by
    :func:`partial_scaler` in the same units), merged: the minima and
    maxima as they are; means and variances by the pairwise update of
    Chan, Golub and LeVeque, and a column is constant by StandardScaler's
    own rule (a variance within the error bound of its computation)."""
    if method == "minmax":
        lo = np.min([s.data_min_ for s in scalers], axis=0)
        hi = np.max([s.data_max_ for s in scalers], axis=0)
        rng = hi - lo
        return lo, rng, rng < 10 * np.finfo(np.float64).eps
    n, mean, m2 = 0, 0.0, 0.0
    for s in scalers:
        nb = int(s.n_samples_seen_ if np.ndim(s.n_samples_seen_) == 0
                 else s.n_samples_seen_[0])
        total = n + nb
        delta = s.mean_ - mean
        mean = mean + delta * (nb / total)
        m2 = m2 + s.var_ * nb + delta * delta * (n * nb / total)
        n = total
    var = m2 / n
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    return mean, np.where(constant, 1.0, np.sqrt(var)), constant


def scaling_from_statistics(method, center, factor, constant, unit):
    """The stored ``(center, factor)`` from statistics learned in ``unit``s
    (a constant column gets the factor 1); a ValueError when they cannot be
    represented."""
    center = np.asarray(center, dtype=np.float64) * unit
    # a constant column keeps its units (factor 1, as the scalers do): its
    # training rows become 0 and a query's deviation is left as it is
    factor = np.where(constant, 1.0, np.asarray(factor, dtype=np.float64) * unit)
    bad = np.flatnonzero(~(np.isfinite(center) & np.isfinite(factor) & (factor > 0)))
    if len(bad):
        raise ValueError(
            f"scale={method!r} cannot represent the statistics of column(s) "
            f"{bad[:10].tolist()}: their values lie too close to the largest float "
            f"({np.finfo(np.float64).max:.3g}). Divide the data by a constant first."
        )
    return center, factor


def apply_column_scaling(X, center, factor, working_memory=None):
    """``(X - center) / factor`` in ``X``'s dtype (computed in float64).

    Raises ``ValueError`` when a scaled value cannot be represented in that
    dtype (a query far outside the training range, near the float limits).
    """
    center = np.asarray(center, dtype=np.float64)
    factor = np.asarray(factor, dtype=np.float64)
    unit = _pow2_at_most(factor)
    c, f = center / unit, factor / unit
    out = np.empty(X.shape, dtype=X.dtype)
    with np.errstate(over="ignore"):  # an overflow is reported below, once
        for rows in _row_chunks(X.shape[0], X.shape[1], working_memory):
            out[rows] = (X[rows] / unit - c) / f
    if not np.isfinite(out).all():
        raise ValueError(
            f"The scaled data overflow {X.dtype}: some values lie so far outside the "
            "training range that (X - scale_center_) / scale_factor_ cannot be "
            "represented. Check the data's units."
        )
    return out
