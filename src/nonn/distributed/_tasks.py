"""Per-partition work of the distributed k-NNN: pure functions on numpy
blocks, run as Dask tasks on the workers.

Nothing here imports Dask: a task receives and returns plain arrays (or a
:class:`ShardIndex` or :class:`Halo`), and every step of the maths is the
core's own (:mod:`nonn._eq2`, :mod:`nonn._knnn`, :mod:`nonn._layout`,
:mod:`nonn._preprocess`, the search backends); the orchestration lives in
:mod:`nonn.distributed._estimator`.

Ids are global row numbers of the training set; partition ``j`` owns the
rows ``[lo_j, hi_j)``.
"""

from __future__ import annotations

import numpy as np

from .._base import row_keys, smallest_keys, trace_moments
from .._chunks import chunk_rows
from .._eq2 import aggregate_terms, eigen_row_bytes, eigen_width, neighborhood_eigen, score_terms
from .._knnn import held_out_groups, neighborhoods, pair_terms
from .._layout import centred_gram, squared_deviations
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


def drop_rows(X, local_ids):
    """A block without the rows ``local_ids`` (ids within the block)."""
    return np.delete(X, np.asarray(local_ids, dtype=np.int64), axis=0)


def smallest_row_keys(X, m, first_id, moments):
    """The block's ``m`` rows of smallest :func:`nonn._base.row_keys` (ids
    from ``first_id``; ``moments``: all partitions' projection moments):
    its candidates for the calibration rows of a whitened fit."""
    return smallest_keys(row_keys(X, moments), m, first_id)

def column_sums(X):
    """(float64 column sums, row count) of a block."""
    return X.sum(axis=0, dtype=np.float64), X.shape[0]


def trace_moments_of(evals):
    """:func:`nonn._base.trace_moments` of a partition's neighborhoods, from
    their eigenvalues (per point, summed over sets and directions)."""
    return trace_moments(np.asarray(evals, dtype=np.float64).sum(axis=(1, 2)))


def column_extremes(X):
    """(column maxima, column minima) of a block."""
    return X.max(axis=0), X.min(axis=0)


def merge_extremes(*parts):
    return (np.max([p[0] for p in parts], axis=0), np.min([p[1] for p in parts], axis=0))


def grid_moments(X, mean, gram, block=4096):
    """A block's share of the column statistics of the layout
    (:func:`nonn._layout.grid_statistics`) about the global ``mean``:
    the centred Gram matrix (when ``gram``; None otherwise) and the squared
    deviations, float64, by row blocks (no float64 copy of ``X``)."""
    G = np.zeros((X.shape[1], X.shape[1])) if gram else None
    if gram:
        for start in range(0, X.shape[0], block):
            G += centred_gram(X[start:start + block], mean)
    return G, squared_deviations(X, mean, block)


def add(*parts):
    """Sum of tuples of arrays or numbers (None stays None), elementwise."""
    out = []
    for items in zip(*parts):
        out.append(None if items[0] is None else sum(items[1:], items[0]))
    return tuple(out)


def query_grid(X, dtype, transform):
    """A validated query block through the fitted input transforms, on the
    grid: ``transform`` is a fitted-transform-only ``KNNN`` (see
    ``DistributedKNNN._transform_model``), so this is ``KNNN``'s own
    query preprocessing."""
    return transform._to_grid(transform._preprocess(clean_block(X, dtype)))


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
    shard) is an error, never a silently smaller neighborhood."""
    ids = merged[1]
    # an empty query block has no neighbors to return (every shard answers
    # (0, 0)); only a block with rows can be short
    if ids.shape[1] < need and ids.shape[0]:
        raise RuntimeError(
            f"The sharded k-NN search returned {ids.shape[1]} neighbors per point where "
            f"{need} were needed; a partition's result is missing. Refit.")
    return np.ascontiguousarray(ids[:, :k])


def partition_neighborhoods(others, lo, n_neighbors_of_neighbors):
    """The partition's rows' neighborhoods (``KNNN.neighborhoods_``'s rows
    ``[lo, lo + len(others))``)."""
    return neighborhoods(others, n_neighbors_of_neighbors, lo)


# ------------------------------------------------------------- rows: halo


class Halo:
    """The training rows a partition's neighborhoods read, gathered from
    every partition: ``ids`` (sorted global ids), ``rows`` (their grid
    rows) and ``groups`` (one row per point of the partition, local indices
    into ``rows``: column 0 the point itself, then its nearest others, the
    first K' columns its neighborhood)."""

    def __init__(self, ids, rows, groups):
        self.ids, self.rows, self.groups = ids, rows, groups

    def local(self, ids):
        """Indices into ``rows`` of global ``ids`` (-1 where absent)."""
        pos = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        found = self.ids[pos] == ids if len(self.ids) else np.zeros(np.shape(ids), bool)
        return np.where(found, pos, -1)

    def __sizeof__(self):  # what Dask weighs when it places work on it
        return int(self.ids.nbytes + self.rows.nbytes + self.groups.nbytes) + 256


def halo_ids(others, lo, width):
    """Each point's id and its ``width`` nearest others (n_j, 1 + width)."""
    own = np.arange(lo, lo + others.shape[0], dtype=np.int64)[:, None]
    return np.concatenate([own, others[:, :width]], axis=1)


def requested_rows(ids, lo, hi):
    """Sorted unique local ids of partition ``[lo, hi)`` among ``ids``."""
    g = ids[(ids >= lo) & (ids < hi)]
    return np.unique(g) - lo


def take_rows(Xg, local):
    return Xg[local]


def gather_halo(ids, *pieces):
    """The :class:`Halo` of a partition whose rows need the global ``ids``
    (n_j, w), from ``pieces``: ``(lo, local ids, rows)`` per partition, in
    partition order (so the global ids come out sorted)."""
    have = np.concatenate([lo + loc for lo, loc, _ in pieces])
    rows = np.ascontiguousarray(np.concatenate([r for _, _, r in pieces]))
    halo = Halo(have, rows, np.zeros(ids.shape, dtype=np.int64))
    local = halo.local(ids)
    if (local < 0).any():
        raise RuntimeError("A neighborhood row is missing from the gathered partitions; "
                           "a partition's result was lost. Refit.")
    halo.groups = local
    return halo


def block_eigen(halo, n_neighbors_of_neighbors, sizes, set_size, n_jobs, working_memory):
    """Eigen-state (values, vectors) of a partition's neighborhoods, as
    ``KNNN._fit_eigen`` computes it (primal or dual form by L and K')."""
    groups = np.ascontiguousarray(halo.groups[:, :n_neighbors_of_neighbors])
    rows = halo.rows
    c, Kp = groups.shape
    n_sets = len(sizes)
    r = eigen_width(set_size, Kp)
    evals = np.empty((c, n_sets, r), dtype=rows.dtype)
    evecs = np.empty((c, n_sets, r, r), dtype=rows.dtype)
    threads = task_threads(n_jobs)
    step = chunk_rows(eigen_row_bytes(rows.dtype.itemsize, n_sets, set_size, Kp),
                      working_memory)
    for start in range(0, c, step):
        sl = slice(start, min(start + step, c))
        neighborhood_eigen(rows, groups[sl], sizes, set_size, threads,
                           out=(evals[sl], evecs[sl]))
    return evals, evecs


# ----------------------------------------------------------------- scoring


def pair_requests(Qg, idx, lo, hi, held=None):
    """The (query, neighbor) pairs whose neighbor lives in ``[lo, hi)``:
    flat positions in ``idx`` (q, k), local neighbor ids, the query rows
    they need (each once) with the map from pair to row, and, with
    ``held`` (the queries' own training ids), each pair's held-out row."""
    flat = idx.ravel()
    pos = np.flatnonzero((flat >= lo) & (flat < hi))
    q_of_pair = pos // idx.shape[1]
    rows, inverse = np.unique(q_of_pair, return_inverse=True)
    return (pos, flat[pos] - lo, np.ascontiguousarray(Qg[rows]), inverse.ravel(),
            None if held is None else held[q_of_pair])


def _pair_chunks(n, row_bytes, working_memory):
    step = chunk_rows(row_bytes, working_memory)
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def pair_scores(Xg, evals, evecs, halo, request, sizes, set_size, floor, n_jobs,
                working_memory):
    """Eq. 2 of each requested (query, neighbor) pair, evaluated where the
    neighbor's eigen-state lives (the query row travels, not the
    eigen-state): ``(positions, per-neighbor sums)``. The dual form reads
    the neighborhood's rows from the partition's ``halo``; the primal form
    needs none (``halo`` None). ``floor``: the absolute floors and the
    neighborhood-relative coefficients (or None) of
    :func:`nonn._eq2.score_terms`."""
    pos, local, Q, inverse, _ = request
    floor, floor_rel = floor
    out = np.empty(len(pos), dtype=Xg.dtype)
    if not len(pos):
        return pos, out
    threads = task_threads(n_jobs)
    n_sets, r = len(sizes), evecs.shape[-1]
    if halo is None:
        X_rows, rows, groups = Xg, None, None
    else:
        X_rows, rows = halo.rows, halo.groups[:, 0]
        groups = np.ascontiguousarray(halo.groups[:, :r])
    row_bytes = Xg.dtype.itemsize * (n_sets * r * (r + 4) + 2 * Xg.shape[1])
    for sl in _pair_chunks(len(pos), row_bytes, working_memory):
        out[sl] = score_terms(Q[inverse[sl]], local[sl, None], X_rows, evecs, evals, sizes,
                              set_size, floor, threads, rows=rows, groups=groups,
                              local=floor_rel)[:, 0]
    return pos, out


def calibration_block(Xg, others, lo, rows, k):
    """The held-out queries of a partition: its calibration rows (local ids
    ``rows``) on the grid, their k nearest other rows and their global ids."""
    return (np.ascontiguousarray(Xg[rows]), np.ascontiguousarray(others[rows, :k]),
            lo + np.asarray(rows, dtype=np.int64))


def calibration_requests(block, lo, hi):
    """:func:`pair_requests` of a :func:`calibration_block`."""
    Q, idx, held = block
    return pair_requests(Q, idx, lo, hi, held)


def held_out_pair_scores(halo, request, n_neighbors_of_neighbors, sizes, set_size, floor,
                         n_jobs, working_memory):
    """``KNNN._held_out_scores``'s per-neighbor sums of the requested
    (calibration row, neighbor) pairs whose neighbor lives in this
    partition: the neighbor's neighborhood without the calibration row
    (:func:`nonn._knnn.held_out_groups`, from the partition's ``halo``,
    which holds one more nearest row per point than a neighborhood) and
    its eigen-state, computed here (``floor`` as in :func:`pair_scores`).
    ``(positions, sums)``."""
    pos, local, Q, inverse, held = request
    floor, floor_rel = floor
    out = np.empty(len(pos), dtype=Q.dtype)
    if not len(pos):
        return pos, out
    ext = halo.groups[local]
    groups = held_out_groups(halo.local(held), ext[:, 0], ext[:, 1:],
                             n_neighbors_of_neighbors)
    threads = task_threads(n_jobs)
    row_bytes = eigen_row_bytes(Q.dtype.itemsize, len(sizes), set_size, groups.shape[1])
    for sl in _pair_chunks(len(pos), row_bytes, working_memory):
        out[sl] = pair_terms(Q[inverse[sl]], halo.rows, groups[sl], sizes, set_size, floor,
                             threads, local=floor_rel)
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
            f"{int((seen != 1).sum())} of {n * k} (query, neighbor) scores are missing or "
            "duplicated; a partition's result was lost. Score again.")
    return aggregate_terms(values.reshape(n, k), aggregate)


def training_rows(Qg, Xg):
    """Which grid query rows are exactly rows of the partition ``Xg``
    (``BaseDetector._training_rows`` on one partition)."""
    if not len(Qg) or not len(Xg):
        return np.zeros(len(Qg), dtype=bool)
    row = np.dtype((np.void, Xg.dtype.itemsize * Xg.shape[1]))
    a = np.ascontiguousarray(Qg, dtype=Xg.dtype).view(row).ravel()
    return np.isin(a, np.ascontiguousarray(Xg).view(row).ravel())


def any_of(*parts):
    return np.logical_or.reduce(parts)


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
