"""Nearest-neighbor search backends behind one protocol.

``make_backend(name, metric=..., **params)`` builds a backend by name;
``"auto"`` picks an exact one from the data's shape, what is installed and
whether a CUDA GPU is visible (see :func:`resolve_backend`). Heavy
libraries are imported only inside the module that needs them.
"""

from __future__ import annotations

import importlib.util
import inspect

from ._base import METRICS, NeighborsBackend, check_metric

__all__ = ["BACKENDS", "METRICS", "NeighborsBackend", "make_backend", "resolve_backend"]


def _brute():
    from .brute import BruteForceBackend

    return BruteForceBackend


def _sklearn():
    from .sklearn import SklearnBackend

    return SklearnBackend


def _faiss():
    from .faiss import FaissBackend

    return FaissBackend


def _torch():
    from .torch import TorchBackend

    return TorchBackend


#: backend name -> loader of its class (imported lazily)
BACKENDS = {
    "brute": _brute,
    "sklearn": _sklearn,
    "faiss": _faiss,
    "torch": _torch,
}


#: "auto" picks the torch backend on CUDA from this much data (N * D) on,
#: when a GPU is visible: a GPU GEMM outruns every CPU backend once the data
#: is large enough to pay for torch's import and CUDA's start-up. Below it,
#: and without a GPU, "brute" (never FAISS's exact flat index, which it beat
#: at every size measured: docs/results.md, "Search backends").
AUTO_CUDA_MIN_SIZE = 20000 * 512


def _installed(module):
    return importlib.util.find_spec(module) is not None


def _cuda_available():
    import torch

    return bool(torch.cuda.is_available())


def resolve_backend(name, n_samples, n_features):
    """The concrete backend name ``"auto"`` stands for.

    ``"auto"`` depends only on the data's shape, on what is installed and on
    whether a CUDA GPU is visible, so the same data on the same machine
    always gets the same backend; it only ever picks an exact backend:

    * ``n_features <= 3``: ``"sklearn"`` (trees beat BLAS in very low dimension);
    * ``n_samples * n_features >= AUTO_CUDA_MIN_SIZE``, torch installed and
      ``torch.cuda.is_available()``: ``"torch"`` (on the GPU);
    * otherwise ``"brute"`` (compiled exact search; faster than FAISS's flat
      index here, see the note above).
    """
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(
                f"Unknown backend {name!r}. Expected 'auto' or one of {sorted(BACKENDS)}; "
                "for example backend='brute'."
            )
        return name
    if n_features <= 3:
        return "sklearn"
    if (n_samples * n_features >= AUTO_CUDA_MIN_SIZE and _installed("torch")
            and _cuda_available()):
        return "torch"
    return "brute"


def make_backend(name, *, metric="euclidean", n_samples=0, n_features=0, **params):
    """Instantiate the backend ``name`` (or the one ``"auto"`` picks).

    ``params`` are keyword arguments of that backend's constructor.
    """
    check_metric(metric)
    resolved = resolve_backend(name, n_samples, n_features)
    cls = BACKENDS[resolved]()
    accepted = [p for p in inspect.signature(cls).parameters if p != "metric"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        picked = f" (picked by backend={name!r})" if name != resolved else ""
        raise TypeError(
            f"The {resolved!r} backend{picked} does not accept the parameter(s) {unknown}. "
            f"It accepts {accepted}. Fix backend_params, or name the backend they are for, "
            "for example backend='faiss', backend_params={'index': 'HNSW32'}."
        )
    return cls(metric=metric, **params)
