"""Image anomaly detection: pretrained features + k-NN / k-NNN (the ``vision`` extra).

Install with ``pip install torch==2.13.0 "nonn[vision]"``. Importing this
package needs neither torch nor Pillow; they load when an object that needs
them is used.

- :class:`ImageFeatureExtractor` — pooled backbone features, a scikit-learn
  transformer (``make_pipeline(ImageFeatureExtractor(), KNNN())``);
- :class:`FeatureDetector`, :class:`SPADE`, :class:`PANDA` — the paper's
  three systems, ``nn='knnn'`` or ``'knn'``;
- :func:`load` — read a model written by ``system.save`` / ``nonn fit-images``;
- :mod:`nonn.vision.datasets` — MVTec AD, image folders, CIFAR-10,
  Fashion-MNIST, MNIST; :mod:`nonn.vision.backbones` — the networks;
- :mod:`nonn.vision.defects` — synthetic defects with masks, written as an
  MVTec-layout test set (``nonn make-defects``).
"""

import importlib

_LAZY = {
    "ImageFeatureExtractor": "features",
    "FeatureDetector": "systems",
    "SPADE": "systems",
    "PANDA": "systems",
    "load": "systems",
    "make_detector": "systems",
    "datasets": None,
    "backbones": None,
    "defects": None,
}

__all__ = ["ImageFeatureExtractor", "FeatureDetector", "SPADE", "PANDA", "load", "datasets"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'nonn.vision' has no attribute {name!r}")
    mod = _LAZY[name]
    if mod is None:
        return importlib.import_module(f"{__name__}.{name}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
