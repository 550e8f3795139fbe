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


def fit_whitening(X, strength, exclude=None):
    """Mean and symmetric (ZCA) whitening matrix of the training rows ``X``
    (without the rows ``exclude``, when given).

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

    The covariance comes from block sums (:func:`whitening_moments`), as
    on a cluster: memory beyond ``X`` is one float64 block, not a float64
    copy of ``X`` (at 1M x 512, 4 GiB and more for scikit-learn's own
    ``ledoit_wolf``, whose estimate this equals to rounding).

    Returns ``(mean (D,), W (D, D))`` in X's dtype.
    """
    keep = None
    if exclude is not None:
        keep = np.ones(X.shape[0], dtype=bool)
        keep[np.asarray(exclude, dtype=np.int64)] = False
    n = X.shape[0] if keep is None else int(keep.sum())
    total = np.zeros(X.shape[1])
    for rows in _blocks(X, keep):
        total += rows.sum(axis=0, dtype=np.float64)
    mean = total / max(n, 1)
    gram, norm4 = whitening_moments(X, mean, keep=keep)
    C, _ = ledoit_wolf_from_moments(n, gram, norm4)
    return whitening_matrix(mean, C, strength, X.dtype)


def _blocks(X, keep, block=4096):
    """``X`` in row blocks, each without the rows ``keep`` leaves out
    (None: all kept)."""
    for start in range(0, X.shape[0], block):
        rows = X[start:start + block]
        yield rows if keep is None else rows[keep[start:start + block]]


def whitening_matrix(mean, C, strength, dtype):
    """:func:`fit_whitening`'s ``(mean, W)`` in ``dtype`` from the training
    mean and Ledoit-Wolf covariance ``C`` (float64)."""
    mean = np.asarray(mean, dtype=np.float64)
    d = C.shape[0]
    iso = np.trace(C) / d
    if not iso > 0:  # constant data: nothing to whiten
        return mean.astype(dtype), np.eye(d, dtype=dtype)
    S = strength * C + (1.0 - strength) * iso * np.eye(d)
    e, V = np.linalg.eigh(S)
    e = np.maximum(e, iso * 1e-12)
    W = (V * (np.sqrt(iso) / np.sqrt(e))) @ V.T
    return mean.astype(dtype), W.astype(dtype)


def whitening_moments(X, mean, keep=None, block=4096):
    """A row block's share of the sums behind the Ledoit-Wolf covariance,
    about the global ``mean`` (float64): the Gram matrix of the centred
    rows and the sum of their squared norms squared (of the rows ``keep``
    marks; None: all). Summed over row partitions they give
    :func:`ledoit_wolf_from_moments` the whole matrix's estimate."""
    mean = np.asarray(mean, dtype=np.float64)
    gram = np.zeros((X.shape[1], X.shape[1]))
    norm4 = 0.0
    for rows in _blocks(X, keep, block):  # a float64 copy of one block
        Xc = np.asarray(rows, dtype=np.float64) - mean
        norms = np.einsum("ij,ij->i", Xc, Xc)
        gram += Xc.T @ Xc
        norm4 += float(norms @ norms)
    return gram, norm4


def ledoit_wolf_from_moments(n, gram, norm4):
    """``sklearn.covariance.ledoit_wolf`` of ``n`` centred rows from their
    Gram matrix ``gram`` and ``norm4`` (the sum over rows of the squared
    norm squared; see :func:`whitening_moments`): scikit-learn's formula,
    whose ``sum((X**2).T @ X**2)`` is that sum. Returns ``(C, shrinkage)``."""
    gram = np.asarray(gram, dtype=np.float64)
    d = gram.shape[0]
    emp = gram / n
    if d == 1:  # one feature: every shrinkage gives the same covariance
        return emp, 0.0
    trace = np.diag(emp)
    mu = trace.sum() / d
    delta_ = float(np.sum(gram ** 2)) / n ** 2
    beta = 1.0 / (d * n) * (norm4 / n - delta_)
    delta = (delta_ - 2.0 * mu * trace.sum() + d * mu ** 2) / d
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    C = (1.0 - shrinkage) * emp
    C.flat[:: d + 1] += shrinkage * mu
    return C, shrinkage


def whiten(X, mean, W):
    """``(X - mean) @ W`` in X's dtype."""
    return np.ascontiguousarray((X - mean) @ W, dtype=X.dtype)
