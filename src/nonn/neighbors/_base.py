"""The one protocol every nearest-neighbour search backend follows.

A backend is fitted on the training matrix and answers ``kneighbors``:

* ``(distances, indices)`` of shape ``(n_queries, n_neighbors)``, sorted
  ascending, true distances (not squared), ``int64`` indices, no ``-1``
  padding;
* ``X=None`` means "the training set itself", each point excluded **by
  index** (never by ``distance == 0``, so exact duplicates stay neighbours).

Estimators only talk to this protocol, so FAISS, GPU or distributed backends
plug in without touching them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

#: metric name -> how a backend must transform the data before Euclidean search.
METRICS = {
    "euclidean": {"normalize": False},
    # cosine distance = 1 - cos(a, b) = ||a/|a| - b/|b|||^2 / 2
    "cosine": {"normalize": True},
}


def check_metric(metric):
    if metric not in METRICS:
        raise ValueError(
            f"Unknown metric {metric!r}. Expected one of {sorted(METRICS)}; "
            "for example metric='euclidean'."
        )
    return metric


@runtime_checkable
class NeighborsBackend(Protocol):
    """Search backend protocol (see module docstring)."""

    name: str
    exact: bool

    def fit(self, X: np.ndarray) -> "NeighborsBackend": ...

    def kneighbors(self, X: np.ndarray | None = None, n_neighbors: int = 1): ...


def unit_rows(X):
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    norms[norms == 0] = 1
    return X / norms


def squared_to_metric(sq, metric):
    """Convert squared Euclidean distances (of unit rows for cosine)."""
    np.maximum(sq, 0, out=sq)
    if metric == "cosine":
        sq *= 0.5
        return sq
    return np.sqrt(sq, out=sq)
