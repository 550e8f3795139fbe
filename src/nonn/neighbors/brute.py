"""Exact blocked brute-force search on BLAS.

Distances are computed block by block as ``|q|^2 - 2 q.x + |x|^2`` (one GEMM
per block, threaded by the BLAS), the ``k`` smallest are selected with
``argpartition``, and their distances are then recomputed exactly from the
differences so the returned values do not carry the cancellation error of
the expansion.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np

from .._chunks import chunk_rows, progress
from ._base import check_metric, check_n_neighbors, resolve_threads, squared_to_metric, unit_rows


class BruteForceBackend:
    """Exact k-NN by blocked matrix products.

    Parameters
    ----------
    metric : {"euclidean", "cosine"}
    working_memory : float or None
        MiB allowed for one block of the distance matrix (None: scikit-learn's
        ``working_memory`` setting, 1024 MiB by default).
    n_jobs : int, optional
        BLAS threads during a search (through threadpoolctl, restored
        afterwards); None leaves the BLAS setting alone.
    """

    name = "brute"
    exact = True

    def __init__(self, metric="euclidean", working_memory=None, verbose=False, n_jobs=None):
        self.metric = check_metric(metric)
        self.working_memory = working_memory
        self.n_jobs = n_jobs
        self.verbose = verbose

    def fit(self, X):
        X = np.asarray(X)
        self._X = unit_rows(X) if self.metric == "cosine" else X
        self._sqnorm = np.einsum("ij,ij->i", self._X, self._X)
        return self

    @property
    def n_samples_fit_(self):
        return self._X.shape[0]

    def kneighbors(self, X=None, n_neighbors=1):
        Xt = self._X
        n_train = Xt.shape[0]
        self_query = X is None
        if self_query:
            Q = Xt
        else:
            Q = np.asarray(X, dtype=Xt.dtype)
            if self.metric == "cosine":
                Q = unit_rows(Q)
        k = check_n_neighbors(n_neighbors, n_train, self_query)
        nq = Q.shape[0]
        dist = np.empty((nq, k), dtype=Xt.dtype)
        ind = np.empty((nq, k), dtype=np.int64)
        # a block holds its distances, argpartition's int64 ids and the gathered
        # candidates used to recompute exact distances
        row_bytes = n_train * (Xt.dtype.itemsize + 8) + k * Xt.shape[1] * Xt.dtype.itemsize * 2
        step = chunk_rows(row_bytes, self.working_memory)
        threads = resolve_threads(self.n_jobs)
        with _blas_threads(threads):
            self._search(Q, k, self_query, step, dist, ind)
        return dist, ind

    def _search(self, Q, k, self_query, step, dist, ind):
        Xt = self._X
        n_train = Xt.shape[0]
        nq = Q.shape[0]
        for start in progress(range(0, nq, step), self.verbose, "k-NN search",
                              total=-(-nq // step)):
            stop = min(start + step, nq)
            q = Q[start:stop]
            sq = q @ Xt.T
            sq *= -2
            sq += self._sqnorm[None, :]
            sq += np.einsum("ij,ij->i", q, q)[:, None]
            if self_query:
                rows = np.arange(stop - start)
                sq[rows, start + rows] = np.inf
            if k < n_train:
                cand = np.argpartition(sq, k - 1, axis=1)[:, :k]
            else:
                cand = np.broadcast_to(np.arange(n_train), (stop - start, n_train)).copy()
            # exact distances of the selected candidates, then sort them
            diff = Xt[cand] - q[:, None, :]
            exact_sq = np.einsum("ijk,ijk->ij", diff, diff)
            order = np.argsort(exact_sq, axis=1, kind="stable")
            ind[start:stop] = np.take_along_axis(cand, order, axis=1)
            dist[start:stop] = squared_to_metric(
                np.take_along_axis(exact_sq, order, axis=1), self.metric
            )


def _blas_threads(threads):
    if threads is None:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")
