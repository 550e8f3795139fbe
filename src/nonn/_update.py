"""Adding normal samples to a fitted detector without a refit (``partial_fit``).

What is frozen
--------------
A fit learns global statistics from all its rows: the input transforms
(column scaling, the power-of-two working scale, unit rows, the whitening
matrix, each resolved by the data-type rule), the feature order of the sets
(from correlations), each set's eigenvalue floor (from variances) and any
"auto" parameter the label-free selection picked. New data would change
each of them, and each change moves every score. ``partial_fit`` keeps them
as the first fit learned them, so the result is **the model a fit on all the
rows would give with those statistics** (:func:`frozen_fit` computes that
model from scratch; the tests compare the two). Only the local state is
updated:

* ``KNNN``: every new row gets its neighborhood (K' - 1 nearest others)
  from a search of all rows; an existing row's neighborhood changes only
  if a new row is nearer than its farthest member, which one pass of
  distances between the old and the new rows finds exactly (then merged by
  exact distance): with the exact brute-force backend that pass is the new
  rows' own search, whose products mark the candidate rows (a margin above
  their rounding), each then checked on exact distances; only the changed
  neighborhoods' eigen-states and the new rows' are computed. A
  calibration row's held-out score depends on its k
  nearest others and on their K' nearest others (one more than a
  neighborhood: the replacement when the row itself leaves it), so it is
  reused when none of these lists changed and recomputed otherwise; the
  calibration rows themselves are those a fit on all rows takes (all of
  them up to ``CALIBRATION_ROWS``, else a seeded subset that depends on the
  row count, so then all are rescored). The threshold is set from them as
  ``fit`` sets it (a threshold from :meth:`calibrate` is replaced: it
  scored the old model).
* ``KNN``, ``LocalEigenKNN``: new rows are scored by their k nearest
  others, and an existing row is rescored only if a new row is nearer than
  its k-th neighbor.
* ``GlobalEigenKNN``: its state is global (one covariance of all rows, and
  cross-fitted calibration scores): it is recomputed on all rows, in the
  fitted input space.

With an exact search backend the state equals that fresh fit's up to the
order of exactly tied neighbors. With an approximate FAISS index the
index is extended (FAISS ``add``; an IVF or PQ index keeps the lists and
codebooks trained on the first rows), the new rows' neighborhoods come from
it as a fit's would, and the existing neighborhoods are updated exactly
against the new rows: a new row enters a stored neighborhood if and only
if it is nearer than the stored members, so no stored neighborhood gets
worse than it was (the graph refinement of ``backend_params={"refine":
...}`` is not rerun on the old rows).
"""

from __future__ import annotations

import copy
import time

import numpy as np
from sklearn.utils.validation import check_is_fitted

from . import _base
from ._base import AUTO_CONTAMINATION, calibration_rows, cap
from ._chunks import chunk_rows
from ._validation import check_array_input


# --------------------------------------------------------------- distances
def closer_pairs(X_old, r2, X_new, working_memory=None):
    """Every pair (old row ``p``, new row ``b``) with squared distance
    ``|X_old[p] - X_new[b]|^2 < r2[p]``, exactly: ``(p, b, d2)``, the
    distances in float64.

    One pass of matrix products in the data's dtype (on data centred by the
    old rows' mean, which keeps the products' rounding small) selects the
    candidates, ``a.b - |b|^2 / 2 > (|a|^2 - r2) / 2`` loosened by a margin
    of ``tol (|a|^2 + |b|^2 + r2) / 2``, above any rounding of the
    expansion; each candidate is then checked on its exact float64
    distance.
    """
    from .neighbors._base import expansion_margin

    n, d = X_old.shape
    m = X_new.shape[0]
    empty = np.zeros(0, dtype=np.int64)
    if n == 0 or m == 0:
        return empty, empty, np.zeros(0)
    dt = X_old.dtype
    centre = X_old.mean(axis=0, dtype=np.float64)
    B = np.ascontiguousarray((X_new - centre).astype(dt))
    nb = np.einsum("ij,ij->i", B, B, dtype=np.float64)
    tol = expansion_margin(d, dt)
    col = (0.5 * (1.0 - tol) * nb).astype(dt)
    ps, bs, ds = [], [], []
    step = chunk_rows(m * (dt.itemsize + 1) + d * 16, working_memory)
    for start in range(0, n, step):
        stop = min(start + step, n)
        A = (X_old[start:stop] - centre).astype(dt)
        na = np.einsum("ij,ij->i", A, A, dtype=np.float64)
        row = (0.5 * ((1.0 - tol) * na - (1.0 + tol) * r2[start:stop])).astype(dt)
        G = A @ B.T
        G -= col[None, :]
        p, b = np.nonzero(G > row[:, None])
        del G
        if not len(p):
            continue
        p = p + start
        d2 = _exact_sq(X_old, p, X_new, b)
        keep = d2 < r2[p]
        ps.append(p[keep])
        bs.append(b[keep])
        ds.append(d2[keep])
    if not ps:
        return empty, empty, np.zeros(0)
    return (np.concatenate(ps).astype(np.int64), np.concatenate(bs).astype(np.int64),
            np.concatenate(ds))


def _exact_sq(X, rows, Y, cols, block=65536):
    """``|X[rows[i]] - Y[cols[i]]|^2`` in float64, with the arithmetic of
    every other exact distance here (the compiled kernel's sequential
    float64 sum), so one pair of rows always gives one value."""
    from .neighbors import _kernels

    out = np.empty(len(rows))
    ids = np.empty((min(block, len(rows)), 1), dtype=np.int64)
    for s in range(0, len(rows), block):
        q = np.ascontiguousarray(X[rows[s:s + block]])
        cand = np.ascontiguousarray(cols[s:s + block, None], dtype=np.int64)
        sq = np.empty(cand.shape, dtype=np.float64)
        _kernels.exact_sq_sorted(Y, q, cand, sq, ids[:len(cand)])
        out[s:s + block] = sq[:, 0]
    return out


def _sq_to(Xg, n, ids):
    """``|Xg[p] - Xg[ids[p]]|^2`` (float64) for the rows ``p < n``."""
    from .neighbors import _kernels

    sq = np.empty((n, 1), dtype=np.float64)
    out = np.empty((n, 1), dtype=np.int64)
    _kernels.exact_sq_sorted(Xg, Xg, np.ascontiguousarray(ids[:, None], dtype=np.int64), sq,
                             out)
    return sq[:, 0]


def merge_lists(Xg, rows, lists, new_rows, new_ids, width):
    """The lists ``lists`` (of the rows ``rows``) with the candidates
    ``new_ids`` of each (``new_rows`` says whose), sorted by exact distance
    (stable: a stored member stays before an equidistant new row, which has
    a higher id, as an exact search orders ties) and cut to ``width``."""
    from .neighbors import _kernels

    out = np.empty((len(rows), width), dtype=np.int64)
    order = np.lexsort((new_ids, new_rows))
    new_rows, new_ids = new_rows[order], new_ids[order]
    pos = np.searchsorted(rows, new_rows)
    counts = np.bincount(pos, minlength=len(rows))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for c in np.unique(counts):
        sel = np.nonzero(counts == c)[0]
        extra = new_ids[(starts[sel][:, None] + np.arange(c)[None, :]).reshape(-1)].reshape(
            len(sel), c)
        cand = np.ascontiguousarray(np.concatenate([lists[sel], extra], axis=1))
        sq = np.empty(cand.shape, dtype=np.float64)
        ids = np.empty(cand.shape, dtype=np.int64)
        _kernels.exact_sq_sorted(Xg, np.ascontiguousarray(Xg[rows[sel]]), cand, sq, ids)
        out[sel] = ids[:, :width]
    return out


# ------------------------------------------------------------ plumbing
def _unfitted(det):
    """Whether ``det`` has not been fitted: its first partial_fit is a fit
    (scikit-learn's convention)."""
    return "offset_" not in det.__dict__


def _check_local(det, what):
    check_is_fitted(det, "offset_")
    if not isinstance(getattr(det, "_fit_X", None), np.ndarray):
        raise NotImplementedError(
            f"{type(det).__name__}.{what} needs the model on this machine: gather it with "
            "to_knnn() first (its state lives on the cluster).")


def _new_rows(det, X):
    """Validated new rows through the model's frozen input transforms."""
    X = check_array_input(det, X, reset=False)
    return det._preprocess(X.astype(det.dtype_, copy=False))


def set_threshold(det, train_scores, rows):
    """The threshold state ``fit`` sets from held-out training scores
    (``score_samples`` of the calibration rows ``rows``; None: all rows)."""
    n = det._fit_X.shape[0]
    det.calibration_rows_ = np.arange(n, dtype=np.int64) if rows is None else rows
    det.train_scores_ = np.asarray(train_scores)
    det.calibration_scores_ = det.train_scores_
    det.contamination_ = (AUTO_CONTAMINATION if det.contamination == "auto"
                          else float(det.contamination))
    det.offset_ = det._quantile_offset(det.calibration_scores_, det.contamination_)
    det.threshold_source_ = (f"training rows scored out of sample "
                             f"({len(det.calibration_scores_)} rows)")


def _extend_search(det, work, Xw, new):
    """The search backend of all rows: rebuilt for an exact one (its build
    is one pass over the rows), extended for an approximate index."""
    search = det._search
    if not getattr(search, "exact", True) and hasattr(search, "add"):
        search.add(new)
        return search
    return work._make_backend(Xw, name=det.backend_)


def _requested(det, name):
    """A count as the fit asked for it (an "auto" one as the selection
    chose it: frozen with the other global statistics)."""
    auto = getattr(det, "auto_params_", None) or {}
    value = getattr(det, name)
    return auto.get(name, value) if value == "auto" else value


def _commit(det, work, stats):
    work._last_update = stats
    det.__dict__.clear()
    det.__dict__.update(work.__dict__)
    return det


# ------------------------------------------------------------------ KNNN
def _knnn_graph(work, Xg):
    """A fit's neighborhood graph and eigen-state on ``Xg`` (the counts
    already set on ``work``); returns its ``others`` graph."""
    n = Xg.shape[0]
    work._fit_X = Xg
    Kp, k = work.n_neighbors_of_neighbors_, work.n_neighbors_
    m = min(max(Kp, k), n - 1)
    others = work._search.kneighbors(None, m, return_distance=False)
    work.neighborhoods_ = np.concatenate(
        [np.arange(n, dtype=np.int64)[:, None], others[:, : Kp - 1]], axis=1)
    if work.memory != "lean":
        work._fit_eigen()
    return others


def _calibration_after_update(det, n_old, n):
    """The calibration rows of a model of ``n`` rows whose first ``n_old``
    were ``det``'s: as a fit would take them; with whitening (frozen from
    ``det``'s fit, estimated without ``det``'s calibration rows) those rows
    and the new ones, which the whitening never saw (at most
    ``CALIBRATION_ROWS``, a seeded subset)."""
    if not getattr(det, "whiten_", 0):
        return calibration_rows(n)
    rows = np.concatenate([np.asarray(det.calibration_rows_, dtype=np.int64),
                           np.arange(n_old, n, dtype=np.int64)])
    if len(rows) > _base.CALIBRATION_ROWS:
        rows = np.random.default_rng(0).choice(rows, _base.CALIBRATION_ROWS, replace=False)
    return np.sort(rows)


def knnn_frozen_state(det, work, Xg):
    """Everything ``fit`` computes after the global statistics, on the grid
    rows ``Xg``, into ``work``."""
    n = Xg.shape[0]
    work.n_neighbors_ = cap(_requested(det, "n_neighbors"), n - 1, "n_neighbors",
                            "the number of other training points")
    work.n_neighbors_of_neighbors_ = cap(_requested(det, "n_neighbors_of_neighbors"), n,
                                         "n_neighbors_of_neighbors",
                                         "the number of training points")
    work._search = work._make_backend(Xg, name=det.backend_)
    others = _knnn_graph(work, Xg)
    rows = _calibration_after_update(det, det._fit_X.shape[0], n)
    work._graph_tail = np.ascontiguousarray(others[:, work.n_neighbors_of_neighbors_ - 1:])
    loo = work._held_out_scores(rows, others)
    set_threshold(work, -np.asarray(work._to_user_units(loo, "training")), rows)


def knnn_partial_fit(det, X):
    """:meth:`nonn.KNNN.partial_fit`."""
    from ._eq2 import neighborhood_eigen
    from .neighbors._base import drop_self

    if _unfitted(det):
        return det.fit(X)
    _check_local(det, "partial_fit")
    t0 = time.perf_counter()
    new = det._to_grid(_new_rows(det, X))
    n_old, M = det._fit_X.shape[0], new.shape[0]
    n = n_old + M
    Xg = np.concatenate([det._fit_X, new])
    work = copy.copy(det)
    k_req = _requested(det, "n_neighbors")
    Kp_req = _requested(det, "n_neighbors_of_neighbors")
    if min(k_req, n - 1) != det.n_neighbors_ or min(Kp_req, n) != det.n_neighbors_of_neighbors_:
        # a count the smaller data capped: all neighborhoods widen
        knnn_frozen_state(det, work, Xg)
        return _commit(det, work, {"added": M, "refit": "a count capped by the first fit's "
                                   "rows grows", "seconds": time.perf_counter() - t0})
    Kp, k = det.n_neighbors_of_neighbors_, det.n_neighbors_
    m = min(max(Kp, k), n - 1)
    head = Kp - 1
    tail = getattr(det, "_graph_tail", None)
    tail_ok = tail is not None and tail.shape == (n_old, m - head)
    lists = np.concatenate([det.neighborhoods_[:, 1:], tail], axis=1) if tail_ok else \
        det.neighborhoods_[:, 1:]
    width = lists.shape[1]
    work._fit_X = Xg
    stages = {}
    t = time.perf_counter()
    search = _extend_search(det, work, Xg, new)
    try:
        work._search = search
        # existing rows whose known list a new row enters: nearer than its last
        r2 = _sq_to(Xg, n_old, lists[:, -1]) if width else None
        if r2 is not None and getattr(search, "metric", None) == "euclidean" and \
                hasattr(search, "kneighbors_entering"):
            # the search's own products mark the rows a new row may enter;
            # only those are checked exactly
            ids, marked = search.kneighbors_entering(
                new, m + 1, np.concatenate([r2, np.full(M, -np.inf)]))
            cand = np.flatnonzero(marked[:n_old])
        else:
            ids = search.kneighbors(new, m + 1, return_distance=False)
            cand = None
        new_lists = drop_self(None, ids, np.arange(n_old, n), m)[1]
        stages["search"], t = time.perf_counter() - t, time.perf_counter()
        if r2 is None:
            p = b = np.zeros(0, dtype=np.int64)
        elif cand is None:
            p, b, _ = closer_pairs(det._fit_X, r2, new, det.working_memory)
        else:
            p, b, _ = closer_pairs(det._fit_X[cand], r2[cand], new, det.working_memory)
            p = cand[p]
        aff = np.unique(p)
        lists_new = lists.copy()
        if len(aff):
            lists_new[aff] = merge_lists(Xg, aff, lists[aff], p, b + n_old, width)
        head_changed = aff[(lists_new[aff, :head] != lists[aff, :head]).any(axis=1)]
        stages["lists"], t = time.perf_counter() - t, time.perf_counter()
        nbhd = np.concatenate([
            np.arange(n, dtype=np.int64)[:, None],
            np.concatenate([lists_new[:, :head], new_lists[:, :head]])], axis=1)
        work.neighborhoods_ = nbhd
        work._graph_tail = (np.concatenate([lists_new[:, head:], new_lists[:, head:]])
                            if tail_ok else None)
        if work._graph_tail is None:
            del work._graph_tail
        if det.memory != "lean":
            S, R = det.eigenvalues_.shape[1:]
            evals = np.empty((n, S, R), dtype=Xg.dtype)
            evecs = np.empty((n, S, R, R), dtype=Xg.dtype)
            evals[:n_old] = det.eigenvalues_
            evecs[:n_old] = det.eigenvectors_
            todo = np.concatenate([head_changed, np.arange(n_old, n)])
            for sl in work._query_chunks(len(todo), work._eigen_row_bytes(),
                                         "neighborhood eigen"):
                w, v = neighborhood_eigen(Xg, nbhd[todo[sl]], work.set_sizes_, work.set_size_,
                                          work.n_jobs_)
                evals[todo[sl]] = w
                evecs[todo[sl]] = v
            work.eigenvalues_, work.eigenvectors_ = evals, evecs
        stages["eigen"], t = time.perf_counter() - t, time.perf_counter()
        # held-out scores of the calibration rows a fit on all rows takes
        rows = _calibration_after_update(det, n_old, n)
        R_ids = np.arange(n, dtype=np.int64) if rows is None else rows
        if tail_ok:
            others = np.concatenate([nbhd[:, 1:], work._graph_tail], axis=1)
        else:
            others = _searched_others(work, search, nbhd, new_lists, n_old, R_ids, m, k)
        changed = np.zeros(n, dtype=bool)
        changed[aff] = True
        changed[n_old:] = True
        reuse = np.zeros(len(R_ids), dtype=bool)
        old_score = np.full(n, np.nan)
        if tail_ok:
            old_score[det.calibration_rows_] = det.train_scores_
            reuse = (R_ids < n_old) & ~np.isnan(old_score[R_ids]) & ~changed[R_ids] & \
                ~changed[others[R_ids, :k]].any(axis=1)
        train = np.empty(len(R_ids), dtype=det.train_scores_.dtype)
        train[reuse] = old_score[R_ids[reuse]]
        todo = R_ids[~reuse]
        if len(todo):
            loo = work._held_out_scores(todo, others)
            train[~reuse] = -np.asarray(work._to_user_units(loo, "training"))
        set_threshold(work, train, rows)
        stages["calibration"] = time.perf_counter() - t
    except BaseException:
        if search is det._search:  # an extended index: rebuild the old one
            det._search = det._make_backend(det._fit_X, name=det.backend_)
        raise
    return _commit(det, work, {
        "added": M, "neighborhoods_changed": int(len(head_changed)),
        "lists_changed": int(len(aff)), "calibration_rescored": int((~reuse).sum()),
        "tail_known": bool(tail_ok), "stage_seconds": stages,
        "seconds": time.perf_counter() - t0})


def _searched_others(work, search, nbhd, new_lists, n_old, R_ids, m, k):
    """The ``m``-nearest-others lists the held-out scores read, where the
    model does not hold them (a model gathered from a cluster, or read from
    a file saved without them, keeps only its neighborhoods, not the one row
    beyond): searched for the rows needed
    (the calibration rows and their k nearest others)."""
    from .neighbors._base import drop_self

    n = nbhd.shape[0]
    head = nbhd.shape[1] - 1
    others = np.zeros((n, m), dtype=np.int64)
    others[:, :head] = nbhd[:, 1:]
    others[n_old:] = new_lists
    known = np.zeros(n, dtype=bool)
    known[n_old:] = True

    def fill(rows):
        rows = np.unique(rows[~known[rows]])
        if not len(rows):
            return
        for sl in work._query_chunks(len(rows), 16 * (m + 1), "calibration neighbors"):
            r = rows[sl]
            ids = search.kneighbors(work._fit_X[r], m + 1, return_distance=False)
            others[r] = drop_self(None, ids, r, m)[1]
        known[rows] = True

    if k > head:
        fill(R_ids)
    fill(others[R_ids, :k].reshape(-1))
    return others


def frozen_fit(det, X):
    """The model a fit on the rows ``X`` gives with ``det``'s frozen global
    statistics (input transforms, feature order, eigenvalue floors, the
    "auto" choices): the reference ``partial_fit`` is equal to. Returns a
    new detector; ``det`` is left as it is."""
    _check_local(det, "frozen_fit")
    work = copy.copy(det)
    Xw = det._preprocess(check_array_input(det, X, reset=False).astype(det.dtype_, copy=False))
    # by class name: the estimators import this module, so it imports none of them
    kinds = {cls.__name__ for cls in type(det).__mro__}
    if "KNNN" in kinds:
        knnn_frozen_state(det, work, det._to_grid(Xw))
    elif "GlobalEigenKNN" in kinds:
        loo = work._fit(Xw)
        set_threshold(work, -np.asarray(work._to_user_units(loo, "training")), None)
    else:
        _neighbor_refit(det, work, det._transform(Xw))
    for name in ("_last_update",):
        work.__dict__.pop(name, None)
    return work


# ------------------------------------------------------------- baselines
def _neighbor_refit(det, work, Xw):
    n = Xw.shape[0]
    work.n_neighbors_ = cap(det.n_neighbors, n - 1, "n_neighbors",
                            "the number of other training points")
    work._fit_X = Xw
    work._search = work._make_backend(Xw, name=det.backend_)
    dist, idx = work._search.kneighbors(None, work.n_neighbors_)
    work._knn_radius = dist[:, -1].astype(np.float64)
    loo = work._from_neighbors(Xw, dist, idx)
    set_threshold(work, -np.asarray(work._to_user_units(loo, "training")), None)


def _cosine_rows(det, X):
    from .neighbors._base import unit_rows

    return unit_rows(X) if det.metric == "cosine" else X


def neighbor_partial_fit(det, X):
    """:meth:`partial_fit` of ``KNN`` and ``LocalEigenKNN``: new rows scored
    by their k nearest others; an existing row rescored only when a new row
    is nearer than its k-th neighbor."""
    from .neighbors._base import drop_self

    if _unfitted(det):
        return det.fit(X)
    _check_local(det, "partial_fit")
    t0 = time.perf_counter()
    new = det._transform(_new_rows(det, X))
    n_old, M = det._fit_X.shape[0], new.shape[0]
    n = n_old + M
    Xw = np.concatenate([det._fit_X, new])
    work = copy.copy(det)
    if min(det.n_neighbors, n - 1) != det.n_neighbors_:
        _neighbor_refit(det, work, Xw)
        return _commit(det, work, {"added": M, "refit": "n_neighbors capped by the first "
                                   "fit's rows grows", "seconds": time.perf_counter() - t0})
    k = det.n_neighbors_
    radius = getattr(det, "_knn_radius", None)
    if radius is None or len(radius) != n_old:
        # a model read from a file: its rows' k-th neighbor distances, once
        radius = det._search.kneighbors(None, k)[0][:, -1].astype(np.float64)
    work._fit_X = Xw
    search = _extend_search(det, work, Xw, new)
    try:
        work._search = search
        dist_n, idx_n = search.kneighbors(new, k + 1)
        dist_n, idx_n = drop_self(dist_n, idx_n, np.arange(n_old, n), k)
        loo_new = work._from_neighbors(new, dist_n, idx_n)
        # cosine distance = |u - v|^2 / 2 of unit rows
        r2 = 2.0 * radius if det.metric == "cosine" else radius * radius
        p, _, _ = closer_pairs(_cosine_rows(det, det._fit_X), r2, _cosine_rows(det, new),
                               det.working_memory)
        aff = np.unique(p)
        train = np.concatenate([det.train_scores_, -np.asarray(
            work._to_user_units(loo_new, "training"))])
        rad = np.concatenate([radius, dist_n[:, -1].astype(np.float64)])
        if len(aff):
            dist_a, idx_a = search.kneighbors(Xw[aff], k + 1)
            dist_a, idx_a = drop_self(dist_a, idx_a, aff, k)
            loo_a = work._from_neighbors(Xw[aff], dist_a, idx_a)
            train[aff] = -np.asarray(work._to_user_units(loo_a, "training"))
            rad[aff] = dist_a[:, -1]
        work._knn_radius = rad
        set_threshold(work, train, None)
    except BaseException:
        if search is det._search:
            det._search = det._make_backend(det._fit_X, name=det.backend_)
        raise
    return _commit(det, work, {"added": M, "neighborhoods_changed": int(len(aff)),
                               "calibration_rescored": int(len(aff) + M),
                               "seconds": time.perf_counter() - t0})


def global_partial_fit(det, X):
    """:meth:`nonn.GlobalEigenKNN.partial_fit`: the global covariance and the
    cross-fitted calibration of all rows, recomputed in the fitted input
    space."""
    if _unfitted(det):
        return det.fit(X)
    _check_local(det, "partial_fit")
    t0 = time.perf_counter()
    new = _new_rows(det, X)
    Xw = np.concatenate([det._fit_X, new])
    work = copy.copy(det)
    loo = work._fit(Xw)
    set_threshold(work, -np.asarray(work._to_user_units(loo, "training")), None)
    return _commit(det, work, {"added": new.shape[0], "refit": "GlobalEigenKNN's state is "
                               "global (one covariance of all rows)",
                               "seconds": time.perf_counter() - t0})
