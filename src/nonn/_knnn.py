"""The k-NNN estimator (Nizan & Tal, Eq. 2)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np

from ._base import (LOCAL_FLOOR_MIN, BaseDetector, CappedParameterWarning, calibration_rows, cap,
                    floor_spread, resolve_floor, resolve_floor_ref, resolve_set_size,
                    row_keys, trace_moments, warn_contaminated)
from ._eq2 import aggregate_terms, eigen_row_bytes, eigen_width, neighborhood_eigen, score_terms
from ._layout import GRID_STATE_SPEC, absolute_floors, fit_grid, permute
from ._state import Array, Dict, Int, Optional, Real, Str
from ._validation import Interval, IsNone, Options


def resolve_counts(n_samples, n_features, counts):
    """``(k, K', L)`` a fit on ``n_samples`` rows of ``n_features`` columns
    uses for the ``counts`` (``n_neighbors``, ``n_neighbors_of_neighbors``,
    ``set_size``: given, or picked by the selection of "auto" values); a
    count the data cannot hold is capped with a
    :class:`~nonn._base.CappedParameterWarning`."""
    # a training row is scored against the n - 1 others (held out)
    k = cap(counts["n_neighbors"], n_samples - 1, "n_neighbors",
            "the number of other training points")
    Kp = cap(counts["n_neighbors_of_neighbors"], n_samples, "n_neighbors_of_neighbors",
             "the number of training points")
    return k, Kp, resolve_set_size(counts["set_size"], n_features)


def search_width(n_samples, n_neighbors, n_neighbors_of_neighbors):
    """Nearest other rows a fit finds per training row: the K' - 1 of its
    neighborhood and one more, which replaces a calibration row that
    leaves the neighborhood (see :func:`held_out_groups`), or k when
    larger; at most the n - 1 others."""
    return min(max(n_neighbors_of_neighbors, n_neighbors), n_samples - 1)


def neighborhoods(others, n_neighbors_of_neighbors, first_id=0):
    """Each row's neighborhood: the row itself (column 0; rows numbered
    from ``first_id``) and its K' - 1 nearest others (``others``, nearest
    first)."""
    own = np.arange(first_id, first_id + others.shape[0], dtype=np.int64)[:, None]
    return np.concatenate([own, others[:, :n_neighbors_of_neighbors - 1]], axis=1)


def held_out_groups(held, nbrs, cand, n_neighbors_of_neighbors):
    """The neighborhood of neighbor ``nbrs[i]`` as a fit without the
    training row ``held[i]`` would find it: ``nbrs[i]``, then the first
    K' - 1 of its nearest other rows ``cand[i]`` (nearest first; one more
    than a neighborhood needs) that are not ``held[i]``. (c, K') ids, fewer
    columns when ``cand`` holds every other row."""
    width = min(n_neighbors_of_neighbors - 1, cand.shape[-1] - 1)
    keep = cand != held[:, None]
    first = np.argsort(~keep, axis=-1, kind="stable")[:, :width]
    return np.concatenate([nbrs[:, None], np.take_along_axis(cand, first, -1)], axis=-1)


def pair_terms(Qg, Xg, groups, sizes, set_size, floor, n_jobs=1, local=None):
    """Eq. 2's sum of each grid query ``Qg[i]`` against the neighbor
    ``groups[i, 0]`` with the eigen-state of the neighborhood
    ``groups[i]`` (rows of ``Xg``), computed here (``floor``, ``local``:
    see :func:`nonn._eq2.score_terms`)."""
    w, v = neighborhood_eigen(Xg, groups, sizes, set_size, n_jobs)
    own = np.arange(len(groups), dtype=np.int64)[:, None]
    return score_terms(Qg, own, Xg, v, w, sizes, set_size, floor, n_jobs,
                       rows=groups[:, 0], groups=groups, local=local)[:, 0]


def floor_base(eig_floor_rel, eig_floor_ref):
    """The data-relative floor behind ``eig_floor_``: the relative floor
    itself, or with a neighborhood-relative floor only the minimum
    (:data:`~nonn._base.LOCAL_FLOOR_MIN`), each neighbor's floor being
    raised to ``eig_floor_rel`` times its neighborhood's variance."""
    return LOCAL_FLOOR_MIN if eig_floor_ref == "neighborhood" else eig_floor_rel


def neighborhood_traces(Xg, groups, n_jobs=1):
    """Each neighborhood's total variance (the trace of its covariance,
    divisor K'), from its rows ``groups`` of ``Xg``."""
    from . import _eq2_kernels
    from ._threads import numba_threads

    groups = np.ascontiguousarray(groups, dtype=np.int64)
    out = np.empty(groups.shape[0])
    with numba_threads(n_jobs, groups.size * Xg.shape[1]):
        _eq2_kernels.neighborhood_traces(Xg, groups, out)
    return out


def floor_local(eig_floor_rel, eig_floor_ref, n_sets):
    """The per-set ``local`` coefficients of :func:`nonn._eq2.score_terms`
    (None for a data-relative floor)."""
    return np.full(n_sets, float(eig_floor_rel)) if eig_floor_ref == "neighborhood" else None


#: The label-free selection grid (``"auto"`` parameters), in trial order; the
#: first value of each is the class default, so ties keep the default.
AUTO_GRID = {
    "n_neighbors": (3, 1, 10),
    "n_neighbors_of_neighbors": (50, 10, 25),
    "set_size": (5, 10, 20),
}
#: fractions of features swapped in the synthetic outliers of the selection
AUTO_RHO = (0.05, 0.25, 1.0)
#: candidates within this synthetic AUROC of the best count as tied
AUTO_TIE = 1e-3


def _eigen_width(arr, sym):
    """Spec check: eigen-pairs per set are L (primal) or K' (dual form)."""
    want = eigen_width(sym["L"], sym["Kp"])
    if sym["R"] != want:
        return (f"must hold {want} eigen-pairs per set (L={sym['L']}, K'={sym['Kp']}); it "
                f"holds {sym['R']}.")
    return None


def _no_self(arr, sym):
    """Spec check: no row is among its own neighbors."""
    if (arr == np.arange(arr.shape[0])[:, None]).any():
        return "lists a row among its own neighbors."
    return None


class KNNN(BaseDetector):
    """k nearest neighbors of neighbors anomaly detector.

    Fit stores, for every training point and every feature set, the
    eigenvectors and eigenvalues of the covariance of its neighborhood (the
    point itself and its ``n_neighbors_of_neighbors - 1`` nearest other
    training points). For a query ``f`` and each of its ``n_neighbors``
    nearest training points ``f_i``, the per-neighbor sum of Eq. 2 is::

        AS_i(f) = sum_s sum_j |(f_s - f_{i,s}) . v_{i,j,s}| / sqrt(e_{i,j,s})

    The paper's anomaly score (Eq. 2) is their sum over i
    (``aggregate="sum"``); nonn's default takes their minimum
    (``aggregate="min"``), which the defaults study (docs/defaults-study.md)
    found at least as accurate on every suite.

    The defaults differ from the paper's settings where the defaults study
    measured a gain: one set of all features (``set_size="all"``, computed
    through each neighborhood's K' x K' Gram matrix, so its cost does not
    grow with the set), and ``normalize``/``whiten``/``eig_floor`` chosen
    from the number of features (``"auto"``: embeddings, 64 features or
    more, get unit-length rows, whitening 0.5 and floor 0.1; tabular data
    none, none and floor 1.0), the floor relative to each neighborhood where
    the training data are populations of different spread
    (``eig_floor_ref="auto"``). The paper-exact operator is one call away:
    :meth:`KNNN.paper` (K' = 25, L = 5, the paper's sum, no floor beyond
    the numerically safe one, the rows as given).

    Parameters
    ----------
    n_neighbors : int or "auto", default=3
        k, neighbors of a query.
    n_neighbors_of_neighbors : int or "auto", default=25
        K', size of each training point's neighborhood (itself included),
        as in the paper.
    set_size : int, "all" or "auto", default="all"
        L, features per set; the last set may be shorter (never dropped).
        ``"all"``: one set of every feature. A set larger than K' is
        decomposed through its neighborhood's K' x K' Gram matrix (the dual
        form: O(K'^2 D) per point, K' x K' numbers stored per point), and
        the directions the neighborhood does not span get the floor. The
        paper's L is 5.
    reorder : {"greedy", "none"}, default="greedy"
        The paper's greedy correlation ordering of the features before they
        are cut into sets, or keep the given order.
    eig_floor : float or "auto", default="auto"
        Relative eigenvalue floor: eigenvalues of a set are floored at
        ``eig_floor`` times the mean training variance of the set's features.
        ``"auto"``: 0.1 for embeddings (64 features or more), 1.0 for
        tabular data.
        Keeps singular neighborhoods finite and makes the score invariant to
        a uniform rescaling of the data. ``0`` means the smallest safe floor
        (10 machine epsilons), the closest to the paper's unfloored maths.
    eig_floor_ref : {"auto", "data", "neighborhood"}, default="auto"
        What ``eig_floor`` is relative to: ``"data"``, the training data's
        mean variance per feature of the set (one floor for every
        neighbor); ``"neighborhood"``, each neighbor's own neighborhood
        (``eig_floor`` times the mean of its eigenvalues over the set's
        features, never below 1e-6 of the data's), so that the floor
        follows the local scale: right when the normal data are several
        populations of different spread (several products or categories
        in one model; MVTec unions +0.05 AUROC), wrong for novelty within
        one population (one-class CIFAR-10 ResNet-18 embeddings -0.03,
        tabular data -0.02 to -0.03). ``"auto"`` (label-free): the
        neighborhood's on embeddings (64 features or more) whose
        neighborhoods' total variances spread by more than a factor
        e^0.6 (standard deviation of their logarithm; 1.3-1.5 on the
        MVTec unions, at most 0.28 on single categories or classes), the
        data's otherwise (``eig_floor_ref_`` says which;
        docs/defaults-study.md, round three).
    aggregate : {"min", "sum"}, default="min"
        How the k per-neighbor sums combine: "sum" is the paper's Eq. 2,
        "min" the smallest of them.
    memory : {"precomputed", "lean"}, default="precomputed"
        "precomputed" stores every training point's eigen-state, as the
        paper does (n_samples * n_features * set_size values): fastest
        scoring. "lean" stores only the n_samples x K' neighborhood graph
        and computes the eigen-state of each query's k neighbors when it
        scores (memory O(n_samples * n_features); the same scores; scoring
        does up to k eigen-decompositions per query more).
    normalize : {None, "l2", "auto"}, default="auto"
        ``"auto"``: ``"l2"`` for embeddings (64 features or more), None
        otherwise (``normalize_`` says which).
        ``"l2"`` scales every row (training and query) to unit length first,
        so that neighbors and Eq. 2 compare directions, not norms (the
        usual preprocessing of CNN embeddings; cosine k-NN is Euclidean
        k-NN of unit rows).
    whiten : float in [0, 1] or "auto", default="auto"
        ``"auto"``: 0.5 for embeddings (64 features or more), 0 otherwise
        (``whiten_`` says which). Global whitening after ``normalize``: the data are multiplied by
        the inverse square root of their Ledoit-Wolf covariance blended
        with an isotropic one (``whiten`` = the weight of the Ledoit-Wolf
        part; 1 whitens fully, 0 not at all), learned at fit. It shrinks
        the local operator toward the global Gaussian: the eigenvalue floor
        and the directions a neighborhood does not span are measured in
        the global covariance's metric. Costs O(D^2) memory and
        O(N D^2) time.
    metric : {"euclidean", "cosine"}, default="euclidean"
        Distance used to find neighbors (Eq. 2 itself is unchanged).
    backend : str, default="auto"
        Search backend by name (see :mod:`nonn.neighbors`); the fitted
        attribute ``backend_`` says which one "auto" picked.
    backend_params : dict, default=None
        Extra keyword arguments for the backend. With an approximate FAISS
        index, ``{"refine": 1}`` or more refines the training graph by
        neighbors of neighbors (see :class:`nonn.neighbors.faiss.FaissBackend`)
        and each query's k neighbors once against the stored neighborhoods.
    contamination : "auto" or float in (0, 0.5], default="auto"
        Share of normal data to flag, set on held-out scores of training
        rows (each scored as by a model fitted without it); "auto" = 0.01.
    scale : {None, "standard", "minmax", "robust"}, default=None
        Per-column scaling learned at fit and applied to every query (for
        tabular data whose columns have different units): scikit-learn's
        StandardScaler, MinMaxScaler or RobustScaler statistics, stored as
        ``scale_center_`` and ``scale_factor_``; a constant column is left
        at 0. None feeds the features as given (embeddings).
    random_state : int or None, default=None
        Seed of the label-free selection of "auto" parameters (its 80/20
        split and synthetic outliers); unused otherwise.
    working_memory : float, default=None
        MiB for one chunk of work (None: scikit-learn's ``working_memory``).
    n_jobs : int, default=None
        Threads for the batched eigen-decompositions; None = all cores.
    verbose : bool, default=False
        Progress bars on long work.

    Attributes
    ----------
    n_neighbors_, n_neighbors_of_neighbors_, set_size_ : int
        The counts used (capped to the data with a warning when too large,
        or chosen by the "auto" selection).
    eig_floor_rel_ : float
        The relative eigenvalue floor used.
    auto_params_ : dict or None
        The values the label-free selection picked for the "auto"
        parameters; None when no parameter is "auto".
    auto_table_ : list of (dict, float) or None
        Every candidate of the selection with its mean synthetic AUROC,
        best first.
    feature_order_ : ndarray (n_features,)
        Column permutation applied before the partition.
    set_sizes_ : ndarray (n_sets,)
    neighborhoods_ : ndarray (n_samples, n_neighbors_of_neighbors_)
        Ids of each training point's neighborhood; column 0 is the point.
    eigenvalues_ : ndarray (n_samples, n_sets, set_size_)
        Ascending per set; the padding of a shorter last set is 0.
        Absent with ``memory="lean"``.
    eigenvectors_ : ndarray (n_samples, n_sets, set_size_, set_size_)
        ``eigenvectors_[p, s, :, j]`` is eigenvector j of point p, set s.
        Absent with ``memory="lean"``.
    eig_floor_ref_ : str
        ``"data"`` or ``"neighborhood"`` (``"auto"`` resolved).
    eig_floor_spread_ : float or None
        The spread ``"auto"`` decided on (None when it was not "auto").
    eig_floor_ : ndarray (n_sets,)
        Absolute eigenvalue floor per set (with a neighborhood-relative
        floor, the least floor any neighbor gets).
    scale_center_, scale_factor_ : ndarray (n_features,)
        With ``scale``: the data are ``(X - scale_center_) / scale_factor_``
        before anything else (training rows and queries alike).
    calibration_rows_ : ndarray (C,)
        The training rows (at most 2,000, seeded) scored held out.
    calibration_scores_, train_scores_ : ndarray (C,)
        Their held-out ``score_samples``: behind ``offset_`` and
        :meth:`pvalue`.
    normalize_, whiten_ : str or None, float
        The row normalisation and whitening strength used ("auto" resolved).
    offset_ : float
        Threshold on ``score_samples``; ``decision_function = score_samples - offset_``.
    backend_ : str
    data_scale_exponent_ : int
        The training data and every query are multiplied by
        ``2**data_scale_exponent_`` before the search and Eq. 2 (exact in
        floating point), so that data of any finite scale score alike; 0
        for data of ordinary scale (RMS entry in [2**-16, 2**16]). The
        stored arrays (``eigenvalues_``, ``eig_floor_``, ...) are at that
        working scale.

    Notes
    -----
    Ties among equidistant neighbors are broken by the search backend:
    "brute" (and FAISS's exact "Flat" index) take the lowest training row
    id, scikit-learn's trees ("auto" with 3 features or fewer) and torch's
    ``topk`` an unspecified one. On heavily tied data (many distinct rows at
    equal distances, as with binary features) the neighborhoods, hence the
    scores, then depend on the order of the training rows; exact copies
    alone do not matter (see the README, "Choices the paper leaves open").

    References
    ----------
    O. Nizan and A. Tal, "k-NNN: Nearest Neighbors of Neighbors for Anomaly
    Detection", WACV Workshops 2024, arXiv:2305.17695.

    Examples
    --------
    >>> import numpy as np
    >>> from nonn import KNNN
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 8))
    >>> det = KNNN(n_neighbors=3, n_neighbors_of_neighbors=25).fit(X)
    >>> det.predict(np.vstack([X[:2], 10 + X[:1]])).tolist()
    [1, 1, -1]
    """

    #: the paper's settings (Nizan & Tal, Section 4): K' = 25, five features
    #: per set, Eq. 2's sum over the k neighbors, no floor beyond the
    #: numerically safe one, rows as given
    PAPER_PARAMS = dict(n_neighbors=3, n_neighbors_of_neighbors=25, set_size=5,
                        reorder="greedy", eig_floor=0.0, eig_floor_ref="data", aggregate="sum",
                        normalize=None, whiten=0.0)

    @classmethod
    def paper(cls, **params):
        """The paper-exact operator: ``cls(**PAPER_PARAMS)``, any parameter
        overridable (``KNNN.paper(n_neighbors=5)``)."""
        return cls(**{**cls.PAPER_PARAMS, **params})

    _constraints = {
        "n_neighbors": [Interval("int", 1, None), Options("auto")],
        "n_neighbors_of_neighbors": [Interval("int", 1, None), Options("auto")],
        "set_size": [Interval("int", 1, None), Options("auto", "all")],
        "reorder": [Options("greedy", "none")],
        "eig_floor": [Interval("real", 0, None), Options("auto")],
        "eig_floor_ref": [Options("auto", "data", "neighborhood")],
        "aggregate": [Options("min", "sum")],
        "memory": [Options("precomputed", "lean")],
        "random_state": [IsNone(), Interval("int", 0, None)],
    }
    _hints = {**BaseDetector._hints, "aggregate": "'min'", "memory": "'lean'",
              "random_state": 0}
    _state_arrays = (
        "_fit_X", "feature_order_", "set_sizes_", "neighborhoods_", "eigenvalues_",
        "eigenvectors_", "eig_floor_", "train_scores_",
    )
    #: the search's neighbors beyond the neighborhoods (partial_fit reads
    #: them; a model without them rescores every calibration row)
    _optional_arrays = ("_graph_tail",)
    _state_scalars = (
        "n_neighbors_", "n_neighbors_of_neighbors_", "set_size_", "eig_floor_rel_", "offset_",
        "contamination_", "threshold_source_", "backend_", "auto_params_",
        "data_scale_exponent_", "normalize_", "whiten_", "eig_floor_ref_", "eig_floor_spread_",
    )
    _state_spec = {
        **BaseDetector._state_spec,
        **GRID_STATE_SPEC,
        "neighborhoods_": Array("N", "Kp", dtype="int64", ids="N"),
        # L x L per set (primal), or K' x K' (dual, L > K'): see nonn._eq2
        "eigenvalues_": Array("N", "S", "R", low=0, check=_eigen_width),
        "eigenvectors_": Array("N", "S", "R", "R"),
        "_graph_tail": Array("N", "T", dtype="int64", ids="N", check=_no_self),
        "n_neighbors_of_neighbors_": Int(1, "N", binds="Kp"),
        "eig_floor_rel_": Real(0, None),
        # a file written before the neighborhood floor: the data's
        "eig_floor_ref_": Str(options=("data", "neighborhood"), default="data"),
        "eig_floor_spread_": Optional(Real(0, None), default=None),
        "auto_params_": Optional(Dict({"n_neighbors": Int(1), "n_neighbors_of_neighbors": Int(1),
                                       "set_size": Int(1)})),
    }

    def __init__(
        self,
        n_neighbors=3,
        n_neighbors_of_neighbors=25,
        set_size="all",
        reorder="greedy",
        eig_floor="auto",
        eig_floor_ref="auto",
        aggregate="min",
        memory="precomputed",
        normalize="auto",
        whiten="auto",
        metric="euclidean",
        backend="auto",
        backend_params=None,
        contamination="auto",
        scale=None,
        random_state=None,
        working_memory=None,
        n_jobs=None,
        verbose=False,
    ):
        self.n_neighbors = n_neighbors
        self.n_neighbors_of_neighbors = n_neighbors_of_neighbors
        self.set_size = set_size
        self.reorder = reorder
        self.eig_floor = eig_floor
        self.eig_floor_ref = eig_floor_ref
        self.aggregate = aggregate
        self.memory = memory
        self.normalize = normalize
        self.whiten = whiten
        self.metric = metric
        self.backend = backend
        self.backend_params = backend_params
        self.contamination = contamination
        self.scale = scale
        self.random_state = random_state
        self.working_memory = working_memory
        self.n_jobs = n_jobs
        self.verbose = verbose

    @classmethod
    def _state_arrays_for(cls, params):
        names = super()._state_arrays_for(params)
        if params.get("memory") == "lean":
            return tuple(a for a in names if a not in ("eigenvalues_", "eigenvectors_"))
        return names

    # ------------------------------------------------------------------ fit
    def _fit(self, X):
        n, d = X.shape
        counts = self._resolve_auto(X)
        self.n_neighbors_, self.n_neighbors_of_neighbors_, L = resolve_counts(n, d, counts)
        self.eig_floor_rel_ = resolve_floor(self.eig_floor, d)
        Xg = fit_grid(self, X, L, self.eig_floor_rel_)
        self._fit_X = Xg
        self._search = self._make_backend(Xg)
        Kp = self.n_neighbors_of_neighbors_
        # ids only, in the backend's own order: the neighborhoods and the
        # held-out neighbors need no distances
        others = self._search.kneighbors(None, search_width(n, self.n_neighbors_, Kp),
                                         return_distance=False)
        self.neighborhoods_ = neighborhoods(others, Kp)
        # the neighbors beyond the neighborhoods: partial_fit's held-out
        # scores need them
        self._graph_tail = np.ascontiguousarray(others[:, Kp - 1:])
        if self.memory != "lean":
            self._fit_eigen()
        if self.eig_floor_ref == "auto":  # the neighborhoods' total variances
            traces = (self.eigenvalues_.sum(axis=(1, 2), dtype=np.float64)
                      if self.memory != "lean" else
                      neighborhood_traces(Xg, self.neighborhoods_, self.n_jobs_))
            self._set_floor_ref(trace_moments(traces))
        else:
            self._set_floor_ref(None)
        rows = self._calibration_plan(n)
        self.calibration_rows_ = rows
        return self._held_out_scores(rows, others)

    def _calibration_plan(self, n):
        if getattr(self, "whiten_", 0):  # those the whitening left out
            return self.__dict__.pop("_whitening_held")
        return calibration_rows(n, getattr(self, "_calibrate_all", False))

    def _whitening_exclusion(self, X):
        # picked by the values the whitening sees (after unit rows): the same
        # rows in any order, and rows only rescaled, give the same split
        rows = None if getattr(self, "_calibrate_all", False) else \
            calibration_rows(X.shape[0], keys=row_keys(X))
        self._whitening_held = rows
        return rows

    def _resolve_auto(self, X):
        """The counts (``n_neighbors``, ``n_neighbors_of_neighbors``,
        ``set_size``) before capping: the given ones, or for "auto" values
        those the label-free selection picks on the (preprocessed) training
        data ``X``, capped to the data silently. Sets ``auto_params_`` and
        ``auto_table_``."""
        auto = [name for name in AUTO_GRID if getattr(self, name) == "auto"]
        if not auto:
            self.auto_params_ = None
            self.auto_table_ = None
            return {name: getattr(self, name) for name in AUTO_GRID}
        chosen, table = self._select_auto(X, auto)
        limits = {"n_neighbors": X.shape[0] - 1, "n_neighbors_of_neighbors": X.shape[0],
                  "set_size": X.shape[1]}
        chosen = {name: (min(v, limits[name]) if name in auto else v)
                  for name, v in chosen.items()}
        self.auto_params_ = {name: chosen[name] for name in auto}
        self.auto_table_ = table
        return chosen

    def _to_grid(self, X):
        """``X`` on the fitted layout (columns re-ordered)."""
        return permute(X, self.feature_order_)

    def _eigen_row_bytes(self):
        return eigen_row_bytes(self._fit_X.dtype.itemsize, len(self.set_sizes_),
                               self.set_size_, self.neighborhoods_.shape[1])

    def _eigen_of(self, points):
        """Eigen-state (values, vectors) of the neighborhoods of ``points``."""
        return neighborhood_eigen(self._fit_X, self.neighborhoods_[points], self.set_sizes_,
                                  self.set_size_, self.n_jobs_)

    def _terms(self, Qg, idx, evecs, evals, rows=None):
        """Per-neighbor Eq. 2 sums (q, k) of grid queries ``Qg``; ``idx``
        indexes rows of the eigen-state ``evecs``/``evals``, whose training
        rows are ``rows`` (None: all of them, in order)."""
        groups = self.neighborhoods_ if rows is None else self.neighborhoods_[rows]
        return score_terms(Qg, idx, self._fit_X, evecs, evals, self.set_sizes_,
                           self.set_size_, self.eig_floor_, self.n_jobs_, rows=rows,
                           groups=groups, local=self._floor_local())

    def _set_floor_ref(self, moments):
        """Resolve ``eig_floor_ref`` (``"auto"`` from the :func:`trace_moments`
        of the neighborhoods' total variances) and set ``eig_floor_``."""
        self.eig_floor_spread_ = None if moments is None else floor_spread(moments)
        self.eig_floor_ref_ = resolve_floor_ref(self.eig_floor_ref, self.n_features_in_,
                                                self.eig_floor_spread_)
        self.eig_floor_ = absolute_floors(floor_base(self.eig_floor_rel_, self.eig_floor_ref_),
                                          self._floor_scale, self._fit_X.dtype)

    def _floor_local(self):
        return floor_local(self.eig_floor_rel_, self.eig_floor_ref_, len(self.set_sizes_))

    def _fit_eigen(self):
        Xg = self._fit_X
        n = Xg.shape[0]
        n_sets, L = len(self.set_sizes_), self.set_size_
        r = eigen_width(L, self.neighborhoods_.shape[1])
        self.eigenvalues_ = np.empty((n, n_sets, r), dtype=Xg.dtype)
        self.eigenvectors_ = np.empty((n, n_sets, r, r), dtype=Xg.dtype)
        for sl in self._query_chunks(n, self._eigen_row_bytes(), "neighborhood eigen"):
            # written in place (the kernels need no intermediate)
            neighborhood_eigen(Xg, self.neighborhoods_[sl], self.set_sizes_, L, self.n_jobs_,
                               out=(self.eigenvalues_[sl], self.eigenvectors_[sl]))

    def _held_out_scores(self, rows, others):
        """Out-of-sample anomaly scores of the training rows ``rows``: each
        row ``p`` is scored as by a model fitted without it — by its k
        nearest other rows, each with the eigen-state of its neighborhood
        *without p* (p, when there, replaced by that neighbor's next
        nearest row; ``others`` holds one more neighbor than a
        neighborhood needs). Keeping p in its neighbors' neighborhoods
        would put the difference to them inside the span of their
        eigenvectors and make these scores optimistic, so that a threshold
        set on them would flag more held-out normals than asked. The
        feature order and the eigenvalue floor, statistics of all rows,
        are kept."""
        Xg = self._fit_X
        k = self.n_neighbors_
        rows = np.arange(Xg.shape[0]) if rows is None else rows
        c = len(rows)
        held = np.repeat(rows, k)  # (c * k,): each row once per neighbor
        nbrs = others[rows, :k].reshape(-1)  # its held-out neighbors
        groups = held_out_groups(held, nbrs, others[nbrs], self.n_neighbors_of_neighbors_)
        terms = np.empty(c * k, dtype=Xg.dtype)
        row_bytes = eigen_row_bytes(Xg.dtype.itemsize, len(self.set_sizes_), self.set_size_,
                                    groups.shape[1])
        for sl in self._query_chunks(c * k, row_bytes, "held-out calibration scores"):
            terms[sl] = pair_terms(Xg[held[sl]], Xg, groups[sl], self.set_sizes_,
                                   self.set_size_, self.eig_floor_, self.n_jobs_,
                                   local=self._floor_local())
        return aggregate_terms(terms.reshape(c, k), self.aggregate)

    def _score_neighbors(self, Qg, idx):
        """Eq. 2 for grid queries ``Qg`` whose neighbors are ``idx`` (q, k)."""
        q, k = idx.shape
        n_sets, L = len(self.set_sizes_), self.set_size_
        out = np.empty(q, dtype=Qg.dtype)
        if self.memory == "lean":
            # the k neighbors' eigen-state, computed here (once per distinct one)
            row_bytes = k * (self._eigen_row_bytes() + Qg.dtype.itemsize * Qg.shape[1])
            for sl in self._query_chunks(q, row_bytes):
                uniq, inv = np.unique(idx[sl], return_inverse=True)
                w, v = self._eigen_of(uniq)
                out[sl] = aggregate_terms(self._terms(Qg[sl], inv.reshape(-1, k), v, w,
                                                      rows=uniq), self.aggregate)
            return out
        row_bytes = Qg.dtype.itemsize * k * n_sets * L * 4
        for sl in self._query_chunks(q, row_bytes):
            out[sl] = aggregate_terms(self._terms(Qg[sl], idx[sl], self.eigenvectors_,
                                                  self.eigenvalues_), self.aggregate)
        return out

    def _anomaly_score(self, X):
        out = np.empty(X.shape[0], dtype=X.dtype)
        row_bytes = X.dtype.itemsize * len(self.set_sizes_) * self.set_size_ * 2
        for sl in self._query_chunks(X.shape[0], row_bytes * 64, "k-NNN queries"):
            Qg = self._to_grid(X[sl])
            idx = self._query_neighbors(Qg)
            out[sl] = self._score_neighbors(Qg, idx)
        return out

    def _query_neighbors(self, Qg):
        """The ``n_neighbors_`` training neighbors (ids) of grid queries,
        refined by the backend against the stored neighborhoods where it
        can (an approximate FAISS index with ``refine``: see
        :meth:`nonn.neighbors.faiss.FaissBackend.refine_neighbors`)."""
        idx = self._search.kneighbors(Qg, self.n_neighbors_, return_distance=False)
        return self._search.refine_neighbors(Qg, idx, self.neighborhoods_)

    def explain(self, X):
        """Per-feature contributions to each query's anomaly score, and the
        training neighbors the score came from.

        Eq. 2 is a sum of ``|d . v_j| / sqrt(e_j)`` over feature sets and
        eigen-directions (``d`` the difference between the query and a
        neighbor); each term is split over the features ``f`` of its set as
        ``sign(d . v_j) * d_f * v_jf / sqrt(e_j)``, which sums to the term
        exactly, and the floored directions' term ``||P_F d|| / sqrt(floor)``
        as ``d_f (P_F d)_f / (||P_F d|| sqrt(floor))``. A contribution can
        be negative. With ``aggregate="min"`` the explanation is that of the
        neighbor attaining the minimum (``neighbor``), with ``"sum"`` the
        sum over the k neighbors. Contributions are per input column, in
        the input's order; with whitening they are mapped back through the
        whitening matrix exactly, with ``normalize="l2"`` they are those of
        the unit-row coordinates (see :mod:`nonn._explain`).

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)

        Returns
        -------
        explanation : :class:`nonn.Explanation`
            ``contributions`` (n_queries, n_features), summing per row to
            ``anomaly_scores`` (= ``anomaly_score(X)``) to floating-point
            rounding; ``neighbors`` (n_queries, k) training row ids;
            ``neighbor`` (n_queries,) the row attaining the minimum (-1 with
            ``aggregate="sum"``); ``neighbor_terms`` (n_queries, k).

        Examples
        --------
        >>> import numpy as np
        >>> from nonn import KNNN
        >>> X = np.random.default_rng(0).normal(size=(200, 6))
        >>> det = KNNN(n_neighbors=3, n_neighbors_of_neighbors=25).fit(X)
        >>> q = X[:1].copy()
        >>> q[0, 4] += 8.0
        >>> ex = det.explain(q)
        >>> int(ex.top(1)[0][0, 0])
        4
        >>> bool(np.isclose(ex.contributions.sum(), det.anomaly_score(q)[0]))
        True
        """
        from ._explain import explain_knnn

        return explain_knnn(self, X)

    def partial_fit(self, X, y=None):
        """Add normal samples ``X`` to the fitted model without a refit.

        The new rows get their neighborhoods, the existing neighborhoods a
        new row enters are updated (only their eigen-states are recomputed),
        and the held-out calibration scores and the threshold are brought up
        to date (only the calibration rows whose neighbors' lists changed
        are rescored). The global statistics of the first fit stay frozen:
        the input transforms (``scale``, the working scale, ``normalize``,
        ``whiten``), the feature order of the sets, the eigenvalue floors
        and any "auto" choice. With an exact backend the result is the model
        a fit on all rows would give with those statistics (neighborhoods,
        eigen-states, calibration scores, threshold); an approximate FAISS
        index is extended with ``add`` (see :mod:`nonn._update` for what is
        guaranteed then). A threshold set by :meth:`calibrate` is replaced
        by the fit's (it scored the model before the update); calibrate
        again if needed. When the first fit capped ``n_neighbors`` or
        ``n_neighbors_of_neighbors`` for lack of rows and the new rows lift
        the cap, the neighborhoods are recomputed in full.

        The cost grows with the new rows and the neighborhoods they enter
        (about ``K' - 1`` per new row): one search of the new rows, one pass
        of distances between old and new rows, and the eigen-states of the
        changed neighborhoods; ``n_samples_seen_`` counts every row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            New normal samples, with the columns (and column names) the
            model was fitted on. On a detector not fitted yet this is
            ``fit(X)``.
        y : ignored

        Returns
        -------
        self
        """
        from ._update import knnn_partial_fit

        return knnn_partial_fit(self, X)

    def fit_predict(self, X, y=None):
        """Fit, then label the training points themselves by their held-out
        scores (each scored as by a model fitted without it, see
        ``calibration_rows_``; here every row is), so about
        ``contamination`` of them are flagged.

        k-NNN is a novelty detector: it models clean normal data. On a
        training set that itself holds anomalies they shape the
        neighborhoods, and their own scores can come out lower than those
        of normal points (see the user guide); this method warns (a
        ``UserWarning``) to say so."""
        warn_contaminated(self)
        self._calibrate_all = True
        try:
            self.fit(X)
        finally:
            del self._calibrate_all
        return np.where(self.train_scores_ - self.offset_ < 0, -1, 1)

    # ------------------------------------------------- label-free selection
    def _select_auto(self, X, auto):
        """Pick the "auto" parameters from the normal training data alone.

        The training rows are split 80/20 (seeded by ``random_state``). Each
        candidate of :data:`AUTO_GRID` (the "auto" parameters vary, the others
        keep their given values) is fitted on the 80 % and scores the held-out
        20 % against synthetic outliers made from them: each is a held-out
        row with a random fraction rho of its features (rho in
        :data:`AUTO_RHO`, at least one feature) replaced by the same features
        of other held-out rows. The candidate with the best mean AUROC wins;
        candidates within :data:`AUTO_TIE` of the best count as tied and the
        first in grid order (the defaults first) is taken. With fewer than 50
        training rows the defaults are kept.
        """
        from sklearn.metrics import roc_auc_score

        grid = {name: (AUTO_GRID[name] if name in auto else (getattr(self, name),))
                for name in AUTO_GRID}
        if grid["set_size"] == ("all",):
            grid["set_size"] = (X.shape[1],)
        first = {name: values[0] for name, values in grid.items()}
        n = X.shape[0]
        n_h = n // 5
        if n_h < 10:
            return first, []
        rng = np.random.default_rng(self.random_state)
        perm = rng.permutation(n)
        H, F = X[perm[:n_h]], X[perm[n_h:]]
        Q = np.vstack([H] + [_swap_features(H, rho, rng) for rho in AUTO_RHO])
        y = np.r_[np.zeros(n_h), np.ones(n_h)]
        nf = F.shape[0]
        kmax = min(max(grid["n_neighbors"]), nf)
        kpmax = min(max(grid["n_neighbors_of_neighbors"]), nf)
        # the counts are chosen with the data's floor unless asked otherwise
        ref = "data" if self.eig_floor_ref == "auto" else self.eig_floor_ref
        probe = KNNN(metric=self.metric, backend=self.backend,
                     backend_params=self.backend_params, working_memory=self.working_memory,
                     n_jobs=self.n_jobs, eig_floor_ref=ref)
        probe.n_jobs_ = self.n_jobs_
        probe.eig_floor_ref_ = ref
        # distances do not depend on the column order: one graph for all L
        search = probe._make_backend(F)
        nbhd = np.concatenate([np.arange(nf, dtype=np.int64)[:, None],
                               search.kneighbors(None, kpmax - 1, return_distance=False)], 1)
        q_idx = search.kneighbors(Q, kmax, return_distance=False)
        results = {}
        done = {}  # set sizes capped at D give the same grid
        fl = resolve_floor(self.eig_floor, X.shape[1])
        for L in grid["set_size"]:
            if min(L, X.shape[1]) in done:
                prev = done[min(L, X.shape[1])]
                results.update({(k, kp, L): a for (k, kp, L0), a in list(results.items())
                                if L0 == prev})
                continue
            done[min(L, X.shape[1])] = L
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CappedParameterWarning)
                Fg = fit_grid(probe, F, resolve_set_size(L, F.shape[1]), 1.0)
            probe._fit_X = Fg
            Qg = probe._to_grid(Q)
            scale = probe.eig_floor_  # floor_scale for a relative floor of 1
            for kp in grid["n_neighbors_of_neighbors"]:
                probe.neighborhoods_ = nbhd[:, :min(kp, kpmax)]
                w, v = probe._eigen_of(slice(None))
                rel = max(float(floor_base(fl, ref)), 10 * np.finfo(X.dtype).eps)
                probe.eig_floor_ = (rel * scale).astype(X.dtype)
                probe.eig_floor_rel_ = fl
                terms = probe._terms(Qg, q_idx, v, w)
                for k in grid["n_neighbors"]:
                    s = aggregate_terms(terms[:, :min(k, kmax)], self.aggregate)
                    auc = np.mean([roc_auc_score(y, np.r_[s[:n_h], s[j * n_h:(j + 1) * n_h]])
                                   for j in range(1, len(AUTO_RHO) + 1)])
                    results[(k, kp, L)] = float(auc)
                del w, v
        cands = [dict(zip(AUTO_GRID, c)) for c in
                 itertools.product(*(grid[name] for name in AUTO_GRID))]
        keyed = [(c, results[(c["n_neighbors"], c["n_neighbors_of_neighbors"], c["set_size"])])
                 for c in cands]
        best = max(a for _, a in keyed)
        pick = next(c for c, a in keyed if a >= best - AUTO_TIE)
        table = sorted(keyed, key=lambda ca: -ca[1])
        return pick, table


def _swap_features(H, rho, rng):
    """Synthetic outliers: each row of ``H`` with a random fraction ``rho`` of
    its features (at least one) replaced by the same features of other,
    independently drawn rows of ``H``."""
    n, d = H.shape
    m = max(1, int(round(rho * d)))
    out = H.copy()
    for i in range(n):
        cols = rng.choice(d, m, replace=False) if m < d else np.arange(d)
        donors = rng.integers(0, n - 1, size=m)
        donors += donors >= i  # never the row itself
        out[i, cols] = H[donors, cols]
    return out
