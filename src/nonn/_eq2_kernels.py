"""Compiled kernels (numba) of Eq. 2: the neighborhood eigen-states and
the per-neighbor sums, in the primal (L x L covariance) and dual (K' x K'
Gram matrix) forms. The operator they compute is stated in :mod:`nonn._eq2`.

Primal. Each point's covariances are formed straight from the neighbor
ids (two-pass, float64, no N x K' x D gather) and diagonalised by cyclic
Jacobi rotations run on many matrices at once, one per SIMD lane, so the
rotations vectorise (``np.linalg.eigh`` spends most of its time in call
overhead on 5 x 5 matrices). Jacobi runs to convergence; sets larger than
:data:`JACOBI_MAX_SET` go to :func:`eigh_rows`. Scoring is fused the same way, so no
(q, k, S, L, L) gather of eigenvectors is ever built.

Dual. A neighborhood of K' points spans at most K' - 1 directions, so the
covariance of a feature set of L > K' features has at most K' - 1 non-zero
eigenvalues. They, and the eigenvectors, come from the K' x K' Gram matrix
of the centred neighborhood: with ``G`` the K' x L centred sub-vectors,
``G G^T / K' = U diag(e) U^T`` and the eigenvectors of the covariance
``G^T G / K'`` are ``v_j = G^T u_j / sqrt(K' e_j)``. A difference ``d``
projects as ``d . v_j = (G d) . u_j / sqrt(K' e_j)``, and ``G d`` is the K'
products of the neighborhood's rows with ``d``, centred, so nothing of
size L x L is ever formed or stored: per point and set the state is ``U``
(K' x K') and ``e`` (K'), and scoring reads the K' rows of the
neighborhood (ids stored in the model) again.

Every index and size these kernels read from a model is checked at their
entry (:mod:`nonn._kernel_checks`), so a corrupted model raises instead of
reading out of bounds. The test suite checks them against a naive numpy
oracle (``tests/oracles.py``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._kernel_checks import check_dual_sets, check_ids, check_rows, check_sets

_MAX_SWEEPS = 30
#: matrices diagonalised together; the innermost loops run over this axis so
#: LLVM vectorises them (sqrt and division included) with SIMD.
_BLOCK = 32



#: matrices up to this size are diagonalised by :func:`_symeig`: on small
#: matrices LAPACK spends most of its time in call overhead (25 x 25:
#: 62 us here against 93-130 us for ``np.linalg.eigh``); above it LAPACK's
#: blocked code is faster (100 x 100: 2.3 ms against 1.7 ms)
SYMEIG_MAX = 48
#: QL steps allowed per eigenvalue (converges in two or three)
_MAX_QL_STEPS = 60


@njit(cache=True, error_model="numpy")
def _symeig(V, d, e):
    """Eigen-decomposition of the symmetric matrix held in ``V`` (float64,
    n x n), in place: ``d`` receives the eigenvalues, ascending, and row
    ``j`` of ``V`` the unit eigenvector of ``d[j]``; ``e`` (n) is scratch.

    Householder reduction to tridiagonal form, then the implicit QL
    iteration with shifts (the EISPACK tred2/tql2 pair), on rows so every
    inner loop is contiguous. Backward stable: eigenvalues within a few
    ulps of the largest, eigenvectors orthonormal to float64 precision.
    The matrix is first brought to unit scale by a power of two (exact), so
    the plain ``sqrt(a^2 + b^2)`` of the rotations (a third faster than
    ``hypot``) can neither overflow nor underflow.
    """
    n = V.shape[0]
    big = 0.0
    for i in range(n):
        for j in range(n):
            big = max(big, abs(V[i, j]))
    if big == 0.0 or not np.isfinite(big):
        for i in range(n):
            d[i] = 0.0 if big == 0.0 else np.nan
            for j in range(n):
                V[i, j] = 1.0 if i == j else 0.0
        return
    unit = 2.0 ** -math.frexp(big)[1]
    for i in range(n):
        for j in range(n):
            V[i, j] *= unit
    # tred2: Householder reduction to tridiagonal form
    for j in range(n):
        d[j] = V[j, n - 1]
    for i in range(n - 1, 0, -1):
        scale = 0.0
        h = 0.0
        for k in range(i):
            scale += abs(d[k])
        if scale == 0.0:
            e[i] = d[i - 1]
            for j in range(i):
                d[j] = V[j, i - 1]
                V[j, i] = 0.0
                V[i, j] = 0.0
        else:
            for k in range(i):
                d[k] /= scale
                h += d[k] * d[k]
            f = d[i - 1]
            g = math.sqrt(h)
            if f > 0:
                g = -g
            e[i] = scale * g
            h = h - f * g
            d[i - 1] = f - g
            for j in range(i):
                e[j] = 0.0
            for j in range(i):
                f = d[j]
                V[i, j] = f
                g = e[j] + V[j, j] * f
                for k in range(j + 1, i):
                    g += V[j, k] * d[k]
                    e[k] += V[j, k] * f
                e[j] = g
            f = 0.0
            for j in range(i):
                e[j] /= h
                f += e[j] * d[j]
            hh = f / (h + h)
            for j in range(i):
                e[j] -= hh * d[j]
            for j in range(i):
                f = d[j]
                g = e[j]
                for k in range(j, i):
                    V[j, k] -= f * e[k] + g * d[k]
                d[j] = V[j, i - 1]
                V[j, i] = 0.0
        d[i] = h
    for i in range(n - 1):
        V[i, n - 1] = V[i, i]
        V[i, i] = 1.0
        h = d[i + 1]
        if h != 0.0:
            for k in range(i + 1):
                d[k] = V[i + 1, k] / h
            for j in range(i + 1):
                g = 0.0
                for k in range(i + 1):
                    g += V[i + 1, k] * V[j, k]
                for k in range(i + 1):
                    V[j, k] -= g * d[k]
        for k in range(i + 1):
            V[i + 1, k] = 0.0
    for j in range(n):
        d[j] = V[j, n - 1]
        V[j, n - 1] = 0.0
    V[n - 1, n - 1] = 1.0
    e[0] = 0.0
    # tql2: implicit QL on the tridiagonal matrix
    for i in range(1, n):
        e[i - 1] = e[i]
    e[n - 1] = 0.0
    f = 0.0
    tst1 = 0.0
    eps = 2.0 ** -52
    for l in range(n):
        tst1 = max(tst1, abs(d[l]) + abs(e[l]))
        m = l
        while m < n - 1:
            if abs(e[m]) <= eps * tst1:
                break
            m += 1
        if m > l:
            for _ in range(_MAX_QL_STEPS):
                g = d[l]
                p = (d[l + 1] - g) / (2.0 * e[l])
                r = math.sqrt(p * p + 1.0)
                if p < 0:
                    r = -r
                d[l] = e[l] / (p + r)
                d[l + 1] = e[l] * (p + r)
                dl1 = d[l + 1]
                h = g - d[l]
                for i in range(l + 2, n):
                    d[i] -= h
                f += h
                p = d[m]
                c = 1.0
                c2 = c
                c3 = c
                el1 = e[l + 1]
                s = 0.0
                s2 = 0.0
                for i in range(m - 1, l - 1, -1):
                    c3 = c2
                    c2 = c
                    s2 = s
                    g = c * e[i]
                    h = c * p
                    r = math.sqrt(p * p + e[i] * e[i])
                    e[i + 1] = s * r
                    s = e[i] / r
                    c = p / r
                    p = c * d[i] - s * g
                    d[i + 1] = h + s * (c * g + s * d[i])
                    for k in range(n):
                        h = V[i + 1, k]
                        V[i + 1, k] = s * V[i, k] + c * h
                        V[i, k] = c * V[i, k] - s * h
                p = -s * s2 * c3 * el1 * e[l] / dl1
                e[l] = s * p
                d[l] = c * p
                if not (abs(e[l]) > eps * tst1):
                    break
        d[l] = d[l] + f
        e[l] = 0.0
    for i in range(n - 1):
        k = i
        p = d[i]
        for j in range(i + 1, n):
            if d[j] < p:
                k = j
                p = d[j]
        if k != i:
            d[k] = d[i]
            d[i] = p
            for j in range(n):
                t = V[i, j]
                V[i, j] = V[k, j]
                V[k, j] = t
    for i in range(n):
        d[i] /= unit


@njit(cache=True, error_model="numpy")
def eigh_rows(M):
    """``(w, Vt)`` of the symmetric matrix ``M``, in float64: eigenvalues
    ascending, eigenvector ``j`` in row ``j`` of ``Vt``."""
    n = M.shape[0]
    if n > SYMEIG_MAX:
        w, U = np.linalg.eigh(M.astype(np.float64))
        return w, np.ascontiguousarray(U.T)
    Vt = np.empty((n, n))
    for a in range(n):
        for b in range(n):
            Vt[a, b] = M[a, b]
    w = np.empty(n)
    e = np.empty(n)
    _symeig(Vt, w, e)
    return w, Vt


@njit(cache=True, inline="always")
def _jacobi_lanes_body(A, V, r, B, tol):
    """Cyclic Jacobi on B symmetric r x r matrices held lane-wise,
    ``A[a, c, b]`` (b the lane, innermost so every statement vectorises);
    only the upper triangle is read and kept up to date (the lower one is
    left stale). ``V`` (same layout) must hold the identity and receives the
    eigenvectors as columns. Stops when the off-diagonal norm is below
    ``tol`` times the diagonal's (squared norms compared) in every lane.

    Each lane loop touches at most two rows of ``A`` besides the rotation
    arrays, so LLVM's run-time alias checks stay few and the loops vectorise.
    """
    dt = A.dtype
    cs = np.empty(B, dtype=dt)
    sn = np.empty(B, dtype=dt)
    # constants of the lanes' dtype: a float64 literal would promote float32
    # lanes to float64 (half the SIMD width, and conversions)
    cst = np.zeros(3, dtype=dt)
    cst[1] = 1.0
    cst[2] = 2.0
    zero = cst[0]
    one = cst[1]
    two = cst[2]
    for _ in range(_MAX_SWEEPS):
        off = 0.0
        diag = 0.0
        for p in range(r):
            for b in range(B):
                diag += A[p, p, b] * A[p, p, b]
            for q in range(p + 1, r):
                for b in range(B):
                    off += A[p, q, b] * A[p, q, b]
        if off <= tol * diag:
            break
        for p in range(r - 1):
            for q in range(p + 1, r):
                # the rotation angle, and the 2 x 2 block it diagonalises
                for b in range(B):
                    apq = A[p, q, b]
                    app = A[p, p, b]
                    aqq = A[q, q, b]
                    den = two * apq if apq != zero else one
                    theta = (aqq - app) / den
                    # t = tan of the rotation angle, the smaller root
                    t = one / (abs(theta) + math.sqrt(theta * theta + one))
                    t = -t if theta < zero else t
                    t = zero if apq == zero else t
                    c = one / math.sqrt(t * t + one)
                    cs[b] = c
                    sn[b] = t * c
                    A[p, p, b] = app - t * apq
                    A[q, q, b] = aqq + t * apq
                    A[p, q, b] = zero
                # the other entries of rows/columns p and q (upper triangle)
                for k in range(r):
                    if k != p and k != q:
                        i1 = min(k, p)
                        j1 = max(k, p)
                        i2 = min(k, q)
                        j2 = max(k, q)
                        for b in range(B):
                            akp = A[i1, j1, b]
                            akq = A[i2, j2, b]
                            A[i1, j1, b] = cs[b] * akp - sn[b] * akq
                            A[i2, j2, b] = sn[b] * akp + cs[b] * akq
                for k in range(r):
                    for b in range(B):
                        vkp = V[k, p, b]
                        vkq = V[k, q, b]
                        V[k, p, b] = cs[b] * vkp - sn[b] * vkq
                        V[k, q, b] = sn[b] * vkp + cs[b] * vkq


_FASTMATH = {"reassoc", "nsz", "arcp", "contract"}

#: largest feature set decomposed by the SIMD-lane Jacobi solver; larger
#: sets go to :func:`eigh_rows`
JACOBI_MAX_SET = 8


# Two compiled copies of the Jacobi loops, each called (not inlined) by the
# kernels so that those stay small to compile: any size, and the default set
# size 5 as a compile-time constant (its loops unroll).
@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _jacobi_lanes(A, V, r, B, tol):
    """:func:`_jacobi_lanes_body` for any ``r``."""
    _jacobi_lanes_body(A, V, r, B, tol)


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _jacobi_lanes5(A, V, B, tol):
    """:func:`_jacobi_lanes_body` for ``r = 5`` (unrolled)."""
    _jacobi_lanes_body(A, V, 5, B, tol)


@njit(cache=True, inline="always")
def _sorted_eigvals_order(A, r, b, order):
    """Insertion sort of lane b's eigenvalues (diagonal of A), ascending."""
    for a in range(r):
        order[a] = a
    for a in range(1, r):
        key = order[a]
        j = a - 1
        while j >= 0 and A[order[j], order[j], b] > A[key, key, b]:
            order[j + 1] = order[j]
            j -= 1
        order[j + 1] = key


# reassociation lets the block reductions vectorise; no "nnan"/"ninf" because


#: points per task of the fused kernel (buffers are reused within a task)
_POINTS_PER_TASK = 16


@njit(cache=True, inline="always")
def _unit_scale(x):
    """The power of two ``2**-e`` that brings ``x > 0`` into [0.5, 1) (1 for
    0 or a non-finite ``x``; clamped to float64's normal range)."""
    if not (x > 0.0 and x < np.inf):
        return 1.0
    e = math.frexp(x)[1]
    e = max(min(e, 1000), -1000)
    return math.ldexp(1.0, -e)


@njit(cache=True, inline="always")
def _full_sets_eigen(P, m, L, full, B, tol, A, V, order, sc, p, w_out, V_out):
    """Jacobi on the ``full`` L x L set covariances of point ``p`` (from its
    lagged products ``P``), one SIMD lane per set, results into the outputs.
    Inlined, so a constant ``L`` at the call site unrolls every loop over it.

    Each lane is multiplied by the power of two ``sc[s]`` that brings its
    largest variance into [0.5, 1) (exact; undone on the eigenvalues): the
    stopping test squares the entries, which over- or underflows for
    covariances far from 1, and each set then weighs alike in it."""
    for a in range(L):
        for b in range(L):
            for s in range(B):
                A[a, b, s] = 0.0
                V[a, b, s] = 0.0
        for s in range(B):
            V[a, a, s] = 1.0
    for s in range(full):
        mx = 0.0
        for a in range(L):
            mx = max(mx, P[0, s * L + a])
        sc[s] = _unit_scale(mx / m)
    for lag in range(L):
        for a in range(L - lag):
            for s in range(full):
                v = P[lag, s * L + a] / m * sc[s]
                A[a, a + lag, s] = v
                A[a + lag, a, s] = v
    if L > JACOBI_MAX_SET:
        # one tridiagonal QL (or LAPACK) per set: Jacobi's sweeps cost
        # O(L^3) each and lose to it well before L = 20
        M = np.empty((L, L), dtype=A.dtype)
        for s in range(full):
            for a in range(L):
                for c in range(L):
                    M[a, c] = A[a, c, s]
            e, Ut = eigh_rows(M)
            for j in range(L):
                A[j, j, s] = e[j]
                for a in range(L):
                    V[a, j, s] = Ut[j, a]
        # eigh's eigenvalues are ascending already; the sort below keeps them
    elif L == 5:
        _jacobi_lanes5(A, V, B, tol)
    else:
        _jacobi_lanes(A, V, L, B, tol)
    for s in range(full):
        _sorted_eigvals_order(A, L, s, order)
        for j in range(L):
            src = order[j]
            e = A[src, src, s]
            w_out[p, s, j] = e / sc[s] if e > 0.0 else 0.0
            for a in range(L):
                V_out[p, s, a, j] = V[a, src, s]


@njit(cache=True, parallel=True, error_model="numpy",
      fastmath={"reassoc", "nsz", "arcp", "contract"})
def primal_eigen(Xg, groups, sizes, L, tol, w_out, V_out):
    """Fused covariance + eigen-decomposition of every neighborhood, per
    feature set, written straight into the outputs.

    For point ``p``: the covariance (divisor M, two-pass, float64) of the
    set-s sub-vectors of the M points ``groups[p]``, then cyclic Jacobi on
    all the point's full sets at once (one SIMD lane per set, in the output
    dtype: float32 data are diagonalised in float32) and on the short last
    set on its own. ``w_out[p, s]`` (ascending, clipped at 0) and
    ``V_out[p, s]`` (eigenvectors as columns) get every slot written; the
    padding of a short last set is 0.
    """
    c, m = groups.shape
    n_sets = sizes.shape[0]
    d = Xg.shape[1]
    width = n_sets * L
    check_ids(groups, 0, Xg.shape[0])
    check_sets(sizes, L, d, d <= width and w_out.shape[0] >= c and w_out.shape[1] >= n_sets
                and w_out.shape[2] >= L and V_out.shape[0] >= c and V_out.shape[1] >= n_sets
                and V_out.shape[2] >= L and V_out.shape[3] >= L)
    full = 0
    for s in range(n_sets):
        if sizes[s] == L:
            full += 1
    r_last = sizes[n_sets - 1]
    short = r_last < L
    # lanes padded to a multiple of 16 (padding lanes: identity, converged);
    # a few large sets (one set of all features) get no padding: 16 lanes of
    # a 21 x 21 Jacobi for one set cost 16x the work
    B = full if full < 8 else ((full + 15) // 16) * 16
    dt = w_out.dtype
    ntasks = (c + _POINTS_PER_TASK - 1) // _POINTS_PER_TASK
    for task in prange(ntasks):
        mean = np.empty(d)
        G = np.zeros((m, width + L))
        P = np.empty((L, width))
        A = np.empty((L, L, B), dtype=dt)
        V = np.empty((L, L, B), dtype=dt)
        A1 = np.empty((L, L, 1), dtype=dt)
        V1 = np.empty((L, L, 1), dtype=dt)
        order = np.empty(L, dtype=np.int64)
        sc = np.empty(B)
        for p in range(task * _POINTS_PER_TASK, min((task + 1) * _POINTS_PER_TASK, c)):
            # ---- covariance as lagged products along the whole row:
            # P[lag, f] = sum_t G[t, f] G[t, f + lag], cov[s, a, a + lag] = P[lag, s*L + a]
            for f in range(d):
                mean[f] = 0.0
            for t in range(m):
                row = groups[p, t]
                for f in range(d):
                    mean[f] += Xg[row, f]
            for f in range(d):
                mean[f] /= m
            for t in range(m):
                row = groups[p, t]
                for f in range(d):
                    G[t, f] = Xg[row, f] - mean[f]
            for lag in range(L):
                for f in range(width):
                    P[lag, f] = 0.0
            for t in range(m):
                for lag in range(L):
                    for f in range(width):
                        P[lag, f] += G[t, f] * G[t, f + lag]
            # ---- the full sets, one SIMD lane each
            if full > 0:
                _full_sets_eigen(P, m, L, full, B, tol, A, V, order, sc, p, w_out, V_out)
            # ---- the short last set, on its own r x r covariance
            if short:
                r = r_last
                off = full * L
                for a in range(L):
                    for b in range(L):
                        A1[a, b, 0] = 0.0
                        V1[a, b, 0] = 0.0
                    V1[a, a, 0] = 1.0
                mx = 0.0
                for a in range(r):
                    mx = max(mx, P[0, off + a])
                sc1 = _unit_scale(mx / m)  # as each lane of the full sets
                for a in range(r):
                    for b in range(a, r):
                        v = P[b - a, off + a] / m * sc1
                        A1[a, b, 0] = v
                        A1[b, a, 0] = v
                if r > JACOBI_MAX_SET:
                    M1 = np.empty((r, r), dtype=dt)
                    for a in range(r):
                        for b2 in range(r):
                            M1[a, b2] = A1[a, b2, 0]
                    e1, U1t = eigh_rows(M1)
                    for a in range(r):
                        A1[a, a, 0] = e1[a]
                        for b2 in range(r):
                            V1[a, b2, 0] = U1t[b2, a]
                else:
                    _jacobi_lanes(A1, V1, r, 1, tol)
                _sorted_eigvals_order(A1, r, 0, order)
                for j in range(L):
                    if j < r:
                        src = order[j]
                        e = A1[src, src, 0]
                        w_out[p, full, j] = e / sc1 if e > 0.0 else 0.0
                    else:
                        w_out[p, full, j] = 0.0
                    for a in range(L):
                        V_out[p, full, a, j] = V1[a, order[j], 0] if (j < r and a < r) else 0.0


@njit(cache=True, parallel=True, error_model="numpy")
def neighborhood_traces(Xg, groups, out):
    """``out[p]``: the total variance (trace of the covariance, divisor K')
    of the rows ``groups[p]`` of ``Xg``, two passes in float64 (the mean,
    then the squared deviations)."""
    c, Kp = groups.shape
    D = Xg.shape[1]
    check_rows(groups, Xg.shape[0])
    if out.shape[0] < c:
        raise ValueError("out has fewer rows than groups")
    for p in prange(c):
        mean = np.zeros(D)
        for m in range(Kp):
            row = groups[p, m]
            for f in range(D):
                mean[f] += Xg[row, f]
        for f in range(D):
            mean[f] /= Kp
        total = 0.0
        for m in range(Kp):
            row = groups[p, m]
            for f in range(D):
                v = np.float64(Xg[row, f]) - mean[f]
                total += v * v
        out[p] = total / Kp


@njit(cache=True)
def neighbor_floor(evals, r, floor, local):
    """The eigenvalue floor of one neighbor's eigen-state in one set:
    ``floor`` (absolute), raised to ``local`` times the neighborhood's mean
    variance per feature (its eigenvalues' sum over the set's ``r``
    features) when ``local > 0`` (``eig_floor_ref="neighborhood"``)."""
    if local <= 0.0:
        return floor
    tr = 0.0
    for j in range(evals.shape[0]):
        tr += evals[j]
    fl = local * tr / r
    return fl if fl > floor else floor


@njit(cache=True, parallel=True, error_model="numpy")
def primal_score(Qg, idx, Xg, evecs, evals, sizes, floor, local, out):
    """Eq. 2's inner sums per (query, neighbor): ``out[u, i]`` is the sum over
    sets and eigen-directions of neighbor ``idx[u, i]`` for grid query ``u``,
    from that neighbor's stored eigen-state (rows ``idx[u, i]`` of ``Xg``,
    ``evecs`` and ``evals``). Floored directions are summed basis-free (see
    :mod:`nonn._eq2`); the floor of a neighbor and set is
    ``max(floor[s], local[s] * trace / sizes[s])`` (:func:`neighbor_floor`).
    Aggregating over ``i`` is the caller's."""
    q, k = idx.shape
    n_sets = sizes.shape[0]
    L = evecs.shape[2]
    check_ids(idx, 0, min(Xg.shape[0], evecs.shape[0], evals.shape[0]))
    check_sets(sizes, L, min(Qg.shape[1], Xg.shape[1]),
                Qg.shape[0] >= q and out.shape[0] >= q and out.shape[1] >= k
                and evecs.shape[1] >= n_sets and evecs.shape[3] >= L
                and evals.shape[1] >= n_sets and evals.shape[2] >= L and floor.shape[0] >= n_sets
                and local.shape[0] >= n_sets)
    for u in prange(q):
        d = np.empty(L)
        for i in range(k):
            nb = idx[u, i]
            total = 0.0
            for s in range(n_sets):
                off = s * L
                r = sizes[s]
                fl = neighbor_floor(evals[nb, s], r, floor[s], local[s])
                for a in range(r):
                    d[a] = Qg[u, off + a] - Xg[nb, off + a]
                sq = 0.0
                for j in range(r):
                    proj = 0.0
                    for a in range(r):
                        proj += d[a] * evecs[nb, s, a, j]
                    e = evals[nb, s, j]
                    if e <= fl:
                        sq += proj * proj
                    else:
                        total += abs(proj) / math.sqrt(e)
                total += math.sqrt(sq) / math.sqrt(fl)
            out[u, i] = total


# ------------------------------------------------------------------ dual form
@njit(cache=True, parallel=True, error_model="numpy")
def dual_eigen(Xg, groups, sizes, L, w_out, U_out):
    """Eigen-state of every neighborhood, per feature set, in the dual form.

    ``groups[p]`` lists the K' training rows of neighborhood ``p``; set
    ``s`` holds columns ``s*L .. s*L + sizes[s]`` of ``Xg``. Writes the
    eigenvalues of ``G G^T / K'`` (ascending, clipped at 0) into
    ``w_out[p, s]`` (K') and its eigenvectors, as columns, into
    ``U_out[p, s]`` (K' x K'). The Gram matrix is a BLAS product of the
    centred rows (the mean in float64) in the data's dtype; the caller
    limits the BLAS to one thread (each point is one task here).
    """
    c, Kp = groups.shape
    n_sets = sizes.shape[0]
    check_rows(groups, Xg.shape[0])
    check_dual_sets(sizes, L, Xg.shape[1])
    for p in prange(c):
        mean = np.empty(L)
        for s in range(n_sets):
            off = s * L
            r = sizes[s]
            G = np.empty((Kp, r), dtype=Xg.dtype)
            for f in range(r):
                mean[f] = 0.0
            # one pass over the (scattered) rows: copied, then centred in place
            for m in range(Kp):
                row = groups[p, m]
                for f in range(r):
                    v = Xg[row, off + f]
                    G[m, f] = v
                    mean[f] += v
            for f in range(r):
                mean[f] /= Kp
            for m in range(Kp):
                for f in range(r):
                    G[m, f] = G[m, f] - mean[f]
            M = np.dot(G, G.T)
            M /= Kp
            w, Ut = eigh_rows(M)
            for j in range(Kp):
                w_out[p, s, j] = w[j] if w[j] > 0 else 0.0
                for m in range(Kp):
                    U_out[p, s, m, j] = Ut[j, m]


@njit(cache=True, parallel=True, error_model="numpy")
def dual_score(Qg, idx, rows, Xg, groups, U, w, sizes, L, floor, local, out):
    """Eq. 2's inner sums per (query, neighbor) from dual eigen-states.

    ``out[u, i]`` is the sum over sets and eigen-directions for grid query
    ``u`` and the neighbor whose eigen-state is row ``t = idx[u, i]`` of
    ``U``/``w``/``groups``; the neighbor's own training row is ``rows[t]``.
    Eigenvalues at or below the floor (:func:`neighbor_floor`), and the
    directions outside the neighborhood's span, share the weight
    ``1 / sqrt(floor)`` and are
    summed as the L2 norm of the difference's projection on them (the
    basis-free rule of the primal form): ``|d|^2`` minus the squared
    projections on the kept directions.
    """
    q, k = idx.shape
    n_sets = sizes.shape[0]
    Kp = groups.shape[1]
    check_rows(idx, groups.shape[0])
    check_rows(rows, Xg.shape[0])
    check_rows(groups, Xg.shape[0])
    check_dual_sets(sizes, L, Xg.shape[1])
    if floor.shape[0] < n_sets or local.shape[0] < n_sets:
        raise ValueError("a floor per feature set is needed")
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
                fl = neighbor_floor(w[e_row, s], r, floor[s], local[s])
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
