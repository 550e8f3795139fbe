"""Per-partition work of the distributed k-NNN: pure functions on numpy
blocks, run as Dask tasks on the workers.

Nothing here imports Dask: a task receives and returns plain arrays (or a
:class:`ShardIndex`), so the maths stays the library's own
(:mod:`nonn._local_eigen`, :mod:`nonn._partition`, the search backends) and
the orchestration lives in :mod:`nonn.distributed._estimator`.

Ids are global row numbers of the training set; partition ``j`` owns the
rows ``[lo_j, hi_j)``.
"""

from __future__ import annotations

import numpy as np

from .._chunks import chunk_rows
from .._local_eigen import neighbourhood_eigen, permute, score_eq2
from ..neighbors import make_backend

# ----------------------------------------------------------------- threads


def task_threads(n_jobs):
    """Threads one task may use: the worker's own thread count when
    ``n_jobs`` is None (several workers share a machine; "all cores" in each
    would oversubscribe it), else ``n_jobs`` resolved as the estimators do."""
    if n_jobs is None or n_jobs == -1:
        try:
            from distributed import get_worker

            return max(int(get_worker().state.nthreads), 1)
        except (ImportError, ValueError, AttributeError):
            pass
    from .._base import resolve_n_jobs

    return resolve_n_jobs(n_jobs)


# -------------------------------------------------------------- input pass


def clean_block(X, dtype):
    """A validated training/query block: 2-D, finite, in ``dtype``,
    C-contiguous. The messages are the library's own input errors."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"Expected 2D array, got an array of shape {X.shape}. Pass a 2-D "
                         "array of shape (n_samples, n_features).")
    if X.dtype.kind not in "biuf":
        raise ValueError(f"Input holds {X.dtype} data. Pass numeric embeddings (convert or "
                         "drop non-numeric columns).")
    X = np.ascontiguousarray(X, dtype=dtype)
    if not np.isfinite(X).all():
        raise ValueError("Input X contains NaN or infinity. Remove or impute the rows with "
                         "NaN or inf before calling nonn.")
    return X


def column_sums(X):
    """(float64 column sums, row count) of a block."""
    return X.sum(axis=0, dtype=np.float64), X.shape[0]


def centred_moments(X, mean, gram):
    """A block's share of the global second moments about the global
    ``mean`` (float64): the centred Gram matrix (in the data's dtype, as
    :func:`nonn._partition.abs_correlation` computes it; summed over blocks
    in float64) when ``gram``, and the float64 sums of squared deviations
    from the mean rounded to the data's dtype (as
    :func:`nonn._local_eigen.column_variance`)."""
    mu = mean.astype(X.dtype)
    G = None
    sq = np.zeros(X.shape[1])
    for start in range(0, X.shape[0], 4096):
        dev = X[start:start + 4096] - mu
        sq += np.einsum("ij,ij->j", dev, dev, dtype=np.float64)
        if gram:
            part = (dev.T @ dev).astype(np.float64)
            G = part if G is None else G + part
    if gram and G is None:
        G = np.zeros((X.shape[1], X.shape[1]))
    return G, sq


def add(*parts):
    """Sum of tuples of arrays (None stays None), elementwise."""
    out = []
    for items in zip(*parts):
        out.append(None if items[0] is None else sum(items[1:], items[0]))
    return tuple(out)


def to_grid(X, dtype, order):
    """A validated block with its columns in the fitted feature order."""
    return permute(clean_block(X, dtype), order)


# ------------------------------------------------------------------ search


class ShardIndex:
    """The search backend of one training partition, fitted on its worker.

    It pickles as its recipe (the partition's rows and the backend's
    settings), so that Dask may move or recompute it even where the index
    itself cannot be pickled (a FAISS index): the receiver rebuilds it.
    """

    def __init__(self, Xg, lo, backend, metric, params, n_jobs):
        self._recipe = (Xg, lo, backend, metric, params, n_jobs)
        self.lo = int(lo)
        self.n = int(Xg.shape[0])
        params = dict(params)
        params["n_jobs"] = task_threads(n_jobs)
        self.search = make_backend(backend, metric=metric, n_samples=self.n,
                                   n_features=Xg.shape[1], **params).fit(Xg)
        self.exact = bool(getattr(self.search, "exact", False))

    def __reduce__(self):
        return (ShardIndex, self._recipe)

    def __sizeof__(self):
        # What Dask's scheduler weighs when it places a search: the shard's
        # rows and an index at least as large. Without it (a few bytes by
        # default) Dask would rather move the index to the queries, which
        # means pickling the rows and rebuilding the index.
        return 2 * int(self._recipe[0].nbytes) + 1024

    def kneighbors(self, Q, k):
        """``(distances, global ids)`` of the ``k`` nearest rows of this
        shard (fewer when it is smaller); ``Q=None``: its own rows, each
        excluded by index."""
        nq = self.n if Q is None else Q.shape[0]
        kk = min(int(k), self.n - 1 if Q is None else self.n)
        if kk < 1 or nq == 0:
            dt = np.float64 if Q is None else Q.dtype
            return np.empty((nq, 0), dtype=dt), np.empty((nq, 0), dtype=np.int64)
        dist, ind = self.search.kneighbors(Q, kk, return_distance=True)
        return dist, ind + self.lo


def shard_search(index, Q, k):
    return index.kneighbors(Q, k)


def merge_topk(k, *parts):
    """Exact merge of per-shard ``(distances, ids)`` lists into the ``k``
    nearest: by distance, ties to the lowest id (as the exact backends)."""
    dist = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    # always sorted: callers take the first columns as the nearest
    order = np.lexsort((ids, dist), axis=-1)[:, :k]
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)


def merged_ids(merged, k, need):
    """The first ``k`` ids of a merge; a short result (a lost or truncated
    shard) is an error, never a silently smaller neighbourhood."""
    ids = merged[1]
    # an empty query block has no neighbours to return (every shard answers
    # (0, 0)); only a block with rows can be short
    if ids.shape[1] < need and ids.shape[0]:
        raise RuntimeError(
            f"The sharded k-NN search returned {ids.shape[1]} neighbours per point where "
            f"{need} were needed; a partition's result is missing. Refit.")
    return np.ascontiguousarray(ids[:, :k])


def first_columns(ids, k):
    return np.ascontiguousarray(ids[:, :k])


def neighbourhoods(others, lo, n_neighbors_of_neighbors):
    """Each point's neighbourhood: itself (column 0) and its ``K' - 1``
    nearest other points, as in :class:`nonn.KNNN`."""
    n = others.shape[0]
    own = np.arange(lo, lo + n, dtype=np.int64)[:, None]
    return np.concatenate([own, others[:, : n_neighbors_of_neighbors - 1]], axis=1)


# ------------------------------------------------------- neighbourhood eigen


def requested_rows(groups, lo, hi):
    """Sorted unique local ids of partition ``[lo, hi)`` among ``groups``."""
    g = groups[(groups >= lo) & (groups < hi)]
    return np.unique(g) - lo


def take_rows(Xg, local):
    return Xg[local]


def block_eigen(groups, sizes, set_size, n_jobs, working_memory, *pieces):
    """Eigen-state of a partition's neighbourhoods from the rows gathered
    from every partition. ``pieces`` are ``(lo, local ids, rows)`` per
    partition, in partition order (so the global ids come out sorted)."""
    ids = np.concatenate([lo + loc for lo, loc, _ in pieces])
    rows = np.concatenate([r for _, _, r in pieces])
    local_groups = np.searchsorted(ids, groups)
    if not np.array_equal(ids[np.minimum(local_groups, len(ids) - 1)], groups):
        raise RuntimeError("A neighbourhood row is missing from the gathered partitions; "
                           "a partition's result was lost. Refit.")
    c = groups.shape[0]
    n_sets, L = len(sizes), set_size
    Kp = groups.shape[1]
    evals = np.empty((c, n_sets, L), dtype=rows.dtype)
    evecs = np.empty((c, n_sets, L, L), dtype=rows.dtype)
    threads = task_threads(n_jobs)
    # the same memory model as KNNN._fit_eigen
    row_bytes = rows.dtype.itemsize * n_sets * L * (2 * Kp + 4 * L)
    step = chunk_rows(row_bytes, working_memory)
    for start in range(0, c, step):
        sl = slice(start, min(start + step, c))
        neighbourhood_eigen(rows, local_groups[sl], sizes, L, threads,
                            out=(evals[sl], evecs[sl]))
    return evals, evecs


# ----------------------------------------------------------------- scoring


def pair_requests(Qg, idx, lo, hi):
    """The (query, neighbour) pairs whose neighbour lives in ``[lo, hi)``:
    flat positions in ``idx`` (q, k), local neighbour ids, and the query
    rows they need (each once) with the map from pair to row."""
    flat = idx.ravel()
    pos = np.flatnonzero((flat >= lo) & (flat < hi))
    q_of_pair = pos // idx.shape[1]
    rows, inverse = np.unique(q_of_pair, return_inverse=True)
    return pos, flat[pos] - lo, np.ascontiguousarray(Qg[rows]), inverse.ravel()


def pair_scores(Xg, evals, evecs, request, sizes, floor, n_jobs, working_memory):
    """Eq. 2 of each requested (query, neighbour) pair, evaluated where the
    neighbour's eigen-state lives (the query row travels, not the L+1 times
    larger eigen-state): ``(positions, per-neighbour scores)``."""
    pos, local, Q, inverse = request
    out = np.empty(len(pos), dtype=Xg.dtype)
    if not len(pos):
        return pos, out
    threads = task_threads(n_jobs)
    n_sets, L = len(sizes), evecs.shape[-1]
    row_bytes = Xg.dtype.itemsize * n_sets * L * (L + 4) + Xg.shape[1] * Xg.dtype.itemsize
    step = chunk_rows(row_bytes, working_memory)
    for start in range(0, len(pos), step):
        sl = slice(start, min(start + step, len(pos)))
        out[sl] = score_eq2(Q[inverse[sl]], local[sl, None], Xg, evecs, evals, sizes, floor,
                            threads)
    return pos, out


def assemble(n, k, aggregate, *parts):
    """A block's scores from the per-shard pair scores: every one of the
    ``n * k`` pairs must be present exactly once."""
    values = np.full(n * k, np.nan, dtype=parts[0][1].dtype if parts else np.float64)
    seen = np.zeros(n * k, dtype=np.int64)
    for pos, val in parts:
        values[pos] = val
        np.add.at(seen, pos, 1)
    if not (seen == 1).all():
        raise RuntimeError(
            f"{int((seen != 1).sum())} of {n * k} (query, neighbour) scores are missing or "
            "duplicated; a partition's result was lost. Score again.")
    return aggregate_terms(values.reshape(n, k), aggregate)


def aggregate_terms(terms, how):
    """KNNN's combination of the k per-neighbour Eq. 2 sums of each query
    (the library's own function where this nonn has it)."""
    from .. import _local_eigen

    if hasattr(_local_eigen, "aggregate_terms"):
        return _local_eigen.aggregate_terms(terms, how)
    if how == "sum":  # pragma: no cover - a nonn without the aggregate parameter
        return terms.sum(axis=1)
    raise ValueError(f"aggregate {how!r} is not implemented by this nonn.")


# --------------------------------------------------------------- threshold


def smallest(r, *parts):
    """The ``r`` smallest values of the concatenated parts, sorted."""
    v = np.concatenate(parts)
    if len(v) > r:
        v = np.partition(v, r - 1)[:r]
    return np.sort(v)


def negate(v):
    return -v


# ------------------------------------------------------------------ output
#: the score columns of a written table, in order (``nonn score``'s)
SCORE_COLUMNS = ("anomaly_score", "score_samples", "label")


def score_columns(anomaly, offset):
    """``anomaly_score``, ``score_samples`` and ``label`` of a block, as
    ``KNNN`` computes them (label -1 where ``score_samples - offset < 0``)."""
    a = np.asarray(anomaly)
    s = -a
    return a, s, np.where(s - offset < 0, -1, 1).astype(np.int64)


def _check_alive(folder):
    """Raise unless the temporary output ``folder`` still exists: a block
    finishing after its write was abandoned (and the folder removed) must
    fail, not re-create the folder with a stray part or chunk."""
    import os

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"The score output folder {folder!r} is gone: this write "
                                "was abandoned.")


def known_keys(keys, dask_worker):
    """How many of ``keys`` this worker still knows (queued, running, or
    cancelled but still running: Dask cannot stop a running task)."""
    tasks = dask_worker.state.tasks
    return sum(key in tasks for key in keys)


def write_parquet_part(path, start, anomaly, offset):
    """One part file of a score table (the columns of :mod:`nonn._io`)."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .._io import atomic_write

    _check_alive(os.path.dirname(path))
    a, s, lab = score_columns(anomaly, offset)
    table = pa.table({"index": np.arange(start, start + len(a), dtype=np.int64),
                      "anomaly_score": a, "score_samples": s, "label": lab})
    atomic_write(path, lambda fh: pq.write_table(table, fh))
    return len(a)


def write_zarr_block(folder, start, anomaly, offset):
    """The rows ``[start, start + len(anomaly))`` of the score arrays of the
    Zarr group ``folder`` (created by the client with one chunk per block, so
    no two blocks write the same chunk)."""
    import os

    import zarr

    _check_alive(folder)
    if not os.path.isfile(os.path.join(folder, "zarr.json")):
        raise FileNotFoundError(f"{folder!r} holds no Zarr group; this write was abandoned.")
    group = zarr.open_group(folder, mode="r+")
    stop = start + len(anomaly)
    for name, values in zip(SCORE_COLUMNS, score_columns(anomaly, offset)):
        group[name][start:stop] = values
    return len(anomaly)
