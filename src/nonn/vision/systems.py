"""The paper's three image systems, each with a k-NN or a k-NNN operator.

- :class:`FeatureDetector` — "Feature + k-NN": global pooled features of a
  pretrained backbone, scored by a nearest-neighbor detector.
- :class:`SPADE` — Cohen & Hoshen 2020: image score from the nearest normal
  images' pooled features; pixel maps from a multi-layer feature pyramid
  matched against the pyramids of the ``n_map_neighbors`` nearest normal
  images (nearest by a coarse grid of the pyramid), upsampled and
  Gaussian-smoothed.
- :class:`PANDA` — Reiss et al. 2021: fine-tune the backbone's last stages on
  the normal images with the compactness loss (squared distance to the
  centre of the normal features), stopped early, then the nearest-neighbor
  score on the adapted features.

``nn='knnn'`` uses :class:`nonn.KNNN` (the paper's operator), ``nn='knn'``
the plain :class:`nonn.KNN` (mean distance to the k nearest), which is what
the paper replaces. Scores follow nonn's conventions: ``anomaly_score``
higher = more anomalous, ``score_samples`` = its negative, ``predict`` +1/-1
with the detector's threshold.

References
----------
O. Nizan and A. Tal, "k-NNN: Nearest Neighbors of Neighbors for Anomaly
Detection", WACV Workshops 2024. N. Cohen and Y. Hoshen, "Sub-Image Anomaly
Detection with Deep Pyramid Correspondences", 2020. T. Reiss, N. Cohen,
L. Bergman and Y. Hoshen, "PANDA: Adapting Pretrained Features for Anomaly
Detection and Segmentation", CVPR 2021.
"""

from __future__ import annotations

import copy

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from nonn import _archive
from nonn._archive import ModelFileError
from nonn._base import ScoreConventions
from nonn._state import Array

from . import _images
from .features import ImageFeatureExtractor, import_torch, show_progress

VISION_FORMAT = "nonn-vision-model"
VISION_FORMAT_VERSION = 5
#: what a SPADE's image score is made of (see SPADE)
IMAGE_SCORES = ("global", "map", "combined")
#: parameters added with a format version, and the value a file of an
#: earlier version scored with (its maps and image scores stay as they were)
_LEGACY_PARAMS = {3: {"image_score": "global", "map_score_q": 0.01, "coreset_ratio": None,
                      "n_map_calibration": 100},
                  4: {"map_normalize": None},
                  5: {"gallery_grid": None}}
#: what SPADE's pyramid locations may be normalised by before matching
MAP_NORMALIZE = (None, "soft")


def make_detector(nn, n_neighbors, n_neighbors_of_neighbors=None, contamination="auto",
                  verbose=False, **params):
    """The nearest-neighbor operator: ``KNNN`` for ``'knnn'``, ``KNN`` for ``'knn'``.

    Parameters not given (``n_neighbors_of_neighbors=None``, anything not in
    ``params``) are the detector's own defaults, so the image systems score
    with the same operator as ``KNNN()`` / ``KNN()``.
    """
    from nonn import KNN, KNNN

    if nn == "knnn":
        if n_neighbors_of_neighbors is not None:
            params = {"n_neighbors_of_neighbors": n_neighbors_of_neighbors, **params}
        return KNNN(n_neighbors=n_neighbors, contamination=contamination, verbose=verbose,
                    **params)
    if nn == "knn":
        return KNN(n_neighbors=n_neighbors, contamination=contamination, verbose=verbose,
                   **params)
    raise ValueError(f"The 'nn' parameter must be 'knn' or 'knnn'. Got {nn!r} instead.")


class _ImageSystem(ScoreConventions, BaseEstimator):
    """Shared plumbing: extractor, detector, scores, persistence."""

    _default_k = 3

    def _extractor(self):
        return ImageFeatureExtractor(backbone=self.backbone, weights=self.weights,
                                     image_size=self.image_size, batch_size=self.batch_size,
                                     device=self.device, verbose=self.verbose,
                                     layers=getattr(self, "layers", "last"))

    def _detector(self):
        k = self._default_k if self.n_neighbors is None else self.n_neighbors
        return make_detector(self.nn, k, self.n_neighbors_of_neighbors, self.contamination,
                             **(self.detector_params or {}))

    # ---------------------------------------------------------------- fit
    def fit(self, X, y=None):
        """Fit on normal images ``X`` (a folder, paths, or a uint8 image array)."""
        self._detector()  # validate nn before the (long) extraction
        self.extractor_ = self._extractor().fit()
        return self.fit_features(self._train_features(X))

    def _train_features(self, X):
        return self.extractor_.transform(X)

    def _prep(self, features):
        features = np.asarray(features, dtype=np.float32)
        if self.normalize:
            # unit length: distances then compare directions, not feature norms
            norms = np.linalg.norm(features, axis=1, keepdims=True)
            features = features / np.maximum(norms, np.finfo(np.float32).tiny)
        return features

    def fit_features(self, features):
        """Fit the nearest-neighbor operator on precomputed pooled features
        (N, dim) — what :meth:`fit` does after extraction."""
        if not isinstance(self.normalize, (bool, np.bool_)):
            raise ValueError(f"The 'normalize' parameter must be True or False. Got "
                             f"{self.normalize!r} instead.")
        features = self._prep(features)
        self.train_features_ = features
        self.detector_ = self._detector().fit(features)
        self.offset_ = self.detector_.offset_
        self.n_train_ = features.shape[0]
        return self

    # -------------------------------------------------------------- scores
    def _features(self, X):
        check_is_fitted(self, "detector_")
        if not hasattr(self, "extractor_"):
            self.extractor_ = self._extractor().fit()
        return self.extractor_.transform(X)

    def anomaly_score_features(self, features):
        """Anomaly scores of precomputed pooled features."""
        check_is_fitted(self, "detector_")
        return self.detector_.anomaly_score(self._prep(features))

    def anomaly_score(self, X):
        """Image anomaly score (higher = more anomalous), shape (N,)."""
        return self.anomaly_score_features(self._features(X))

    def labels_from_scores(self, anomaly):
        """``predict`` for already computed anomaly scores."""
        return np.where(-np.asarray(anomaly) - self.offset_ < 0, -1, 1)

    # ---------------------------------------------------------- threshold
    @property
    def calibration_scores_(self):
        """The detector's calibration scores (``score_samples`` of normal
        images scored out of sample), behind ``offset_`` and :meth:`pvalue`."""
        check_is_fitted(self, "detector_")
        return self.detector_.calibration_scores_

    def calibrate(self, X, false_alarm_rate=0.01):
        """Re-set the threshold (and the p-values) on held-out normal images
        ``X`` (a folder, paths, or a uint8 image array), without refitting;
        about ``false_alarm_rate`` of images like them are then flagged.
        The model's own training images are refused (their scores are not
        out of sample). Returns self."""
        check_is_fitted(self, "detector_")
        from nonn._base import check_false_alarm_rate

        check_false_alarm_rate(false_alarm_rate)
        return self.calibrate_features(self._features(X), false_alarm_rate)

    def calibrate_features(self, features, false_alarm_rate=0.01):
        """:meth:`calibrate` from precomputed pooled features."""
        import warnings

        from nonn._base import check_false_alarm_rate

        check_is_fitted(self, "detector_")
        check_false_alarm_rate(false_alarm_rate)
        features = self._prep(features)
        seen = self._training_images(features)
        n = len(features)
        if seen.sum() * 2 > n:
            raise ValueError(
                f"{int(seen.sum())} of the {n} images given to calibrate are training images "
                "of this model; their scores are not out of sample, so the threshold would "
                "flag far more new normal images than asked. Calibrate on normal images held "
                "out from fit.")
        with warnings.catch_warnings():
            if seen.any():
                warnings.warn(f"{int(seen.sum())} of the {n} calibration images are training "
                              "images of this model; their scores are optimistic.",
                              stacklevel=3)
                # the detector would say the same of the exact copies among them
                warnings.simplefilter("ignore", UserWarning)
            self.detector_.calibrate(features, false_alarm_rate)
        self.offset_ = self.detector_.offset_
        return self

    #: a feature row within this share of a training row's length of it is
    #: taken for that training image (features of one image computed on
    #: another device, or with reduced-precision convolutions, differ a little)
    _SAME_IMAGE_RTOL = 1e-3

    def _training_images(self, features):
        """Which rows of ``features`` (as the detector sees them) are the
        features of training images."""
        train = np.asarray(self.train_features_, dtype=np.float32)
        out = np.zeros(len(features), dtype=bool)
        if not len(train) or features.shape[1:] != train.shape[1:]:
            return out
        t2 = (train.astype(np.float64) ** 2).sum(1)
        for start in range(0, len(features), 256):
            f = features[start:start + 256].astype(np.float64)
            d2 = (f ** 2).sum(1)[:, None] - 2 * f @ train.T.astype(np.float64) + t2[None]
            j = d2.argmin(1)
            out[start:start + 256] = (np.maximum(d2[np.arange(len(f)), j], 0)
                                      <= self._SAME_IMAGE_RTOL ** 2 * t2[j])
        return out

    # -------------------------------------------------------- persistence
    _extra_arrays = ("train_features_",)
    _optional_arrays = ()

    def _required_arrays(self):
        return self._extra_arrays

    def _saved_arrays(self):
        return self._required_arrays()
    #: the saved arrays (see nonn._state): N training images, D feature
    #: dimensions (the detector's), in float32 as the detector sees them
    _state_spec = {"train_features_": Array("N", "D", dtype="float32")}

    def save(self, path):
        """Write the fitted system (parameters, detector arrays, stored
        features; never the backbone's weights, nor pickle) to ``path``."""
        check_is_fitted(self, "detector_")
        arrays, meta = _system_state(self)
        return _archive.write(path, arrays, meta)

    def _check_params(self):
        """Validate the parameters a saved system scores with (``fit``
        validates the extractor's and detector's own as it builds them)."""
        name = type(self).__name__
        problems = []

        def need(param, ok, expected):
            if not ok(getattr(self, param)):
                problems.append(f"The {param!r} parameter of {name} must be {expected}. "
                                f"Got {getattr(self, param)!r} instead.")

        def is_int(v, low=1):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= low

        need("nn", lambda v: v in ("knn", "knnn"), "'knn' or 'knnn'")
        need("n_neighbors", lambda v: v is None or is_int(v), "None or an int >= 1")
        need("n_neighbors_of_neighbors", lambda v: v is None or is_int(v),
             "None (KNNN's default) or an int >= 1")
        need("backbone", lambda v: isinstance(v, str), "a backbone name")
        need("weights", lambda v: v is None or isinstance(v, str), "None or a file path")
        need("image_size", is_int, "an int >= 1")
        need("batch_size", is_int, "an int >= 1")
        need("device", lambda v: isinstance(v, str), "'auto', 'cpu' or 'cuda'")
        need("verbose", lambda v: v in (True, False, "auto"), "True, False or 'auto'")
        need("normalize", lambda v: isinstance(v, (bool, np.bool_)), "True or False")
        if hasattr(self, "layers"):
            need("layers", lambda v: v in ("last", "multi"), "'last' or 'multi'")
        need("detector_params", lambda v: v is None or isinstance(v, dict), "None or a dict")
        if problems:
            raise ValueError(problems[0])
        self._detector()._check_params()


def _system_state(system):
    """``(members, meta)`` of an image model file: the system's arrays, the
    detector's under ``detector/``, and the metadata (the detector's nested
    under ``"detector"``), checked as :func:`load` checks them."""
    from nonn import __version__
    from nonn._model_file import detector_state, jsonable

    det_arrays, det_meta = detector_state(system.detector_)
    arrays = {name.rstrip("_"): np.ascontiguousarray(getattr(system, name))
              for name in system._saved_arrays()}
    meta = {"format": VISION_FORMAT, "format_version": VISION_FORMAT_VERSION,
            "nonn_version": __version__, "system": type(system).__name__,
            "params": jsonable(system.get_params()),
            "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str}
                       for k, v in arrays.items()},
            "detector": det_meta}
    try:
        _check_system(type(system), meta, {k: (v.shape, v.dtype) for k, v in arrays.items()},
                      arrays.__getitem__, system.detector_, "the model")
    except ModelFileError as exc:
        raise ValueError(f"Refusing to save this {type(system).__name__}: {exc}") from None
    members = dict(arrays)
    members.update({_DETECTOR + k: v for k, v in det_arrays.items()})
    return members, meta


# ------------------------------------------------------------------ Feature
class FeatureDetector(_ImageSystem):
    """"Feature + k-NN" / "Feature + k-NNN": pooled backbone features scored
    by a nearest-neighbor detector.

    Parameters
    ----------
    nn : {'knnn', 'knn'}, default='knnn'
    n_neighbors : int or None, default=None
        k; None means 3.
    n_neighbors_of_neighbors : int or None, default=None
        K' of k-NNN (ignored by k-NN); None: KNNN's default. Every
        parameter not given here or in ``detector_params`` is the
        detector's default, so ``FeatureDetector(nn='knnn')`` scores with
        ``KNNN(n_neighbors=3)``.
    backbone, weights, image_size, batch_size, device, verbose
        See :class:`ImageFeatureExtractor`.
    contamination : 'auto' or float
        Threshold of ``predict`` (share of training images flagged).
    detector_params : dict or None
        More parameters of the detector (e.g. ``{'set_size': 8}``).
    normalize : bool, default=True
        Scale every pooled feature to unit length before the detector (the
        paper uses raw features; unit length removes the feature-norm effect
        that dominates raw Euclidean k-NN on these features: measured on
        CIFAR-10 at 224 px it raises both k-NN and k-NNN, see
        docs/vision.md); PANDA's too (its fine-tuned features at full scale:
        k-NN 0.802 -> 0.857, KNNN unchanged).
    layers : {'last', 'multi'}, default='last'
        The extractor's features (see :class:`ImageFeatureExtractor`).

    Attributes
    ----------
    extractor_, detector_, offset_
    train_features_ : ndarray (n_train, dim)
        The training features as the detector sees them (after ``normalize``).

    Examples
    --------
    >>> det = FeatureDetector(nn="knnn").fit("good/")      # doctest: +SKIP
    >>> det.predict("new/")                                 # doctest: +SKIP
    """

    def __init__(self, nn="knnn", n_neighbors=None, n_neighbors_of_neighbors=None,
                 backbone="efficientnet_lite0", weights=None, image_size=224, batch_size=32,
                 device="auto", verbose="auto", contamination="auto", detector_params=None,
                 normalize=True, layers="last"):
        self.layers = layers
        self.nn = nn
        self.n_neighbors = n_neighbors
        self.n_neighbors_of_neighbors = n_neighbors_of_neighbors
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose
        self.contamination = contamination
        self.detector_params = detector_params
        self.normalize = normalize


# -------------------------------------------------------------------- SPADE
class SPADE(_ImageSystem):
    """SPADE with a k-NN or k-NNN image-level operator, and a k-NN or k-NNN
    pixel-level operator.

    Global score: the nearest-neighbor operator ``nn`` on pooled features
    (SPADE's K = 50 nearest normal images by default); the image score
    combines it with the map's (``image_score``). Pixel map: every
    location of the query's feature pyramid is matched against the gallery
    of all locations of the ``n_map_neighbors`` nearest normal images'
    pyramids (nearest by ``gallery_grid``), with the operator ``map_nn``:

    - ``'knn'`` (SPADE's): the distance to the nearest gallery location
      (kappa = 1);
    - ``'knnn'``: the paper's Eq. 2 against the gallery: a :class:`nonn.KNNN`
      is fitted on the gallery locations (each location's local eigenbasis
      comes from its ``map_n_neighbors_of_neighbors`` nearest locations in
      the gallery) and scores the query's locations with its nearest gallery
      location (kappa = 1, like SPADE's matching; ``map_detector_params`` can
      change it and the other parameters of that KNNN). One KNNN is fitted
      per distinct gallery, i.e. per query image in practice: several times
      the cost of ``'knn'`` (timings in docs/vision.md).

    The map is then upsampled to ``image_size``, smoothed with a Gaussian of
    ``sigma`` pixels and resized to the image's own size. ``map_nn``
    defaults to ``'knn'``, not to ``nn``: the paper replaces SPADE's k-NN
    for the *image* score and reports image-level AUROC only (Table 1), so
    nothing shows that k-NNN pixel matching localises better; it costs a
    KNNN fit per query image; and a model saved before ``map_nn`` existed
    must keep giving the maps it gave. The two maps are on different
    scales (a distance in feature units vs. a sum of eigen-whitened
    projections), so compare maps of one ``map_nn`` only.

    Parameters
    ----------
    n_neighbors : int or None, default=None
        K of the image-level score; None means 50 (SPADE's choice).
    n_map_neighbors : int, default=20
        Normal images whose pyramids form the gallery of a query's pixels
        (capped at the training images), the nearest by ``gallery_grid``.
        20, not the 5 of common SPADE implementations: on the
        synthetic-defect sets it raised image AUROC, pixel AUROC and AUPRO
        on every set, for about 1.3x the scoring time (docs/vision.md); with
        thousands of training images 50 measured better still. Files store
        their own value.
    map_size : int, default=28
        Side of the stored pyramid (28 = stride 8 at 224 pixels); smaller
        saves memory (the model file stores every training pyramid).
    sigma : float, default=4
        Gaussian smoothing of the map, in pixels at ``image_size``.
    map_nn : {'knn', 'knnn'}, default='knn'
        Pixel-level operator (see above). A scoring-time choice: it can be
        changed with ``set_params`` on a fitted or loaded model.
    map_n_neighbors_of_neighbors : int, default=25
        K' of the pixel-level KNNN: gallery locations in each gallery
        location's neighborhood, itself included (capped at the gallery's
        size; ignored by ``map_nn='knn'``).
    map_detector_params : dict or None
        More parameters of the pixel-level KNNN (e.g. ``{'set_size': 8}`` or
        ``{'n_neighbors': 3, 'aggregate': 'sum'}``); the defaults are
        KNNN's, with ``n_neighbors=1`` and K' = ``map_n_neighbors_of_neighbors``
        (25, not KNNN's default: the KNNN is fitted anew on every query's
        gallery, and its cost grows with K').
    image_score : {'combined', 'global', 'map'}, default='combined'
        The image score: ``'global'`` the operator ``nn`` on the pooled
        feature (SPADE's and the paper's); ``'map'`` the mean of the largest
        ``map_score_q`` share of the map's pixels (at ``image_size``), which
        sees local defects the pooled feature averages away; ``'combined'``
        both, each standardised by the median and MAD of held-out normal
        training images, summed. ``'map'`` and ``'combined'`` compute the
        map of every image scored. See docs/vision.md for the measurements.
    map_score_q : float in [0, 1), default=0.01
        Share of map pixels averaged for the map score; 0 = the maximum.
    map_score_border : int, default=0
        Pixels (at ``image_size``) along each edge that the map score leaves
        out; the maps, masks and pixel threshold keep them. A CNN's feature
        maps at the image's edge are computed partly from its zero padding,
        and a normal image's map has its highest values there more often
        than elsewhere (CIFAR-10 horses: 70 % of the maxima within 28 pixels
        of the edge, 44 % of the area). With ``image_score='map'``, 16
        raised pasted patches' image AUROC on all three synthetic-defect
        sets (300 + 300 horses, 5,000 training images: 0.918 -> 0.942;
        docs/vision.md). A defect wholly within the border is then seen by
        the map only, hence the default 0.
    gallery_grid : int or None, default=4
        How the gallery's ``n_map_neighbors`` images are chosen. An int
        ``g``: the nearest by the pyramid averaged over a ``g`` x ``g`` grid
        (every location normalised as for matching, ``map_normalize``; the
        cells' means concatenated; Euclidean distance), so that the gallery
        holds images with like things in like places, whose locations match
        a normal query's more closely. None: the nearest by the pooled
        feature (SPADE's; files written before this parameter), which says
        what an image shows, not where. Pasted patches on 300 + 300 test
        images (5,000 training images, gallery 50, ``image_score='map'``,
        top 5 %, border 16), image AUROC by the pooled feature -> by a 4 x 4
        grid: horses 0.942 -> 0.951, T-shirts 0.950 -> 0.958, textures
        0.954 -> 0.957; pixel AUROC and AUPRO higher on horses and T-shirts
        (docs/vision.md). Capped at ``map_size``; ignored with a coreset (no
        gallery). A scoring-time choice, like ``map_nn``.
    coreset_ratio : float in (0, 1] or None, default=None
        None: keep every training image's pyramid and match each query
        against its ``n_map_neighbors`` nearest images (SPADE). A ratio: keep
        a greedy k-center coreset of that share of all training locations
        (PatchCore's memory bank, :func:`greedy_coreset`) and match every
        query location against the whole bank; the model then stores the
        bank instead of the pyramids (about ``ratio`` of their size). With a
        coreset the held-out calibration is computed at fit only (it needs
        the pyramids), so ``map_nn`` and the map parameters are fixed then.
    map_normalize : {'soft', None}, default='soft'
        What every pyramid location's feature vector ``v`` (query, gallery,
        memory bank) is divided by before matching: ``'soft'``
        ``sqrt(|v|^2 + s^2)``, ``s`` the median norm of the training
        locations (:attr:`map_scale_`), a soft L2 normalisation that evens out
        local contrast (a texture's lighting, a bright or dim object) while a
        near-empty location (a black background) keeps its small norm;
        None: nothing (SPADE's raw features). Fixed at fit (the coreset is
        chosen in its space). ``map_nn='knnn'`` is unaffected but for that
        choice: its KNNN scales every location to unit length anyway
        (``normalize='auto'``: ``'l2'`` from 64 channels, as every backbone's
        pyramid has). Measured in docs/vision.md.
    n_map_calibration : int, default=100
        Training images (a seeded subset of the detector's calibration rows)
        whose held-out maps set :attr:`map_median_`, :attr:`pixel_threshold_`
        and the scale of the map score.
    test_time_flip : bool, default=False
        Map every image twice, as it is and as its horizontal mirror image
        (the latter's map flipped back), and use the mean of the two maps —
        for the image score, the pixels and the held-out calibration alike.
        Twice the map's extraction and matching time; the gallery is chosen
        by the image itself. On CIFAR-10 horses with a pasted
        patch it raised the map score's image AUROC from 0.918 to 0.929, and
        pixel AUROC and AUPRO on every synthetic-defect set (docs/vision.md).
        Leave it off where a mirror image is itself a defect (a part mounted
        the wrong way round, a flipped nut): the mean would halve that
        evidence. Fixed at fit (the held-out calibration
        needs the training images' mirror images, which the model does not
        store): changing a map parameter of such a model afterwards raises.

    Other parameters as :class:`FeatureDetector`.

    Attributes
    ----------
    train_maps_ : ndarray (n_train, channels, map_size, map_size) float16
        Without a coreset.
    memory_bank_ : ndarray (n_bank, channels) float16
        With a coreset: the kept locations (raw, as extracted);
        ``memory_bank_source_`` (int32) the training image of each.
    map_scale_ : ndarray (1,) float32
        With ``map_normalize='soft'``: ``s``, the median norm of the
        training pyramids' locations (of a seeded sample of at most 100,000).
    map_calibration_ : ndarray (n_calibration, 3) float32
        Per held-out training image (scored as by a model without it: its
        own pyramid out of its gallery, its own locations out of the bank):
        the global anomaly score, the map score, the map's maximum.
    map_levels_ : ndarray (2,) float32
        :attr:`map_median_` and :attr:`pixel_threshold_` (see those).
    offset_ : float
        Threshold of ``predict`` on the image score in use; for ``'map'`` and
        ``'combined'`` the ``1 - contamination`` quantile of the held-out
        calibration images' scores (out of sample).

    References
    ----------
    N. Cohen and Y. Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid
    Correspondences", 2020 (SPADE). O. Nizan and A. Tal, "k-NNN: Nearest
    Neighbors of Neighbors for Anomaly Detection", WACV Workshops 2024 (Eq. 2).

    Examples
    --------
    >>> spade = SPADE(nn="knnn", map_nn="knnn").fit("good/")   # doctest: +SKIP
    >>> scores, maps = spade.score_with_maps("test/")          # doctest: +SKIP
    """

    _default_k = 50
    _extra_arrays = ("train_features_", "train_maps_")
    _optional_arrays = ("map_calibration_", "map_levels_")
    #: ... and the feature pyramids: C channels of M x M (M = map_size), or
    #: the coreset memory bank (B locations of C channels) with the training
    #: image of every location; the held-out calibration (Q images: global
    #: score, map score, map maximum) and the map levels (median normal
    #: pixel, pixel threshold)
    _state_spec = {**_ImageSystem._state_spec,
                   "train_maps_": Array("N", "C", "M", "M", dtype="float16"),
                   "memory_bank_": Array("B", "C", dtype="float16"),
                   "memory_bank_source_": Array("B", dtype="int32", ids="N"),
                   "map_calibration_": Array("Q", 3, dtype="float32"),
                   "map_levels_": Array(2, dtype="float32"),
                   "map_scale_": Array(1, dtype="float32", positive=True)}

    def __init__(self, nn="knnn", n_neighbors=None, n_neighbors_of_neighbors=None,
                 n_map_neighbors=20, map_size=28, sigma=4.0, map_nn="knn",
                 map_n_neighbors_of_neighbors=25, map_detector_params=None,
                 image_score="combined", map_score_q=0.01, coreset_ratio=None,
                 map_normalize="soft", n_map_calibration=100, test_time_flip=False,
                 map_score_border=0, gallery_grid=4, backbone="efficientnet_lite0", weights=None,
                 image_size=224, batch_size=32, device="auto", verbose="auto",
                 contamination="auto", detector_params=None, normalize=True):
        self.image_score = image_score
        self.map_score_q = map_score_q
        self.coreset_ratio = coreset_ratio
        self.map_normalize = map_normalize
        self.n_map_calibration = n_map_calibration
        self.test_time_flip = test_time_flip
        self.map_score_border = map_score_border
        self.gallery_grid = gallery_grid
        self.nn = nn
        self.n_neighbors = n_neighbors
        self.n_neighbors_of_neighbors = n_neighbors_of_neighbors
        self.n_map_neighbors = n_map_neighbors
        self.map_size = map_size
        self.sigma = sigma
        self.map_nn = map_nn
        self.map_n_neighbors_of_neighbors = map_n_neighbors_of_neighbors
        self.map_detector_params = map_detector_params
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose
        self.contamination = contamination
        self.detector_params = detector_params
        self.normalize = normalize

    def _check_map_params(self):
        for name in ("n_map_neighbors", "map_size", "map_n_neighbors_of_neighbors",
                     "n_map_calibration"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"The '{name}' parameter of SPADE must be an int in the "
                                 f"range [1, inf). Got {v!r} instead.")
        if self.map_nn not in ("knn", "knnn"):
            raise ValueError(f"The 'map_nn' parameter of SPADE must be 'knn' or 'knnn'. Got "
                             f"{self.map_nn!r} instead.")
        if self.map_detector_params is not None and not isinstance(self.map_detector_params,
                                                                   dict):
            raise ValueError(f"The 'map_detector_params' parameter of SPADE must be a dict or "
                             f"None. Got {self.map_detector_params!r} instead.")
        if self.image_score not in IMAGE_SCORES:
            raise ValueError(f"The 'image_score' parameter of SPADE must be one of "
                             f"{IMAGE_SCORES}. Got {self.image_score!r} instead.")
        q = self.map_score_q
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q < 1:
            raise ValueError(f"The 'map_score_q' parameter of SPADE must be a float in [0, 1) "
                             f"(0: the map's maximum). Got {q!r} instead.")
        b = self.map_score_border
        size = self.image_size
        if (not isinstance(b, (int, np.integer)) or isinstance(b, bool) or b < 0
                or (isinstance(size, (int, np.integer)) and 2 * b >= size)):
            raise ValueError(f"The 'map_score_border' parameter of SPADE must be an int in the "
                             f"range [0, image_size / 2) = [0, {size}/2). Got {b!r} instead.")
        g = self.gallery_grid
        if g is not None and (not isinstance(g, (int, np.integer)) or isinstance(g, bool)
                              or g < 1):
            raise ValueError(f"The 'gallery_grid' parameter of SPADE must be None or an int in "
                             f"the range [1, inf). Got {g!r} instead.")
        r = self.coreset_ratio
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float))
                              or not 0 < r <= 1):
            raise ValueError(f"The 'coreset_ratio' parameter of SPADE must be None or a float "
                             f"in (0, 1]. Got {r!r} instead.")
        if not any(self.map_normalize is v or self.map_normalize == v for v in MAP_NORMALIZE):
            raise ValueError(f"The 'map_normalize' parameter of SPADE must be 'soft' or None. "
                             f"Got {self.map_normalize!r} instead.")
        if not isinstance(self.test_time_flip, (bool, np.bool_)):
            raise ValueError(f"The 'test_time_flip' parameter of SPADE must be True or False. "
                             f"Got {self.test_time_flip!r} instead.")

    # ------------------------------------------------------------ state
    def _required_arrays(self):
        """The arrays a fitted SPADE with these parameters holds (the
        calibration ones are optional: files written before them lack them)."""
        scale = ("map_scale_",) if self.map_normalize == "soft" else ()
        if self.coreset_ratio is None:
            return ("train_features_", "train_maps_") + scale
        return ("train_features_", "memory_bank_", "memory_bank_source_") + scale

    def _saved_arrays(self):
        return self._required_arrays() + tuple(
            a for a in self._optional_arrays if getattr(self, a, None) is not None)

    def save(self, path):
        if getattr(self, "map_calibration_", None) is not None:
            # the calibration of the parameters saved with it (a map parameter
            # changed since the last scoring is recalibrated, or refused), and
            # the threshold of both, as a loaded model has it
            self._calibration()
            self._set_offset()
        return super().save(path)

    save.__doc__ = _ImageSystem.save.__doc__

    # -------------------------------------------------------------- fit
    def fit(self, X, y=None):
        """Fit on normal images ``X`` (a folder, paths, or a uint8 image array)."""
        try:
            return super().fit(X, y)
        finally:
            self._fit_images = None

    def _train_features(self, X):
        self._check_map_params()
        images = _images.as_image_list(X)
        feats, maps = self.extractor_.transform_pyramid(images, self.map_size)
        self._fit_maps = maps
        # test_time_flip: the calibration rows' mirror images are extracted
        # once those rows are known (a hundred images, not every one)
        self._fit_images = images if self.test_time_flip else None
        return feats

    def fit_features(self, features, maps=None, mirror_maps=None):
        """Fit from precomputed pooled features and pyramids (N, C, M, M) —
        what :meth:`fit` does after extraction. With ``test_time_flip``,
        ``mirror_maps``: the pyramids of the training images' mirror images
        (``transform_pyramid(X, map_size, mirror=True)[2]``), for the
        held-out calibration."""
        self._check_map_params()
        if maps is not None:
            self._fit_maps = np.asarray(maps, dtype=np.float16)
        if getattr(self, "_fit_maps", None) is None:
            raise ValueError("SPADE.fit_features needs the training pyramids (maps=...).")
        maps, self._fit_maps = self._fit_maps, None
        if mirror_maps is not None:
            if not self.test_time_flip:
                raise ValueError("mirror_maps is for test_time_flip=True; this SPADE has "
                                 "test_time_flip=False.")
            mirror_maps = np.asarray(mirror_maps)
            if mirror_maps.shape != maps.shape:
                raise ValueError(f"mirror_maps of shape {mirror_maps.shape} for training "
                                 f"pyramids of shape {maps.shape}.")
        elif self.test_time_flip and getattr(self, "_fit_images", None) is None:
            raise ValueError("A SPADE with test_time_flip=True needs the training images' "
                             "mirror-image pyramids for its held-out calibration: pass "
                             "mirror_maps=transform_pyramid(X, map_size, mirror=True)[2], or "
                             "fit(images).")
        self._fit_mirror_maps = mirror_maps
        for name in ("train_maps_", "memory_bank_", "memory_bank_source_",
                     "map_calibration_", "map_levels_", "map_scale_"):
            if hasattr(self, name):
                delattr(self, name)
        self._map_cache, self._bank_cache, self._grid_cache = {}, {}, {}
        super().fit_features(features)
        if maps.shape[0] != self.n_train_:
            raise ValueError(f"{maps.shape[0]} pyramids for {self.n_train_} training images.")
        if self.map_normalize == "soft":
            self.map_scale_ = np.array([_median_norm(maps)], dtype=np.float32)
        if self.coreset_ratio is None:
            self.train_maps_ = maps
        else:
            locations = maps.transpose(0, 2, 3, 1).reshape(-1, maps.shape[1])
            keep = greedy_coreset(self._normed(locations), self.coreset_ratio, random_state=0)
            self.memory_bank_ = np.ascontiguousarray(locations[keep])
            self.memory_bank_source_ = (keep // (self.map_size ** 2)).astype(np.int32)
        try:
            self._calibrate(maps)
        finally:
            self._fit_mirror_maps = None
        return self

    # ------------------------------------------------------- calibration
    def _calibration_key(self):
        return (self.map_nn, self.map_n_neighbors_of_neighbors, repr(self.map_detector_params),
                self.n_map_neighbors, float(self.sigma), float(self.map_score_q),
                int(self.image_size), bool(self.test_time_flip), int(self.map_score_border),
                # a coreset has no gallery to choose
                self.gallery_grid if self.coreset_ratio is None else None)

    def _calibration_rows(self):
        """Training images whose held-out maps set the map's scale and
        threshold: the detector's calibration rows (scored out of sample),
        a seeded subset of ``n_map_calibration`` of them."""
        rows = np.asarray(self.detector_.calibration_rows_)
        glob = -np.asarray(self.detector_.calibration_scores_, dtype=np.float64)
        if len(rows) > self.n_map_calibration:
            pick = np.sort(np.random.default_rng(0).choice(len(rows), self.n_map_calibration,
                                                           replace=False))
            rows, glob = rows[pick], glob[pick]
        return rows, glob

    def _calibrate(self, maps=None):
        """Held-out maps of training images: each scored as by a model that
        never saw it (its own pyramid left out of its gallery, or its own
        locations out of the memory bank). Sets ``map_calibration_`` (per
        image: the global score, the map score, the map's maximum) and
        ``map_levels_`` (the median normal pixel value, the pixel threshold)."""
        torch = import_torch()
        rows, glob = self._calibration_rows()
        if maps is None:
            if self.coreset_ratio is not None:
                raise ValueError("This SPADE's memory bank is a coreset: its held-out "
                                 "calibration can only be computed at fit. Refit it with "
                                 f"map_nn={self.map_nn!r} (and the other map parameters) "
                                 "to use them.")
            maps = self.train_maps_
        feats = self.train_features_[rows]
        mirror = self._calibration_mirror_maps(rows) if self.test_time_flip else None
        raw = self._raw_maps(feats, np.asarray(maps[rows]), exclude=rows, mirror_maps=mirror)
        s = self.image_size
        finished = self._finish_maps(raw, [(s, s)] * len(rows), torch)
        score = np.array([_top_mean(m, self.map_score_q, self.map_score_border)
                          for m in finished])
        peak = np.array([float(m.max()) for m in finished])
        rng = np.random.default_rng(0)
        pixels = np.concatenate([rng.choice(m.ravel(), 256, replace=False) for m in finished])
        contamination = self.detector_.contamination_
        self.map_calibration_ = np.stack([glob, score, peak], 1).astype(np.float32)
        self.map_levels_ = np.array([np.median(pixels), _upper_quantile(peak, contamination)],
                                    dtype=np.float32)
        self._map_cache[self._calibration_key()] = (self.map_calibration_, self.map_levels_)
        self._set_offset()

    def _calibration_mirror_maps(self, rows):
        """Pyramids of the mirror images of training images ``rows`` (fit only)."""
        given = getattr(self, "_fit_mirror_maps", None)
        if given is not None:
            return np.asarray(given[rows])
        images = getattr(self, "_fit_images", None)
        if images is None:
            raise ValueError("This SPADE has test_time_flip=True: its held-out calibration "
                             "needs the training images' mirror images, so it is computed at "
                             "fit only and the map parameters are fixed then. Refit with "
                             f"map_nn={self.map_nn!r} (and the other map parameters), or set "
                             "test_time_flip back to the value it was fitted with.")
        subset = images[rows] if isinstance(images, np.ndarray) else [images[i] for i in rows]
        return self.extractor_.transform_pyramid(subset, self.map_size, mirror=True)[2]

    def _calibration(self):
        """``(map_calibration_, map_levels_)`` for the current map
        parameters: the stored ones, or recomputed from the stored pyramids
        when a map parameter changed since fit (or the file predates them)."""
        cache = self.__dict__.setdefault("_map_cache", {})
        key = self._calibration_key()
        if key not in cache:
            self._calibrate()
        # the attributes (and a saved file) follow the parameters in use, also
        # when they return to values calibrated before
        self.map_calibration_, self.map_levels_ = cache[key]
        return cache[key]

    def _set_offset(self):
        if self.image_score == "global":
            self.offset_ = self.detector_.offset_
            return
        cal, _ = self._calibration()
        held_out = self._combine(cal[:, 0], cal[:, 1], cal)
        self.offset_ = -_upper_quantile(held_out, self.detector_.contamination_)

    def _combine(self, glob, score, cal):
        """The image score of ``image_score`` from the global and map scores:
        ``'map'`` the map score; ``'combined'`` the sum of both, each
        standardised by its held-out normal median and MAD."""
        if self.image_score == "map":
            return np.asarray(score, dtype=np.float64)
        out = 0.0
        for j, v in ((0, glob), (1, score)):
            med = np.median(cal[:, j])
            mad = 1.4826 * np.median(np.abs(cal[:, j] - med))
            out = out + (np.asarray(v, dtype=np.float64) - med) / max(mad, 1e-12)
        return out

    @property
    def calibration_scores_(self):
        """``score_samples`` of held-out normal training images under this
        model's image score: the detector's calibration scores for
        ``image_score='global'``, else the held-out maps' combined (or map)
        scores, negated. Behind ``offset_`` and the p-values."""
        check_is_fitted(self, "detector_")
        if self.image_score == "global":
            return self.detector_.calibration_scores_
        cal, _ = self._calibration()
        return -self._combine(cal[:, 0], cal[:, 1], cal)

    def calibrate(self, X, false_alarm_rate=0.01):
        self._check_calibratable()
        return super().calibrate(X, false_alarm_rate)

    def calibrate_features(self, features, false_alarm_rate=0.01):
        self._check_calibratable()
        return super().calibrate_features(features, false_alarm_rate)

    def _check_calibratable(self):
        check_is_fitted(self, "detector_")
        if self.image_score != "global":
            raise ValueError(
                f"A SPADE whose image_score is {self.image_score!r} scores images by their "
                "maps, which pooled features alone cannot give; its threshold and p-values "
                "come from held-out training maps at fit. Refit with the normal images "
                "included, or use image_score='global' to calibrate on new normal images.")

    @property
    def pixel_threshold_(self):
        """Map value above which a pixel is anomalous: the held-out normal
        images' map maxima at the ``1 - contamination_`` quantile, so about
        that share of normal images shows any anomalous pixel."""
        return float(self._calibration()[1][1])

    @property
    def map_median_(self):
        """Median map value of held-out normal pixels (colour 0 of the maps)."""
        return float(self._calibration()[1][0])

    # ------------------------------------------------------------ scores
    def score_with_maps(self, X):
        """Image scores (N,) and pixel anomaly maps (a list of float32 arrays,
        each of its image's original (H, W)), from one pass over ``X``."""
        check_is_fitted(self, "detector_")
        torch = import_torch()
        if not hasattr(self, "extractor_"):
            self.extractor_ = self._extractor().fit()
        images = _images.as_image_list(X)
        feats, maps, *mirror = self.extractor_.transform_pyramid(
            images, self.map_size, mirror=bool(self.test_time_flip))
        sizes = [_images.original_size(images[i]) for i in range(len(images))]
        return self.score_pyramids(feats, maps, sizes, mirror[0] if mirror else None)

    def score_pyramids(self, features, maps, sizes=None, mirror_maps=None):
        """Image scores and maps of precomputed pooled features (N, D) and
        pyramids (N, C, M, M) (what :meth:`score_with_maps` does after
        extraction); maps at ``sizes`` (a list of (H, W); default
        ``image_size``). With ``test_time_flip``, ``mirror_maps``: the
        pyramids of the images' mirror images
        (``transform_pyramid(X, map_size, mirror=True)[2]``)."""
        check_is_fitted(self, "detector_")
        torch = import_torch()
        self._check_map_params()
        if self.test_time_flip and mirror_maps is None:
            raise ValueError("This SPADE has test_time_flip=True: pass the mirror images' "
                             "pyramids (mirror_maps=transform_pyramid(X, map_size, "
                             "mirror=True)[2]), or use score_with_maps(images).")
        if mirror_maps is not None and not self.test_time_flip:
            raise ValueError("mirror_maps is for test_time_flip=True; this SPADE has "
                             "test_time_flip=False.")
        feats = self._prep(features)
        maps = np.asarray(maps)
        if self.test_time_flip:
            if np.shape(mirror_maps) != maps.shape:
                raise ValueError(f"mirror_maps of shape {np.shape(mirror_maps)} for pyramids "
                                 f"of shape {maps.shape}.")
            # the calibration first: a changed map parameter must raise before
            # the (long) matching
            self._calibration()
        glob = self.detector_.anomaly_score(feats)
        raw = self._raw_maps(feats, maps, mirror_maps=mirror_maps if self.test_time_flip else None)
        s = self.image_size
        at_size = self._finish_maps(raw, [(s, s)] * len(raw), torch)
        if self.image_score == "global":
            scores = glob
        else:
            cal, _ = self._calibration()
            self._set_offset()
            score = np.array([_top_mean(m, self.map_score_q, self.map_score_border)
                              for m in at_size])
            scores = self._combine(glob, score, cal)
        if sizes is None:
            return scores, at_size
        return scores, [_resize_map(m, hw, torch) for m, hw in zip(at_size, sizes)]

    def anomaly_score(self, X):
        """Image anomaly score (higher = more anomalous), shape (N,): the
        global score, or (``image_score='map'`` / ``'combined'``) from the map."""
        if self.image_score == "global":
            return super().anomaly_score(X)
        return self.score_with_maps(X)[0]

    def anomaly_score_features(self, features):
        if self.image_score != "global":
            raise ValueError(f"image_score={self.image_score!r} needs the images' pyramids; "
                             "use anomaly_score(images) or score_with_maps(images).")
        return super().anomaly_score_features(features)

    def anomaly_maps(self, X):
        """Pixel anomaly maps only (see :meth:`score_with_maps`)."""
        return self.score_with_maps(X)[1]

    def anomaly_masks(self, maps):
        """Binary masks of maps from :meth:`score_with_maps`: pixels above
        :attr:`pixel_threshold_`."""
        t = self.pixel_threshold_
        return [np.asarray(m) > t for m in maps]

    # ------------------------------------------------------------- maps
    def _raw_maps(self, feats, maps, exclude=None, mirror_maps=None):
        """Raw (N, map_size, map_size) maps of query pyramids ``maps``;
        ``exclude[i]``: a training image query i must not be matched with
        (itself, for held-out calibration maps). ``mirror_maps``
        (``test_time_flip``): the mirror images' pyramids; the result is then
        the mean of each map and its mirror image's map flipped back, both
        matched against the same gallery (chosen by the image itself, not
        its mirror image, computed once; a k-NNN gallery fitted once)."""
        self._check_map_params()
        self._check_fitted_normalize()
        n = len(maps)
        if mirror_maps is not None:
            # one batch of both, so each gallery (or bank) serves both queries
            maps = np.concatenate([np.asarray(maps), np.asarray(mirror_maps)])
        copies = 1 if mirror_maps is None else 2
        if self.coreset_ratio is not None:
            out = self._bank_maps(maps, None if exclude is None else np.tile(exclude, copies))
        else:
            if maps.shape[1:] != self.train_maps_.shape[1:]:
                raise ValueError(f"Query pyramids of shape {maps.shape[1:]} do not match the "
                                 f"training pyramids {self.train_maps_.shape[1:]}.")
            if self.gallery_grid is None:
                # the gallery images: nearest by pooled-feature distance
                query = np.asarray(feats, dtype=np.float32)
                train = np.asarray(self.train_features_, dtype=np.float32)
            else:
                # ... or by the grid of the pyramid (the image's own, not its mirror's)
                query, train = self._grid(maps[:n]), self._train_grid()
            kk = min(self.n_map_neighbors, train.shape[0] - (exclude is not None))
            if kk < 1:
                raise ValueError("Held-out maps need at least 2 training images.")
            d2 = ((query ** 2).sum(1)[:, None] - 2 * query @ train.T
                  + (train ** 2).sum(1)[None])
            if exclude is not None:
                d2[np.arange(n), exclude] = np.inf
            nbrs = np.argsort(d2, axis=1, kind="stable")[:, :kk]
            out = self._gallery_maps(maps, np.tile(nbrs, (copies, 1)))
        if mirror_maps is None:
            return out
        return (out[:n] + out[n:, :, ::-1]) / 2

    def _grid(self, maps, chunk=256):
        """Gallery keys of pyramids ``maps`` (N, C, M, M): every location
        normalised as for matching (:meth:`_normed`), averaged over a
        ``g`` x ``g`` grid of cells (adaptive average pooling; ``g`` is
        ``gallery_grid`` capped at the pyramid's side M), flattened to
        (N, g * g * C) float32."""
        torch = import_torch()
        import torch.nn.functional as F

        g, out = min(self.gallery_grid, maps.shape[-1]), []
        for s in range(0, len(maps), chunk):
            part = np.asarray(maps[s:s + chunk])
            n, c, m, _ = part.shape
            v = self._normed(part.transpose(0, 2, 3, 1).reshape(-1, c))
            v = torch.from_numpy(v).reshape(n, m, m, c).permute(0, 3, 1, 2)
            out.append(F.adaptive_avg_pool2d(v, g).reshape(n, -1).numpy())
        if not out:
            return np.zeros((0, g * g * maps.shape[1]), dtype=np.float32)
        return np.concatenate(out)

    def _train_grid(self):
        """:meth:`_grid` of the training pyramids, computed once per grid."""
        cache = self.__dict__.setdefault("_grid_cache", {})
        if self.gallery_grid not in cache:
            cache.clear()
            cache[self.gallery_grid] = self._grid(self.train_maps_)
        return cache[self.gallery_grid]

    def _gallery_maps(self, maps, nbrs):
        """Raw maps of query pyramids ``maps``, query i matched against the
        pyramids of training images ``nbrs[i]``."""
        if self.map_nn == "knnn":
            return self._pixel_maps_knnn(maps, nbrs)
        torch = import_torch()
        out = np.empty((len(maps), self.map_size, self.map_size), dtype=np.float32)
        for i in range(len(maps)):
            q = self._normed(maps[i].reshape(maps.shape[1], -1).T)  # (m*m, C)
            g = self.train_maps_[nbrs[i]]
            g = self._normed(g.transpose(0, 2, 3, 1).reshape(-1, g.shape[1]))  # (kk*m*m, C)
            q, g = torch.from_numpy(q), torch.from_numpy(g)
            d = torch.cdist(q, g).min(dim=1).values
            out[i] = d.reshape(self.map_size, self.map_size).numpy()
        return out

    def _check_fitted_normalize(self):
        if (self.map_normalize == "soft") != hasattr(self, "map_scale_"):
            raise ValueError(f"map_normalize={self.map_normalize!r}, but this SPADE was fitted "
                             f"with map_normalize="
                             f"{'soft' if hasattr(self, 'map_scale_') else None!r}: it is "
                             "fixed at fit. Refit to change it.")

    def _normed(self, locations):
        """Locations (n, C) as float32, each divided by ``sqrt(|v|^2 + s^2)``
        (``map_normalize='soft'``, ``s`` = :attr:`map_scale_`), else as they are."""
        v = np.asarray(locations, dtype=np.float32)
        if getattr(self, "map_scale_", None) is None:
            return v
        s2 = np.float32(self.map_scale_[0]) ** 2
        den = np.maximum(np.sqrt(np.einsum("ij,ij->i", v, v) + s2), np.finfo(np.float32).tiny)
        return np.ascontiguousarray(v / den[:, None])

    # kept for callers of the earlier private name
    def _pixel_maps(self, feats, maps, torch=None):
        return self._raw_maps(self._prep(feats), maps)

    def _bank_maps(self, maps, exclude=None):
        """Maps against the coreset memory bank: every query location's
        nearest bank location (``'knn'``) or Eq. 2 of a KNNN fitted on the
        bank (``'knnn'``); ``exclude``: leave out that image's locations."""
        torch = import_torch()
        m = self.map_size
        channels = self.memory_bank_.shape[1]
        if maps.shape[1:] != (channels, m, m):
            raise ValueError(f"Query pyramids of shape {maps.shape[1:]} do not match the "
                             f"memory bank's {channels} channels at {m} x {m}.")
        bank = self._normed(self.memory_bank_)
        out = np.empty((len(maps), m, m), dtype=np.float32)
        full = None
        for i in range(len(maps)):
            keep = None if exclude is None else self.memory_bank_source_ != exclude[i]
            q = self._normed(maps[i].reshape(channels, -1).T)
            if self.map_nn == "knnn":
                if keep is None:
                    if full is None:
                        full = self._bank_detector()
                    det = full
                else:
                    g = bank[keep]
                    det = self._map_detector(g.shape[0]).fit(g)
                out[i] = det.anomaly_score(q).reshape(m, m)
                continue
            g = torch.from_numpy(bank if keep is None else bank[keep])
            qt = torch.from_numpy(q)
            best = torch.full((q.shape[0],), float("inf"))
            for s in range(0, g.shape[0], 16384):
                best = torch.minimum(best, torch.cdist(qt, g[s:s + 16384]).min(dim=1).values)
            out[i] = best.reshape(m, m).numpy()
        return out

    def _bank_detector(self):
        cache = self.__dict__.setdefault("_bank_cache", {})
        key = (self.map_n_neighbors_of_neighbors, repr(self.map_detector_params))
        if key not in cache:
            g = self._normed(self.memory_bank_)
            cache.clear()
            cache[key] = self._map_detector(g.shape[0]).fit(g)
        return cache[key]

    def _map_detector(self, n_gallery):
        """The (unfitted) pixel-level :class:`nonn.KNNN` of ``map_nn='knnn'``
        for a gallery of ``n_gallery`` locations."""
        from nonn import KNNN

        if n_gallery < 2:
            raise ValueError(f"map_nn='knnn' needs at least 2 gallery locations; this gallery "
                             f"has {n_gallery} (n_map_neighbors x map_size**2). Raise "
                             "map_size or n_map_neighbors, or use map_nn='knn'.")
        # capped here rather than by KNNN, which would warn once per query image;
        # the floor relative to the data, as the pixel maps were measured (a
        # gallery's locations mix object and background: "auto" would decide
        # per gallery, unmeasured)
        params = dict(n_neighbors=1,
                      n_neighbors_of_neighbors=min(self.map_n_neighbors_of_neighbors, n_gallery),
                      eig_floor_ref="data", verbose=False)
        params.update(self.map_detector_params or {})
        return KNNN(**params)

    def _pixel_maps_knnn(self, maps, nbrs):
        """Eq. 2 of every query location against its gallery. Queries with
        the same gallery share one KNNN fit and are scored in one call."""
        from nonn._chunks import progress

        m = self.map_size
        channels = self.train_maps_.shape[1]  # query shapes checked by _raw_maps
        groups = {}
        for i, row in enumerate(nbrs):
            groups.setdefault(tuple(row.tolist()), []).append(i)
        out = np.empty((len(nbrs), m, m), dtype=np.float32)
        for key, rows in progress(groups.items(), show_progress(self.verbose),
                                  "k-NNN pixel maps", total=len(groups)):
            # (kk*m*m, C) gallery, rows in image, row, column order
            g = self.train_maps_[list(key)]
            g = self._normed(g.transpose(0, 2, 3, 1).reshape(-1, channels))
            det = self._map_detector(g.shape[0]).fit(g)
            q = self._normed(maps[rows].transpose(0, 2, 3, 1).reshape(-1, channels))
            out[rows] = det.anomaly_score(q).reshape(len(rows), m, m)
        return out

    def _finish_maps(self, pixel, sizes, torch):
        """Raw maps upsampled to ``image_size``, smoothed (``sigma``) and
        resized to ``sizes``."""
        import torch.nn.functional as F
        from scipy.ndimage import gaussian_filter

        s = self.image_size
        up = F.interpolate(torch.from_numpy(pixel)[:, None], size=(s, s), mode="bilinear",
                           align_corners=False)[:, 0].numpy()
        out = []
        for m, hw in zip(up, sizes):
            m = gaussian_filter(m, sigma=self.sigma) if self.sigma else m
            out.append(_resize_map(m.astype(np.float32), hw, torch))
        return out


def _median_norm(maps, n_max=100_000):
    """Median Euclidean norm of the locations of pyramids ``maps`` (N, C, M, M)
    (of a seeded sample of at most ``n_max``, gathered without copying the
    rest), floored so that it is a positive float32."""
    n, _, m, _ = maps.shape
    flat = np.arange(n * m * m)
    if len(flat) > n_max:
        flat = np.sort(np.random.default_rng(0).choice(len(flat), n_max, replace=False))
    img, rc = np.divmod(flat, m * m)
    locations = np.asarray(maps[img, :, rc // m, rc % m], dtype=np.float32)  # (n, C)
    norms = np.linalg.norm(locations, axis=1)
    return max(float(np.median(norms)), float(np.finfo(np.float32).tiny))


def _resize_map(m, hw, torch):
    """A map resized (bilinear) to ``hw`` = (H, W); unchanged when it has that size."""
    import torch.nn.functional as F

    if tuple(m.shape) == tuple(hw):
        return np.asarray(m, dtype=np.float32)
    return F.interpolate(torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None],
                         size=tuple(hw), mode="bilinear", align_corners=False)[0, 0].numpy()


def _top_mean(m, q, border=0):
    """Mean of the largest ``q`` share of a map's values (at least one); its
    maximum for ``q = 0``; the ``border`` pixels along each edge left out."""
    m = np.asarray(m, dtype=np.float64)
    if border:
        m = m[border:m.shape[0] - border, border:m.shape[1] - border]
    v = m.ravel()
    if q <= 0:
        return float(v.max())
    n = max(1, int(np.ceil(q * v.size)))
    return float(np.partition(v, v.size - n)[v.size - n:].mean())


def _upper_quantile(values, rate):
    """The value that about ``rate`` of new values like ``values`` exceed:
    the core detectors' conformal threshold rule (:func:`nonn._base.threshold`)
    on anomaly scores."""
    from nonn._base import threshold

    return -threshold(-np.asarray(values, dtype=np.float64), rate)


def greedy_coreset(X, ratio, random_state=0, projection=128, chunk=65536):
    """Indices of a greedy k-center coreset of the rows of ``X`` (PatchCore).

    ``ceil(ratio * len(X))`` rows are picked one at a time, each the row
    farthest from those picked so far (the first one seeded), so every row
    lies close to some picked one: the k-center 2-approximation. Distances
    are measured after a seeded Gaussian random projection to ``projection``
    dimensions (Johnson-Lindenstrauss; none when ``X`` has no more columns),
    as PatchCore does to make the selection cheaper. ``ratio=1`` keeps every
    row. Returns sorted int64 indices.
    """
    torch = import_torch()
    X = np.asarray(X)
    n, d = X.shape
    m = int(np.ceil(float(ratio) * n))
    if m >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(random_state)
    Z = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    if d > projection:
        P = torch.from_numpy((rng.standard_normal((d, projection))
                              / np.sqrt(projection)).astype(np.float32))
        Z = torch.cat([Z[s:s + chunk] @ P for s in range(0, n, chunk)])
    picked = np.empty(m, dtype=np.int64)
    picked[0] = int(rng.integers(n))
    dist = torch.full((n,), float("inf"))
    sq = (Z * Z).sum(1)
    for j in range(m):
        c = Z[picked[j]]
        # |z - c|^2 by one matrix-vector product (no n x d temporary)
        dist = torch.minimum(dist, sq - 2.0 * (Z @ c) + sq[picked[j]])
        if j + 1 < m:
            picked[j + 1] = int(torch.argmax(dist))
    return np.sort(picked)


# -------------------------------------------------------------------- PANDA
def panda_finetune(backbone, trunk, epochs=2, lr=1e-4, batch_size=64, weight_decay=5e-5,
                   validation_fraction=0.1, patience=1, collapse_ratio=0.5, max_backoffs=2,
                   random_state=0, verbose=False):
    """Fine-tune ``backbone``'s tail (in place) on cached trunk outputs of
    normal images with PANDA's compactness loss ``||f(x) - c||^2``, ``c`` the
    centre of the normal features before training.

    Early stopping: after each epoch the loss of held-out normals is measured
    against the *initial* centre; training stops when it has not improved for
    ``patience`` epochs, and the best tail is kept. Batch-norm statistics stay
    frozen (eval mode), as in PANDA's code. Returns the per-epoch history.

    Collapse guard: the compactness loss is also lowered by PANDA's failure
    mode, catastrophic collapse (features shrinking onto a few dimensions),
    which the held-out loss cannot tell from adaptation. After each epoch
    the effective rank of the held-out features (participation ratio
    ``(sum l)^2 / sum l^2`` of their covariance eigenvalues) is compared with
    the pretrained tail's; below ``collapse_ratio`` times it, the epoch is
    undone (``"collapsed": True`` in the history) and retried with a ten
    times smaller learning rate, at most ``max_backoffs`` times; then
    training stops with the tail from before. Label-free: it looks at the
    held-out normal features only (the collapse it guards against is
    documented in docs/vision.md). ``collapse_ratio=0`` switches the guard
    off.
    """
    torch = import_torch()
    from nonn._chunks import progress

    g = torch.Generator().manual_seed(int(random_state))
    n = trunk.shape[0]
    perm = torch.randperm(n, generator=g)
    n_val = int(round(validation_fraction * n)) if n >= 10 else 0
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    device = next(backbone.parameters()).device
    start = backbone.tail_start

    def feats(z, grad=False):
        with torch.set_grad_enabled(grad):
            out, _ = backbone.run_stages(z.to(device), start)
            return backbone.pool(out)

    def held_out(idx, centre):
        """Mean loss of ``idx`` against ``centre``, and their features'
        effective rank."""
        if not len(idx):
            return None, None
        f = torch.cat([feats(trunk[idx[s:s + 256]]) for s in range(0, len(idx), 256)])
        loss = float(((f - centre) ** 2).sum(1).mean())
        lam = torch.linalg.svdvals((f - f.mean(0)).double()) ** 2
        rank = float(lam.sum() ** 2 / (lam ** 2).sum()) if float(lam.sum()) > 0 else 0.0
        return loss, rank

    backbone.eval()
    with torch.no_grad():
        centre = torch.cat([feats(trunk[s:s + 256]) for s in range(0, n, 256)]).mean(0)
    params = []
    for m in backbone.tail_modules():
        for p in m.parameters():
            p.requires_grad_(True)
            params.append(p)
    def sgd(rate):
        return torch.optim.SGD(params, lr=rate, momentum=0.9, weight_decay=weight_decay)

    def restore(state):
        with torch.no_grad():
            for p, b in zip(params, state):
                p.copy_(b)

    rate = float(lr)
    opt = sgd(rate)
    best, rank0 = held_out(val_idx, centre)
    best_state = copy.deepcopy([p.detach().clone() for p in params])
    history = [{"epoch": 0, "val_loss": best, "effective_rank": rank0}]
    bad = backoffs = 0
    epoch = 0
    while epoch < epochs:
        epoch += 1
        start_state = [p.detach().clone() for p in params]
        order = tr_idx[torch.randperm(len(tr_idx), generator=g)]
        starts = range(0, len(order), batch_size)
        for s in progress(starts, verbose, f"PANDA epoch {epoch}", total=len(starts)):
            f = feats(trunk[order[s:s + batch_size]], grad=True)
            loss = ((f - centre) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        val, rank = held_out(val_idx, centre)
        history.append({"epoch": epoch, "val_loss": val, "train_loss": loss.item(),
                        "effective_rank": rank, "lr": rate})
        if rank is not None and rank < collapse_ratio * rank0:
            history[-1]["collapsed"] = True
            restore(start_state)
            if backoffs >= max_backoffs:
                break
            backoffs += 1
            rate /= 10
            opt = sgd(rate)
            epoch -= 1
            continue
        if val is None or val < best:
            best, bad = val, 0
            best_state = [p.detach().clone() for p in params]
        else:
            bad += 1
            if bad >= patience:
                break
    restore(best_state)
    for p in params:
        p.requires_grad_(False)
    backbone.eval()
    return history


class PANDA(_ImageSystem):
    """PANDA: compactness fine-tuning of the backbone's last stages on the
    normal images, then a k-NN / k-NNN score on the adapted pooled features.

    Only the backbone's tail (``backbone.tail_start`` onward: EfficientNet's
    last two blocks and head, ResNet's layer4, ViT's last block) is trained, so
    the frozen trunk is run once per image and cached.

    Parameters
    ----------
    n_neighbors : int or None, default=None
        None means 2 (PANDA's k).
    epochs : int, default=2
        At most this many epochs (PANDA's "early stopping" variant trains
        briefly; see :func:`panda_finetune` for the held-out stopping rule).
    lr : float, default=1e-4
        SGD learning rate (momentum 0.9, weight decay 5e-5).
    validation_fraction : float, default=0.1
        Normal images held out for early stopping (0: train all epochs).
    collapse_ratio : float, default=0.5
        Undo an epoch that leaves the held-out features' effective rank below
        this share of the pretrained one (catastrophic collapse) and retry it
        at a tenth of the learning rate, at most twice (see
        :func:`panda_finetune`). 0: no guard.
    random_state : int, default=0

    Other parameters as :class:`FeatureDetector`. A fitted PANDA holds the
    fine-tuned backbone in ``extractor_.backbone_``; it is not saved by
    :meth:`save` (the CLI offers the feature and spade systems).
    """

    _default_k = 2

    def __init__(self, nn="knnn", n_neighbors=None, n_neighbors_of_neighbors=None, epochs=2,
                 lr=1e-4, validation_fraction=0.1, collapse_ratio=0.5, random_state=0,
                 backbone="efficientnet_lite0", weights=None, image_size=224, batch_size=32,
                 device="auto", verbose="auto", contamination="auto", detector_params=None,
                 normalize=True):
        self.nn = nn
        self.n_neighbors = n_neighbors
        self.n_neighbors_of_neighbors = n_neighbors_of_neighbors
        self.epochs = epochs
        self.lr = lr
        self.validation_fraction = validation_fraction
        self.collapse_ratio = collapse_ratio
        self.random_state = random_state
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose
        self.contamination = contamination
        self.detector_params = detector_params
        self.normalize = normalize

    def _train_features(self, X):
        trunk = self.extractor_.transform_trunk(X)
        return self.fit_trunk(trunk, _features_only=True)

    def fit_trunk(self, trunk, _features_only=False):
        """Fine-tune from cached trunk outputs (``extractor_`` must be set),
        then fit the detector; returns self (or the features, internally)."""
        if not hasattr(self, "extractor_"):
            self.extractor_ = self._extractor().fit()
        bb = self.extractor_.backbone_
        self.history_ = panda_finetune(bb, trunk, epochs=self.epochs, lr=self.lr,
                                       batch_size=max(self.batch_size, 2),
                                       validation_fraction=self.validation_fraction,
                                       collapse_ratio=self.collapse_ratio,
                                       random_state=self.random_state,
                                       verbose=show_progress(self.verbose))
        feats = self.features_from_trunk(trunk)
        if _features_only:
            return feats
        return self.fit_features(feats)

    def features_from_trunk(self, trunk):
        """Pooled (adapted) features of cached trunk outputs."""
        torch = import_torch()
        bb = self.extractor_.backbone_
        device = next(bb.parameters()).device
        out = []
        with torch.inference_mode():
            for s in range(0, trunk.shape[0], 256):
                z, _ = bb.run_stages(trunk[s:s + 256].to(device), bb.tail_start)
                out.append(bb.pool(z).float().cpu().numpy())
        return np.concatenate(out, 0)

    def save(self, path):
        raise NotImplementedError("PANDA models hold fine-tuned weights and are not saved "
                                  "by nonn; use FeatureDetector or SPADE for model files.")


SYSTEMS = {"feature": FeatureDetector, "spade": SPADE, "panda": PANDA}


# -------------------------------------------------------------- load model
# An image model file is a nonn model archive (see nonn._archive): the JSON
# ``__meta__`` (format, version, system class, parameters, shape and dtype of
# every stored array, and under ``"detector"`` the detector's own metadata as
# a core ``nonn-model`` file has it), the stored arrays (``train_features``,
# and ``train_maps`` for SPADE) and the detector's arrays under
# ``detector/``. Format 1 stored the detector as the bytes of a whole core
# model file in the member ``detector``; it is read in place, through the
# same checked reader. There is no checksum beyond the zip's CRC-32 of every
# member (checked as a member is read), as in the core format: the file is
# validated as a whole (the detector by the core checks, the system's arrays
# against it and its parameters) before it is used.

_DETECTOR = "detector/"
_CREATE = "`nonn fit-images` / system.save()"


def _saved_classes():
    return {"FeatureDetector": FeatureDetector, "SPADE": SPADE}


def _check_meta(meta, where):
    """The system class of an image model's metadata, after checking its
    format, version and top-level keys."""
    if meta.get("format") != VISION_FORMAT:
        hint = (" It looks like a `nonn fit` model; score it with `nonn score`."
                if meta.get("format") == "nonn-model" else "")
        raise ModelFileError(f"{where} is not a nonn image model file.{hint}")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(f"{where} has an invalid image model format version "
                             f"{version!r}.")
    if version > VISION_FORMAT_VERSION:
        raise ModelFileError(f"{where} was written by a newer nonn (image model format "
                             f"{version}); upgrade nonn to load it.")
    cls = _saved_classes().get(meta.get("system"))
    if cls is None:
        raise ModelFileError(f"{where} names an unknown image system "
                             f"{meta.get('system')!r}.")
    from nonn._model_file import check_array_table

    keys = ("params", "arrays") + (("detector",) if version >= 2 else ())
    for key in keys:
        if not isinstance(meta.get(key), dict):
            raise ModelFileError(f"{where}: the metadata key {key!r} is missing or not a "
                                 "dict; the file is corrupted.")
    check_array_table(meta["arrays"], where, {name.rstrip("_"): len(spec.shape)
                                              for name, spec in cls._state_spec.items()
                                              if name.rstrip("_") in meta["arrays"]})
    return cls


def is_image_model(path):
    """Whether ``path`` is a file whose metadata names the image model format
    (it may still be corrupted, or too new to load)."""
    try:
        with _archive.Archive.open(path, "image model", _CREATE) as ar:
            return ar.meta().get("format") == VISION_FORMAT
    except (OSError, ValueError):
        return False


def _legacy_detector(ar, where):
    """The embedded core model of a format-1 file, opened in place."""
    return ar.embedded("detector", f"{where} (its embedded detector)")


def read_meta(path):
    """The metadata of an image model file, with the detector's (under
    ``'detector'``, as :func:`nonn.persistence.read_meta` gives it), without
    reading the stored arrays. Raises
    :class:`nonn.persistence.ModelFileError` for a file that is not a
    readable image model."""
    from nonn._model_file import check_meta

    with _archive.Archive.open(path, "image model", _CREATE) as ar:
        meta = ar.meta()
        _check_meta(meta, ar.where)
        if meta["format_version"] == 1:
            with _legacy_detector(ar, ar.where) as inner:
                meta["detector"] = inner.meta()
                check_meta(meta["detector"], inner.where)
        else:
            check_meta(meta["detector"], f"{ar.where} (its detector)")
    return meta


def _make_system(cls, params, where, version=VISION_FORMAT_VERSION):
    if not all(isinstance(k, str) for k in params):
        raise ModelFileError(f"{where}: the metadata key 'params' has non-string keys.")
    params = dict(params)
    for since, legacy in _LEGACY_PARAMS.items():
        if version < since:
            for k, v in legacy.items():
                if k in cls().get_params():
                    params.setdefault(k, v)
    from nonn._model_file import params_errors

    with params_errors(where):
        system = cls(**params)
        system._check_params()
        if isinstance(system, SPADE):
            system._check_map_params()
            system._map_detector(2)._check_params()
            if (isinstance(system.sigma, bool) or not isinstance(system.sigma, (int, float))
                    or not np.isfinite(system.sigma) or system.sigma < 0):
                raise ValueError(f"The 'sigma' parameter of SPADE must be a float >= 0. Got "
                                 f"{system.sigma!r} instead.")
    return system


def _check_system(cls, meta, headers, read, detector, where):
    """Check an image system's parameters and arrays (``headers``: member ->
    (shape, dtype); ``read(member)``: data) against each other and against
    its loaded ``detector``; returns the system with its state set."""
    from nonn._state import StateError, check_state

    system = _make_system(cls, meta["params"], where,
                          meta.get("format_version", VISION_FORMAT_VERSION))
    expected = {"knnn": "KNNN", "knn": "KNN"}[system.nn]
    if type(detector).__name__ != expected:
        raise ModelFileError(f"{where} is inconsistent: nn={system.nn!r} but the detector is "
                             f"a {type(detector).__name__}. The file is corrupted.")
    required = system._required_arrays()
    members = {name: name.rstrip("_") for name in required + cls._optional_arrays
               if name in required or name.rstrip("_") in headers}
    extra = sorted(set(headers) - set(members.values()))
    if extra:
        raise ModelFileError(f"{where} holds the member {extra[0]!r}, which a {cls.__name__} "
                             "model does not have; the file is corrupted or crafted.")
    for key in members.values():
        if key not in headers:
            raise ModelFileError(f"{where} lacks the array {key!r}; the file is incomplete.")
        shape, dtype = headers[key]
        spec = meta["arrays"].get(key)
        if (not isinstance(spec, dict) or list(shape) != spec.get("shape")
                or np.dtype(dtype).str != spec.get("dtype")):
            raise ModelFileError(f"{where}: the array {key!r} (shape {tuple(shape)}, dtype "
                                 f"{np.dtype(dtype)}) does not match its metadata ({spec}); "
                                 "the file is corrupted.")
    if set(cls._optional_arrays) & set(members) and \
            not set(cls._optional_arrays) <= set(members):
        raise ModelFileError(f"{where} holds only part of the map calibration "
                             f"({sorted(set(cls._optional_arrays) & set(members))}); the file "
                             "is corrupted.")
    sym = {"dtype": np.dtype(np.float32), "N": detector._fit_X.shape[0],
           "D": detector.n_features_in_, "M": getattr(system, "map_size", None)}
    spec = {name: cls._state_spec[name] for name in members}
    try:
        values, _ = check_state(spec, sym, {a: headers[k] for a, k in members.items()}, {},
                                lambda attr: read(members[attr]))
    except StateError as exc:
        raise ModelFileError(f"{where}: the array {members[exc.name]!r} {exc} The detector "
                             f"holds N={sym['N']} images of D={sym['D']} features; the file "
                             "is corrupted or crafted.") from None
    for name, value in values.items():
        setattr(system, name, value)
    return system


def load(path):
    """Load a system saved with ``system.save(path)`` (never unpickles).

    The file is validated as a whole before it is used: the detector by the
    core checks (:func:`nonn.load`'s), the stored features and pyramids
    against the detector and the parameters; a file that fails raises
    :class:`nonn.persistence.ModelFileError` naming what is wrong.
    """
    from nonn._model_file import load_detector

    with _archive.Archive.open(path, "image model", _CREATE) as ar:
        where = ar.where
        meta = ar.meta()
        cls = _check_meta(meta, where)
        if meta["format_version"] == 1:
            with _legacy_detector(ar, where) as inner:
                detector = load_detector(inner, inner.meta())
            own = ar.names() - {_archive.META, "detector"}
        else:
            detector = load_detector(ar, meta["detector"], _DETECTOR,
                                     f"{where} (its detector)")
            own = {n for n in ar.names() - {_archive.META} if not n.startswith(_DETECTOR)}
        headers = {name: ar.header(name) for name in own}
        system = _check_system(cls, meta, headers, ar.read, detector, where)
    system.detector_ = detector
    system.offset_ = detector.offset_
    system.n_train_ = system.train_features_.shape[0]
    if isinstance(system, SPADE):
        system._map_cache = {}
        if getattr(system, "map_calibration_", None) is not None:
            system._map_cache[system._calibration_key()] = (system.map_calibration_,
                                                            system.map_levels_)
        if system.image_score != "global":
            system._set_offset()
    return system
