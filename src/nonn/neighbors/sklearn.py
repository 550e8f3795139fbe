"""Exact search through scikit-learn's ``NearestNeighbors`` (kd-tree, ball
tree or brute, chosen by scikit-learn): a good choice for low-dimensional
data such as the 2-D synthetic benchmarks or small tabular sets."""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

from ._base import check_metric, check_n_neighbors, drop_self, squared_to_metric, unit_rows


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

    def kneighbors(self, X=None, n_neighbors=1, return_distance=True):
        n_train = self._X.shape[0]
        k = check_n_neighbors(n_neighbors, n_train, X is None)
        if X is None:
            # Ask for one more and drop each point by index, not by distance,
            # so exact duplicates stay neighbors of each other.
            dist, ind = self._nn.kneighbors(self._X, k + 1)
            dist, ind = drop_self(dist, ind, np.arange(n_train), k)
        else:
            Q = np.asarray(X, dtype=self._X.dtype)
            if self.metric == "cosine":
                Q = unit_rows(Q)
            dist, ind = self._nn.kneighbors(Q, k)
        ind = ind.astype(np.int64, copy=False)
        if not return_distance:
            return ind
        dist = dist.astype(self._X.dtype, copy=False)
        if self.metric == "cosine":
            dist = squared_to_metric(dist * dist, "cosine")
        return dist, ind

    def refine_neighbors(self, X, ind, graph):
        """``ind`` as it is: an exact search has nothing to refine (see
        :mod:`nonn.neighbors._base`)."""
        return ind
