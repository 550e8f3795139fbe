"""Pretrained-network image features as a scikit-learn transformer."""

from __future__ import annotations

import sys

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .. import _torch
from . import _images

#: ``layers`` of :class:`ImageFeatureExtractor`: the last pooled feature,
#: or mid-level blocks and the last, pooled and concatenated
LAYERS = ("last", "multi")


def import_torch():
    """``torch``, or an ImportError that says how to install it."""
    return _torch.import_torch("nonn's image features", extra="vision")


def show_progress(verbose):
    """Progress bars: ``verbose='auto'`` shows them only on a terminal."""
    if verbose == "auto":
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(verbose)


class ImageFeatureExtractor(TransformerMixin, BaseEstimator):
    """Global image features of a pretrained backbone (a stateless transformer).

    ``transform`` accepts a folder, a list of image paths and/or arrays, or a
    uint8 array (N, H, W) or (N, H, W, C); grey images are repeated to RGB.
    Every image is resized to ``image_size`` x ``image_size`` (antialiased
    bilinear), normalised as the backbone expects and passed through it in
    batches; the output is the globally average-pooled last feature map
    (the CLS token for ViTs), float32 (N, dim).

    Parameters
    ----------
    backbone : str, default='efficientnet_lite0'
        See :mod:`nonn.vision.backbones`; ``efficientnet_lite0`` works offline.
    weights : str or None
        Weight file; default: the packaged one, or the torch hub cache.
    image_size : int, default=224
    batch_size : int, default=32
    device : {'auto', 'cpu', 'cuda'}, default='auto'
    verbose : bool or 'auto', default='auto'
        Progress bar; 'auto' shows it only when stderr is a terminal.
    layers : {'last', 'multi'}, default='last'
        ``'last'``: the globally pooled last feature map (the paper's
        feature). ``'multi'``: mid-level features too (the DFM/PatchCore
        recipe): the global average of each intermediate block of the
        backbone's pyramid after the first (EfficientNet-Lite0: strides 8
        and 16, 40 + 112 channels; ResNets: layer2 and layer3) and the last
        pooled feature, each scaled to unit length, concatenated
        (EfficientNet-Lite0: 1432 features). Mid-level blocks respond to
        local texture and colour that the last block pools away.

    Attributes
    ----------
    backbone_ : torch.nn.Module
    device_ : str
    n_features_out_ : int

    Examples
    --------
    >>> from sklearn.pipeline import make_pipeline           # doctest: +SKIP
    >>> from nonn import KNNN                                  # doctest: +SKIP
    >>> from nonn.vision import ImageFeatureExtractor          # doctest: +SKIP
    >>> det = make_pipeline(ImageFeatureExtractor(), KNNN())   # doctest: +SKIP
    >>> det.fit("good_images/").predict("new_images/")         # doctest: +SKIP
    """

    def __init__(self, backbone="efficientnet_lite0", weights=None, image_size=224,
                 batch_size=32, device="auto", verbose="auto", layers="last"):
        self.layers = layers
        self.backbone = backbone
        self.weights = weights
        self.image_size = image_size
        self.batch_size = batch_size
        self.device = device
        self.verbose = verbose

    def _check_params(self):
        for name in ("image_size", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"The '{name}' parameter of ImageFeatureExtractor must be an "
                                 f"int in the range [1, inf). Got {v!r} instead.")
        if self.layers not in LAYERS:
            raise ValueError(f"The 'layers' parameter of ImageFeatureExtractor must be one of "
                             f"{LAYERS}. Got {self.layers!r} instead.")
        if self.image_size < 32:
            raise ValueError(f"The 'image_size' parameter of ImageFeatureExtractor must be at "
                             f"least 32 (the backbones downsample 32x). Got {self.image_size}.")

    def fit(self, X=None, y=None):
        """Load the backbone (``X`` is ignored: the features are not learned)."""
        import_torch()
        from .backbones import load_backbone

        self._check_params()
        self.device_ = _torch.resolve_device(self.device, "ImageFeatureExtractor")
        self.backbone_ = load_backbone(self.backbone, self.weights, self.device_)
        self.n_features_out_ = int(self.backbone_.feature_dim)
        if self.layers == "multi":
            torch = import_torch()
            with torch.inference_mode():
                probe = torch.zeros(1, 3, 64, 64, device=self.device_)
                self.n_features_out_ = int(self._multi(probe).shape[1])
        return self

    def _multi(self, x):
        """Mid-level multi-layer feature: the global average of each
        intermediate pyramid block after the first (EfficientNet-Lite0:
        strides 8 and 16; ResNets: layer2, layer3) and the last pooled
        feature, each scaled to unit length, concatenated."""
        torch = import_torch()
        maps, pooled = self.backbone_.pyramid(x)
        parts = [m.float().mean(dim=(2, 3)) for m in maps[1:]] + [pooled.float()]
        parts = [p / p.norm(dim=1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
                 for p in parts]
        return torch.cat(parts, 1)

    def _ensure(self):
        if not hasattr(self, "backbone_"):
            self.fit()

    # ------------------------------------------------------------ batching
    def iter_batches(self, X, desc="features"):
        """Yield ``(slice, float tensor (B, 3, S, S) in [0, 255])`` on the device."""
        from nonn._chunks import progress

        images = _images.as_image_list(X)
        n = len(images)
        starts = range(0, n, self.batch_size)
        for s in progress(starts, show_progress(self.verbose), desc, total=len(starts)):
            sl = slice(s, min(s + self.batch_size, n))
            if isinstance(images, np.ndarray):
                chunk = list(images[sl])
            else:
                chunk = images[sl]
            yield sl, _images.batch_tensor(chunk, self.image_size).to(self.device_)

    def _map(self, X, fn, desc):
        torch = import_torch()
        self._ensure()
        out = []
        with torch.inference_mode():
            for _, x in self.iter_batches(X, desc):
                out.append(fn(self.backbone_.preprocess(x)))
        return out

    # ------------------------------------------------------------ features
    def transform(self, X):
        """Pooled features, float32 (N, n_features_out_)."""
        if self.layers == "multi":
            def fn(x):
                return self._multi(x).cpu().numpy()
        else:
            def fn(x):
                return self.backbone_.pooled(x).float().cpu().numpy()
        parts = self._map(X, fn, "image features")
        return np.concatenate(parts, 0)

    def transform_pyramid(self, X, map_size, mirror=False):
        """SPADE's inputs: pooled features (N, D) and the multi-layer feature
        pyramid (N, C, map_size, map_size) float16 — each pyramid layer
        resized (bilinear) to ``map_size`` and stacked along channels.

        ``mirror=True`` also returns, third, the pyramids of the images'
        horizontal mirror images (as extracted from them, not flipped back),
        from the same pass over ``X``."""
        torch = import_torch()
        import torch.nn.functional as F

        def pyramid(x):
            maps, pooled = self.backbone_.pyramid(x)
            maps = [F.interpolate(m.float(), size=(map_size, map_size), mode="bilinear",
                                  align_corners=False) for m in maps]
            return (pooled.float().cpu().numpy(),
                    torch.cat(maps, 1).to(torch.float16).cpu().numpy())

        def fn(x):
            # the resize and the preprocessing are mirror-symmetric, so the
            # flipped batch is the batch of the mirror images
            return pyramid(x) + ((pyramid(x.flip(-1))[1],) if mirror else ())

        parts = self._map(X, fn, "feature pyramids")
        return tuple(np.concatenate([p[j] for p in parts], 0) for j in range(len(parts[0])))

    def transform_trunk(self, X):
        """Output of the frozen stages before ``backbone_.tail_start`` (what
        PANDA's fine-tuning starts from), float32 tensors concatenated (CPU)."""
        torch = import_torch()
        self._ensure()
        start = self.backbone_.tail_start
        parts = self._map(X, lambda x: self.backbone_.run_stages(x, 0, start)[0].float().cpu(),
                          "frozen trunk")
        return torch.cat(parts, 0)

    def get_feature_names_out(self, input_features=None):
        check_is_fitted(self, "n_features_out_")
        return np.array([f"{self.backbone}_{i}" for i in range(self.n_features_out_)],
                        dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags
