"""Search with FAISS: exact (flat) or approximate (any index-factory string).

``index="Flat"`` is exact (``IndexFlatL2``, or ``IndexFlatIP`` on unit rows
for the cosine metric); any other FAISS index-factory string builds an
approximate index, e.g. ``"HNSW32"``, ``"IVF1024,Flat"``, ``"IVF256,PQ32"``.

FAISS computes in float32. The data are converted chunk by chunk (never a
whole float32 copy of float64 data on top of FAISS's own store), and the
distances of the returned neighbors are recomputed from the stored
training rows (accumulated in float64, returned in the input dtype), so they
are true distances (no cancellation error of the ``|a|^2 - 2ab + |b|^2``
expansion, no product-quantisation error) and sorted by those true values.
With ``return_distance=False`` only the ids come back, in FAISS's own order,
and nothing is recomputed.

``faiss`` is imported only here; install it with ``pip install "nonn[faiss]"``.
"""

from __future__ import annotations

import numpy as np

from .._chunks import chunk_rows, progress
from .._threads import pool_threads
from ._base import (
    _duplicate_groups,
    check_metric,
    check_n_neighbors,
    drop_self,
    refine_by_graph,
    refine_graph,
    refine_sorted,
    squared_to_metric,
    unit_rows,
)


def import_faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - exercised only without faiss
        raise ImportError(
            "The 'faiss' backend needs FAISS, which is not installed. Install it with "
            'pip install "nonn[faiss]" (or pip install faiss-cpu), or use backend="brute".'
        ) from exc
    return faiss


#: nonn metric -> FAISS metric, and how a raw FAISS score becomes the distance
#: (used only with ``recompute_distances=False``).
_METRICS = {
    "euclidean": {
        "faiss": "METRIC_L2",
        "to_distance": lambda s: np.sqrt(np.maximum(s, 0, out=s), out=s),
    },
    "cosine": {  # inner product of unit rows = cos; distance = 1 - cos
        "faiss": "METRIC_INNER_PRODUCT",
        "to_distance": lambda s: np.subtract(1, s, out=s),
    },
}

# Below this many query rows per search call FAISS's flat search stops using
# its blocked BLAS path and gets much slower per row.
_MIN_CHUNK = 2048


class FaissBackend:
    """k-NN search on a FAISS index.

    Parameters
    ----------
    metric : {"euclidean", "cosine"}
    index : str, default="Flat"
        FAISS index-factory string. ``"Flat"`` is exact; anything else
        (``"HNSW32"``, ``"IVF1024,Flat"``, ``"IVF256,PQ32"``, ...) is
        approximate.
    nprobe : int, optional
        Inverted lists visited per query (IVF indexes). Default:
        ``max(1, nlist // 16)``, capped at ``nlist``.
    efSearch : int, optional
        Candidate list size of an HNSW search. Default: ``max(64, 2 * k)``
        for a search of ``k`` neighbors.
    efConstruction : int, optional
        Candidate list size while building an HNSW graph (FAISS's default: 40).
    train_size : int, optional
        Rows sampled (without replacement) to train an index that needs
        training (IVF, PQ). Default: ``max(64 * nlist, 12800)``, at most all rows.
    random_state : int, default=0
        Seed of that sample.
    refine : int, default=0
        Rounds of "neighbors of neighbors" refinement of the training
        set's k-NN graph (``kneighbors(None, k)``) after an approximate
        search: each row's exact ``k`` nearest among its found neighbors and
        the neighbors of its first ``refine_fanout`` ones (the local join of
        NN-descent), plus up to ``refine_reverse`` rows that list it. Raises
        graph recall at about ``refine_fanout * k`` exact distances per row
        and round (at N = 200k, D = 512, HNSW32: recall@49 0.83 -> 0.92 after
        one round, 0.93 after two, each round about as long as the search);
        ignored by the exact ``"Flat"`` index. This backend does not refine
        queries of new points (it keeps no graph); ``KNNN`` does, once,
        against its stored neighborhoods when its backend has ``refine``.
    refine_fanout : int, default=20
        Neighbors whose own neighbors are candidates in a refinement round.
    refine_reverse : int, optional
        Reverse neighbors taken as candidates per row and round (nearest
        ranks first); default: the graph's ``k``. 0 for none.
    dedupe : bool, default=True
        Approximate indexes only: index each distinct row once and expand
        each found row to all its exact duplicates (ascending id, as exact
        search orders ties). Graph indexes navigate badly through many
        identical points (docs/results.md, "Search backends"), and an
        identical copy is an exact neighbor at distance 0. No effect
        without duplicates beyond one pass to find them.
    recompute_distances : bool, default=True
        Recompute the returned distances from the training rows (true,
        sorted distances in the input dtype). ``False`` returns FAISS's own
        float32 values converted to distances (faster, approximate for
        compressed indexes).
    n_jobs : int, optional
        OpenMP threads for FAISS during fit and search (restored afterwards);
        None leaves FAISS's setting alone (all cores).
    working_memory : float, optional
        MiB for one chunk of queries (None: scikit-learn's setting).
    verbose : bool, default=False

    Attributes
    ----------
    exact : bool
        True for ``index="Flat"``.
    index_ : faiss.Index
    nprobe_, efSearch_ : int or None
        The values used (None where the index has no such parameter; an
        ``efSearch_`` of None on an HNSW index means "from k at search time").
    """

    name = "faiss"

    def __init__(self, metric="euclidean", index="Flat", nprobe=None, efSearch=None,
                 efConstruction=None, train_size=None, random_state=0, refine=0,
                 refine_fanout=20, refine_reverse=None, dedupe=True, recompute_distances=True,
                 n_jobs=None,
                 working_memory=None, verbose=False):
        self.metric = check_metric(metric)
        if not isinstance(index, str) or not index.strip():
            raise ValueError(
                f"The 'index' parameter of the faiss backend must be a FAISS index-factory "
                f"string. Got {index!r} instead. For example: index='Flat' (exact) or "
                "index='HNSW32'."
            )
        self.index = index
        self.nprobe = nprobe
        self.efSearch = efSearch
        self.efConstruction = efConstruction
        self.train_size = train_size
        self.random_state = random_state
        for name, value, low in (("refine", refine, 0), ("refine_fanout", refine_fanout, 1),
                                 ("refine_reverse", 0 if refine_reverse is None else
                                  refine_reverse, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"The '{name}' parameter of the faiss backend must be an int "
                                 f"in the range [{low}, inf). Got {value!r} instead.")
        self.refine = int(refine)
        self.refine_fanout = int(refine_fanout)
        self.refine_reverse = None if refine_reverse is None else int(refine_reverse)
        if not isinstance(dedupe, (bool, np.bool_)):
            raise ValueError(f"The 'dedupe' parameter of the faiss backend must be True or False. "
                             f"Got {dedupe!r} instead.")
        self.dedupe = bool(dedupe)
        self.recompute_distances = recompute_distances
        self.n_jobs = n_jobs
        self.working_memory = working_memory
        self.verbose = verbose
        self.exact = index.replace(" ", "") == "Flat"

    # ------------------------------------------------------------------ fit
    def fit(self, X):
        faiss = import_faiss()
        X = np.asarray(X)
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)
        self._X = unit_rows(X) if self.metric == "cosine" else X
        self._groups = None
        if self.dedupe and not self.exact:
            self._groups = _duplicate_groups(self._X)
        # the rows the index holds: every row, or one per group of duplicates
        self._index_X = self._X if self._groups is None else self._X[self._groups["first"]]
        n, d = self._index_X.shape
        metric = getattr(faiss, _METRICS[self.metric]["faiss"])
        with _threads(faiss, self.n_jobs):
            if self.exact:
                index = faiss.IndexFlatL2(d) if metric == faiss.METRIC_L2 else faiss.IndexFlatIP(d)
            else:
                try:
                    index = faiss.index_factory(d, self.index, metric)
                except RuntimeError as exc:
                    raise ValueError(
                        f"FAISS could not build the index {self.index!r} "
                        f"({str(exc).strip().splitlines()[-1]}). Use a FAISS index-factory "
                        "string such as 'Flat', 'HNSW32', 'IVF1024,Flat' or 'IVF256,PQ32'."
                    ) from exc
            ivf = faiss.try_extract_index_ivf(index)
            hnsw = _find_hnsw(faiss, index)
            if hnsw is not None and self.efConstruction is not None:
                hnsw.efConstruction = int(self.efConstruction)
            if not index.is_trained:
                self._train(index, ivf, n)
            step = chunk_rows(d * 4, self.working_memory, min_rows=_MIN_CHUNK)
            for start in progress(range(0, n, step), self.verbose, "faiss add",
                                  total=-(-n // step)):
                index.add(np.ascontiguousarray(self._index_X[start:start + step],
                                               dtype=np.float32))
        self.nprobe_ = None
        if ivf is not None:
            nlist = int(ivf.nlist)
            nprobe = max(1, nlist // 16) if self.nprobe is None else int(self.nprobe)
            self.nprobe_ = min(max(nprobe, 1), nlist)
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", self.nprobe_)
        self._hnsw = hnsw
        self.efSearch_ = None if self.efSearch is None else int(self.efSearch)
        self.index_ = index
        self._fallback = None
        return self

    def _train(self, index, ivf, n):
        nlist = 0 if ivf is None else int(ivf.nlist)
        if n < nlist:
            raise ValueError(
                f"The FAISS index {self.index!r} has {nlist} inverted lists but only {n} "
                f"training points were given; it needs at least as many points as lists "
                f"(and ideally 39 times as many). Use fewer lists, for example "
                f"index='IVF{max(1, n // 39)},Flat', or backend='brute' for small data."
            )
        size = max(64 * nlist, 12800) if self.train_size is None else int(self.train_size)
        size = min(max(size, nlist, 1), n)
        if size < n:
            rng = np.random.default_rng(self.random_state)
            rows = np.sort(rng.choice(n, size, replace=False))
            sample = self._index_X[rows]
        else:
            sample = self._index_X
        index.train(np.ascontiguousarray(sample, dtype=np.float32))

    @property
    def n_samples_fit_(self):
        return self._X.shape[0]

    def add(self, X):
        """Append the rows ``X`` to the indexed rows (their ids continue
        after the existing ones) without rebuilding the index: FAISS's
        ``add``. An index that needs training keeps what it learnt from the
        first rows (IVF lists, PQ codebooks); an HNSW graph inserts the new
        rows. With ``dedupe``, a new row that duplicates an indexed one joins
        its group and is not indexed again. Returns ``self``."""
        faiss = import_faiss()
        X = np.asarray(X, dtype=self._X.dtype)
        if X.ndim != 2 or X.shape[1] != self._X.shape[1]:
            raise ValueError(f"add takes rows of {self._X.shape[1]} features; got shape "
                             f"{X.shape}.")
        n_old = self._X.shape[0]
        rows = np.concatenate([self._X, unit_rows(X) if self.metric == "cosine" else X])
        if self.exact or not self.dedupe:
            fresh = rows[n_old:]
            groups = None
        else:
            groups, fresh = _extend_groups(rows, n_old, self._groups)
        step = chunk_rows(rows.shape[1] * 4, self.working_memory, min_rows=_MIN_CHUNK)
        with _threads(faiss, self.n_jobs):
            for start in range(0, len(fresh), step):
                self.index_.add(np.ascontiguousarray(fresh[start:start + step],
                                                     dtype=np.float32))
        self._X = rows
        self._groups = groups
        self._index_X = rows if groups is None else rows[groups["first"]]
        self._fallback = None
        return self

    # --------------------------------------------------------------- search
    def kneighbors(self, X=None, n_neighbors=1, return_distance=True):
        faiss = import_faiss()
        Xt = self._X
        n_train, d = Xt.shape
        self_query = X is None
        k = check_n_neighbors(n_neighbors, n_train, self_query)
        if self_query:
            Q = Xt
        else:
            Q = np.asarray(X, dtype=Xt.dtype)
            if self.metric == "cosine":
                Q = unit_rows(Q)
        # one more for the training set: each point's own id is then dropped
        kk = min(k + 1, n_train) if self_query else k
        # FAISS's ids and scores, the float32 query copy, the candidates'
        # exact distances and sorted ids
        step = chunk_rows(kk * 40 + d * 4, self.working_memory, min_rows=_MIN_CHUNK)
        with _threads(faiss, self.n_jobs):
            if self._groups is not None:
                ind, dist = self._search_grouped(faiss, Q, k, self_query, return_distance, step)
            else:
                ind, dist = self._search_rows(faiss, Q, k, kk, self_query, return_distance,
                                              step)
            if self_query and self.refine and not self.exact and k < n_train - 1:
                rev = k if self.refine_reverse is None else self.refine_reverse
                sq, ind = refine_graph(Xt, ind, self.refine, self.refine_fanout, rev,
                                       self.working_memory, self.verbose)
                if return_distance:
                    dist = squared_to_metric(sq, self.metric).astype(Xt.dtype, copy=False)
        return (dist, ind) if return_distance else ind

    def refine_neighbors(self, X, ind, graph):
        """The neighbors ``ind`` (q, k) of the queries ``X`` an approximate
        index found, refined once against ``graph`` (n_train, m), a
        neighbor graph of the training rows (a KNNN's neighborhoods):
        each query's exact k nearest (by this backend's metric) among its
        found rows and their graph neighbors. As found with ``refine=0``
        or the exact index. The graph comes with the model, so the result
        is the same after saving and loading it."""
        if not self.refine or self.exact:
            return ind
        Xt = self._X
        Q = np.ascontiguousarray(X, dtype=Xt.dtype)
        if self.metric == "cosine":
            Q = unit_rows(Q)
        ind = np.ascontiguousarray(ind, dtype=np.int64)
        return refine_by_graph(Xt, Q, ind, graph)

    def _search_ids(self, q, kk):
        """FAISS's (scores, int64 ids) of ``kk`` neighbors of ``q``; rows an
        approximate index could not fill are searched exactly (their scores
        NaN). Returns also whether any row was."""
        s, cand = self.index_.search(np.ascontiguousarray(q, dtype=np.float32), kk)
        padded = (cand < 0).any(axis=1)
        if padded.any():
            cand[padded] = self._exact_ids(q[padded], kk)
            s[padded] = np.nan
        return s, cand.astype(np.int64, copy=False), bool(padded.any())

    def _search_rows(self, faiss, Q, k, kk, self_query, return_distance, step):
        """k-NN on an index that holds every training row."""
        Xt = self._X
        self._set_ef(faiss, kk)
        nq = Q.shape[0]
        dist = np.empty((nq, k), dtype=Xt.dtype) if return_distance else None
        ind = np.empty((nq, k), dtype=np.int64)
        for start in progress(range(0, nq, step), self.verbose, "faiss search",
                              total=-(-nq // step)):
            stop = min(start + step, nq)
            q = Q[start:stop]
            s, cand, padded = self._search_ids(q, kk)
            if not return_distance:
                # FAISS's order (its own float32 distances); the exact
                # fallback's rows come sorted by true distances
                dd = None
            elif padded or self.recompute_distances:
                sq, cand = refine_sorted(Xt, q, cand)
                dd = squared_to_metric(sq, self.metric).astype(Xt.dtype, copy=False)
            else:
                dd = _METRICS[self.metric]["to_distance"](s).astype(Xt.dtype, copy=False)
            if self_query:
                dd, cand = drop_self(dd, cand, np.arange(start, stop), k)
            if return_distance:
                dist[start:stop] = dd
            ind[start:stop] = cand
        return ind, dist

    def _search_grouped(self, faiss, Q, k, self_query, return_distance, step):
        """k-NN through the index of distinct rows: search neighbor groups,
        expand each to its members (the own group's other members first for
        a training row), then exact distances when asked."""
        from . import _kernels

        Xt = self._X
        gr = self._groups
        n_groups = len(gr["first"])
        # the training set's groups are searched once, from their first rows
        gq = self._index_X if self_query else Q
        kg = min(k + 1 if self_query else k, n_groups)
        self._set_ef(faiss, kg)
        gids = np.empty((gq.shape[0], kg), dtype=np.int64)
        for start in progress(range(0, gq.shape[0], step), self.verbose, "faiss search",
                              total=-(-gq.shape[0] // step)):
            gids[start:start + step] = self._search_ids(gq[start:start + step], kg)[1]
        nq = Q.shape[0]
        ind = np.empty((nq, k), dtype=np.int64)
        dist = np.empty((nq, k), dtype=Xt.dtype) if return_distance else None
        for start in range(0, nq, step):
            stop = min(start + step, nq)
            if self_query:
                own = gr["inv"][start:stop]
                rows_g = gids[own]
                self_ids = np.arange(start, stop, dtype=np.int64)
            else:
                own = np.full(stop - start, -1, dtype=np.int64)
                rows_g = gids[start:stop]
                self_ids = own
            cand = np.empty((stop - start, k), dtype=np.int64)
            _kernels.expand_groups(np.ascontiguousarray(rows_g), gr["ptr"], gr["members"],
                                   self_ids, own, cand)
            if (cand < 0).any():  # pragma: no cover - the group counts rule it out
                raise RuntimeError("internal error: too few members behind the found groups")
            if return_distance:
                sq, cand = refine_sorted(Xt, Q[start:stop], cand)
                dist[start:stop] = squared_to_metric(sq, self.metric).astype(Xt.dtype,
                                                                             copy=False)
            ind[start:stop] = cand
        return ind, dist

    def _set_ef(self, faiss, kk):
        if self._hnsw is None:
            return
        ef = self.efSearch_ if self.efSearch_ is not None else max(64, 2 * kk)
        faiss.ParameterSpace().set_index_parameter(self.index_, "efSearch", int(ef))

    def _exact_ids(self, q, kk):
        """Ids of the exact ``kk`` nearest training rows of ``q`` (exact
        blocked search on the stored rows; only for rows an approximate
        index could not fill)."""
        if self._fallback is None:
            from .brute import BruteForceBackend

            # the stored rows are already unit rows under cosine, where the
            # Euclidean order is the cosine order
            self._fallback = BruteForceBackend(working_memory=self.working_memory).fit(
                self._index_X)
        return self._fallback.kneighbors(q, kk, return_distance=False)


def _extend_groups(rows, n_old, old):
    """Duplicate groups of ``rows`` after appending rows to ``n_old``
    indexed ones, with the groups in the index's order: the indexed groups
    keep their positions, groups of only new rows follow (by first row).
    Returns ``(groups or None, the new rows to index)``; ``old`` is the
    groups before (None: every old row was indexed, one per position)."""
    flat = np.ascontiguousarray(rows).view(
        np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, inv = np.unique(flat, return_index=True, return_inverse=True)
    inv = inv.ravel()
    indexed = np.arange(n_old) if old is None else old["first"]
    position = np.full(len(first), -1, dtype=np.int64)
    position[inv[indexed]] = np.arange(len(indexed))
    added = np.nonzero(position < 0)[0]
    added = added[np.argsort(first[added], kind="stable")]
    position[added] = len(indexed) + np.arange(len(added))
    fresh = rows[first[added]]
    if len(first) == rows.shape[0] and old is None:
        return None, fresh  # every row distinct: indexed one per row, in order
    g = position[inv]
    firsts = np.empty(len(first), dtype=np.int64)
    firsts[position] = first
    counts = np.bincount(g, minlength=len(first))
    ptr = np.zeros(len(first) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ({"first": firsts, "inv": g.astype(np.int64), "ptr": ptr,
             "members": np.argsort(g, kind="stable").astype(np.int64)}, fresh)


def _find_hnsw(faiss, index):
    """The HNSW graph inside ``index`` (possibly wrapped), or None."""
    idx = faiss.downcast_index(index)
    while idx is not None:
        if hasattr(idx, "hnsw"):
            return idx.hnsw
        sub = getattr(idx, "index", None)
        idx = faiss.downcast_index(sub) if sub is not None else None
    return None


def _threads(faiss, n_jobs):
    """FAISS's OpenMP thread count for a block (see :func:`nonn._threads.pool_threads`)."""
    return pool_threads(faiss.omp_get_max_threads, faiss.omp_set_num_threads, n_jobs)
