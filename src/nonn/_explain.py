"""Per-feature explanations of anomaly scores: which features, and which
training neighbors, a score came from.

The rule (every detector)
-------------------------
Each detector's score is a sum of terms, one per (query, training
neighbor) pair, and every term is a function ``t(d)`` of the pair's
difference ``d = q - x`` that is positively homogeneous of degree one
(``t(c d) = c t(d)`` for ``c > 0``): a sum of ``|d . v| / sqrt(e)`` terms
and of Euclidean norms. For such a function Euler's theorem gives the exact
split ``t(d) = sum_f d_f * dt/dd_f``: feature ``f`` is credited with
``d_f`` times the term's gradient along it. Per eigen-direction ``j`` of a
set this is

* ``|d . v_j| / sqrt(e_j)`` (an eigenvalue above the floor) gives feature
  ``f`` of the set ``sign(d . v_j) * d_f * v_jf / sqrt(e_j)``: the pieces
  add up to ``|d . v_j| / sqrt(e_j)`` exactly;
* the floored directions' term ``||P_F d|| / sqrt(floor)`` (``P_F`` the
  projection onto the directions whose eigenvalue is at or below the floor,
  and in the dual form also the directions outside the neighborhood's
  span) gives ``d_f (P_F d)_f / (||P_F d|| sqrt(floor))``: they add up to
  ``||P_F d|| / sqrt(floor)`` because ``d . P_F d = ||P_F d||^2``. In the
  dual form ``v_j = G^T u_j / sqrt(K' e_j)`` (``G`` the centred
  neighborhood rows of the set) and ``P_F d = d - sum_kept (d . v_j) v_j``;
* a Euclidean distance ``||d||`` (k-NN) gives ``d_f^2 / ||d||``; a cosine
  distance ``||u_q - u_x||^2 / 2`` of unit rows gives ``(u_q - u_x)_f^2 / 2``.

So the contributions of a query sum to its anomaly score (to floating-point
rounding), and a contribution can be **negative**: a feature whose
difference points against the direction's sign lowers that direction's
term (the other features of the set then carry more than the term).
With ``aggregate="min"`` the score is one neighbor's term, and so is the
explanation (``neighbor`` names that training row); with ``"sum"`` (and the
baselines that sum or average over the k neighbors) the explanation is the
sum (or mean) of the k neighbors' splits.

Input transforms
----------------
The operator sees the data after the model's input transforms; the
contributions are reported per **input column**, in the input's order (the
feature re-ordering of the sets is undone):

* column scaling (``scale``) and the power-of-two working scale multiply
  each column by a constant: feature ``f`` of the working space is input
  column ``f`` (scores that carry units, k-NN distances, are returned in
  the data's units, and so are their contributions);
* whitening is linear, ``d_white = d W`` with ``W`` symmetric, so
  ``d_white . a = d . (W a)``: a contribution is mapped back to the
  columns exactly, feature ``f`` getting ``d_f (W a)_f`` where ``d`` is the
  difference before whitening (after scaling and unit rows);
* unit-row normalisation (``normalize="l2"``) is not linear: the
  contributions are those of the normalised coordinates (one per input
  column: the column divided by the row's norm); the same holds for
  k-NN's cosine metric, in the coordinates of the rows it compares.
"""

from __future__ import annotations

import numpy as np

from ._eq2 import PRIMAL, eigen_form, neighbor_floors
from ._layout import diff_grid, pad

#: dtype of every contribution (sums of many terms of both signs)
_DT = np.float64


class Explanation:
    """Per-feature contributions to anomaly scores, and the neighbors they
    came from (see :mod:`nonn._explain` for the exact rule).

    Attributes
    ----------
    contributions : ndarray of shape (n_queries, n_features), float64
        Contribution of each input column to each query's anomaly score, in
        the input's column order. Each row sums to ``anomaly_scores`` (to
        floating-point rounding); a contribution can be negative.
    anomaly_scores : ndarray of shape (n_queries,)
        The scores explained, as ``anomaly_score(X)`` returns them.
    neighbors : ndarray of shape (n_queries, k), int64
        Training row ids (rows of the data the model was fitted on, in
        order; rows added by ``partial_fit`` follow) of each query's k
        nearest training points, nearest first.
    neighbor : ndarray of shape (n_queries,), int64
        The training row whose term is the whole score (``KNNN`` with
        ``aggregate="min"``: the neighbor attaining the minimum; ``KNN``
        with ``aggregate="max"`` or ``"kth"``: the k-th neighbor); -1 where
        the score combines all k (sum, mean).
    neighbor_terms : ndarray of shape (n_queries, k)
        Each neighbor's own term (k-NNN: Eq. 2's per-neighbor sum; k-NN:
        the distance), in the order of ``neighbors``.
    feature_names : list of str or None
        The model's column names (``feature_names_in_``), if it has them.
    coordinates : str
        What a feature's contribution is measured in ("input columns", or
        the normalised coordinates when the model normalises rows).
    """

    def __init__(self, contributions, anomaly_scores, neighbors, neighbor, neighbor_terms,
                 feature_names=None, coordinates="input columns"):
        self.contributions = contributions
        self.anomaly_scores = anomaly_scores
        self.neighbors = neighbors
        self.neighbor = neighbor
        self.neighbor_terms = neighbor_terms
        self.feature_names = feature_names
        self.coordinates = coordinates

    def __len__(self):
        return self.contributions.shape[0]

    def __repr__(self):
        n, d = self.contributions.shape
        return (f"Explanation({n} queries x {d} features, k={self.neighbors.shape[1]}, "
                f"coordinates={self.coordinates!r})")

    @property
    def shares(self):
        """``contributions / anomaly_scores`` (each row sums to 1; 0 where a
        score is 0)."""
        s = np.asarray(self.anomaly_scores, dtype=_DT)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(s != 0, self.contributions / np.where(s != 0, s, 1), 0.0)

    def top(self, n=5):
        """The ``n`` largest contributions of each query: ``(columns,
        contributions)``, both of shape (n_queries, n), largest first (ties:
        lower column first). ``columns`` are column indices; map them with
        ``feature_names`` when the model has names."""
        n = int(min(max(n, 0), self.contributions.shape[1]))
        c = self.contributions
        # stable sort of the negated values: ties keep the lower column first
        order = np.argsort(-c, axis=1, kind="stable")[:, :n]
        return order, np.take_along_axis(c, order, axis=1)

    def feature_name(self, column):
        """Name of input column ``column`` (its index as text without names)."""
        if self.feature_names is None:
            return f"x{int(column)}"
        return str(self.feature_names[int(column)])


# ------------------------------------------------------------- gradients
def primal_weights(diff, evecs, evals, sizes, floor):
    """Per-feature gradient ``a`` of Eq. 2's per-neighbor term with respect
    to the difference, primal form: ``term = sum(diff * a)`` exactly.

    diff : (..., S, L) float64 differences on the padded set grid
    evecs : (..., S, L, L) eigenvectors (columns), evals : (..., S, L)
    sizes : (S,) set sizes, floor : (S,) or (..., S) absolute floors
    returns (..., S, L) float64 (0 on padding)
    """
    L = evals.shape[-1]
    valid = np.arange(L)[None, :] < np.asarray(sizes)[:, None]  # (S, L): features, directions
    V = evecs.astype(_DT, copy=False)
    e = evals.astype(_DT, copy=False)
    fl = np.asarray(floor, dtype=_DT)
    floored = e <= fl[..., None]
    free = valid & ~floored
    low = valid & floored
    proj = np.einsum("...a,...aj->...j", diff, V)
    w = np.where(free, np.sign(proj) / np.sqrt(np.where(free, e, 1.0)), 0.0)
    a = np.einsum("...aj,...j->...a", V, w)
    low_proj = np.where(low, proj, 0.0)
    norm = np.sqrt(np.einsum("...j,...j->...", low_proj, low_proj))  # ||P_F d|| (..., S)
    pf = np.einsum("...aj,...j->...a", V, low_proj)  # P_F d
    scale = np.where(norm > 0, 1.0 / (np.where(norm > 0, norm, 1.0) * np.sqrt(fl)), 0.0)
    a += pf * scale[..., None]
    return np.where(valid, a, 0.0)


def dual_weights(diff, Xg, groups, U, w, sizes, set_size, floor):
    """Per-feature gradient of Eq. 2's per-neighbor term, dual form (sets
    larger than a neighborhood): ``term = sum(diff * a)`` exactly.

    diff : (m, D) float64 differences in grid order; groups : (m, K') the
    neighborhood each eigen-state was computed from; U : (m, S, K', K'),
    w : (m, S, K') the dual eigen-state; floor : (S,) or (m, S) absolute
    floors; returns (m, D) float64.
    """
    m, Kp = groups.shape
    fl = np.broadcast_to(np.asarray(floor, dtype=_DT), (m, len(sizes)))
    out = np.zeros(diff.shape, dtype=_DT)
    for s, r in enumerate(np.asarray(sizes)):
        off = s * set_size
        cols = slice(off, off + int(r))
        d = diff[:, cols]  # (m, r)
        G = Xg[groups, cols].astype(_DT)  # (m, K', r)
        G -= G.mean(axis=1, keepdims=True)
        e = w[:, s].astype(_DT)  # (m, K')
        kept = e > fl[:, s, None]
        root = np.sqrt(np.where(kept, Kp * e, 1.0))
        # projections d . v_j with v_j = G^T u_j / sqrt(K' e_j)
        Gd = np.einsum("mka,ma->mk", G, d)
        proj = np.where(kept, np.einsum("mk,mkj->mj", Gd, U[:, s].astype(_DT)) / root, 0.0)
        coef = np.where(kept, np.sign(proj) / np.sqrt(np.where(kept, e, 1.0)) / root, 0.0)
        a = np.einsum("mka,mkj,mj->ma", G, U[:, s].astype(_DT), coef)
        # the floored rest: P_F d = d - sum_kept proj_j v_j, ||P_F d||^2 = |d|^2 - |proj|^2
        rest = np.einsum("ma,ma->m", d, d) - np.einsum("mj,mj->m", proj, proj)
        pf = d - np.einsum("mka,mkj,mj->ma", G, U[:, s].astype(_DT),
                           np.where(kept, proj / root, 0.0))
        ok = rest > 0
        scale = np.where(ok, 1.0 / (np.sqrt(np.where(ok, rest, 1.0)) * np.sqrt(fl[:, s])), 0.0)
        out[:, cols] = a + pf * scale[:, None]
    return out


# ------------------------------------------------------ back to the input
def _whitening(det):
    W = getattr(det, "whiten_matrix_", None)
    return W if W is not None and getattr(det, "whiten_", 0) else None


def _coordinates(det):
    if getattr(det, "normalize_", None) == "l2":
        return "unit-row (normalize='l2') coordinates of the input columns"
    return "input columns"


def input_contributions(det, diff, a):
    """Contributions per input column from working-space differences
    ``diff`` and gradients ``a`` (both (m, D), in the working space's column
    order, i.e. after undoing any feature re-ordering): ``diff * a``, mapped
    back through the whitening matrix when the model whitens."""
    W = _whitening(det)
    if W is None:
        return diff * a
    W = W.astype(_DT)
    # d_white = d W (W symmetric): d_white . a = d . (W a)
    d = np.linalg.solve(W, diff.T).T
    return d * (a @ W)


def _ungrid(det, A):
    """Columns of ``A`` (m, D) from grid order back to the working order."""
    order = getattr(det, "feature_order_", None)
    if order is None:
        return A
    out = np.empty_like(A)
    out[:, order] = A
    return out


def _finish(det, contributions, scores, neighbors, neighbor, terms):
    names = getattr(det, "feature_names_in_", None)
    return Explanation(
        contributions=contributions,
        anomaly_scores=det._to_user_units(scores),
        neighbors=np.asarray(neighbors, dtype=np.int64),
        neighbor=np.asarray(neighbor, dtype=np.int64),
        neighbor_terms=det._to_user_units(np.asarray(terms)),
        feature_names=None if names is None else [str(n) for n in names],
        coordinates=_coordinates(det),
    )


# ------------------------------------------------------------ detectors
def explain_knnn(det, X):
    """:meth:`nonn.KNNN.explain`."""
    if not isinstance(getattr(det, "_fit_X", None), np.ndarray) and hasattr(det, "to_knnn"):
        # a model whose state lives on a cluster: explain with the gathered
        # single-machine model (the same neighbors, eigen-states and scores)
        return explain_knnn(det.to_knnn(), X)
    Xp = det._validate_query(X)
    n, D = Xp.shape
    k = det.n_neighbors_
    contrib = np.zeros((n, D), dtype=_DT)
    scores = np.empty(n, dtype=Xp.dtype)
    neighbors = np.empty((n, k), dtype=np.int64)
    neighbor = np.full(n, -1, dtype=np.int64)
    terms_all = np.empty((n, k), dtype=Xp.dtype)
    Kp = det.neighborhoods_.shape[1]
    form = eigen_form(det.set_size_, Kp)
    lean = det.memory == "lean"
    row_bytes = 8 * k * (D * (4 + (Kp if form != PRIMAL else det.set_size_)) + 64)
    for sl in det._query_chunks(n, row_bytes, "explanations"):
        Qg = det._to_grid(Xp[sl])
        idx = det._query_neighbors(Qg)
        if lean:
            uniq, inv = np.unique(idx, return_inverse=True)
            w, v = det._eigen_of(uniq)
            eidx, rows = inv.reshape(idx.shape), uniq
        else:
            w, v, eidx, rows = det.eigenvalues_, det.eigenvectors_, idx, None
        terms = det._terms(Qg, eidx, v, w, rows=rows)
        if det.aggregate == "min":
            pick = np.argmin(terms, axis=1)
            scores[sl] = terms[np.arange(len(idx)), pick]
            neighbor[sl] = idx[np.arange(len(idx)), pick]
            pairs_q = np.arange(len(idx))
            pairs_e = eidx[pairs_q, pick]
            pairs_x = idx[pairs_q, pick]
        else:
            scores[sl] = terms.sum(axis=1)
            pairs_q = np.repeat(np.arange(len(idx)), k)
            pairs_e = eidx.reshape(-1)
            pairs_x = idx.reshape(-1)
        neighbors[sl] = idx
        terms_all[sl] = terms
        diff = Qg[pairs_q].astype(_DT) - det._fit_X[pairs_x].astype(_DT)
        sizes, L = det.set_sizes_, det.set_size_
        floors = neighbor_floors(w[pairs_e], sizes, det.eig_floor_, det._floor_local())
        if form == PRIMAL:
            grid = pad(diff, len(sizes) * L).reshape(-1, len(sizes), L)
            a = primal_weights(grid, v[pairs_e], w[pairs_e], sizes, floors)
            a = a.reshape(len(pairs_q), -1)[:, :D]
        else:
            groups = det.neighborhoods_[pairs_x]
            a = dual_weights(diff, det._fit_X, groups, v[pairs_e], w[pairs_e], sizes, L, floors)
        c = input_contributions(det, _ungrid(det, diff), _ungrid(det, a))
        contrib[sl] = c if det.aggregate == "min" else c.reshape(len(idx), k, D).sum(axis=1)
    return _finish(det, contrib, scores, neighbors, neighbor, terms_all)


def explain_knn(det, X):
    """:meth:`nonn.KNN.explain`: a distance ``||d||`` is split as
    ``d_f^2 / ||d||`` (Euclidean), ``||u_q - u_x||^2 / 2`` as
    ``(u_q - u_x)_f^2 / 2`` (cosine, on unit rows)."""
    from ._preprocess import l2_rows

    Xp = det._validate_query(X)
    n, D = Xp.shape
    k = det.n_neighbors_
    contrib = np.zeros((n, D), dtype=_DT)
    scores = np.empty(n, dtype=Xp.dtype)
    neighbors = np.empty((n, k), dtype=np.int64)
    neighbor = np.full(n, -1, dtype=np.int64)
    dists = np.empty((n, k), dtype=Xp.dtype)
    cosine = det.metric == "cosine"
    for sl in det._query_chunks(n, 8 * k * D * 4, "explanations"):
        Q = det._transform(Xp[sl])
        dist, idx = det._search.kneighbors(Q, k)
        scores[sl] = det._from_neighbors(Q, dist, idx)
        neighbors[sl], dists[sl] = idx, dist
        q = Q.astype(_DT)[:, None, :]
        x = det._fit_X[idx].astype(_DT)
        if cosine:
            u = l2_rows(q.reshape(-1, D)).reshape(q.shape) - l2_rows(x.reshape(-1, D)).reshape(
                x.shape)
            c = 0.5 * u * u  # the rows the cosine distance compares
        else:
            d = q - x
            norm = np.sqrt(np.einsum("qkf,qkf->qk", d, d))[..., None]
            a = np.where(norm > 0, d / np.where(norm > 0, norm, 1.0), 0.0)
            c = input_contributions(det, d.reshape(-1, D), a.reshape(-1, D)).reshape(d.shape)
        if det.aggregate == "mean":
            contrib[sl] = c.mean(axis=1)
        else:  # "max" and "kth": the k-th (farthest) neighbor's distance
            contrib[sl] = c[:, -1]
            neighbor[sl] = idx[:, -1]
    if det._scores_carry_units:
        contrib = np.ldexp(contrib, -det._data_scale_exponent())
    return _finish(det, contrib, scores, neighbors, neighbor, dists)


def explain_global(det, X):
    """:meth:`nonn.GlobalEigenKNN.explain`: Eq. 3's ``|d_i . v_j| /
    sqrt(max(e_j, floor))`` split as ``sign(d_i . v_j) d_if v_jf / ...``,
    summed over the k neighbors ``i``."""
    Xp = det._validate_query(X)
    n, D = Xp.shape
    k = det.n_neighbors_
    V = det.components_.astype(_DT)
    wts = 1.0 / np.sqrt(np.maximum(det.eigenvalues_.astype(_DT), float(det.eig_floor_[0])))
    contrib = np.zeros((n, D), dtype=_DT)
    scores = np.empty(n, dtype=Xp.dtype)
    neighbors = np.empty((n, k), dtype=np.int64)
    terms = np.empty((n, k), dtype=_DT)
    for sl in det._query_chunks(n, 8 * k * D * 6, "explanations"):
        Q = Xp[sl]
        dist, idx = det._search.kneighbors(Q, k)
        scores[sl] = det._from_neighbors(Q, dist, idx)
        neighbors[sl] = idx
        d = Q.astype(_DT)[:, None, :] - det._fit_X[idx].astype(_DT)  # (q, k, D)
        proj = d @ V
        terms[sl] = np.abs(proj) @ wts
        a = (np.sign(proj) * wts) @ V.T
        c = input_contributions(det, d.reshape(-1, D), a.reshape(-1, D))
        contrib[sl] = c.reshape(d.shape).sum(axis=1)
    return _finish(det, contrib, scores, neighbors, np.full(n, -1), terms)


def explain_local(det, X):
    """:meth:`nonn.LocalEigenKNN.explain`: the eigenvectors of the query's
    own k neighbors, each neighbor's difference split as in k-NNN's
    primal form, summed over the k neighbors."""
    from ._eq2 import PRIMAL, neighborhood_eigen, shared_score_terms

    Xp = det._validate_query(X)
    n, D = Xp.shape
    k = det.n_neighbors_
    sizes, L = det.set_sizes_, det.set_size_
    S = len(sizes)
    contrib = np.zeros((n, D), dtype=_DT)
    scores = np.empty(n, dtype=Xp.dtype)
    neighbors = np.empty((n, k), dtype=np.int64)
    terms = np.empty((n, k), dtype=Xp.dtype)
    for sl in det._query_chunks(n, 8 * k * S * L * (3 * L + 6), "explanations"):
        Qg = det._transform(Xp[sl])
        dist, idx = det._search.kneighbors(Qg, k)
        scores[sl] = det._from_neighbors(Qg, dist, idx)
        neighbors[sl] = idx
        w, v = neighborhood_eigen(det._fit_X, idx, sizes, L, det.n_jobs_, form=PRIMAL)
        diff = diff_grid(Qg, det._fit_X, idx, sizes, L)  # (q, k, S, L)
        terms[sl] = shared_score_terms(Qg, idx, det._fit_X, v, w, sizes, L, det.eig_floor_,
                                       det.n_jobs_)
        a = primal_weights(diff.astype(_DT), v[:, None], w[:, None], sizes, det.eig_floor_)
        q = len(idx)
        dg = diff.astype(_DT).reshape(q * k, -1)[:, :D]
        ag = a.reshape(q * k, -1)[:, :D]
        c = input_contributions(det, _ungrid(det, dg), _ungrid(det, ag))
        contrib[sl] = c.reshape(q, k, D).sum(axis=1)
    return _finish(det, contrib, scores, neighbors, np.full(n, -1), terms)
