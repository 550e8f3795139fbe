"""Evaluation protocols, metrics and the benchmark harness.

Protocol (the paper authors' novelty protocol on ADBench files)
----------------------------------------------------------------
For a dataset ``(X, y)`` with ``y == 1`` marking the anomalies and a seed:

1. a random hold-out of normal rows, as large as the anomaly count, is put
   aside;
2. every detector is fitted on the remaining normal rows (no anomaly is
   ever seen in training);
3. it scores the hold-out normals plus all anomalies; AUROC and average
   precision (:mod:`sklearn.metrics`) are computed with ``y == 1`` as the
   positive class, on the anomaly score (higher = more anomalous).

The test set is therefore balanced (as many normals as anomalies). Results
are averaged over several seeds (default 0, 1, 2). See
:func:`novelty_split`.

Caps for big data (same for every detector)
-------------------------------------------
So that all 43 ADBench tabular sets run in reasonable time on two cores,
the training normals are subsampled to :data:`MAX_TRAIN` (10,000) rows and
the test set to :data:`MAX_TEST` (10,000) rows, half hold-out normals and
half anomalies (ADBench itself subsamples every set above 10,000 rows). The
caps are drawn from their own random streams of the seed, so a cap never
changes which rows are held out, and every detector sees exactly the same
rows. Pass ``max_train=None`` / ``max_test=None`` to lift them.

Scaling
-------
``scale="minmax"`` (ADBench's own default for its tabular sets) or
``"standard"`` fits the scaler on the training normals only and applies it
to train and test; ``None`` (the default, and what the paper does with its
embeddings) feeds the raw features.

Detectors
---------
A :class:`Detector` is a named factory ``make(seed) -> estimator`` and a
scoring rule ``score(estimator, X) -> anomaly scores``. :data:`DETECTORS`
holds nonn's detectors and the peers of the issue (PyOD, scikit-learn and
the paper authors' ``knnn`` 0.1.0 package); peers are imported lazily,
only when they run, and a peer that is not installed is skipped with a
note. :func:`register_detector` plugs in more.

Nothing here is imported by the rest of nonn.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import math
import re
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = [
    "DETECTORS",
    "MAX_TEST",
    "MAX_TRAIN",
    "PAPER_TABLE1",
    "PAPER_TABLE4",
    "PAPER_TABLE7",
    "SUITES",
    "Detector",
    "Summary",
    "auroc_ap",
    "evaluate_detector",
    "get_detectors",
    "list_detectors",
    "load_dataset",
    "novelty_split",
    "plot_results",
    "register_detector",
    "run_benchmark",
    "scaling_detectors",
    "run_suite",
    "summarize",
    "table7_grid",
    "to_markdown",
    "write_csv",
    "write_markdown",
]

#: cap on the training normals of one run (rows drawn at random, per seed)
MAX_TRAIN = 10_000
#: cap on the test rows of one run (half hold-out normals, half anomalies)
MAX_TEST = 10_000

#: the paper's Table 1 (ResNet-18 features, AUROC), for comparison only:
#: dataset name -> {"paper k-NN": ..., "paper k-NNN": ...}
PAPER_TABLE1 = {
    f"MVTec-AD_{c}": {"paper k-NN": a, "paper k-NNN": b}
    for c, a, b in [
        ("carpet", 0.896, 0.990), ("grid", 0.444, 0.777), ("leather", 0.792, 0.986),
        ("tile", 0.986, 0.993), ("wood", 0.636, 0.938), ("bottle", 0.971, 0.983),
        ("cable", 0.882, 0.934), ("capsule", 0.803, 0.919), ("hazelnut", 0.903, 0.991),
        ("metal_nut", 0.813, 0.913), ("pill", 0.738, 0.882), ("screw", 0.712, 0.840),
        ("toothbrush", 0.886, 0.969), ("transistor", 0.878, 0.936), ("zipper", 0.937, 0.964),
    ]
}
PAPER_TABLE1["mean"] = {"paper k-NN": 0.819, "paper k-NNN": 0.934}

#: the paper's Table 4, "Feature" columns: number of MVTec classes united
#: -> AUROC (the paper does not say which classes; nonn takes the first n
#: of :data:`nonn.datasets.MVTEC_CATEGORIES`)
PAPER_TABLE4 = {
    f"MVTec-union-{n}": {"paper k-NN": a, "paper k-NNN": b}
    for n, a, b in [(5, 0.806, 0.890), (7, 0.743, 0.852), (11, 0.680, 0.760),
                    (15, 0.627, 0.757)]
}

#: the paper's Table 7 (15 MVTec classes united): (k, K', AUROC); K' = 0 is
#: plain k-NN with k neighbors
PAPER_TABLE7 = (
    (1, 75, 0.753), (3, 20, 0.753), (3, 25, 0.757), (3, 75, 0.755), (4, 20, 0.754),
    (5, 15, 0.753), (10, 5, 0.686), (60, 0, 0.616), (75, 0, 0.616), (80, 0, 0.634),
)

# --------------------------------------------------------------------------
# protocol and metrics
# --------------------------------------------------------------------------


def novelty_split(y, seed=0, *, max_train=MAX_TRAIN, max_test=MAX_TEST):
    """Row indices of one draw of the novelty protocol.

    Parameters
    ----------
    y : array-like of shape (n_samples,)
        1 = anomaly, 0 = normal.
    seed : int, default=0
        Same seed, same split (independent of the caps: a cap subsamples
        the rows the uncapped split would use).
    max_train : int or None, default=MAX_TRAIN
        Cap on the training normals (random subsample); None = no cap.
    max_test : int or None, default=MAX_TEST
        Cap on the test rows: ``max_test // 2`` hold-out normals and as many
        anomalies at most (the test set stays balanced); None = no cap.

    Returns
    -------
    train : ndarray of int64, sorted — normal rows to fit on.
    test : ndarray of int64, sorted — held-out normal rows and anomalies.

    Raises
    ------
    ValueError
        No anomalies, or not more normal rows than anomalies.

    Examples
    --------
    >>> import numpy as np
    >>> from nonn.evaluation import novelty_split
    >>> y = np.r_[np.zeros(90, int), np.ones(10, int)]
    >>> train, test = novelty_split(y, seed=0)
    >>> len(train), len(test), int(y[test].sum())
    (80, 20, 10)
    """
    y = np.asarray(y).ravel()
    normals = np.flatnonzero(y == 0)
    anomalies = np.flatnonzero(y == 1)
    n_anom = len(anomalies)
    if n_anom == 0:
        raise ValueError("The novelty protocol needs at least one anomaly (y == 1); got none.")
    if len(normals) <= n_anom:
        raise ValueError(
            f"The novelty protocol holds out as many normal rows as there are anomalies "
            f"({n_anom}), which leaves no normal row to train on ({len(normals)} normal rows)."
        )
    for name, cap in (("max_train", max_train), ("max_test", max_test)):
        if cap is not None and (not isinstance(cap, (int, np.integer)) or cap < 2):
            raise ValueError(f"The '{name}' parameter of novelty_split must be None or an "
                             f"int >= 2. Got {cap!r} instead.")
    hold_ss, train_ss, test_ss = np.random.SeedSequence(int(seed)).spawn(3)
    perm = np.random.default_rng(hold_ss).permutation(normals)
    holdout, train = perm[:n_anom], perm[n_anom:]
    if max_train is not None and len(train) > max_train:
        train = np.random.default_rng(train_ss).choice(train, max_train, replace=False)
    if max_test is not None and 2 * n_anom > max_test:
        rng = np.random.default_rng(test_ss)
        half = max_test // 2
        holdout = rng.choice(holdout, half, replace=False)
        anomalies = rng.choice(anomalies, max_test - half, replace=False)
    test = np.concatenate([holdout, anomalies])
    return np.sort(train).astype(np.int64), np.sort(test).astype(np.int64)


def auroc_ap(y_true, scores):
    """AUROC and average precision of anomaly ``scores`` (higher = more
    anomalous) against ``y_true`` (1 = anomaly).

    NaN scores raise ValueError; +/-inf are ranked first/last (only the
    order matters to both metrics).
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    s = np.asarray(scores, dtype=np.float64).ravel()
    if np.isnan(s).any():
        raise ValueError(f"{int(np.isnan(s).sum())} anomaly scores are NaN.")
    if not np.isfinite(s).all():
        big = np.finfo(np.float64).max
        s = np.clip(s, -big, big)
    y = np.asarray(y_true).ravel()
    return float(roc_auc_score(y, s)), float(average_precision_score(y, s))


# --------------------------------------------------------------------------
# detectors
# --------------------------------------------------------------------------


def _anomaly_score(est, X):
    return est.anomaly_score(X)


def _decision_function(est, X):  # PyOD: higher = more anomalous
    return est.decision_function(X)


def _neg_score_samples(est, X):  # scikit-learn: higher = more normal
    return -est.score_samples(X)


def _predict(est, X):  # the authors' knnn: predict() returns anomaly scores
    return est.predict(X)


@dataclass(frozen=True)
class Detector:
    """A named detector for the harness.

    Parameters
    ----------
    name : str
        Unique name (the column of the result tables).
    make : callable ``seed -> estimator``
        A fresh, unfitted estimator with a ``fit(X)`` method; ``seed`` is the
        run's seed (for randomised detectors).
    score : callable ``(estimator, X) -> ndarray``, default: ``anomaly_score``
        Anomaly scores, higher = more anomalous.
    requires : tuple of str
        Importable modules it needs; when one is missing the detector is
        skipped with a note instead of failing every run.
    family : str
        ``"nonn"``, ``"peer"`` or ``"custom"``.
    description : str

    Examples
    --------
    >>> from nonn import KNN
    >>> from nonn.evaluation import Detector
    >>> det = Detector("KNN-k5", lambda seed: KNN(n_neighbors=5))
    """

    name: str
    make: Callable[[int], Any]
    score: Callable[[Any, np.ndarray], np.ndarray] = _anomaly_score
    requires: tuple = ()
    family: str = "custom"
    description: str = ""

    def missing(self):
        """Names of the required modules that are not installed."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


#: name -> Detector; the default set of :func:`run_suite`, in this order
DETECTORS: dict[str, Detector] = {}


def register_detector(detector, *, replace=False):
    """Add ``detector`` (a :class:`Detector`) to :data:`DETECTORS`."""
    if not isinstance(detector, Detector):
        raise TypeError(f"register_detector needs a Detector. Got {type(detector).__name__}.")
    if detector.name in DETECTORS and not replace:
        raise ValueError(f"A detector called {detector.name!r} is already registered; "
                         "pass replace=True to replace it.")
    DETECTORS[detector.name] = detector
    return detector


def _nonn(cls_name, seeded=False, **params):
    def make(seed):
        from . import _baselines, _knnn

        cls = getattr(_knnn, cls_name, None) or getattr(_baselines, cls_name)
        return cls(random_state=seed, **params) if seeded else cls(**params)

    return make


def _pyod(module, cls_name, seeded=False):
    def make(seed):
        import importlib

        cls = getattr(importlib.import_module(f"pyod.models.{module}"), cls_name)
        return cls(random_state=seed) if seeded else cls()

    return make


def _sk_lof(seed):
    from sklearn.neighbors import LocalOutlierFactor

    return LocalOutlierFactor(novelty=True)


def _sk_iforest(seed):
    from sklearn.ensemble import IsolationForest

    return IsolationForest(random_state=seed)


class _LedoitWolfMahalanobis:
    """Peer: squared Mahalanobis distance to the mean under scikit-learn's
    Ledoit-Wolf covariance of the training normals (one global Gaussian)."""

    def fit(self, X):
        from sklearn.covariance import LedoitWolf

        self.lw_ = LedoitWolf().fit(X)
        return self

    def anomaly_score(self, X):
        return self.lw_.mahalanobis(X)


def _authors(**params):
    def make(seed):
        from knnn import KNNN as AuthorsKNNN

        return AuthorsKNNN(**params)

    return make


def _knnn_paper(seed):
    from ._knnn import KNNN

    return KNNN.paper()


def _register_builtins():
    nonn = [
        ("KNNN", _nonn("KNNN"), "nonn KNNN, default parameters"),
        ("KNNN-paper", _knnn_paper,
         "nonn KNNN.paper(): the paper's k=3, K'=25, L=5, greedy reordering, Eq. 2's sum, "
         "no floor beyond the safe one, rows as given"),
        ("KNNN-L40", _nonn("KNNN", n_neighbors=3, n_neighbors_of_neighbors=50, set_size=40,
                           eig_floor=1e-3, normalize=None, whiten=0.0, aggregate="min"),
         "nonn KNNN, round one's accuracy-only winner: K'=50, L=40 (capped at D), floor "
         "1e-3, min over neighbors"),
        ("KNNN-auto", _nonn("KNNN", seeded=True, n_neighbors="auto",
                            n_neighbors_of_neighbors="auto", set_size="auto", eig_floor="auto"),
         "nonn KNNN with k, K', L and the floor chosen label-free from the training "
         "normals (synthetic outliers), random_state=seed"),
    ]
    for agg in ("mean", "kth"):
        for metric in ("euclidean", "cosine"):
            nonn.append((f"KNN-{agg}-{metric}", _nonn("KNN", aggregate=agg, metric=metric),
                         f"nonn KNN, k=3, {agg} distance, {metric}"))
    for k in (1, 5):
        for metric in ("euclidean", "cosine"):
            nonn.append((f"KNN-k{k}-{metric}", _nonn("KNN", n_neighbors=k, metric=metric),
                         f"nonn KNN, k={k}, mean distance, {metric}"))
    nonn += [
        ("GlobalEigenKNN", _nonn("GlobalEigenKNN"), "nonn GlobalEigenKNN (paper Eq. 3)"),
        ("LocalEigenKNN", _nonn("LocalEigenKNN"), "nonn LocalEigenKNN, L=5"),
    ]
    for name, make, desc in nonn:
        register_detector(Detector(name, make, _anomaly_score, (), "nonn", desc))
    peers = [
        ("pyod-KNN", _pyod("knn", "KNN"), _decision_function, ("pyod",),
         "PyOD KNN, defaults (k=5, largest)"),
        ("pyod-LOF", _pyod("lof", "LOF"), _decision_function, ("pyod",),
         "PyOD LOF, defaults (k=20)"),
        ("pyod-IForest", _pyod("iforest", "IForest", seeded=True), _decision_function,
         ("pyod",), "PyOD IForest, defaults, random_state=seed"),
        ("LW-Mahalanobis", lambda seed: _LedoitWolfMahalanobis(), _anomaly_score, (),
         "global Ledoit-Wolf Mahalanobis distance (scikit-learn LedoitWolf)"),
        ("pyod-PCA", _pyod("pca", "PCA"), _decision_function, ("pyod",),
         "PyOD PCA (weighted projections on the principal components), defaults"),
        ("sklearn-LOF", _sk_lof, _neg_score_samples, (),
         "scikit-learn LocalOutlierFactor(novelty=True), k=20"),
        ("sklearn-IForest", _sk_iforest, _neg_score_samples, (),
         "scikit-learn IsolationForest, defaults, random_state=seed"),
        ("authors-knnn", _authors(), _predict, ("knnn",),
         "the authors' knnn 0.1.0, defaults (cosine, p=2)"),
        ("authors-knnn-p1", _authors(p=1), _predict, ("knnn",),
         "the authors' knnn 0.1.0, p=1 (Eq. 2 / (k D))"),
    ]
    for name, make, score, req, desc in peers:
        register_detector(Detector(name, make, score, req, "peer", desc))


_register_builtins()

#: the detector ``scale`` options compared by :func:`scaling_detectors`
SCALE_OPTIONS = (None, "standard", "minmax", "robust")


def scaling_detectors(bases=("KNNN", "KNN"), options=SCALE_OPTIONS):
    """Detectors that differ only in their ``scale`` option, for measuring
    the detectors' own column scaling: run them with the harness's scaling
    off (``run_suite(..., scale=None)``), so that each detector learns its
    scaling from the training normals it is fitted on.

    Returns a list of :class:`Detector` named ``"<base> scale=<option>"``
    (``none`` for None), each the base class with its default parameters.
    """
    out = []
    for base in bases:
        for option in options:
            label = "none" if option is None else option
            out.append(Detector(f"{base} scale={label}", _nonn(base, scale=option),
                                _anomaly_score, (), "nonn",
                                f"nonn {base}, default parameters, scale={option!r}"))
    return out


def list_detectors(available_only=False):
    """Names in :data:`DETECTORS` (those whose modules are installed, if asked)."""
    return [n for n, d in DETECTORS.items() if not (available_only and d.missing())]


def get_detectors(detectors=None):
    """Resolve a detector selection.

    Parameters
    ----------
    detectors : None, str or iterable of (str or Detector)
        None = every registered detector. A str is a name or a shell-style
        pattern over names (``"KNN-*"``); a comma-separated str is split.

    Returns
    -------
    selected : list of Detector
        In the order asked (registry order within a pattern), without the
        ones whose modules are missing.
    notes : list of str
        One line per detector skipped, and why.
    """
    if detectors is None:
        items = list(DETECTORS)
    elif isinstance(detectors, (str, Detector)):
        items = [detectors]
    else:
        items = list(detectors)
    expanded = []
    for item in items:
        if isinstance(item, Detector):
            expanded.append(item)
            continue
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            if part in DETECTORS:
                expanded.append(DETECTORS[part])
                continue
            hits = [d for n, d in DETECTORS.items() if fnmatch.fnmatchcase(n, part)]
            if not hits:
                import difflib

                close = difflib.get_close_matches(part, list(DETECTORS), n=3)
                hint = f" Close matches: {close}." if close else ""
                raise ValueError(f"Unknown detector {part!r}.{hint} Registered: "
                                 f"{list(DETECTORS)}.")
            expanded.extend(hits)
    selected, notes, seen = [], [], set()
    for det in expanded:
        if det.name in seen:
            continue
        seen.add(det.name)
        missing = det.missing()
        if missing:
            notes.append(f"skipped {det.name}: {', '.join(missing)} not installed "
                         "(pip install 'nonn[bench]')")
            continue
        selected.append(det)
    return selected, notes


# --------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------

_UNION = re.compile(r"^mvtec[-_]union[-_](\d+)$", re.IGNORECASE)
#: "<dataset>-effnet224-<class>": a one-class task on cached image features
_IMAGE = re.compile(r"^(cifar10|fashion)-effnet224-(\d)$")


def load_dataset(spec, *, home=None):
    """``(name, X, y)`` from a dataset spec.

    ``spec`` is an ADBench name (see :func:`nonn.datasets.load_adbench`),
    ``"MVTec-union-<n>"`` (the first ``n`` MVTec categories united, paper
    Table 4), or an explicit ``(name, X, y)`` / ``(name, (X, y))`` tuple.
    """
    from . import datasets

    if isinstance(spec, str) and _IMAGE.match(spec):
        return _image_one_class(spec, home=home)
    if isinstance(spec, str):
        m = _UNION.match(spec)
        if m:
            X, y = datasets.mvtec_union(int(m.group(1)), home=home)
            return f"MVTec-union-{int(m.group(1))}", X, y
        X, y = datasets.load_adbench(spec, home=home)
        return datasets.resolve_adbench(spec, home=home).stem, X, y
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], tuple):
        name, (X, y) = spec
        return str(name), np.asarray(X), np.asarray(y)
    if isinstance(spec, tuple) and len(spec) == 3:
        name, X, y = spec
        return str(name), np.asarray(X), np.asarray(y)
    raise TypeError(f"A dataset must be a name or a (name, X, y) tuple. Got {spec!r:.80}.")


def check_datasets(specs, *, home=None):
    """Raise (``FileNotFoundError`` / ``ValueError``) unless every named
    dataset of ``specs`` can be found, before any run starts: a typo or a
    missing data folder is one clear error, not a table of failed runs."""
    from . import datasets

    for spec in specs:
        if not isinstance(spec, str):
            continue
        m = _UNION.match(spec)
        if m:
            for category in datasets._mvtec_names(int(m.group(1))):
                datasets.resolve_adbench(f"MVTec-AD_{category}", home=home)
        elif _IMAGE.match(spec):
            continue  # cached image features, extracted on first use
        else:
            datasets.resolve_adbench(spec, home=home)


def _is_single_spec(obj):
    """A ``(name, X, y)`` or ``(name, (X, y))`` tuple (not a tuple of names)."""
    return (isinstance(obj, tuple) and len(obj) in (2, 3) and isinstance(obj[0], str)
            and not isinstance(obj[1], str))


def _dataset_specs(datasets):
    if isinstance(datasets, str) or _is_single_spec(datasets):
        return [datasets]
    if isinstance(datasets, dict):
        return [(name, tuple(xy)) for name, xy in datasets.items()]
    return list(datasets)


def _scale(X_train, X_test, scale):
    if scale is None:
        return X_train, X_test
    from sklearn.preprocessing import MinMaxScaler, StandardScaler

    scalers = {"minmax": MinMaxScaler, "standard": StandardScaler}
    if scale not in scalers:
        raise ValueError(f"The 'scale' parameter must be None, 'minmax' or 'standard'. "
                         f"Got {scale!r} instead.")
    sc = scalers[scale]().fit(X_train)
    return sc.transform(X_train), sc.transform(X_test)


# --------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------

RESULT_COLUMNS = ["dataset", "seed", "detector", "auroc", "ap", "fit_s", "score_s",
                  "n_train", "n_test", "n_features", "error", "warnings"]


def _short(text, n=300):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def evaluate_detector(detector, X_train, X_test, y_test, seed=0):
    """Fit one detector on ``X_train`` and score ``X_test``; never raises.

    Returns a dict with ``auroc``, ``ap``, ``fit_s``, ``score_s``, ``error``
    (``""`` when it worked; NaN metrics otherwise) and ``warnings`` (the
    distinct warnings it raised, shortened).
    """
    row = {"auroc": math.nan, "ap": math.nan, "fit_s": math.nan, "score_s": math.nan,
           "error": "", "warnings": ""}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            t0 = time.perf_counter()
            est = detector.make(seed)
            est.fit(X_train)
            row["fit_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            scores = np.asarray(detector.score(est, X_test))
            row["score_s"] = time.perf_counter() - t0
            if scores.shape != (len(X_test),):
                raise ValueError(f"expected {len(X_test)} scores, got shape {scores.shape}")
            row["auroc"], row["ap"] = auroc_ap(y_test, scores)
        except Exception as exc:  # noqa: BLE001 - one bad detector must not stop a suite
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            where = f" ({Path(frame.filename).name}:{frame.lineno})"
            row["error"] = _short(f"{type(exc).__name__}: {exc}{where}")
    msgs = dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught)
    row["warnings"] = _short(" | ".join(msgs))
    return row


def run_suite(datasets, detectors=None, seeds=(0, 1, 2), *, max_train=MAX_TRAIN,
              max_test=MAX_TEST, scale=None, progress=True, checkpoint=None, resume=False,
              home=None):
    """Run every detector on every dataset and seed under the novelty protocol.

    Parameters
    ----------
    datasets : iterable
        Dataset specs (see :func:`load_dataset`): ADBench names,
        ``"MVTec-union-<n>"``, ``(name, X, y)`` tuples, or a dict
        ``{name: (X, y)}``.
    detectors : None, str or iterable, default=None
        See :func:`get_detectors` (None = all registered). Missing peers are
        skipped with a warning.
    seeds : iterable of int, default=(0, 1, 2)
    max_train, max_test : int or None
        Caps, see :func:`novelty_split` (same rows for every detector).
    scale : {None, "minmax", "standard"}, default=None
        Scaler fitted on the training normals of each run.
    progress : bool, default=True
        A tqdm bar over (dataset, seed, detector) runs.
    checkpoint : path, default=None
        Write the results so far to this CSV after every dataset.
    resume : bool, default=False
        With ``checkpoint``: keep its rows and skip the runs it already has.
    home : path, default=None
        Data folder for named datasets.

    Returns
    -------
    pandas.DataFrame
        One row per (dataset, seed, detector) with the columns ``dataset,
        seed, detector, auroc, ap, fit_s, score_s, n_train, n_test,
        n_features, error, warnings``. A detector that raises gets NaN
        metrics and its error; the run goes on. The notes about skipped
        detectors are in ``df.attrs["notes"]``.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    specs = _dataset_specs(datasets)
    dets, notes = get_detectors(detectors)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    seeds = [int(s) for s in seeds]
    rows, done = [], set()
    if checkpoint is not None and resume and Path(checkpoint).exists():
        old = pd.read_csv(checkpoint, dtype={"dataset": str, "detector": str, "error": str,
                                             "warnings": str})
        for col in ("error", "warnings"):
            old[col] = old[col].fillna("")
        rows = old.to_dict("records")
        done = {(r["dataset"], int(r["seed"]), r["detector"]) for r in rows}
    bar = tqdm(total=len(specs) * len(seeds) * len(dets), disable=not progress,
               desc="novelty protocol", unit="run", dynamic_ncols=True)
    try:
        for spec in specs:
            label = spec if isinstance(spec, str) else str(spec[0])
            try:
                name, X, y = load_dataset(spec, home=home)
            except Exception as exc:  # noqa: BLE001 - a missing file is one failed dataset
                err = _short(f"load: {type(exc).__name__}: {exc}")
                for seed in seeds:
                    for det in dets:
                        rows.append(dict(dataset=label, seed=seed, detector=det.name,
                                         auroc=math.nan, ap=math.nan, fit_s=math.nan,
                                         score_s=math.nan, n_train=0, n_test=0, n_features=0,
                                         error=err, warnings=""))
                        bar.update()
                continue
            for seed in seeds:
                todo = [d for d in dets if (name, seed, d.name) not in done]
                if not todo:
                    bar.update(len(dets))
                    continue
                bar.update(len(dets) - len(todo))
                try:
                    if isinstance(y, OneClassTask):
                        tr, te, y_test = y.split(seed)
                    else:
                        tr, te = novelty_split(y, seed, max_train=max_train, max_test=max_test)
                        y_test = y[te]
                    X_train, X_test = _scale(X[tr], X[te], scale)
                    split_error = ""
                except Exception as exc:  # noqa: BLE001
                    split_error = _short(f"split: {type(exc).__name__}: {exc}")
                for det in todo:
                    bar.set_postfix_str(f"{name} seed={seed} {det.name}", refresh=True)
                    if split_error:
                        res = {"auroc": math.nan, "ap": math.nan, "fit_s": math.nan,
                               "score_s": math.nan, "error": split_error, "warnings": ""}
                        n_tr = n_te = 0
                    else:
                        res = evaluate_detector(det, X_train, X_test, y_test, seed)
                        n_tr, n_te = len(X_train), len(X_test)
                    rows.append(dict(dataset=name, seed=seed, detector=det.name,
                                     n_train=n_tr, n_test=n_te, n_features=X.shape[1], **res))
                    bar.update()
            if checkpoint is not None:
                _frame(rows).to_csv(checkpoint, index=False)
    finally:
        bar.close()
    df = _frame(rows)
    df.attrs["notes"] = notes
    return df


def _frame(rows):
    import pandas as pd

    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    df["error"] = df["error"].fillna("").astype(str)
    df["warnings"] = df["warnings"].fillna("").astype(str)
    return df


# --------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------


@dataclass
class Summary:
    """What :func:`summarize` returns.

    Attributes
    ----------
    auroc, ap : DataFrame (dataset x detector)
        Mean over seeds (over the seeds that worked; NaN if none did).
    ranks : DataFrame (dataset x detector)
        Rank of each detector's mean AUROC on each dataset, 1 = best, ties
        share the average rank. Only on the datasets where every detector
        has a result.
    overall : DataFrame (one row per detector, best mean AUROC first)
        ``mean_auroc``, ``seed_std`` (std over seeds of the mean over
        datasets), ``mean_ap``, ``mean_rank``, ``wins`` (datasets where it
        ranks first, ties included), ``n_datasets`` (datasets in the
        means), ``n_failed`` (runs that raised), ``fit_s``, ``score_s``
        (total seconds over all runs).
    dropped : list of str
        Datasets left out of the means and ranks because some detector has
        no result on them (so that every detector is averaged over the same
        datasets).
    """

    auroc: Any
    ap: Any
    ranks: Any
    overall: Any
    dropped: list = field(default_factory=list)


def summarize(df):
    """Mean AUROC per detector per dataset, mean over datasets, mean rank.

    Parameters
    ----------
    df : DataFrame from :func:`run_suite`.

    Returns
    -------
    Summary
    """
    import pandas as pd

    det_order = list(dict.fromkeys(df["detector"]))
    ds_order = list(dict.fromkeys(df["dataset"]))
    g = df.groupby(["dataset", "detector"], sort=False)
    auroc = g["auroc"].mean().unstack("detector").reindex(index=ds_order, columns=det_order)
    ap = g["ap"].mean().unstack("detector").reindex(index=ds_order, columns=det_order)
    complete = auroc.notna().all(axis=1)
    dropped = [d for d in ds_order if not complete[d]]
    kept = auroc.loc[complete]
    ranks = kept.rank(axis=1, ascending=False, method="average")
    per_seed = (df[df["dataset"].isin(kept.index)]
                .groupby(["seed", "detector"])["auroc"].mean().unstack("detector"))
    failed = df.assign(f=df["error"].astype(str) != "").groupby("detector")["f"].sum()
    best = kept.max(axis=1)
    overall = pd.DataFrame({
        "mean_auroc": kept.mean(axis=0),
        "seed_std": per_seed.std(axis=0, ddof=0).reindex(det_order) if len(per_seed) else np.nan,
        "mean_ap": ap.loc[complete].mean(axis=0),
        "mean_rank": ranks.mean(axis=0),
        "wins": kept.eq(best, axis=0).sum(axis=0).astype(int),
        "n_datasets": int(complete.sum()),
        "n_failed": failed.reindex(det_order).fillna(0).astype(int),
        "fit_s": df.groupby("detector")["fit_s"].sum().reindex(det_order),
        "score_s": df.groupby("detector")["score_s"].sum().reindex(det_order),
    }, index=det_order)
    overall.index.name = "detector"
    overall = overall.sort_values(["mean_auroc", "mean_rank"], ascending=[False, True],
                                  na_position="last", kind="stable")
    return Summary(auroc=auroc, ap=ap, ranks=ranks, overall=overall, dropped=dropped)


def _fmt(v, digits):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{v:.{digits}f}"


def _md_table(header, rows):
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def to_markdown(summary, *, digits=3, reference=None, title=None):
    """Markdown tables of a :class:`Summary`.

    The first table has one row per dataset (mean AUROC over seeds, the best
    of each row in bold), then the mean over datasets and the mean rank; the
    second one the per-detector summary. ``reference`` adds columns of
    claimed numbers (``{dataset: {column: value}}``, e.g.
    :data:`PAPER_TABLE1`; key ``"mean"`` fills the mean row).
    """
    auroc, overall = summary.auroc, summary.overall
    dets = list(auroc.columns)
    ref_cols = []
    if reference:
        for vals in reference.values():
            for c in vals:
                if c not in ref_cols:
                    ref_cols.append(c)
    rows = []
    for ds, r in auroc.iterrows():
        best = r.max(skipna=True)
        cells = [str(ds)]
        for d in dets:
            s = _fmt(r[d], digits)
            cells.append(f"**{s}**" if not math.isnan(r[d]) and r[d] == best else s)
        cells += [_fmt((reference or {}).get(ds, {}).get(c), digits) for c in ref_cols]
        rows.append(cells)
    mean_label = "mean" if not summary.dropped else f"mean ({int(overall['n_datasets'].iloc[0])})"
    rows.append([f"**{mean_label}**"] + [_fmt(overall.loc[d, "mean_auroc"], digits) for d in dets]
                + [_fmt((reference or {}).get("mean", {}).get(c), digits) for c in ref_cols])
    rows.append(["**mean rank**"] + [_fmt(overall.loc[d, "mean_rank"], 2) for d in dets]
                + ["" for _ in ref_cols])
    parts = []
    if title:
        parts.append(f"### {title}\n")
    parts.append("Mean AUROC over seeds (best per row in bold).\n")
    parts.append(_md_table(["dataset"] + dets + ref_cols, rows))
    head = ["detector", "mean AUROC", "± seeds", "mean AP", "mean rank", "wins", "datasets",
            "failed runs", "fit s", "score s"]
    orow = []
    for d, r in overall.iterrows():
        orow.append([str(d), _fmt(r["mean_auroc"], digits), _fmt(r["seed_std"], digits),
                     _fmt(r["mean_ap"], digits), _fmt(r["mean_rank"], 2), _fmt(int(r["wins"]), 0),
                     _fmt(int(r["n_datasets"]), 0), _fmt(int(r["n_failed"]), 0),
                     _fmt(r["fit_s"], 1), _fmt(r["score_s"], 1)])
    parts.append("\nPer detector (means over datasets; ± = std over seeds of the mean; "
                 "rank 1 = best; seconds are totals).\n")
    parts.append(_md_table(head, orow))
    if summary.dropped:
        parts.append(f"\nLeft out of the means and ranks (a detector has no result): "
                     f"{', '.join(map(str, summary.dropped))}.")
    return "\n".join(parts) + "\n"


def write_csv(obj, path):
    """Write a results DataFrame, or a :class:`Summary` (its per-dataset
    AUROC table followed by nothing else), to CSV. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, Summary):
        obj.auroc.to_csv(path)
    else:
        obj.to_csv(path, index=False)
    return path


def write_markdown(summary, path, **kwargs):
    """Write :func:`to_markdown` to ``path``. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_markdown(summary, **kwargs))
    return path


def plot_results(summary, path, *, kind="both", title=None):
    """PNG plot of a :class:`Summary` (needs matplotlib, ``nonn[plot]``).

    ``kind="dots"``: per-dataset AUROC, one marker per detector;
    ``"ranks"``: mean rank per detector (bar chart, 1 = best);
    ``"both"``: the two side by side. Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if kind not in ("dots", "ranks", "both"):
        raise ValueError(f"kind must be 'dots', 'ranks' or 'both'. Got {kind!r} instead.")
    auroc, overall = summary.auroc, summary.overall
    dets = list(auroc.columns)  # run order: the same colours in every suite's plot
    n_ds = len(auroc)
    panels = ["dots", "ranks"] if kind == "both" else [kind]
    height = max(3.5, 0.28 * n_ds + 1.8) + (0.2 * math.ceil(len(dets) / 5) + 0.2
                                           if "dots" in panels else 0)
    widths = {"dots": 8.0, "ranks": 5.0}
    fig = Figure(figsize=(sum(widths[p] for p in panels), height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False,
                        gridspec_kw={"width_ratios": [widths[p] for p in panels]})[0]
    import matplotlib as mpl

    cmap = mpl.colormaps["tab20"]
    markers = "os^vD<>ph*P"
    colors = {d: cmap(i % 20) for i, d in enumerate(dets)}
    for ax, panel in zip(axes, panels):
        if panel == "dots":
            ypos = np.arange(n_ds)[::-1]
            for i, d in enumerate(dets):
                ax.scatter(auroc[d].to_numpy(), ypos, s=22, color=colors[d],
                           marker=markers[i % len(markers)], label=d, alpha=0.85,
                           edgecolors="none")
            ax.set_yticks(ypos)
            ax.set_yticklabels([str(s) for s in auroc.index], fontsize=7)
            ax.set_xlabel("AUROC (mean over seeds)")
            ax.grid(axis="x", alpha=0.3)
            ax.set_ylim(-0.7, n_ds - 0.3)
            ax.set_title("per-dataset AUROC", fontsize=9)
        else:
            r = overall["mean_rank"].sort_values(ascending=False, na_position="first")
            ax.barh(np.arange(len(r)), r.to_numpy(), color=[colors[d] for d in r.index])
            ax.set_yticks(np.arange(len(r)))
            ax.set_yticklabels(list(r.index), fontsize=7)
            ax.set_xlabel(f"mean rank over {int(overall['n_datasets'].iloc[0])} datasets "
                          "(1 = best)")
            ax.grid(axis="x", alpha=0.3)
            ax.set_title("mean rank", fontsize=9)
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=10)
        top = 1.0 - 0.35 / fig.get_figheight()
    bottom = 0.0
    if "dots" in panels:
        # the legend goes under the panels, never over the markers
        ncol = min(5, len(dets))
        handles, labels = axes[panels.index("dots")].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7,
                   frameon=False)
        bottom = (0.2 * math.ceil(len(dets) / ncol) + 0.15) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------
# paper protocols
# --------------------------------------------------------------------------


def table7_grid(dataset="MVTec-union-15", ks=(1, 3, 4, 5, 10), kprimes=(0, 5, 15, 20, 25, 75),
                seeds=(0, 1, 2), *, pairs=None, knnn_params=None, progress=True, **run_kw):
    """The paper's Table 7: AUROC over a grid of k (neighbors of a query)
    and K' (neighbors of each neighbor).

    ``K' = 0`` is plain k-NN with k neighbors (nonn ``KNN``, mean distance),
    as in the paper's bottom rows; otherwise nonn ``KNNN(n_neighbors=k,
    n_neighbors_of_neighbors=K', **knnn_params)``.

    Parameters
    ----------
    dataset : dataset spec, default="MVTec-union-15" (the paper's setting)
    ks, kprimes : iterables of int
        Every combination is run, unless ``pairs`` is given.
    seeds : iterable of int
    pairs : iterable of (k, K'), default=None
        Explicit cells, e.g. the paper's ``[(k, kp) for k, kp, _ in PAPER_TABLE7]``.
    knnn_params : dict, default=None
        Other ``KNNN`` parameters, the same in every cell (``aggregate``
        defaults to the paper's ``"sum"`` here).
    **run_kw
        Passed to :func:`run_suite` (``max_train``, ``scale``, ``home``...).

    Returns
    -------
    DataFrame with columns ``k, kprime, auroc, auroc_std, ap, n_failed``
    (means and std over seeds), plus ``paper`` (Table 7's value where the
    paper has that cell).
    """
    import pandas as pd

    from ._baselines import KNN
    from ._knnn import KNNN

    cells = list(pairs) if pairs is not None else [(k, kp) for k in ks for kp in kprimes]
    params = {"aggregate": "sum", **(knnn_params or {})}  # the paper's Eq. 2 by default
    dets = []
    for k, kp in cells:
        k, kp = int(k), int(kp)
        if kp == 0:
            make = (lambda seed, k=k: KNN(n_neighbors=k))
        else:
            make = (lambda seed, k=k, kp=kp: KNNN(n_neighbors=k, n_neighbors_of_neighbors=kp,
                                                  **params))
        dets.append(Detector(f"k={k},K'={kp}", make))
    df = run_suite([dataset], dets, seeds, progress=progress, **run_kw)
    paper = {(k, kp): v for k, kp, v in PAPER_TABLE7}
    out = []
    for (k, kp), det in zip(cells, dets):
        sub = df[df["detector"] == det.name]
        out.append({"k": int(k), "kprime": int(kp), "auroc": sub["auroc"].mean(),
                    "auroc_std": sub["auroc"].std(ddof=0), "ap": sub["ap"].mean(),
                    "n_failed": int((sub["error"] != "").sum()),
                    "paper": paper.get((int(k), int(kp)), math.nan)})
    return pd.DataFrame(out)


# --------------------------------------------------------------------------
# suites
# --------------------------------------------------------------------------

#: suite name -> (datasets (callable returning specs), default scaling,
#: claimed numbers for the Markdown table)
def _adbench_suite(name):
    def names(home):
        from .datasets import list_adbench

        return list_adbench(name, home=home)

    return names


SUITES = {
    "mvtec": (_adbench_suite("mvtec"), None, PAPER_TABLE1),
    "classical": (_adbench_suite("classical"), "minmax", None),
    "cifar10": (lambda home: ["CIFAR10_0", "CIFAR10_4", "CIFAR10_6"], None, None),
    "mvtec_union": (lambda home: [f"MVTec-union-{n}" for n in (5, 7, 11, 15)], None,
                    PAPER_TABLE4),
    "cifar10_effnet": (lambda home: [f"cifar10-effnet224-{c}" for c in range(10)], None, None),
    "fashion_effnet": (lambda home: [f"fashion-effnet224-{c}" for c in range(10)], None, None),
}


def run_benchmark(suite, out=None, *, detectors=None, seeds=(0, 1, 2), datasets=None,
                  max_train=MAX_TRAIN, max_test=MAX_TEST, scale="auto", progress=True,
                  resume=False, home=None, plot=True):
    """Run one suite and write its results.

    Parameters
    ----------
    suite : {"mvtec", "classical", "cifar10", "mvtec_union"}
        ``"mvtec"``: the 15 MVTec AD categories (ResNet-18 embeddings, paper
        Table 1); ``"classical"``: the 43 ADBench tabular sets;
        ``"cifar10"``: ADBench's three CIFAR-10 embedding sets;
        ``"mvtec_union"``: the first 5, 7, 11, 15 MVTec categories united
        (paper Table 4).
    out : path, default=None
        Folder for ``results.csv`` (every run), ``auroc.csv`` (dataset x
        detector), ``summary.csv`` (per detector), ``summary.md`` and
        ``summary.png``; None writes nothing.
    detectors, seeds, max_train, max_test, progress, home
        As in :func:`run_suite`.
    datasets : list, default=None
        Run only these datasets of the suite (default: all of it).
    scale : "auto", None, "minmax" or "standard"
        "auto": min-max for "classical" (ADBench's own preprocessing), none
        for the embedding suites (as the paper).
    resume : bool
        Continue from ``out/results.csv`` (a checkpoint written after every
        dataset).

    Returns
    -------
    df : DataFrame of every run
    summary : Summary
    markdown : str
    """
    if suite not in SUITES:
        raise ValueError(f"Unknown suite {suite!r}. Expected one of {list(SUITES)}.")
    list_fn, default_scale, reference = SUITES[suite]
    specs = list(datasets) if datasets is not None else list_fn(home)
    if not specs:
        raise ValueError(f"No datasets to run for the suite {suite!r}.")
    check_datasets(specs, home=home)
    if scale == "auto":
        scale = default_scale
    checkpoint = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = out / "results.csv"
    df = run_suite(specs, detectors, seeds, max_train=max_train, max_test=max_test,
                   scale=scale, progress=progress, checkpoint=checkpoint, resume=resume,
                   home=home)
    summary = summarize(df)
    title = (f"{suite}: {len(summary.auroc)} datasets, seeds {list(seeds)}, "
             f"scale={scale}, max_train={max_train}, max_test={max_test}")
    md = to_markdown(summary, reference=reference, title=title)
    notes = df.attrs.get("notes", [])
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if out is not None:
        write_csv(df, out / "results.csv")
        write_csv(summary, out / "auroc.csv")
        summary.overall.to_csv(out / "summary.csv")
        (out / "summary.md").write_text(md)
        if plot:
            try:
                plot_results(summary, out / "summary.png", title=title)
            except ImportError as exc:
                warnings.warn(f"no plot: {exc} (pip install 'nonn[plot]')", stacklevel=2)
    return df, summary, md


# --------------------------------------------------------------------------
# one-class tasks on image features (cached on disk)
# --------------------------------------------------------------------------

#: images per class in the training pool the one-class tasks draw from (the
#: pool is nonn.vision.datasets' seeded per-class subsample, random_state=0)
IMAGE_POOL_PER_CLASS = 1000
#: training images of the normal class drawn per seed from the pool
IMAGE_TRAIN_PER_CLASS = 400
_IMAGE_BACKBONE = ("efficientnet_lite0", 224)


@dataclass(frozen=True)
class OneClassTask:
    """Labels of a one-class task with its own split: the normal class's
    training images (a per-seed draw of ``n_train`` from ``train_rows``)
    against the whole test split, every other class anomalous."""

    labels: np.ndarray
    train_rows: np.ndarray
    test_rows: np.ndarray
    normal: int
    n_train: int = IMAGE_TRAIN_PER_CLASS

    def split(self, seed):
        pool = self.train_rows[self.labels[self.train_rows] == self.normal]
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), self.normal]))
        train = np.sort(rng.choice(pool, min(self.n_train, len(pool)), replace=False))
        test = self.test_rows
        return train, test, (self.labels[test] != self.normal).astype(np.int64)

    def __len__(self):
        return len(self.labels)


def feature_cache_dir(cache=None):
    """Folder of cached image features: ``cache``, else ``$NONN_CACHE``, else
    ``~/.cache/nonn``."""
    import os

    if cache is None:
        cache = os.environ.get("NONN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "nonn")
    return Path(cache) / "features" / f"{_IMAGE_BACKBONE[0]}-{_IMAGE_BACKBONE[1]}"


def image_features(dataset, split, *, home=None, cache=None, progress=True):
    """Pooled EfficientNet-Lite0 features at 224 px of a dataset split, and
    their labels, extracted once (needs ``nonn[vision]``) and cached.

    ``split`` is ``"test"`` (the whole official test split) or ``"pool"``
    (:data:`IMAGE_POOL_PER_CLASS` training images per class, nonn's seeded
    subsample). Returns ``(X float32 (n, 1280), y int64 (n,))``.
    """
    from ._io import atomic_write

    if dataset not in ("cifar10", "fashion") or split not in ("test", "pool"):
        raise ValueError(f"image_features takes dataset 'cifar10' or 'fashion' and split "
                         f"'test' or 'pool'; got {dataset!r}, {split!r}.")
    path = feature_cache_dir(cache) / f"{dataset}-{split}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return z["X"], z["y"]
    from .vision import datasets as vds
    from .vision.features import ImageFeatureExtractor

    loader = vds.load_cifar10 if dataset == "cifar10" else vds.load_fashion_mnist
    kw = ({"split": "test"} if split == "test" else
          {"split": "train", "n_per_class": IMAGE_POOL_PER_CLASS, "random_state": 0})
    images, y = loader(home=home, **kw)
    ext = ImageFeatureExtractor(backbone=_IMAGE_BACKBONE[0], image_size=_IMAGE_BACKBONE[1],
                                verbose=progress)
    X = ext.fit().transform(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: np.savez(fh, X=X, y=y))
    return X, y


def _image_one_class(spec, home=None):
    dataset, normal = _IMAGE.match(spec).groups()
    Xp, yp = image_features(dataset, "pool", home=home)
    Xt, yt = image_features(dataset, "test", home=home)
    X = np.concatenate([Xp, Xt])
    labels = np.concatenate([yp, yt]).astype(np.int64)
    task = OneClassTask(labels, np.arange(len(yp)), np.arange(len(yp), len(labels)), int(normal))
    return spec, X, task
