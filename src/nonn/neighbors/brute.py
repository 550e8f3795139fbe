"""Exact blocked brute-force search on BLAS.

Work is split into tasks run on numba's thread pool; each task multiplies
its block of queries by a block of training rows (a single-thread BLAS GEMM,
so the BLAS's own thread pool never competes with this one for the cores)
and merges the ranking values ``|x|^2 / 2 - q.x`` (the squared distance up
to the per-row constant ``|q|^2``, halved: the same order) into the running
top-k heaps of its queries, a SIMD check first so most candidates cost a
single pass. The training set against itself computes only the blocks of
the symmetric ``X @ X.T`` on and above the diagonal (half the GEMM work),
each merged into the heaps of its rows and of its columns. A point is
excluded from its own neighbors by index; ties go to the lowest id.

With ``return_distance=True`` the selected candidates' distances are then
recomputed exactly from the differences (float64 accumulation), so the
returned values do not carry the cancellation error of the expansion, and
the candidates are sorted by them.

Ties: candidates are ranked by (ranking value, id), so among equal ranking
values the lowest id wins, in every block and thread layout. Rows at equal
distance get equal ranking values whenever the arithmetic is exact (binary
or small-integer features). Exact duplicate rows need not: a BLAS may round
the same product differently at different positions of its GEMM tiles (seen
with OpenBLAS on AMD EPYC), so the copies of a row are found at fit and
each list's copies are then replaced by the lowest ids of their group, at
one value. Other equidistant rows may differ in the last bit of their
ranking values, which then decides.

Data far from unit scale (say float32 times 1e30, whose squared norms
overflow, or times 1e-30, whose products underflow) are searched multiplied
by a power of two (exact: the same neighbors; see :mod:`nonn._data_scale`),
and distances are returned in the data's own units. nonn's detectors already
pass data at a safe scale, which the squared norms show at no extra cost.
"""

from __future__ import annotations

import numpy as np

from .. import _data_scale
from .._chunks import chunk_rows, progress
from .._threads import library_threads, numba_pool_size, numba_threads, single_thread_blas
from ._base import _duplicate_groups, check_metric, check_n_neighbors, expansion_margin, \
    squared_to_metric, unit_rows


class BruteForceBackend:
    """Exact k-NN by blocked matrix products.

    Parameters
    ----------
    metric : {"euclidean", "cosine"}
    working_memory : float or None
        MiB allowed for the products being merged at once (None:
        scikit-learn's ``working_memory`` setting, 1024 MiB by default).
    n_jobs : int, optional
        Threads of a search (numba's pool, restored afterwards; the BLAS runs
        one thread per task meanwhile); None uses numba's setting (all cores).
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
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)
        self._exponent = 0
        if self.metric == "euclidean":
            self._X = np.ascontiguousarray(X)
            self._half_sqnorm = 0.5 * np.einsum("ij,ij->i", self._X, self._X)
            # the squared norms, needed anyway, show data at a safe scale
            # (all that nonn's detectors pass) without another pass
            rms = np.sqrt(2 * float(self._half_sqnorm.sum(dtype=np.float64)) / max(X.size, 1))
            if 2.0 ** (1 - _data_scale.SAFE_EXPONENT) <= rms <= 2.0 ** (
                    _data_scale.SAFE_EXPONENT - 1):
                self._groups = _duplicate_groups(self._X)
                return self
        # the working scale first: cosine's row norms square the entries too
        self._exponent = _data_scale.fit_exponent(X)
        X = _data_scale.scale(X, self._exponent, "The training data")
        self._X = np.ascontiguousarray(unit_rows(X) if self.metric == "cosine" else X)
        self._half_sqnorm = 0.5 * np.einsum("ij,ij->i", self._X, self._X)
        self._groups = _duplicate_groups(self._X)
        return self

    @property
    def n_samples_fit_(self):
        return self._X.shape[0]

    def kneighbors(self, X=None, n_neighbors=1, return_distance=True):
        return self._kneighbors(X, n_neighbors, return_distance)

    def kneighbors_entering(self, X, n_neighbors, radius2):
        """``(ind, entered)``: ``kneighbors(X, n_neighbors,
        return_distance=False)``, and from the same products a boolean mask
        of the training rows ``j`` that some query is nearer to than
        ``sqrt(radius2[j])`` (Euclidean, in the data's units; ``-inf``
        leaves a row out). Every such row is marked; rows within the
        products' rounding of that radius may be marked too, so a caller
        checks the marked rows exactly (``nonn._update.closer_pairs``)."""
        if self.metric != "euclidean" or X is None:
            raise ValueError("kneighbors_entering takes queries, measured in Euclidean "
                             "distance.")
        return self._kneighbors(X, n_neighbors, False, radius2)

    def _kneighbors(self, X, n_neighbors, return_distance, radius2=None):
        Xt = self._X
        n_train = Xt.shape[0]
        self_query = X is None
        if self_query:
            Q = Xt
        else:
            Q = np.ascontiguousarray(X, dtype=Xt.dtype)
            Q = _data_scale.scale(Q, self._exponent)
            if self.metric == "cosine":
                Q = unit_rows(Q)
        k = check_n_neighbors(n_neighbors, n_train, self_query)
        nq = Q.shape[0]
        dist = np.empty((nq, k), dtype=Xt.dtype) if return_distance else None
        ind = np.empty((nq, k), dtype=np.int64)
        marks = _NO_MARKS if radius2 is None else self._entering_thresholds(Q, radius2)
        # a small search runs on one thread: waking the pool costs more
        with numba_threads(library_threads(self.n_jobs), nq * n_train * Xt.shape[1]):
            for start, stop in self._query_blocks(nq, k, self_query):
                self._search(Q, start, stop, k, self_query, numba_pool_size(), dist, ind,
                             marks)
        if radius2 is not None:
            return ind, marks[2].astype(bool)
        return (dist, ind) if return_distance else ind

    def _entering_thresholds(self, Q, radius2):
        """The float64 thresholds ``(q_thr, x_thr, flags)`` of the rows
        that a query (of the scaled queries ``Q``) enters: ``|q - x|^2 <
        r2`` is ``q.x > |x|^2/2 + |q|^2/2 - r2/2``, and the products'
        rounding is below ``(d + 4) eps |q| |x| <= (d + 4) eps (|q|^2 +
        |x|^2) / 2``, so both halves are loosened by twice that."""
        Xt = self._X
        r2 = np.ldexp(np.asarray(radius2, dtype=np.float64), 2 * self._exponent)
        if r2.shape != (Xt.shape[0],):
            raise ValueError(f"radius2 has shape {r2.shape}; expected ({Xt.shape[0]},).")
        tol = expansion_margin(Xt.shape[1], Xt.dtype)
        half_q = 0.5 * np.einsum("ij,ij->i", Q, Q, dtype=np.float64)
        x_thr = (1.0 - tol) * self._half_sqnorm.astype(np.float64) - 0.5 * r2
        return (1.0 - tol) * half_q, x_thr, np.zeros(Xt.shape[0], dtype=np.uint8)

    def refine_neighbors(self, X, ind, graph):
        """``ind`` as it is: an exact search has nothing to refine (see
        :mod:`nonn.neighbors._base`)."""
        return ind

    def _query_blocks(self, nq, k, self_query):
        """Query row ranges searched at once: all of them for the training
        set (its heaps are (N, k) anyway), else within the memory budget."""
        if self_query:
            return [(0, nq)]
        step = chunk_rows(k * 32 + self._X.shape[1] * self._X.dtype.itemsize,
                          self.working_memory)
        starts = range(0, nq, step)
        return progress([(a, min(a + step, nq)) for a in starts], self.verbose,
                        "k-NN search", total=len(starts))

    def _search(self, Q, start, stop, k, self_query, threads, dist, ind, marks):
        from . import _kernels

        Xt = self._X
        n = Xt.shape[0]
        item = Xt.dtype.itemsize
        # per-thread product buffers within the memory budget
        per_thread = chunk_rows(item * threads, self.working_memory)
        heap_v = np.full((stop - start, k), np.inf, dtype=Xt.dtype)
        heap_i = np.full((stop - start, k), n, dtype=np.int64)
        # the kernels run the BLAS one thread per task: no second pool
        with single_thread_blas():
            if self_query:
                bs = int(max(min(_SELF_BLOCK, np.sqrt(per_thread)), 1))
                buf = np.empty((threads, bs * bs), dtype=Xt.dtype)
                _kernels.knn_self(Xt, self._half_sqnorm, bs, buf, heap_v, heap_i)
            else:
                rows = int(max(min(_QUERY_ROWS, -(-(stop - start) // threads)), 1))
                bs = int(max(min(_QUERY_BLOCK, per_thread // rows), 1))
                buf = np.empty((threads, rows * bs), dtype=Xt.dtype)
                q_thr, x_thr, flags = marks
                _kernels.knn_query(Q[start:stop], Xt, self._half_sqnorm, rows, bs, buf,
                                   heap_v, heap_i, q_thr[start:stop], x_thr, flags)
        if (heap_i >= n).any():
            # a heap never filled: ranking values that overflowed (the
            # kernels assume finite ones). Never hand out an invalid id.
            raise ValueError(
                f"The k-NN search overflowed {Xt.dtype}: some query values are too large "
                "relative to the training data to be compared with it. Pass float64 data, or "
                "check that the queries are in the training data's units.")
        g = getattr(self, "_groups", None)
        if g is not None:
            _kernels.canonical_duplicates(heap_v, heap_i, g["inv"], g["ptr"], g["members"],
                                          start, self_query)
        if dist is None:
            ind[start:stop] = heap_i
            return
        # exact distances of the selected candidates, then sort them
        sq = np.empty((stop - start, k), dtype=np.float64)
        _kernels.exact_sq_sorted(Xt, Q[start:stop], heap_i, sq, ind[start:stop])
        d = squared_to_metric(sq, self.metric)
        if self._exponent and self.metric == "euclidean":
            d = np.ldexp(d, -self._exponent)  # back in the data's units (exact)
        with np.errstate(over="ignore"):  # beyond the dtype's range: inf
            dist[start:stop] = d


#: side of the square blocks of ``X @ X.T`` for the training set's own graph
#: (smaller when ``working_memory`` is): large enough for an efficient GEMM,
#: small enough that the diagonal blocks (computed whole) waste little and a
#: block stays in the cache for its two merges.
_SELF_BLOCK = 1024
#: the empty thresholds and flags of a search that marks no rows
_NO_MARKS = (np.zeros(0), np.zeros(0), np.zeros(0, np.uint8))
#: queries per task, and training rows per product, of a search for new points
_QUERY_ROWS = 256
_QUERY_BLOCK = 2048
