"""The paper's baselines (Sec. 5.1): k-NN, global and local eigen-normalised
k-NN. Same base, same methods as :class:`nonn.KNNN`, so the ablation is a
loop over four estimators."""

from __future__ import annotations

import numpy as np

from ._base import BaseDetector, cap, resolve_set_size
from ._eq2 import PRIMAL, neighborhood_eigen, shared_score_terms
from ._layout import GRID_STATE_SPEC, fit_grid, permute
from ._state import Array
from ._validation import Interval, Options

_AGGREGATES = {
    "mean": lambda d: d.mean(axis=1),
    "max": lambda d: d.max(axis=1),
    "kth": lambda d: d[:, -1],
}


class _NeighborQueries:
    """Chunked "search, then score from the neighbors" loop."""

    def _fit_neighbors(self, X):
        n = X.shape[0]
        self.n_neighbors_ = cap(self.n_neighbors, n - 1, "n_neighbors",
                                "the number of other training points")
        self._fit_X = self._transform(X)
        self._search = self._make_backend(self._fit_X)
        dist, idx = self._search.kneighbors(None, self.n_neighbors_)
        # each row's k-th neighbor distance: which rows partial_fit rescores
        self._knn_radius = dist[:, -1].astype(np.float64)
        return self._from_neighbors(self._fit_X, dist, idx)

    def partial_fit(self, X, y=None):
        """Add normal samples ``X`` to the fitted model without a refit: the
        new rows are scored by their k nearest others, and an existing row's
        leave-one-out score is recomputed only when a new row is nearer than
        its k-th neighbor. The input transforms (and the feature order and
        floors of :class:`LocalEigenKNN`) stay those of the first fit; with
        an exact backend the result is the model a fit on all rows gives with
        them. ``n_samples_seen_`` counts every row. See
        :meth:`nonn.KNNN.partial_fit`.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            New normal samples, with the columns (and column names) the
            model was fitted on. On a detector not fitted yet this is
            ``fit(X)``.
        y : ignored

        Returns
        -------
        self
        """
        from ._update import neighbor_partial_fit

        return neighbor_partial_fit(self, X)

    def _transform(self, X):
        return X

    def _anomaly_score(self, X):
        out = np.empty(X.shape[0], dtype=X.dtype)
        row_bytes = X.dtype.itemsize * X.shape[1] * 64
        for sl in self._query_chunks(X.shape[0], row_bytes, "queries"):
            Q = self._transform(X[sl])
            dist, idx = self._search.kneighbors(Q, self.n_neighbors_)
            out[sl] = self._from_neighbors(Q, dist, idx)
        return out


class KNN(_NeighborQueries, BaseDetector):
    """Plain k-NN distance detector (the paper's baseline).

    Parameters
    ----------
    n_neighbors : int, default=3
    aggregate : {"mean", "max", "kth"}, default="mean"
        How the k distances become one score: their mean (the paper), their
        maximum, or the k-th distance (equal to max for sorted distances;
        kept as its own name because PyOD users know it).
    metric : {"euclidean", "cosine"}, default="euclidean"
    backend, backend_params, contamination, working_memory, n_jobs
        As in :class:`nonn.KNNN`.
    verbose, normalize, whiten, scale
        As in :class:`nonn.KNNN`.

    Attributes
    ----------
    data_scale_exponent_ : int
        As in :class:`nonn.KNNN`: the search runs on the data multiplied by
        ``2**data_scale_exponent_``; the scores (distances) are returned in
        the data's own units.

    Examples
    --------
    >>> import numpy as np
    >>> from nonn import KNN
    >>> X = np.random.default_rng(0).normal(size=(100, 4))
    >>> KNN(n_neighbors=3).fit(X).anomaly_score(np.zeros((1, 4))).shape
    (1,)
    """

    _constraints = {
        "n_neighbors": [Interval("int", 1, None)],
        "aggregate": [Options(*_AGGREGATES)],
    }
    _state_arrays = ("_fit_X", "train_scores_")
    _state_scalars = ("n_neighbors_", "offset_", "contamination_", "threshold_source_",
                      "backend_", "data_scale_exponent_", "normalize_", "whiten_")

    @property
    def _scores_carry_units(self):
        # Euclidean distances carry the data's units (returned in the user's
        # units); cosine distances and distances between unit rows do not
        return self.metric == "euclidean" and getattr(self, "normalize_", None) is None

    def __init__(self, n_neighbors=3, aggregate="mean", metric="euclidean", backend="auto",
                 backend_params=None, contamination="auto", working_memory=None, n_jobs=None,
                 verbose=False, normalize=None, whiten=0.0, scale=None):
        self.n_neighbors = n_neighbors
        self.aggregate = aggregate
        self.metric = metric
        self.backend = backend
        self.backend_params = backend_params
        self.contamination = contamination
        self.working_memory = working_memory
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.normalize = normalize
        self.whiten = whiten
        self.scale = scale

    def _fit(self, X):
        return self._fit_neighbors(X)

    def _from_neighbors(self, Q, dist, idx):
        return _AGGREGATES[self.aggregate](dist).astype(Q.dtype, copy=False)

    def explain(self, X):
        """Per-feature contributions to each query's score and the training
        neighbors it came from. A Euclidean distance ``||d||`` is split as
        ``d_f^2 / ||d||`` (sums to the distance exactly; every share is
        >= 0 without whitening), a cosine distance as ``(u_q - u_x)_f^2 / 2``
        over the unit rows it compares; ``aggregate="mean"`` averages the k
        neighbors' splits, ``"max"``/``"kth"`` takes the k-th neighbor's
        (``neighbor``).

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)

        Returns
        -------
        explanation : :class:`nonn.Explanation`
            ``contributions`` (n_queries, n_features) in the input's column
            order, summing per row to ``anomaly_scores``; ``neighbors``
            (n_queries, k) training row ids; ``neighbor`` (n_queries,).
            See :meth:`nonn.KNNN.explain` and :mod:`nonn._explain`.
        """
        from ._explain import explain_knn

        return explain_knn(self, X)


class GlobalEigenKNN(_NeighborQueries, BaseDetector):
    """Global eigen-normalised k-NN (paper Eq. 3).

    One eigen-decomposition of the covariance of the whole training set;
    ``AS(f) = sum_i sum_j |(f - f_i) . v_j| / sqrt(e_j)`` over the query's k
    nearest training points.

    Parameters
    ----------
    n_neighbors : int, default=3
    eig_floor : float, default=1e-3
        Relative floor: eigenvalues below ``eig_floor`` times the mean
        feature variance are raised to it.
    metric, backend, backend_params, contamination, working_memory, n_jobs, verbose,
    normalize, whiten, scale
        As in :class:`nonn.KNNN`.

    Attributes
    ----------
    components_ : ndarray (n_features, n_features), column j = eigenvector j
    eigenvalues_ : ndarray (n_features,)
        At the working scale (see ``data_scale_exponent_``).
    data_scale_exponent_ : int
        As in :class:`nonn.KNNN`.
    """

    _constraints = {
        "n_neighbors": [Interval("int", 1, None)],
        "eig_floor": [Interval("real", 0, None)],
    }
    _state_arrays = ("_fit_X", "components_", "eigenvalues_", "eig_floor_", "train_scores_")
    _state_scalars = ("n_neighbors_", "offset_", "contamination_", "threshold_source_",
                      "backend_", "data_scale_exponent_", "normalize_", "whiten_")
    _state_spec = {
        **BaseDetector._state_spec,
        "components_": Array("D", "D"),
        "eigenvalues_": Array("D", low=0),
        "eig_floor_": Array(1, positive=True),
    }

    def __init__(self, n_neighbors=3, eig_floor=1e-3, metric="euclidean", backend="auto",
                 backend_params=None, contamination="auto", working_memory=None, n_jobs=None,
                 verbose=False, normalize=None, whiten=0.0, scale=None):
        self.n_neighbors = n_neighbors
        self.eig_floor = eig_floor
        self.metric = metric
        self.backend = backend
        self.backend_params = backend_params
        self.contamination = contamination
        self.working_memory = working_memory
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.normalize = normalize
        self.whiten = whiten
        self.scale = scale

    def _fit(self, X):
        self.eigenvalues_, self.components_, self.eig_floor_ = self._eigen_state(X)
        n = X.shape[0]
        self.n_neighbors_ = cap(self.n_neighbors, n - 1, "n_neighbors",
                                "the number of other training points")
        self._fit_X = X
        self._search = self._make_backend(X)
        return self._cross_fitted_scores(X)

    def _eigen_state(self, X):
        """(eigenvalues, eigenvectors, floor) of the covariance of ``X``."""
        X64 = X.astype(np.float64)
        cov = np.cov(X64, rowvar=False, bias=True).reshape(X.shape[1], X.shape[1])
        w, v = np.linalg.eigh(cov)
        scale = np.trace(cov) / X.shape[1]
        if scale <= 0:
            scale = 1.0
        rel = max(float(self.eig_floor), 10 * np.finfo(X.dtype).eps)
        return (np.maximum(w, 0).astype(X.dtype), v.astype(X.dtype),
                np.array([rel * scale], dtype=X.dtype))

    def partial_fit(self, X, y=None):
        """Add normal samples ``X``. The model is global (one covariance of
        all rows, cross-fitted calibration scores), so it is recomputed on
        all rows, at the cost of a fit, with the input transforms of the
        first fit kept; ``n_samples_seen_`` counts every row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            New normal samples, with the columns (and column names) the
            model was fitted on. On a detector not fitted yet this is
            ``fit(X)``.
        y : ignored

        Returns
        -------
        self
        """
        from ._update import global_partial_fit

        return global_partial_fit(self, X)

    def _cross_fitted_scores(self, X):
        """Out-of-sample scores of every training row by K-fold cross-fitting:
        the rows of a fold are scored by the model (covariance, floor,
        neighbors) of the other folds. A leave-one-out score would keep the
        row in the global covariance: with fewer rows than features every
        training row then lies in the covariance's span while new rows do
        not, and a threshold set on such scores flags almost all new data."""
        n = X.shape[0]
        folds = np.array_split(np.random.default_rng(0).permutation(n), min(_FOLDS, n))
        out = np.empty(n, dtype=X.dtype)
        for fold in folds:
            rest = np.setdiff1d(np.arange(n), fold)
            w, v, floor = self._eigen_state(X[rest])
            k = min(self.n_neighbors_, len(rest))
            search = self._make_backend(X[rest])
            _, idx = search.kneighbors(X[fold], k)
            out[fold] = _global_eq3(X[fold], X[rest], idx, w, v, floor[0], self)
        self._search = self._make_backend(X)  # _make_backend records backend_
        return out

    def _from_neighbors(self, Q, dist, idx):
        return _global_eq3(Q, self._fit_X, idx, self.eigenvalues_, self.components_,
                           self.eig_floor_[0], self)

    def explain(self, X):
        """Per-feature contributions to each query's score (Eq. 3): each
        ``|d_i . v_j| / sqrt(max(e_j, floor))`` is split as
        ``sign(d_i . v_j) d_if v_jf / sqrt(max(e_j, floor))``, summed over the
        k neighbors ``i`` (``neighbor`` is -1: all k count).

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)

        Returns
        -------
        explanation : :class:`nonn.Explanation`
            ``contributions`` (n_queries, n_features) in the input's column
            order, summing per row to ``anomaly_scores``; ``neighbors``
            (n_queries, k) training row ids; ``neighbor`` (n_queries,).
            See :meth:`nonn.KNNN.explain` and :mod:`nonn._explain`.
        """
        from ._explain import explain_global

        return explain_global(self, X)


#: folds of GlobalEigenKNN's cross-fitted calibration scores
_FOLDS = 10


def _global_eq3(Q, X, idx, evals, evecs, floor, det):
    """Eq. 3: sum_i sum_j |(q - x_i) . v_j| / sqrt(max(e_j, floor))."""
    weights = (1.0 / np.sqrt(np.maximum(evals, floor))).astype(Q.dtype)
    out = np.empty(Q.shape[0], dtype=Q.dtype)
    row_bytes = Q.dtype.itemsize * idx.shape[1] * Q.shape[1] * 3
    for sl in det._query_chunks(Q.shape[0], row_bytes):
        diff = Q[sl, None, :] - X[idx[sl]]
        proj = np.abs(diff @ evecs)
        out[sl] = (proj @ weights).sum(axis=1)
    return out


class LocalEigenKNN(_NeighborQueries, BaseDetector):
    """Local eigen-normalised k-NN (paper Sec. 5.1, "local normalisation").

    The eigenvectors come from the covariance of the query's own k nearest
    training points (not from each neighbor's neighborhood as in k-NNN),
    then Eq. 3 is applied, per feature set as in :class:`KNNN` so that it
    scales to embeddings (with ``set_size >= n_features`` it is exactly the
    paper's whole-vector version).

    Parameters
    ----------
    n_neighbors : int, default=3
    set_size : int, default=5
    reorder : {"greedy", "none"}, default="greedy"
    eig_floor : float, default=1e-3
    metric, backend, backend_params, contamination, working_memory, n_jobs, verbose,
    normalize, whiten, scale
        As in :class:`nonn.KNNN`.

    Attributes
    ----------
    data_scale_exponent_ : int
        As in :class:`nonn.KNNN`.
    """

    _constraints = {
        "n_neighbors": [Interval("int", 1, None)],
        "set_size": [Interval("int", 1, None)],
        "reorder": [Options("greedy", "none")],
        "eig_floor": [Interval("real", 0, None)],
    }
    _state_arrays = ("_fit_X", "feature_order_", "set_sizes_", "eig_floor_", "train_scores_")
    _state_scalars = ("n_neighbors_", "set_size_", "offset_", "contamination_",
                      "threshold_source_", "backend_", "data_scale_exponent_", "normalize_",
                      "whiten_")
    _state_spec = {**BaseDetector._state_spec, **GRID_STATE_SPEC}

    def __init__(self, n_neighbors=3, set_size=5, reorder="greedy", eig_floor=1e-3,
                 metric="euclidean", backend="auto", backend_params=None, contamination="auto",
                 working_memory=None, n_jobs=None, verbose=False, normalize=None, whiten=0.0,
                 scale=None):
        self.n_neighbors = n_neighbors
        self.set_size = set_size
        self.reorder = reorder
        self.eig_floor = eig_floor
        self.metric = metric
        self.backend = backend
        self.backend_params = backend_params
        self.contamination = contamination
        self.working_memory = working_memory
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.normalize = normalize
        self.whiten = whiten
        self.scale = scale

    def _fit(self, X):
        fit_grid(self, X, resolve_set_size(self.set_size, X.shape[1]), self.eig_floor)
        return self._fit_neighbors(X)

    def _to_grid(self, X):
        """``X`` on the fitted layout (columns re-ordered)."""
        return permute(X, self.feature_order_)

    def _transform(self, X):
        return self._to_grid(X)

    def _from_neighbors(self, Qg, dist, idx):
        q, k = idx.shape
        n_sets, L = len(self.set_sizes_), self.set_size_
        out = np.empty(q, dtype=Qg.dtype)
        # the eigen-state, and a copy of it per neighbor for the kernel
        row_bytes = Qg.dtype.itemsize * (n_sets * L * (k + 1) * (L + 1) + Qg.shape[1] * k)
        for sl in self._query_chunks(q, row_bytes):
            w, v = neighborhood_eigen(self._fit_X, idx[sl], self.set_sizes_, L, self.n_jobs_,
                                      form=PRIMAL)
            out[sl] = shared_score_terms(Qg[sl], idx[sl], self._fit_X, v, w, self.set_sizes_, L,
                                         self.eig_floor_, self.n_jobs_).sum(axis=1)
        return out

    def explain(self, X):
        """Per-feature contributions to each query's score: the eigenvectors
        of the query's own k neighbors, each neighbor's difference split as
        in :meth:`nonn.KNNN.explain` (primal form), summed over the k
        neighbors (``neighbor`` is -1: all k count).

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)

        Returns
        -------
        explanation : :class:`nonn.Explanation`
            ``contributions`` (n_queries, n_features) in the input's column
            order, summing per row to ``anomaly_scores``; ``neighbors``
            (n_queries, k) training row ids; ``neighbor`` (n_queries,).
            See :meth:`nonn.KNNN.explain` and :mod:`nonn._explain`.
        """
        from ._explain import explain_local

        return explain_local(self, X)
