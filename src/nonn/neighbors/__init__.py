"""Nearest-neighbour search backends behind one protocol.

``make_backend(name, metric=..., **params)`` builds a backend by name;
``"auto"`` picks one from the data's size and what is installed. Heavy
libraries are imported only inside the module that needs them.
"""

from __future__ import annotations

from ._base import METRICS, NeighborsBackend, check_metric

__all__ = ["BACKENDS", "METRICS", "NeighborsBackend", "make_backend", "resolve_backend"]


def _brute():
    from .brute import BruteForceBackend

    return BruteForceBackend


def _sklearn():
    from .sklearn import SklearnBackend

    return SklearnBackend


#: backend name -> loader of its class (imported lazily)
BACKENDS = {
    "brute": _brute,
    "sklearn": _sklearn,
}


def resolve_backend(name, n_samples, n_features):
    """The concrete backend name ``"auto"`` stands for."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(
                f"Unknown backend {name!r}. Expected 'auto' or one of {sorted(BACKENDS)}; "
                "for example backend='brute'."
            )
        return name
    # Trees beat BLAS only in very low dimension.
    if n_features <= 3:
        return "sklearn"
    return "brute"


def make_backend(name, *, metric="euclidean", n_samples=0, n_features=0, **params):
    """Instantiate the backend ``name`` (or the one ``"auto"`` picks)."""
    check_metric(metric)
    resolved = resolve_backend(name, n_samples, n_features)
    return BACKENDS[resolved]()(metric=metric, **params)
