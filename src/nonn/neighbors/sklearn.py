"""Exact search through scikit-learn's ``NearestNeighbors`` (kd-tree, ball
tree or brute, chosen by scikit-learn): a good choice for low-dimensional
data such as the 2-D synthetic benchmarks or small tabular sets."""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

from ._base import check_metric, squared_to_metric, unit_rows


class SklearnBackend:
    name = "sklearn"
    exact = True

    def __init__(self, metric="euclidean", algorithm="auto", n_jobs=None, working_memory=None,
                 verbose=False):
        self.metric = check_metric(metric)
        self.algorithm = algorithm
        self.n_jobs = n_jobs

    def fit(self, X):
        X = np.asarray(X)
        self._X = unit_rows(X) if self.metric == "cosine" else X
        self._nn = NearestNeighbors(algorithm=self.algorithm, n_jobs=self.n_jobs).fit(self._X)
        return self

    @property
    def n_samples_fit_(self):
        return self._X.shape[0]

    def kneighbors(self, X=None, n_neighbors=1):
        n_train = self._X.shape[0]
        k = int(n_neighbors)
        max_k = n_train - 1 if X is None else n_train
        if not 1 <= k <= max_k:
            raise ValueError(
                f"n_neighbors must be in [1, {max_k}] for this search; got {k}. "
                "Ask for fewer neighbours or fit on more data."
            )
        if X is None:
            # Ask for one more and drop each point by index, not by distance,
            # so exact duplicates stay neighbours of each other.
            dist, ind = self._nn.kneighbors(self._X, k + 1)
            rows = np.arange(n_train)[:, None]
            is_self = ind == rows
            # where self is absent (many duplicates tie at 0) drop the last column
            no_self = ~is_self.any(axis=1)
            is_self[no_self, -1] = True
            keep = ~is_self
            ind = ind[keep].reshape(n_train, k)
            dist = dist[keep].reshape(n_train, k)
        else:
            Q = np.asarray(X, dtype=self._X.dtype)
            if self.metric == "cosine":
                Q = unit_rows(Q)
            dist, ind = self._nn.kneighbors(Q, k)
        dist = dist.astype(self._X.dtype, copy=False)
        if self.metric == "cosine":
            dist = squared_to_metric(dist * dist, "cosine")
        return dist, ind.astype(np.int64, copy=False)
