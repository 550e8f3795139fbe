"""Input transforms a detector learns at fit and applies to every query:
unit-length rows and global (ZCA) whitening.

Both are pure functions on arrays; the detector stores what they learn.
"""

from __future__ import annotations

import numpy as np


def l2_rows(X):
    """Rows scaled to unit Euclidean length (zero rows stay zero), in X's
    dtype. Distances then compare directions, not norms: cosine k-NN is
    Euclidean k-NN of these rows."""
    norms = np.sqrt(np.einsum("ij,ij->i", X, X, dtype=np.float64))
    norms[norms == 0] = 1.0
    return (X / norms[:, None].astype(X.dtype, copy=False)).astype(X.dtype, copy=False)


def fit_whitening(X, strength):
    """Mean and symmetric (ZCA) whitening matrix of the training rows ``X``.

    The covariance is Ledoit-Wolf's shrinkage estimate ``C`` (well
    conditioned even with fewer rows than features), blended with the
    isotropic covariance of the same total variance,
    ``S = strength * C + (1 - strength) * trace(C) / D * I``, and the
    matrix is ``W = sqrt(trace(S) / D) * S^(-1/2)``: ``strength = 1``
    whitens fully (distances become Ledoit-Wolf Mahalanobis distances),
    ``0`` changes nothing but the translation; the factor keeps the data's
    overall scale. ZCA (rather than PCA) whitening keeps each coordinate
    closest to its original feature, so feature sets and per-feature
    explanations still refer to the input's columns.

    Returns ``(mean (D,), W (D, D))`` in X's dtype.
    """
    from sklearn.covariance import ledoit_wolf

    X64 = np.asarray(X, dtype=np.float64)
    mean = X64.mean(axis=0)
    C, _ = ledoit_wolf(X64 - mean, assume_centered=True)
    d = C.shape[0]
    iso = np.trace(C) / d
    if not iso > 0:  # constant data: nothing to whiten
        return mean.astype(X.dtype), np.eye(d, dtype=X.dtype)
    S = strength * C + (1.0 - strength) * iso * np.eye(d)
    e, V = np.linalg.eigh(S)
    e = np.maximum(e, iso * 1e-12)
    W = (V * (np.sqrt(iso) / np.sqrt(e))) @ V.T
    return mean.astype(X.dtype), W.astype(X.dtype)


def whiten(X, mean, W):
    """``(X - mean) @ W`` in X's dtype."""
    return np.ascontiguousarray((X - mean) @ W, dtype=X.dtype)
