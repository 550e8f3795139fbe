"""Shared detector plumbing: parameters, input checks, search, thresholds."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils.validation import check_is_fitted

from . import _data_scale
from ._chunks import chunk_rows, progress
from ._model_file import save_detector
from ._preprocess import fit_whitening, l2_rows, whiten
from ._scaling import SCALINGS, apply_column_scaling, fit_column_scaling
from ._state import Array, Int, Optional, Real, Str, Strings
from ._threads import resolve_n_jobs  # noqa: F401  (estimators resolve n_jobs here)
from ._validation import Interval, IsDict, IsNone, Options, check_array_input, validate_params
from .neighbors import BACKENDS, make_backend

#: contamination="auto": the share of training points flagged by default.
AUTO_CONTAMINATION = 0.01


#: fitted arrays of every detector's threshold and p-values
CALIBRATION_ARRAYS = ("calibration_rows_", "calibration_scores_")


#: training rows whose held-out scores set the threshold (all of them below
#: this many; a seeded random subset above): each costs k eigen-decompositions
CALIBRATION_ROWS = 2000


#: :func:`row_keys`: periods of the key within one standard deviation of the
#: rows' projections
KEY_PERIODS = 64


def key_direction(n_features):
    """The fixed unit direction :func:`row_keys` projects rows on."""
    w = np.random.default_rng(0).standard_normal(n_features)
    return w / np.linalg.norm(w)


def projections(X, block=4096):
    """``X``'s rows projected on :func:`key_direction` (float64 (n,))."""
    w = key_direction(X.shape[1])
    u = np.empty(X.shape[0])
    for start in range(0, X.shape[0], block):
        u[start:start + block] = np.asarray(X[start:start + block], dtype=np.float64) @ w
    return u


def projection_moments(X):
    """``(sum, sum of squares, count)`` of ``X``'s :func:`projections`: a
    cluster adds them over partitions for :func:`row_keys`."""
    return _moments(projections(X))


def _moments(u):
    # summed in sorted order, so that a re-ordering of the rows gives the same
    # moments to the bit (numpy's sum of the rows as given does not; sorting
    # costs about 0.2 s per 10 million rows, math.fsum 2 s)
    u = np.sort(np.asarray(u, dtype=np.float64))
    return np.array([u.sum(), (u * u).sum(), u.size])


def row_keys(X, moments=None):
    """Each row's key in [0, 1) from its values alone: a row has the same
    key wherever it stands in ``X``.

    The key is the fractional part of the row's standardised projection on
    a fixed direction times :data:`KEY_PERIODS` (``moments``: the
    :func:`projection_moments` of all rows, default ``X``'s). Picking the
    rows of smallest keys (:func:`calibration_rows`) gives a subset that is
    spread over the data like a random one and that a re-ordering of the
    rows does not change. A rounding-sized change of the values (float32
    against float64) moves a key by about 64 times the change of the
    standardised projection, so only the few rows that close to a period's
    edge change sides (a hash of the bytes would redraw them all).
    """
    u = projections(X)
    total, squares, count = _moments(u) if moments is None else moments
    mean = total / max(count, 1)
    std = np.sqrt(max(squares / max(count, 1) - mean * mean, 0.0))
    if not std > 0:  # one projection for all: positions decide the ties
        return np.zeros(u.size)
    z = (u - mean) / std * KEY_PERIODS
    return z - np.floor(z)


def smallest_keys(keys, m, first_id=0):
    """Ids (from ``first_id``) of the ``m`` smallest ``keys``, ties to the
    lower id: ``(keys, ids)`` of them, in that order. Merging the picks of
    row blocks with :func:`merge_smallest_keys` gives the pick of all rows."""
    keys = np.asarray(keys)
    order = np.argsort(keys, kind="stable")[:m]
    return keys[order], order.astype(np.int64) + first_id


def merge_smallest_keys(picks, m):
    """The sorted ids of the ``m`` smallest keys over blocks' ``picks``
    (each a :func:`smallest_keys` result), ties to the lower id."""
    keys = np.concatenate([k for k, _ in picks])
    ids = np.concatenate([i for _, i in picks])
    return np.sort(ids[np.lexsort((ids, keys))[:m]])


def whitened_calibration_size(n):
    """How many calibration rows a whitened fit of ``n`` rows holds out."""
    return min(CALIBRATION_ROWS, n // 2)


def calibration_rows(n, all_rows=False, keys=None):
    """The training rows a fit scores out of sample for its threshold:
    ``None`` (all) up to :data:`CALIBRATION_ROWS`, else that many, drawn
    with a fixed seed (the same data give the same threshold).

    With whitening (pass the :func:`row_keys` of the rows it sees as
    ``keys``) at most half the rows, those with the smallest keys: the
    whitening is then estimated from the other rows, so that it is out of
    sample for the calibration rows too (a covariance estimated with a row
    in it makes that row look more normal than new data, and the threshold
    would flag far more new normals than asked: docs/guide.md). As the keys
    follow the rows' values, not their positions, the split, and with it
    the whitening and every score, is the same for the training rows in any
    order. ``all_rows`` (``fit_predict``) scores every row, the whitening
    then from all of them.
    """
    if all_rows:
        return None
    if keys is not None:
        return merge_smallest_keys([smallest_keys(keys, whitened_calibration_size(n))],
                                   whitened_calibration_size(n))
    if n <= CALIBRATION_ROWS:
        return None
    return np.sort(np.random.default_rng(0).choice(n, CALIBRATION_ROWS, replace=False))


def _preprocess_arrays(params):
    """Fitted arrays of the input transforms a model with ``params`` holds."""
    return ("whiten_mean_", "whiten_matrix_") if params.get("whiten", 0) else ()


#: ``normalize="auto"`` / ``whiten="auto"`` treat data with at least this many
#: features as embeddings (CNN, text): unit rows, and a partly whitened
#: space; fewer features as tabular records, used as they are
EMBEDDING_MIN_FEATURES = 64
#: the whitening strength ``whiten="auto"`` gives embeddings
AUTO_WHITEN = 0.5
#: the relative eigenvalue floor ``eig_floor="auto"`` gives embeddings and
#: tabular data (a larger floor keeps fewer local directions: tabular data
#: are scored closer to plain Euclidean k-NN)
AUTO_FLOOR = {"embedding": 0.1, "tabular": 1.0}
#: with a neighborhood-relative floor, the data-relative floor below which
#: no neighbor's floor goes (a neighborhood of copies has no variance)
LOCAL_FLOOR_MIN = 1e-6
#: ``eig_floor_ref="auto"`` takes the neighborhood-relative floor on
#: embeddings whose neighborhoods' variances spread more than this (standard
#: deviation of their logarithm over the training points): normal data made
#: of populations of different spread. Measured: 1.3-1.5 on the MVTec unions,
#: at most 0.28 on single categories or classes (docs/defaults-study.md)
AUTO_FLOOR_SPREAD = 0.6


def is_embedding(n_features):
    """The data-type rule of the ``"auto"`` transforms and floor."""
    return n_features >= EMBEDDING_MIN_FEATURES


def resolve_floor(eig_floor, n_features):
    """The relative eigenvalue floor a fit on ``n_features`` columns uses."""
    if eig_floor == "auto":
        return AUTO_FLOOR["embedding" if is_embedding(n_features) else "tabular"]
    return float(eig_floor)


def trace_moments(traces):
    """``(count, positive count, sum and sum of squares of the positive
    ones' logarithms)`` of neighborhoods' total variances: what
    :func:`floor_spread` needs, summable over row partitions."""
    t = np.asarray(traces, dtype=np.float64)
    lg = np.log(t[t > 0])
    return len(t), len(lg), float(lg.sum()), float((lg * lg).sum())


def floor_spread(moments):
    """The spread of the neighborhoods' total variances from their
    :func:`trace_moments`: the standard deviation of the positive ones'
    logarithm (0 when fewer than half are positive: copies everywhere)."""
    n, n_pos, s1, s2 = moments
    if n_pos < 2 or 2 * n_pos < n:
        return 0.0
    mean = s1 / n_pos
    return float(np.sqrt(max(s2 / n_pos - mean * mean, 0.0)))


def resolve_floor_ref(eig_floor_ref, n_features, spread):
    """``"data"`` or ``"neighborhood"``: what a fit on ``n_features``
    columns whose neighborhoods spread ``spread`` (:func:`floor_spread`)
    makes the eigenvalue floor relative to."""
    if eig_floor_ref != "auto":
        return eig_floor_ref
    wide = is_embedding(n_features) and spread > AUTO_FLOOR_SPREAD
    return "neighborhood" if wide else "data"


def resolve_transforms(normalize, whiten, n_features):
    """The ``(normalize, whiten)`` a fit on ``n_features`` columns uses."""
    embedding = is_embedding(n_features)
    if normalize == "auto":
        normalize = "l2" if embedding else None
    if whiten == "auto":
        whiten = AUTO_WHITEN if embedding else 0.0
    return normalize, float(whiten)


def resolve_contamination(contamination):
    """The share of calibration rows a fit flags."""
    return AUTO_CONTAMINATION if contamination == "auto" else float(contamination)


def threshold(score_samples, rate):
    """The threshold ``offset_`` on ``score_samples`` (higher = more normal)
    that flags about a share ``rate`` of new data like the calibration
    scores: the k-th lowest of the n scores, k = floor(rate * (n + 1)) (at
    least 1). This is the conformal rule: a new point exchangeable with the
    calibration points scores below it with probability k / (n + 1), never
    more than ``rate`` and within 1 / (n + 1) of it, and ``predict`` then
    flags what ``pvalue(X) <= rate`` flags. (An interpolated percentile
    flags about ``rate + 1 / (n + 1)``: twice the rate for 1 % of 100
    scores.) With fewer than ``1 / rate - 1`` scores, k = 1: the lowest
    score, about ``1 / (n + 1)`` flagged."""
    s = np.sort(np.asarray(score_samples, dtype=np.float64))
    k = max(int(np.floor(rate * (len(s) + 1) + 1e-9)), 1)
    return float(s[min(k, len(s)) - 1])


def conformal_pvalues(anomaly_scores, calibration_scores):
    """For each anomaly score, ``(1 + #{c >= s}) / (n + 1)`` over the ``n``
    calibration normals' anomaly scores ``c`` (the negated
    ``calibration_scores`` given as ``score_samples``)."""
    s = np.asarray(anomaly_scores, dtype=np.float64)
    cal = np.sort(-np.asarray(calibration_scores, dtype=np.float64))
    at_least = len(cal) - np.searchsorted(cal, s, side="left")
    return (1.0 + at_least) / (len(cal) + 1.0)


class CappedParameterWarning(UserWarning):
    """A count larger than the data allows was capped (the user's parameter
    is left untouched; the value used is stored as a fitted attribute)."""


def cap(value, limit, name, what):
    if value > limit:
        warnings.warn(
            f"{name}={value} is more than {what} ({limit}); using {limit}. "
            f"The value used is stored as the fitted attribute {name}_.",
            CappedParameterWarning,
            stacklevel=4,
        )
        return limit
    return value


def resolve_set_size(set_size, n_features):
    """The set size L a fit on ``n_features`` columns uses (``"all"``: one
    set; larger values capped, with a warning)."""
    if set_size == "all":
        set_size = n_features
    return cap(set_size, n_features, "set_size", "the number of features")


def conformal_pvalues(anomaly_scores, calibration_scores):
    """Conformal p-values of ``anomaly_scores`` (higher = more anomalous)
    against ``calibration_scores`` (``score_samples`` of calibration
    normals, higher = more normal): ``(1 + #{calibration anomaly score >=
    s}) / (n + 1)`` for each score ``s``. See :meth:`ScoreConventions.pvalue`."""
    s = np.asarray(anomaly_scores, dtype=np.float64)
    cal = np.sort(-np.asarray(calibration_scores, dtype=np.float64))
    at_least = len(cal) - np.searchsorted(cal, s, side="left")
    return (1.0 + at_least) / (len(cal) + 1.0)


def check_fdr(fdr, example="predict_fdr(X, fdr=0.05)"):
    """Raise unless ``fdr`` is a false-discovery rate in (0, 1)."""
    if not Interval("real", 0, 1, closed="neither").accepts(fdr):
        raise ValueError(f"fdr must be a float in the range (0, 1). Got {fdr!r} instead. "
                         f"For example: {example}.")


def check_false_alarm_rate(rate):
    """``rate`` as a float, or a ValueError unless it is in (0, 1)."""
    if not Interval("real", 0, 1, closed="neither").accepts(rate):
        raise ValueError(
            "false_alarm_rate must be a float in the range (0, 1). "
            f"Got {rate!r} instead. For example: calibrate(X_val, false_alarm_rate=0.01)."
        )
    return float(rate)


def fdr_labels(pvalues, fdr):
    """+1 / -1 labels of a batch with p-values ``pvalues`` at the
    false-discovery rate ``fdr`` (Benjamini-Hochberg)."""
    from scipy.stats import false_discovery_control

    check_fdr(fdr)
    p = np.asarray(pvalues, dtype=np.float64)
    if not len(p):
        return np.ones(0, dtype=np.int64)
    return np.where(false_discovery_control(p, method="bh") <= fdr, -1, 1)


#: what ``fit_predict`` warns: it labels the training rows themselves, which
#: suits clean training data only
CONTAMINATION_ADVICE = (
    "{name}.fit_predict labels the training rows themselves, but nonn's detectors model "
    "clean normal data: anomalies in the training data shape the model and can score as "
    "normal. For data that may hold anomalies, fit on rows known to be normal (and "
    "calibrate on other normal rows), or clean the data first (for example, set aside the "
    "rows an isolation forest scores highest); see 'Contaminated training data' in the "
    "user guide.")


def warn_contaminated(estimator):
    """The :data:`CONTAMINATION_ADVICE` warning of ``fit_predict`` (one per
    call; Python's default filter shows it once per calling line)."""
    warnings.warn(CONTAMINATION_ADVICE.format(name=type(estimator).__name__), UserWarning,
                  stacklevel=3)


class ScoreConventions:
    """scikit-learn's outlier conventions on top of ``anomaly_score`` (higher
    = more anomalous) and a fitted threshold ``offset_``; shared by the
    detectors and the image systems."""

    def score_samples(self, X):
        """scikit-learn convention: higher = more normal (``-anomaly_score``)."""
        return -self.anomaly_score(X)

    def decision_function(self, X):
        """``score_samples(X) - offset_``: negative = outlier."""
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """+1 for inliers, -1 for outliers (at the fitted threshold)."""
        return np.where(self.decision_function(X) < 0, -1, 1)

    def pvalue(self, X):
        """Conformal p-values: for each query, the share of calibration
        normals scoring at least as high, ``(1 + #{c >= s}) / (n + 1)``.

        The calibration normals are out-of-sample training rows after
        ``fit`` (``calibration_scores_``), or the held-out normals given to
        :meth:`calibrate`. For a query drawn like them the p-value is
        uniform on (0, 1] (up to ties), so ``pvalue(X) <= a`` flags about a
        share ``a`` of normal data; small values mean unusual in a unit
        that is comparable across models and data sets.
        """
        return conformal_pvalues(self.anomaly_score(X), self.calibration_scores_)

    def predict_fdr(self, X, fdr=0.05):
        """+1 / -1 labels of a batch at a false-discovery rate: the
        Benjamini-Hochberg procedure on :meth:`pvalue` flags the largest set
        of queries in which, on average, at most a share ``fdr`` are
        normal (valid for independent queries)."""
        check_fdr(fdr)
        return fdr_labels(self.pvalue(X), fdr)


class BaseDetector(ScoreConventions, OutlierMixin, BaseEstimator):
    """Common behaviour of every nonn detector.

    Subclasses implement ``_fit(X) -> loo_anomaly_scores`` (training scores
    where a point does not count itself as a neighbor) and
    ``_anomaly_score(X)`` on validated data.
    """

    _common_constraints = {
        "backend": [Options("auto", *BACKENDS)],
        "backend_params": [IsNone(), IsDict()],
        "metric": [Options("euclidean", "cosine")],
        "contamination": [Options("auto"), Interval("real", 0, 0.5, closed="right")],
        "working_memory": [IsNone(), Interval("real", 0, None, closed="neither")],
        "n_jobs": [IsNone(), Interval("int", None, None)],
        "scale": [IsNone(), Options(*SCALINGS)],
        "normalize": [IsNone(), Options("l2", "auto")],
        "whiten": [Interval("real", 0, 1), Options("auto")],
    }
    _constraints: dict = {}
    _hints = {
        "n_neighbors": 3,
        "n_neighbors_of_neighbors": 25,
        "set_size": 5,
        "reorder": "'greedy'",
        "backend": "'auto'",
        "metric": "'euclidean'",
        "contamination": 0.01,
        "eig_floor": 1e-3,
        "aggregate": "'mean'",
        "scale": "'standard'",
        "normalize": "'auto'",
        "whiten": "'auto'",
    }

    #: fitted arrays saved when the model has them (a model without them
    #: still works): see nonn._model_file
    _optional_arrays = ()

    #: What a valid fitted attribute is, per saved attribute (checked on
    #: every load and save; see nonn._state). Subclasses extend it.
    _state_spec = {
        "_fit_X": Array("N", "D"),
        # out-of-sample scores of the calibration rows, set by fit
        "train_scores_": Array("C"),
        "calibration_rows_": Array("C", dtype="int64", ids="N"),
        # the scores behind offset_ and pvalue (fit's, or calibrate's)
        "calibration_scores_": Array("M"),
        "normalize_": Optional(Str(options=("l2",)), default=None),
        "whiten_": Real(0, 1, default=0.0),
        "whiten_mean_": Array("D"),
        "whiten_matrix_": Array("D", "D"),
        "n_neighbors_": Int(1, "N-1"),
        "offset_": Real(),
        "contamination_": Real(0, 1, positive=True),
        "threshold_source_": Str(),
        "backend_": Str(options=tuple(BACKENDS)),
        # inputs are multiplied by 2**data_scale_exponent_ (files written
        # before it existed worked at the data's own scale)
        "data_scale_exponent_": Int(-1200, 1200, default=0),
        # the ``scale`` option's column statistics (float64 for every data
        # dtype: see nonn._scaling)
        "scale_center_": Array("D", dtype="float64"),
        "scale_factor_": Array("D", dtype="float64", positive=True),
        # column names, when fitted on a table with string column names
        "feature_names_in_": Optional(Strings("D"), default=None),
        # the rows fit and every partial_fit gave (files from before it
        # existed hold their fit's rows)
        "n_samples_seen_": Optional(Int("N", "N"), default=None),
    }
    #: fitted arrays of the ``scale`` option (present when it is not None)
    _scale_arrays = ("scale_center_", "scale_factor_")

    @property
    def n_samples_seen_(self):
        """Training samples the model holds: those of ``fit`` plus those of
        every ``partial_fit`` (saved in the model file)."""
        X = self.__dict__.get("_fit_X")
        if X is None:
            raise AttributeError(f"This {type(self).__name__} is not fitted: it has no "
                                 "n_samples_seen_ yet.")
        return int(X.shape[0])

    @n_samples_seen_.setter
    def n_samples_seen_(self, value):
        # a model file records the count; the rows the model holds are it
        X = self.__dict__.get("_fit_X")
        if value is not None and X is not None and int(value) != X.shape[0]:
            raise ValueError(f"n_samples_seen_={value} but the model holds {X.shape[0]} "
                             "training rows.")

    @classmethod
    def _state_arrays_for(cls, params):
        """The fitted arrays a model with constructor ``params`` holds."""
        arrays = cls._state_arrays + CALIBRATION_ARRAYS + _preprocess_arrays(params)
        if params.get("scale") is not None:
            arrays += cls._scale_arrays
        return arrays

    # ----------------------------------------------------------------- fit
    def _check_params(self):
        constraints = dict(self._common_constraints)
        constraints.update(self._constraints)
        constraints = {k: v for k, v in constraints.items() if k in self.get_params()}
        validate_params(self, constraints, self._hints)
        if self.n_jobs == 0:
            raise ValueError(
                f"The 'n_jobs' parameter of {type(self).__name__} must be None, -1 or a "
                "non-zero int. Got 0 instead. For example: n_jobs=None (all cores)."
            )

    def fit(self, X, y=None):
        """Fit on normal training embeddings ``X`` (n_samples, n_features).

        ``y`` is ignored (present for API consistency). Returns ``self``.
        """
        self._check_params()
        X = check_array_input(self, X, reset=True)
        self.n_jobs_ = resolve_n_jobs(self.n_jobs)
        self.dtype_ = X.dtype
        try:
            X = self._fit_preprocess(X)
            self.calibration_rows_ = None
            self._fit_threshold(self._fit(X), X.shape[0])
        finally:  # the rows a whitening left out, kept for the fit only
            self.__dict__.pop("_whitening_held", None)
        return self

    def _whitening_exclusion(self, X):
        """The training rows the whitening is estimated without (None: it
        sees them all), from the rows ``X`` it is estimated on."""
        return self._calibration_plan(X.shape[0])

    def _calibration_plan(self, n):
        """The training rows whose held-out scores will set the threshold
        (None: all), known before the whitening is estimated: the whitening
        is estimated without them. ``KNNN`` holds out half the rows when it
        whitens (:func:`calibration_rows`); the baselines score
        every row, so their (optional) whitening sees the rows it scores."""
        return None

    def _fit_threshold(self, held_out, n):
        """Set the threshold from the out-of-sample anomaly scores
        ``held_out`` of the training rows ``calibration_rows_`` (None: all
        ``n`` of them, in order)."""
        self.train_scores_ = -np.asarray(self._to_user_units(held_out, "training"))
        if self.calibration_rows_ is None:  # every training row was scored
            self.calibration_rows_ = np.arange(n, dtype=np.int64)
        self.calibration_scores_ = self.train_scores_
        self.contamination_ = resolve_contamination(self.contamination)
        self.offset_ = threshold(self.calibration_scores_, self.contamination_)
        self.threshold_source_ = (f"training rows scored out of sample "
                                  f"({len(self.calibration_scores_)} rows)")

    def _make_backend(self, X, name=None):
        """Build and fit the search backend (``name`` overrides ``backend``,
        e.g. the resolved backend of a model being loaded)."""
        params = dict(self.backend_params or {})
        params.setdefault("working_memory", self.working_memory)
        params.setdefault("verbose", getattr(self, "verbose", False))
        params.setdefault("n_jobs", self.n_jobs)
        backend = make_backend(
            name or self.backend, metric=getattr(self, "metric", "euclidean"),
            n_samples=X.shape[0], n_features=X.shape[1], **params
        )
        self.backend_ = backend.name
        return backend.fit(X)

    @staticmethod
    def _quantile_offset(score_samples, rate):
        return threshold(score_samples, rate)

    # -------------------------------------------------------------- scores
    def _validate_query(self, X):
        check_is_fitted(self, "offset_")
        X = check_array_input(self, X, reset=False)
        return self._preprocess(X.astype(self.dtype_, copy=False))

    # ------------------------------------------------------- preprocessing
    def _fit_preprocess(self, X):
        """Learn the input transforms from the validated training data and
        return the transformed training data (what the search and the
        operator see). Queries go through :meth:`_preprocess`.

        In order: column scaling (``scale``), the power-of-two working scale
        (exact; it only guards the arithmetic of everything after it),
        unit-length rows (``normalize="l2"``) and global whitening
        (``whiten > 0``, see :func:`nonn._preprocess.fit_whitening`).
        """
        X = self._fit_column_scaling(X)
        X = self._fit_data_scale(X)
        return self._row_transforms(X, fit=True)

    def _preprocess(self, X):
        """Apply the fitted input transforms to validated queries."""
        X = self._apply_column_scaling(X)
        X = self._apply_data_scale(X)
        return self._row_transforms(X)

    def _row_transforms(self, X, fit=False):
        params = self.get_params()
        if fit:
            self.normalize_, self.whiten_ = resolve_transforms(
                params.get("normalize"), params.get("whiten", 0.0), X.shape[1])
            for name in ("whiten_mean_", "whiten_matrix_"):  # a refit forgets them
                self.__dict__.pop(name, None)
        if getattr(self, "normalize_", None) == "l2":
            X = l2_rows(X)
        if "whiten" in params and params["whiten"] != 0:
            if fit:
                if self.whiten_:
                    # estimated without the calibration rows (out of sample for them)
                    self.whiten_mean_, self.whiten_matrix_ = fit_whitening(
                        X, self.whiten_, exclude=self._whitening_exclusion(X))
                else:  # "auto" chose none: the identity (exact), stored alike
                    self.whiten_mean_ = np.zeros(X.shape[1], dtype=X.dtype)
                    self.whiten_matrix_ = np.eye(X.shape[1], dtype=X.dtype)
            if self.whiten_:
                X = whiten(X, self.whiten_mean_, self.whiten_matrix_)
        return X

    #: whether the scores carry the data's units (distances); such scores
    #: are multiplied back from the working scale (see :mod:`nonn._data_scale`)
    _scores_carry_units = False

    def _fit_data_scale(self, X):
        """Learn ``data_scale_exponent_`` (the inputs are multiplied by
        ``2**data_scale_exponent_``, exact) and scale the training data."""
        self.data_scale_exponent_ = _data_scale.fit_exponent(X)
        return _data_scale.scale(X, self.data_scale_exponent_, "The training data")

    def _data_scale_exponent(self):
        # models saved before the working scale existed were fitted unscaled
        return _data_scale.check_exponent(getattr(self, "data_scale_exponent_", 0))

    def _apply_data_scale(self, X):
        return _data_scale.scale(X, self._data_scale_exponent())

    def _to_user_units(self, scores, what="query"):
        """Scores computed at the working scale, as the user's data give
        them: unit-carrying scores multiplied back (exact), and anything
        that is not finite refused with the reason."""
        scores = np.asarray(scores)
        if self._scores_carry_units:
            scores = _data_scale.unscale_scores(scores, self._data_scale_exponent())
        if not np.isfinite(scores).all():
            bad = int(np.count_nonzero(~np.isfinite(scores)))
            raise ValueError(
                f"{bad} of the {scores.size} {what} anomaly scores are not finite: they "
                f"overflowed {scores.dtype} (the {what} points are too far from the training "
                f"data, relative to its spread, to score in {scores.dtype}). Pass float64 "
                "data, or check that the queries are in the training data's units.")
        return scores

    def _fit_column_scaling(self, X):
        """The ``scale`` option: learn each column's center and factor (see
        :mod:`nonn._scaling`) and return the scaled training data."""
        for name in self._scale_arrays:  # a refit forgets the previous fit's
            self.__dict__.pop(name, None)
        method = getattr(self, "scale", None)
        if method is None:
            return X
        self.scale_center_, self.scale_factor_ = fit_column_scaling(
            X, method, self.working_memory)
        return self._apply_column_scaling(X)

    def _apply_column_scaling(self, X):
        # the fitted state decides, not a parameter changed after fit
        if getattr(self, "scale_center_", None) is None:
            return X
        return apply_column_scaling(X, self.scale_center_, self.scale_factor_,
                                    self.working_memory)

    def _query_chunks(self, n, row_bytes, desc="scoring"):
        step = chunk_rows(row_bytes, self.working_memory)
        starts = range(0, n, step)
        for start in progress(starts, getattr(self, "verbose", False), desc,
                              total=len(starts)):
            yield slice(start, min(start + step, n))

    def anomaly_score(self, X):
        """The paper's anomaly score AS(f): higher = more anomalous.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)

        Returns
        -------
        scores : ndarray of shape (n_queries,), in the training dtype.

        Raises
        ------
        ValueError
            If a score cannot be represented in the training dtype (queries
            too far out to score in float32, say): never NaN or inf.
        """
        X = self._validate_query(X)
        return self._to_user_units(self._anomaly_score(X))

    def fit_predict(self, X, y=None):
        """Fit, then label the training points themselves by their
        leave-one-out scores (a point is not its own neighbor), so about
        ``contamination`` of them are flagged.

        nonn's detectors model clean normal data (novelty detection). On a
        training set that itself holds anomalies they shape the model, and
        their scores can come out lower than those of normal points; see
        the user guide before using this on contaminated data; this method
        warns (a ``UserWarning``) to say so."""
        warn_contaminated(self)
        self.fit(X)
        return np.where(self.train_scores_ - self.offset_ < 0, -1, 1)

    def calibrate(self, X_normal, false_alarm_rate=0.01):
        """Re-set the threshold on held-out normal data, without refitting.

        After this, about ``false_alarm_rate`` of data like ``X_normal`` is
        flagged as outliers.

        Parameters
        ----------
        X_normal : array-like of shape (n_samples, n_features)
            Normal samples that were *not* used for fitting.
        false_alarm_rate : float in (0, 1)

        Returns
        -------
        self
        """
        rate = check_false_alarm_rate(false_alarm_rate)
        X_normal = self._validate_query(X_normal)
        seen = self._training_rows(X_normal)
        n = X_normal.shape[0]
        if seen.sum() * 2 > n:
            raise ValueError(
                f"{int(seen.sum())} of the {n} rows given to calibrate are training rows of "
                "this model; their scores are not out of sample (a training row is its own "
                "nearest neighbor), so the threshold would flag far more new normal data "
                "than asked. Calibrate on normal data held out from fit.")
        if seen.any():
            warnings.warn(f"{int(seen.sum())} of the {n} calibration rows are training rows "
                          "of this model; their scores are optimistic.", stacklevel=2)
        scores = -self._to_user_units(self._anomaly_score(X_normal), "calibration")
        self.calibration_scores_ = scores
        self.offset_ = self._quantile_offset(scores, rate)
        self.contamination_ = float(rate)
        self.threshold_source_ = f"calibrated on {n} held-out normal samples"
        return self

    def _training_rows(self, Xp):
        """Which preprocessed query rows are exactly rows of the training data."""
        fit = self._fit_X
        if hasattr(self, "_to_grid"):
            Xp = self._to_grid(Xp)
        if Xp.shape[1] != fit.shape[1] or not len(Xp):
            return np.zeros(len(Xp), dtype=bool)
        row = np.dtype((np.void, fit.dtype.itemsize * fit.shape[1]))
        a = np.ascontiguousarray(Xp, dtype=fit.dtype).view(row).ravel()
        b = np.ascontiguousarray(fit).view(row).ravel()
        return np.isin(a, b)

    # --------------------------------------------------------- persistence
    def save(self, path):
        """Save the fitted detector to ``path`` in nonn's safe format
        (npz arrays + JSON metadata, never pickle). See :func:`nonn.load`."""
        save_detector(self, path)
        return path

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags
