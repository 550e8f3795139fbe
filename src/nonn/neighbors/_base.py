"""The one protocol every nearest-neighbor search backend follows.

A backend is fitted on the training matrix and answers
``kneighbors(X=None, n_neighbors=1, return_distance=True)``:

* ``(distances, indices)`` of shape ``(n_queries, n_neighbors)``, sorted
  ascending, true distances (not squared), ``int64`` indices, no ``-1``
  padding;
* ``return_distance=False`` (scikit-learn's convention) returns only the
  ``indices``: the same ids, ordered by the backend's own ranking values
  (for example the ``|x|^2 - 2 q.x`` expansion, or an index's compressed
  distances), so the order may differ from the true-distance order only
  between near-ties. Backends skip the exact-distance recompute then;
  callers that need ids only (a k-NN graph) should ask for them this way;
* ``X=None`` means "the training set itself", each point excluded **by
  index** (never by ``distance == 0``, so exact duplicates stay neighbors).

Every backend also answers ``refine_neighbors(X, ind, graph)``: the ids
``ind`` of the queries ``X`` it found, improved with ``graph``, a neighbor
graph of the training rows the caller keeps (a KNNN's neighborhoods). An
exact backend, or one not asked to refine, returns ``ind`` as it is; FAISS's
approximate indexes with ``refine`` take each query's exact nearest among
the found rows and their graph neighbors.

Every backend's constructor takes ``metric``, ``working_memory`` (MiB for
one block of work), ``verbose`` and ``n_jobs`` (threads of the library it
drives; None leaves that library's setting alone) as keyword arguments, plus
its own options (``backend_params`` of the estimators).

Estimators only talk to this protocol, so FAISS, GPU or distributed backends
plug in without touching them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

#: metric name -> how a backend must transform the data before Euclidean search.
METRICS = {
    "euclidean": {"normalize": False},
    # cosine distance = 1 - cos(a, b) = ||a/|a| - b/|b|||^2 / 2
    "cosine": {"normalize": True},
}


def check_metric(metric):
    if metric not in METRICS:
        raise ValueError(
            f"Unknown metric {metric!r}. Expected one of {sorted(METRICS)}; "
            "for example metric='euclidean'."
        )
    return metric


@runtime_checkable
class NeighborsBackend(Protocol):
    """Search backend protocol (see module docstring)."""

    name: str
    exact: bool

    def fit(self, X: np.ndarray) -> "NeighborsBackend": ...

    def kneighbors(self, X: np.ndarray | None = None, n_neighbors: int = 1,
                   return_distance: bool = True): ...

    def refine_neighbors(self, X: np.ndarray, ind: np.ndarray,
                         graph: np.ndarray) -> np.ndarray: ...


def unit_rows(X):
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    norms[norms == 0] = 1
    return X / norms


def squared_to_metric(sq, metric):
    """Convert squared Euclidean distances (of unit rows for cosine)."""
    np.maximum(sq, 0, out=sq)
    if metric == "cosine":
        sq *= 0.5
        return sq
    return np.sqrt(sq, out=sq)


def check_n_neighbors(n_neighbors, n_train, self_query):
    """``n_neighbors`` as an int, checked against what this search can return."""
    k = int(n_neighbors)
    max_k = n_train - 1 if self_query else n_train
    if not 1 <= k <= max_k:
        raise ValueError(
            f"n_neighbors must be in [1, {max_k}] for this search; got {k}. "
            "Ask for fewer neighbors or fit on more data."
        )
    return k


def expansion_margin(d, dtype):
    """Relative margin above the rounding of ``|a|^2 - 2 a.b + |b|^2`` (and
    of ``a.b``) computed in ``dtype`` over ``d`` features: that rounding is
    at most ~(d + 4) eps (|a|^2 + |b|^2) / 2, and the margin is twice it,
    so a test loosened by it keeps every true pair."""
    return 2.0 * (d + 4) * float(np.finfo(dtype).eps)


def drop_self(dist, ind, row_ids, k):
    """Remove each row's own id from ``k + 1`` sorted neighbors.

    The own id is dropped **by index** wherever it appears, so exact
    duplicates stay neighbors at distance 0. Where the own id is absent (an
    approximate index missed it, or more than ``k`` duplicates tie at 0) the
    last, farthest column is dropped instead. ``dist=None`` drops from the
    ids only (and returns ``None`` for the distances).
    """
    is_self = ind == np.asarray(row_ids)[:, None]
    # keep only the first match: guards against an index repeating an id
    first = is_self & (np.cumsum(is_self, axis=1) == 1)
    no_self = ~first.any(axis=1)
    first[no_self, -1] = True
    keep = ~first
    n = ind.shape[0]
    ids = ind[keep].reshape(n, k)
    return (None if dist is None else dist[keep].reshape(n, k)), ids


def refine_sorted(X, q, cand):
    """Exact squared distances (float64) from the candidates ``cand`` (q, m)
    to the queries ``q``, recomputed from the differences (no cancellation
    error of the ``|a|^2 - 2ab + |b|^2`` expansion, and true values for
    compressed indices), with the candidates sorted by them (stable).

    A compiled kernel does it without gathering the (q, m, d) candidates."""
    from . import _kernels

    q = np.ascontiguousarray(q, dtype=X.dtype)
    cand = np.ascontiguousarray(cand, dtype=np.int64)
    sq = np.empty(cand.shape, dtype=np.float64)
    ids = np.empty(cand.shape, dtype=np.int64)
    _kernels.exact_sq_sorted(X, q, cand, sq, ids)
    return sq, ids


def reverse_lists(ind, cap):
    """CSR (ptr, ids) of the reverse k-NN graph: for row ``j`` the rows that
    list ``j`` among their neighbors, nearest ranks first, at most ``cap``."""
    n, k = ind.shape
    src = np.repeat(np.arange(n, dtype=np.int64), k)
    rank = np.tile(np.arange(k, dtype=np.int64), n)
    dst = ind.ravel()
    order = np.lexsort((rank, dst))
    dst, src, rank = dst[order], src[order], rank[order]
    counts = np.bincount(dst, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(dst.size) - np.repeat(starts, counts)
    keep = pos < cap
    kept = np.bincount(dst[keep], minlength=n)
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(kept, out=ptr[1:])
    return ptr, src[keep]


def refine_by_graph(X, Q, ind, graph):
    """One "neighbors of neighbors" round for queries ``Q`` (not training
    rows): each query's exact ``k`` nearest rows of ``X`` among its found
    ones ``ind`` (q, k) and their neighbors in ``graph`` (n, m), sorted by
    (distance, id). Returns the ids (q, k)."""
    from . import _kernels

    k = ind.shape[1]
    sq = np.empty(ind.shape, dtype=np.float64)
    out = np.empty_like(ind)
    none = np.zeros(1, dtype=np.int64)
    _kernels.refine_by_neighbors(X, Q, ind, np.ascontiguousarray(graph, dtype=np.int64), k,
                                  none, none[:0], np.full(len(ind), -1, dtype=np.int64), sq,
                                  out)
    return out


def refine_graph(X, ind, rounds=1, fanout=10, reverse=0, working_memory=None, verbose=False):
    """Improve an approximate k-NN graph of the training set by "neighbors
    of neighbors" rounds (the local join of NN-descent, Dong et al. 2011).

    ``ind`` (n, k) holds each training row's approximate neighbors, its own
    id excluded. Each round gives every row the exact ``k`` nearest among
    its current neighbors and the neighbors of its first ``fanout`` ones
    (``k + fanout * k`` distance evaluations per row), so neighbors the
    index missed but that sit next to ones it found come in. ``reverse > 0``
    adds up to that many reverse neighbors (rows that list this one) as
    candidates, as NN-descent does. Returns the
    squared Euclidean distances (float64, sorted) and ids (int64) of the
    last round.
    """
    from . import _kernels
    from .._chunks import chunk_rows, progress

    rounds = int(rounds)
    fanout = int(fanout)
    ind = np.ascontiguousarray(ind, dtype=np.int64)
    n, k = ind.shape
    if rounds < 1 or fanout < 1 or n <= k:
        raise ValueError(f"refine_graph needs rounds >= 1, fanout >= 1 and more rows than "
                         f"neighbors; got rounds={rounds}, fanout={fanout}, shape {ind.shape}.")
    d = X.shape[1]
    # per row: the candidate ids, and the output rows
    step = chunk_rows((k + fanout * k) * 8 + k * 16 + d * 8, working_memory, min_rows=4096,
                      max_rows=65536)
    sq = np.empty((n, k), dtype=np.float64)
    for r in range(rounds):
        new = np.empty_like(ind)
        if reverse:
            rev_ptr, rev_ids = reverse_lists(ind, int(reverse))
        else:
            rev_ptr, rev_ids = np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        for start in progress(range(0, n, step), verbose, f"refine graph {r + 1}/{rounds}",
                              total=-(-n // step)):
            stop = min(start + step, n)
            _kernels.refine_by_neighbors(X, X[start:stop], ind[start:stop], ind, fanout,
                                          rev_ptr[start:stop + 1] if reverse else rev_ptr,
                                          rev_ids, np.arange(start, stop, dtype=np.int64),
                                          sq[start:stop], new[start:stop])
        # a row with fewer than k distinct candidates (an index that repeated
        # ids) keeps its old list
        short = new[:, -1] == np.iinfo(np.int64).max
        if short.any():
            diff = X[ind[short]].astype(np.float64) - X[short][:, None, :]
            sq_s = np.einsum("ijk,ijk->ij", diff, diff)
            order = np.argsort(sq_s, axis=1, kind="stable")
            sq[short] = np.take_along_axis(sq_s, order, 1)
            new[short] = np.take_along_axis(ind[short], order, 1)
        ind = new
    return sq, ind


def _duplicate_groups(X):
    """Groups of exact duplicate rows of ``X``, or None when all rows differ.

    ``first``: each group's lowest row id (the row the index holds);
    ``inv``: each row's group; ``ptr`` / ``members``: the rows of group ``g``
    are ``members[ptr[g]:ptr[g + 1]]``, ascending. Rows are compared by
    their bytes, a negative zero first made positive (equal values)."""
    X = np.ascontiguousarray(X)
    for start in range(0, X.shape[0], 65536):  # bounded temporaries
        block = X[start:start + 65536]
        if (np.signbit(block) & (block == 0)).any():
            X = X + 0.0  # -0.0 + 0.0 is +0.0
            break
    rows = X.view(np.dtype((np.void, X.dtype.itemsize * X.shape[1]))).ravel()
    _, first, inv, counts = np.unique(rows, return_index=True, return_inverse=True,
                                      return_counts=True)
    if len(first) == X.shape[0]:
        return None
    ptr = np.zeros(len(first) + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    return {"first": first.astype(np.int64), "inv": inv.ravel().astype(np.int64), "ptr": ptr,
            "members": np.argsort(inv.ravel(), kind="stable").astype(np.int64)}
