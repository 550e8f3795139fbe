"""The paper's three image systems, each with a k-NN or a k-NNN operator.

- :class:`FeatureDetector` — "Feature + k-NN": global pooled features of a
  pretrained backbone, scored by a nearest-neighbour detector.
- :class:`SPADE` — Cohen & Hoshen 2020: image score from the nearest normal
  images' pooled features; pixel maps from a multi-layer feature pyramid
  matched against the pyramids of the ``n_map_neighbors`` nearest normal
  images, upsampled and Gaussian-smoothed.
- :class:`PANDA` — Reiss et al. 2021: fine-tune the backbone's last stages on
  the normal images with the compactness loss (squared distance to the
  centre of the normal features), stopped early, then the nearest-neighbour
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
import json
import os
import tempfile

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from . import _images
from .features import ImageFeatureExtractor, import_torch, show_progress

VISION_FORMAT = "nonn-vision-model"
VISION_FORMAT_VERSION = 1


def make_detector(nn, n_neighbors, n_neighbors_of_neighbors=25, contamination="auto",
                  verbose=False, **params):
    """The nearest-neighbour operator: ``KNNN`` for ``'knnn'``, ``KNN`` for ``'knn'``."""
    from nonn import KNN, KNNN

    if nn == "knnn":
        return KNNN(n_neighbors=n_neighbors, n_neighbors_of_neighbors=n_neighbors_of_neighbors,
                    contamination=contamination, verbose=verbose, **params)
    if nn == "knn":
        return KNN(n_neighbors=n_neighbors, contamination=contamination, verbose=verbose,
                   **params)
    raise ValueError(f"The 'nn' parameter must be 'knn' or 'knnn'. Got {nn!r} instead.")


class _ImageSystem(BaseEstimator):
    """Shared plumbing: extractor, detector, scores, persistence."""

    _default_k = 3

    def _extractor(self):
        return ImageFeatureExtractor(backbone=self.backbone, weights=self.weights,
                                     image_size=self.image_size, batch_size=self.batch_size,
                                     device=self.device, verbose=self.verbose)

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
        """Fit the nearest-neighbour operator on precomputed pooled features
        (N, dim) — what :meth:`fit` does after extraction."""
        if self.normalize not in (True, False):
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

    def score_samples(self, X):
        """Higher = more normal (``-anomaly_score``)."""
        return -self.anomaly_score(X)

    def decision_function(self, X):
        """Negative = outlier."""
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """+1 normal, -1 anomalous."""
        return np.where(self.decision_function(X) < 0, -1, 1)

    def labels_from_scores(self, anomaly):
        """``predict`` for already computed anomaly scores."""
        return np.where(-np.asarray(anomaly) - self.offset_ < 0, -1, 1)

    # -------------------------------------------------------- persistence
    _extra_arrays = ("train_features_",)

    def save(self, path):
        """Write the fitted system (parameters, detector arrays, stored
        features; never the backbone's weights, nor pickle) to ``path``."""
        from nonn._io import atomic_write
        from nonn.persistence import _jsonable, save as save_detector

        check_is_fitted(self, "detector_")
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, "detector.nonn")
            save_detector(self.detector_, p)
            with open(p, "rb") as fh:
                det_bytes = np.frombuffer(fh.read(), dtype=np.uint8)
        arrays = {name.rstrip("_"): np.ascontiguousarray(getattr(self, name))
                  for name in self._extra_arrays}
        meta = {"format": VISION_FORMAT, "format_version": VISION_FORMAT_VERSION,
                "system": type(self).__name__, "params": _jsonable(self.get_params()),
                "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str}
                           for k, v in arrays.items()}}
        payload = dict(arrays, detector=det_bytes,
                       __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
        return atomic_write(path, lambda fh: np.savez(fh, **payload))


# ------------------------------------------------------------------ Feature
class FeatureDetector(_ImageSystem):
    """"Feature + k-NN" / "Feature + k-NNN": pooled backbone features scored
    by a nearest-neighbour detector.

    Parameters
    ----------
    nn : {'knnn', 'knn'}, default='knnn'
    n_neighbors : int or None, default=None
        k; None means 3.
    n_neighbors_of_neighbors : int, default=25
        K' of k-NNN (ignored by k-NN).
    backbone, weights, image_size, batch_size, device, verbose
        See :class:`ImageFeatureExtractor`.
    contamination : 'auto' or float
        Threshold of ``predict`` (share of training images flagged).
    detector_params : dict or None
        More parameters of the detector (e.g. ``{'set_size': 8}``).
    normalize : bool, default=False
        Scale every pooled feature to unit length before the detector (the
        paper uses raw features; unit length removes the feature-norm effect
        that can dominate raw Euclidean k-NN, see docs/vision.md).

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

    def __init__(self, nn="knnn", n_neighbors=None, n_neighbors_of_neighbors=25,
                 backbone="efficientnet_lite0", weights=None, image_size=224, batch_size=32,
                 device="auto", verbose="auto", contamination="auto", detector_params=None,
                 normalize=False):
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
    """SPADE with a k-NN or k-NNN image-level operator.

    Image score: the nearest-neighbour operator on pooled features (SPADE's
    K = 50 nearest normal images by default). Pixel map: for every location
    of the query's feature pyramid, the distance to the nearest location
    (kappa = 1) of the ``n_map_neighbors`` nearest normal images' pyramids,
    upsampled to ``image_size``, smoothed with a Gaussian of ``sigma`` pixels
    and resized to the image's own size. The pixel matching is SPADE's
    (nearest distance); ``nn`` changes the image-level operator.

    Parameters
    ----------
    n_neighbors : int or None, default=None
        K of the image-level score; None means 50 (SPADE's choice).
    n_map_neighbors : int, default=5
        Normal images whose pyramids form the gallery of a query's pixels.
    map_size : int, default=28
        Side of the stored pyramid (28 = stride 8 at 224 pixels); smaller
        saves memory (the model file stores every training pyramid).
    sigma : float, default=4
        Gaussian smoothing of the map, in pixels at ``image_size``.

    Other parameters as :class:`FeatureDetector`.

    Attributes
    ----------
    train_maps_ : ndarray (n_train, channels, map_size, map_size) float16
    """

    _default_k = 50
    _extra_arrays = ("train_features_", "train_maps_")

    def __init__(self, nn="knnn", n_neighbors=None, n_neighbors_of_neighbors=25,
                 n_map_neighbors=5, map_size=28, sigma=4.0, backbone="efficientnet_lite0",
                 weights=None, image_size=224, batch_size=32, device="auto", verbose="auto",
                 contamination="auto", detector_params=None, normalize=False):
        self.nn = nn
        self.n_neighbors = n_neighbors
        self.n_neighbors_of_neighbors = n_neighbors_of_neighbors
        self.n_map_neighbors = n_map_neighbors
        self.map_size = map_size
        self.sigma = sigma
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
        for name in ("n_map_neighbors", "map_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"The '{name}' parameter of SPADE must be an int in the "
                                 f"range [1, inf). Got {v!r} instead.")
        feats, self.train_maps_ = self.extractor_.transform_pyramid(X, self.map_size)
        return feats

    def fit_features(self, features, maps=None):
        """Fit from precomputed pooled features (and pyramids, for maps)."""
        if maps is not None:
            self.train_maps_ = np.asarray(maps, dtype=np.float16)
        return super().fit_features(features)

    def score_with_maps(self, X):
        """Image scores (N,) and pixel anomaly maps (a list of float32 arrays,
        each of its image's original (H, W)), from one pass over ``X``."""
        check_is_fitted(self, "train_maps_")
        torch = import_torch()
        if not hasattr(self, "extractor_"):
            self.extractor_ = self._extractor().fit()
        images = _images.as_image_list(X)
        feats, maps = self.extractor_.transform_pyramid(images, self.map_size)
        scores = self.anomaly_score_features(feats)
        pixel = self._pixel_maps(feats, maps, torch)
        sizes = [_images.original_size(images[i]) for i in range(len(images))]
        return scores, self._finish_maps(pixel, sizes, torch)

    def anomaly_maps(self, X):
        """Pixel anomaly maps only (see :meth:`score_with_maps`)."""
        return self.score_with_maps(X)[1]

    def _pixel_maps(self, feats, maps, torch):
        train = np.asarray(self.train_features_, dtype=np.float32)
        feats = self._prep(feats)
        kk = min(self.n_map_neighbors, train.shape[0])
        # the gallery images: nearest by pooled-feature distance
        d2 = ((feats ** 2).sum(1)[:, None] - 2 * feats @ train.T + (train ** 2).sum(1)[None])
        nbrs = np.argsort(d2, axis=1, kind="stable")[:, :kk]
        out = np.empty((len(feats), self.map_size, self.map_size), dtype=np.float32)
        for i in range(len(feats)):
            q = torch.from_numpy(maps[i].astype(np.float32)).flatten(1).T  # (m*m, C)
            g = torch.from_numpy(self.train_maps_[nbrs[i]].astype(np.float32))
            g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])  # (kk*m*m, C)
            d = torch.cdist(q, g).min(dim=1).values
            out[i] = d.reshape(self.map_size, self.map_size).numpy()
        return out

    def _finish_maps(self, pixel, sizes, torch):
        import torch.nn.functional as F
        from scipy.ndimage import gaussian_filter

        s = self.image_size
        up = F.interpolate(torch.from_numpy(pixel)[:, None], size=(s, s), mode="bilinear",
                           align_corners=False)[:, 0].numpy()
        out = []
        for m, (h, w) in zip(up, sizes):
            m = gaussian_filter(m, sigma=self.sigma) if self.sigma else m
            if (h, w) != (s, s):
                m = F.interpolate(torch.from_numpy(np.ascontiguousarray(m))[None, None],
                                  size=(h, w), mode="bilinear",
                                  align_corners=False)[0, 0].numpy()
            out.append(m.astype(np.float32))
        return out


# -------------------------------------------------------------------- PANDA
def panda_finetune(backbone, trunk, epochs=2, lr=1e-4, batch_size=64, weight_decay=5e-5,
                   validation_fraction=0.1, patience=1, random_state=0, verbose=False):
    """Fine-tune ``backbone``'s tail (in place) on cached trunk outputs of
    normal images with PANDA's compactness loss ``||f(x) - c||^2``, ``c`` the
    centre of the normal features before training.

    Early stopping: after each epoch the loss of held-out normals is measured
    against the *initial* centre; training stops when it has not improved for
    ``patience`` epochs, and the best tail is kept. Batch-norm statistics stay
    frozen (eval mode), as in PANDA's code. Returns the per-epoch history.
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

    def mean_loss(idx, centre):
        total = 0.0
        for s in range(0, len(idx), 256):
            f = feats(trunk[idx[s:s + 256]])
            total += float(((f - centre) ** 2).sum(1).sum())
        return total / max(len(idx), 1)

    backbone.eval()
    with torch.no_grad():
        centre = torch.cat([feats(trunk[s:s + 256]) for s in range(0, n, 256)]).mean(0)
    params = []
    for m in backbone.tail_modules():
        for p in m.parameters():
            p.requires_grad_(True)
            params.append(p)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    best = mean_loss(val_idx, centre) if n_val else None
    best_state = copy.deepcopy([p.detach().clone() for p in params])
    history = [{"epoch": 0, "val_loss": best}]
    bad = 0
    for epoch in range(1, epochs + 1):
        order = tr_idx[torch.randperm(len(tr_idx), generator=g)]
        starts = range(0, len(order), batch_size)
        for s in progress(starts, verbose, f"PANDA epoch {epoch}", total=len(starts)):
            f = feats(trunk[order[s:s + batch_size]], grad=True)
            loss = ((f - centre) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = mean_loss(val_idx, centre) if n_val else None
        history.append({"epoch": epoch, "val_loss": val, "train_loss": loss.item()})
        if val is None or val < best:
            best, bad = val, 0
            best_state = [p.detach().clone() for p in params]
        else:
            bad += 1
            if bad >= patience:
                break
    with torch.no_grad():
        for p, b in zip(params, best_state):
            p.copy_(b)
    for p in params:
        p.requires_grad_(False)
    backbone.eval()
    return history


class PANDA(_ImageSystem):
    """PANDA: compactness fine-tuning of the backbone's last stages on the
    normal images, then a k-NN / k-NNN score on the adapted pooled features.

    Only the backbone's tail (``backbone.tail_start`` onward: EfficientNet's
    last block and head, ResNet's layer4, ViT's last block) is trained, so
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
    random_state : int, default=0

    Other parameters as :class:`FeatureDetector`. A fitted PANDA holds the
    fine-tuned backbone in ``extractor_.backbone_``; it is not saved by
    :meth:`save` (the CLI offers the feature and spade systems).
    """

    _default_k = 2

    def __init__(self, nn="knnn", n_neighbors=None, n_neighbors_of_neighbors=25, epochs=2,
                 lr=1e-4, validation_fraction=0.1, random_state=0,
                 backbone="efficientnet_lite0", weights=None, image_size=224, batch_size=32,
                 device="auto", verbose="auto", contamination="auto", detector_params=None,
                 normalize=False):
        self.nn = nn
        self.n_neighbors = n_neighbors
        self.n_neighbors_of_neighbors = n_neighbors_of_neighbors
        self.epochs = epochs
        self.lr = lr
        self.validation_fraction = validation_fraction
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
def load(path):
    """Load a system saved with ``system.save(path)`` (never unpickles)."""
    from nonn.persistence import ModelFileError, load as load_detector

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No image model file at {path!r}. Create one with "
                                "`nonn fit-images`.")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ModelFileError(f"{path!r} is not a readable nonn image model ({exc}).") from None
    with npz:
        try:
            meta = json.loads(bytes(npz["__meta__"]).decode())
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(f"{path!r} is not a nonn image model (no readable "
                                 f"metadata: {exc}).") from None
        if not isinstance(meta, dict) or meta.get("format") != VISION_FORMAT:
            hint = (" It looks like a `nonn fit` model; score it with `nonn score`."
                    if isinstance(meta, dict) and meta.get("format") == "nonn-model" else "")
            raise ModelFileError(f"{path!r} is not a nonn image model file.{hint}")
        if meta.get("format_version", 0) > VISION_FORMAT_VERSION:
            raise ModelFileError(f"{path!r} was written by a newer nonn (image model format "
                                 f"{meta.get('format_version')}); upgrade nonn to load it.")
        classes = {"FeatureDetector": FeatureDetector, "SPADE": SPADE}
        cls = classes.get(meta.get("system"))
        if cls is None:
            raise ModelFileError(f"{path!r} names an unknown image system "
                                 f"{meta.get('system')!r}.")
        try:
            system = cls(**meta["params"])
        except TypeError as exc:
            raise ModelFileError(f"{path!r} has parameters this nonn does not accept: {exc}")
        for name in cls._extra_arrays:
            key = name.rstrip("_")
            spec = meta["arrays"].get(key)
            arr = npz[key]
            if spec is None or list(arr.shape) != spec["shape"] or arr.dtype.str != spec["dtype"]:
                raise ModelFileError(f"{path!r}: the array {key!r} does not match its metadata; "
                                     "the file is corrupted.")
            setattr(system, name, arr)
        det_bytes = npz["detector"].tobytes()
    with tempfile.TemporaryDirectory() as tmp:
        p = os.path.join(tmp, "detector.nonn")
        with open(p, "wb") as fh:
            fh.write(det_bytes)
        system.detector_ = load_detector(p)
    system.offset_ = system.detector_.offset_
    system.n_train_ = system.train_features_.shape[0]
    return system
