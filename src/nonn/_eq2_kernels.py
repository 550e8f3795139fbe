"""Compiled kernels (numba) of Eq. 2 in its dual (Gram) form.

A neighbourhood of K' points spans at most K' - 1 directions, so the
covariance of a feature set of L > K' features has at most K' - 1 non-zero
eigenvalues. They, and the eigenvectors, come from the K' x K' Gram matrix
of the centred neighbourhood (the dual form of PCA): with ``G`` the K' x L
centred sub-vectors, ``G G^T / K' = U diag(e) U^T`` and the eigenvectors of
the covariance ``G^T G / K'`` are ``v_j = G^T u_j / sqrt(K' e_j)``. A
difference ``d`` projects as ``d . v_j = (G d) . u_j / sqrt(K' e_j)``, and
``G d`` is the K' products of the neighbourhood's rows with ``d``, centred —
so nothing of size L x L is ever formed or stored: per point and set the
state is ``U`` (K' x K') and ``e`` (K'), and scoring reads the K' rows of
the neighbourhood (ids stored in the model) again.

Every index and size these kernels read from a model is checked at their
entry, so a corrupted model raises instead of reading out of bounds.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _check_ids(ids, n):
    for v in ids.ravel():
        if v < 0 or v >= n:
            raise IndexError("a neighbor id is out of range of the training rows")


@njit(cache=True)
def _check_sets(sizes, L, width):
    total = 0
    for s in range(sizes.shape[0]):
        if sizes[s] < 1 or sizes[s] > L:
            raise ValueError("a feature-set size is out of range")
        total += sizes[s]
    if sizes.shape[0] * L < total or total > width:
        raise ValueError("the feature-set sizes do not fit the data's columns")


@njit(cache=True, parallel=True, error_model="numpy")
def dual_eigen(Xg, groups, sizes, L, w_out, U_out):
    """Eigen-state of every neighbourhood, per feature set, in the dual form.

    ``groups[p]`` lists the K' training rows of neighbourhood ``p``; set
    ``s`` holds columns ``s*L .. s*L + sizes[s]`` of ``Xg``. Writes the
    eigenvalues of ``G G^T / K'`` (ascending, clipped at 0) into
    ``w_out[p, s]`` (K') and its eigenvectors, as columns, into
    ``U_out[p, s]`` (K' x K'). The Gram matrix is a BLAS product of the
    centred rows (the mean in float64) in the data's dtype; the caller
    limits the BLAS to one thread (each point is one task here).
    """
    c, Kp = groups.shape
    n_sets = sizes.shape[0]
    _check_ids(groups, Xg.shape[0])
    _check_sets(sizes, L, Xg.shape[1])
    for p in prange(c):
        mean = np.empty(L)
        for s in range(n_sets):
            off = s * L
            r = sizes[s]
            G = np.empty((Kp, r), dtype=Xg.dtype)
            for f in range(r):
                mean[f] = 0.0
            for m in range(Kp):
                row = groups[p, m]
                for f in range(r):
                    mean[f] += Xg[row, off + f]
            for f in range(r):
                mean[f] /= Kp
            for m in range(Kp):
                row = groups[p, m]
                for f in range(r):
                    G[m, f] = Xg[row, off + f] - mean[f]
            M = np.dot(G, G.T)
            M /= Kp
            w, U = np.linalg.eigh(M)
            for j in range(Kp):
                w_out[p, s, j] = w[j] if w[j] > 0 else 0.0
                for m in range(Kp):
                    U_out[p, s, m, j] = U[m, j]


@njit(cache=True, parallel=True, error_model="numpy")
def dual_score(Qg, idx, rows, Xg, groups, U, w, sizes, L, floor, out):
    """Eq. 2's inner sums per (query, neighbour) from dual eigen-states.

    ``out[u, i]`` is the sum over sets and eigen-directions for grid query
    ``u`` and the neighbour whose eigen-state is row ``t = idx[u, i]`` of
    ``U``/``w``/``groups``; the neighbour's own training row is ``rows[t]``.
    Eigenvalues at or below the set's floor, and the directions outside the
    neighbourhood's span, share the weight ``1 / sqrt(floor)`` and are
    summed as the L2 norm of the difference's projection on them (the
    basis-free rule of the primal form): ``|d|^2`` minus the squared
    projections on the kept directions.
    """
    q, k = idx.shape
    n_sets = sizes.shape[0]
    Kp = groups.shape[1]
    _check_ids(idx, groups.shape[0])
    _check_ids(rows, Xg.shape[0])
    _check_ids(groups, Xg.shape[0])
    _check_sets(sizes, L, Xg.shape[1])
    for u in prange(q):
        d = np.empty(L)
        t = np.empty(Kp)
        for i in range(k):
            e_row = idx[u, i]
            nb = rows[e_row]
            total = 0.0
            for s in range(n_sets):
                off = s * L
                r = sizes[s]
                fl = floor[s]
                dd = 0.0
                for a in range(r):
                    v = np.float64(Qg[u, off + a]) - np.float64(Xg[nb, off + a])
                    d[a] = v
                    dd += v * v
                tm = 0.0
                for m in range(Kp):
                    row = groups[e_row, m]
                    acc = 0.0
                    for a in range(r):
                        acc += Xg[row, off + a] * d[a]
                    t[m] = acc
                    tm += acc
                tm /= Kp
                kept = 0.0
                for j in range(Kp):
                    e = w[e_row, s, j]
                    if e <= fl:
                        continue
                    pj = 0.0
                    for m in range(Kp):
                        pj += (t[m] - tm) * U[e_row, s, m, j]
                    proj = pj / math.sqrt(Kp * e)
                    total += abs(proj) / math.sqrt(e)
                    kept += proj * proj
                rest = dd - kept
                total += math.sqrt(rest if rest > 0.0 else 0.0) / math.sqrt(fl)
            out[u, i] = total
