"""The k-NNN estimator (Nizan & Tal, Eq. 2)."""

from __future__ import annotations

import numpy as np

from ._base import BaseDetector, cap
from ._local_eigen import (
    floor_scale,
    neighbourhood_eigen,
    pad,
    permute,
    score_eq2,
)
from ._partition import feature_order, set_sizes
from ._validation import Interval, Options


class _SetGridMixin:
    """Feature re-ordering, partition into sets and the relative eigenvalue
    floor, shared by :class:`KNNN` and :class:`LocalEigenKNN`."""

    def _fit_grid(self, X):
        d = X.shape[1]
        self.set_size_ = cap(self.set_size, d, "set_size", "the number of features")
        self.feature_order_ = feature_order(X, self.set_size_, self.reorder)
        self.set_sizes_ = set_sizes(d, self.set_size_)
        Xg = permute(X, self.feature_order_)
        # Floor relative to the data's own scale (per set), so that duplicates,
        # constant columns, K' <= L or low-rank data give finite scores and a
        # uniform rescaling of all data leaves every score unchanged. The eps
        # term keeps eig_floor=0 finite too.
        rel = max(float(self.eig_floor), 10 * np.finfo(X.dtype).eps)
        self.eig_floor_ = (rel * floor_scale(Xg, self.set_sizes_, self.set_size_)).astype(X.dtype)
        return Xg

    def _to_grid(self, X):
        return permute(X, self.feature_order_)

    def _diff_grid(self, Qg, idx):
        """(q, k, S, L) differences between queries and their neighbours."""
        n_sets, L = len(self.set_sizes_), self.set_size_
        diff = pad(Qg[:, None, :] - self._fit_X[idx], n_sets * L)
        return diff.reshape(idx.shape + (n_sets, L))


class KNNN(_SetGridMixin, BaseDetector):
    """k nearest neighbours of neighbours anomaly detector.

    Fit stores, for every training point and every feature set, the
    eigenvectors and eigenvalues of the covariance of its neighbourhood (the
    point itself and its ``n_neighbors_of_neighbors - 1`` nearest other
    training points). A query's anomaly score is Eq. 2 of the paper::

        AS(f) = sum_i sum_s sum_j |(f_s - f_{i,s}) . v_{i,j,s}| / sqrt(e_{i,j,s})

    over its ``n_neighbors`` nearest training points ``f_i``.

    Parameters
    ----------
    n_neighbors : int, default=3
        k, neighbours of a query.
    n_neighbors_of_neighbors : int, default=25
        K', size of each training point's neighbourhood (itself included).
    set_size : int, default=5
        L, features per set; the last set may be shorter (never dropped).
    reorder : {"greedy", "none"}, default="greedy"
        The paper's greedy correlation ordering of the features before they
        are cut into sets, or keep the given order.
    eig_floor : float, default=1e-3
        Relative eigenvalue floor: eigenvalues of a set are floored at
        ``eig_floor`` times the mean training variance of the set's features.
        Keeps singular neighbourhoods finite and makes the score invariant to
        a uniform rescaling of the data. ``0`` means the smallest safe floor
        (10 machine epsilons), the closest to the paper's unfloored maths.
    metric : {"euclidean", "cosine"}, default="euclidean"
        Distance used to find neighbours (Eq. 2 itself is unchanged).
    backend : str, default="auto"
        Search backend by name (see :mod:`nonn.neighbors`); the fitted
        attribute ``backend_`` says which one "auto" picked.
    backend_params : dict, default=None
        Extra keyword arguments for the backend.
    contamination : "auto" or float in (0, 0.5], default="auto"
        Share of the (leave-one-out scored) training points to flag;
        "auto" = 0.01.
    working_memory : float, default=None
        MiB for one chunk of work (None: scikit-learn's ``working_memory``).
    n_jobs : int, default=None
        Threads for the batched eigen-decompositions; None = all cores.
    verbose : bool, default=False
        Progress bars on long work.

    Attributes
    ----------
    n_neighbors_, n_neighbors_of_neighbors_, set_size_ : int
        The counts used (capped to the data with a warning when too large).
    feature_order_ : ndarray (n_features,)
        Column permutation applied before the partition.
    set_sizes_ : ndarray (n_sets,)
    neighborhoods_ : ndarray (n_samples, n_neighbors_of_neighbors_)
        Ids of each training point's neighbourhood; column 0 is the point.
    eigenvalues_ : ndarray (n_samples, n_sets, set_size_)
        Ascending per set; the padding of a shorter last set is 0.
    eigenvectors_ : ndarray (n_samples, n_sets, set_size_, set_size_)
        ``eigenvectors_[p, s, :, j]`` is eigenvector j of point p, set s.
    eig_floor_ : ndarray (n_sets,)
        Absolute eigenvalue floor per set.
    train_scores_ : ndarray (n_samples,)
        Leave-one-out ``score_samples`` of the training points.
    offset_ : float
        Threshold on ``score_samples``; ``decision_function = score_samples - offset_``.
    backend_ : str

    References
    ----------
    O. Nizan and A. Tal, "k-NNN: Nearest Neighbors of Neighbors for Anomaly
    Detection", WACV Workshops 2024, arXiv:2305.17695.

    Examples
    --------
    >>> import numpy as np
    >>> from nonn import KNNN
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 8))
    >>> det = KNNN(n_neighbors=3, n_neighbors_of_neighbors=25).fit(X)
    >>> det.predict(np.vstack([X[:2], 10 + X[:1]])).tolist()
    [1, 1, -1]
    """

    _constraints = {
        "n_neighbors": [Interval("int", 1, None)],
        "n_neighbors_of_neighbors": [Interval("int", 1, None)],
        "set_size": [Interval("int", 1, None)],
        "reorder": [Options("greedy", "none")],
        "eig_floor": [Interval("real", 0, None)],
    }
    _state_arrays = (
        "_fit_X", "feature_order_", "set_sizes_", "neighborhoods_", "eigenvalues_",
        "eigenvectors_", "eig_floor_", "train_scores_",
    )
    _state_scalars = (
        "n_neighbors_", "n_neighbors_of_neighbors_", "set_size_", "offset_",
        "contamination_", "threshold_source_", "backend_",
    )

    def __init__(
        self,
        n_neighbors=3,
        n_neighbors_of_neighbors=25,
        set_size=5,
        reorder="greedy",
        eig_floor=1e-3,
        metric="euclidean",
        backend="auto",
        backend_params=None,
        contamination="auto",
        working_memory=None,
        n_jobs=None,
        verbose=False,
    ):
        self.n_neighbors = n_neighbors
        self.n_neighbors_of_neighbors = n_neighbors_of_neighbors
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

    def _fit(self, X):
        n = X.shape[0]
        # a training point is scored against the n - 1 others (leave-one-out)
        self.n_neighbors_ = cap(self.n_neighbors, n - 1, "n_neighbors",
                                "the number of other training points")
        self.n_neighbors_of_neighbors_ = cap(
            self.n_neighbors_of_neighbors, n, "n_neighbors_of_neighbors",
            "the number of training points")
        Xg = self._fit_grid(X)
        self._fit_X = Xg
        self._search = self._make_backend(Xg)
        m = max(self.n_neighbors_of_neighbors_ - 1, self.n_neighbors_)
        # ids only, in the backend's own order: the neighbourhoods and the
        # leave-one-out neighbours need no distances
        others = self._search.kneighbors(None, m, return_distance=False)
        Kp = self.n_neighbors_of_neighbors_
        self.neighborhoods_ = np.concatenate(
            [np.arange(n, dtype=np.int64)[:, None], others[:, : Kp - 1]], axis=1
        )
        self._fit_eigen()
        return self._score_neighbours(Xg, others[:, : self.n_neighbors_])

    def _fit_eigen(self):
        Xg = self._fit_X
        n = Xg.shape[0]
        n_sets, L = len(self.set_sizes_), self.set_size_
        Kp = self.neighborhoods_.shape[1]
        self.eigenvalues_ = np.empty((n, n_sets, L), dtype=Xg.dtype)
        self.eigenvectors_ = np.empty((n, n_sets, L, L), dtype=Xg.dtype)
        item = Xg.dtype.itemsize
        # numpy path: gathered neighbourhood (gather + transposed copy),
        # covariance, eigenvectors and LAPACK's copies; the kernels need less
        row_bytes = item * n_sets * L * (2 * Kp + 4 * L)
        for sl in self._query_chunks(n, row_bytes, "neighbourhood eigen"):
            # written in place (the kernel needs no intermediate)
            neighbourhood_eigen(Xg, self.neighborhoods_[sl], self.set_sizes_, L, self.n_jobs_,
                                out=(self.eigenvalues_[sl], self.eigenvectors_[sl]))

    def _score_neighbours(self, Qg, idx):
        """Eq. 2 for grid queries ``Qg`` whose neighbours are ``idx`` (q, k)."""
        q, k = idx.shape
        n_sets, L = len(self.set_sizes_), self.set_size_
        out = np.empty(q, dtype=Qg.dtype)
        # the numpy path gathers (k, S, L, L) eigenvectors per query
        row_bytes = Qg.dtype.itemsize * k * n_sets * L * (L + 4)
        for sl in self._query_chunks(q, row_bytes):
            out[sl] = score_eq2(Qg[sl], idx[sl], self._fit_X, self.eigenvectors_,
                                self.eigenvalues_, self.set_sizes_, self.eig_floor_,
                                self.n_jobs_)
        return out

    def _anomaly_score(self, X):
        out = np.empty(X.shape[0], dtype=X.dtype)
        row_bytes = X.dtype.itemsize * len(self.set_sizes_) * self.set_size_ * 2
        for sl in self._query_chunks(X.shape[0], row_bytes * 64, "k-NNN queries"):
            Qg = self._to_grid(X[sl])
            idx = self._search.kneighbors(Qg, self.n_neighbors_, return_distance=False)
            out[sl] = self._score_neighbours(Qg, idx)
        return out
