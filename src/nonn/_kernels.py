"""Compiled kernels (numba) for the two hot loops of k-NNN.

Fit decomposes one small L x L covariance per training point and feature
set: 2 million 5 x 5 matrices at N = 20,000, D = 512. LAPACK through
``np.linalg.eigh`` spends ~2.4 us per matrix, mostly call overhead. Here the
covariances are formed straight from the neighbour ids (two-pass, float64,
no N x K' x D gather), and diagonalised by cyclic Jacobi rotations run on
32 matrices at once so the rotations vectorise: about 4x faster than
``np.linalg.eigh`` on this 2-core machine. Scoring is fused the same way,
so no (q, k, S, L, L) gather of eigenvectors is ever built.

Jacobi runs to convergence (off-diagonal norm below 1e-12 of the diagonal),
and the test-suite checks every kernel against the pure-numpy path in
``_local_eigen``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import get_thread_id, njit, prange

_MAX_SWEEPS = 30
#: matrices diagonalised together; the innermost loops run over this axis so
#: LLVM vectorises them (sqrt and division included) with SIMD.
_BLOCK = 32


@njit(cache=True, parallel=True, error_model="numpy",
      fastmath={"reassoc", "nsz", "arcp", "contract"})
def covariances(Xg, groups, sizes, L, out):
    """out[p, s] = covariance (divisor M, two-pass, float64) of the set-s
    sub-vectors of the M points ``groups[p]``; padding stays 0.

    The products are formed as lagged products along the whole row,
    P[lag, f] = sum_t G[t, f] G[t, f + lag], contiguous in f so they
    vectorise; cov[s, a, a + lag] = P[lag, s*L + a].
    """
    c, m = groups.shape
    n_sets = sizes.shape[0]
    d = Xg.shape[1]
    width = n_sets * L
    _check_ids(groups, 0, Xg.shape[0])
    _check_sets(sizes, L, d, d <= width and out.shape[0] >= c and out.shape[1] >= n_sets
                and out.shape[2] >= L and out.shape[3] >= L)
    for p in prange(c):
        mean = np.zeros(d)
        for t in range(m):
            row = groups[p, t]
            for f in range(d):
                mean[f] += Xg[row, f]
        for f in range(d):
            mean[f] /= m
        # centred neighbourhood, zero-padded past column d (to the grid + one lag)
        G = np.zeros((m, width + L))
        for t in range(m):
            row = groups[p, t]
            for f in range(d):
                G[t, f] = Xg[row, f] - mean[f]
        P = np.zeros((L, width))
        for t in range(m):
            for lag in range(L):
                for f in range(width):
                    P[lag, f] += G[t, f] * G[t, f + lag]
        for s in range(n_sets):
            off = s * L
            r = sizes[s]
            for a in range(L):
                for b in range(L):
                    out[p, s, a, b] = 0.0
            for a in range(r):
                for b in range(a, r):
                    v = P[b - a, off + a] / m
                    out[p, s, a, b] = v
                    out[p, s, b, a] = v


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
#: sets go to LAPACK (numba's ``np.linalg.eigh``)
JACOBI_MAX_SET = 8


# Two compiled copies of the Jacobi loops, each called (not inlined) by the
# kernels so that those stay small to compile: any size, and the default set
# size 5 as a compile-time constant (its loops unroll: about 1.5x faster).
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
# the rotation formula relies on IEEE inf for extreme angles.
@njit(cache=True, parallel=True, error_model="numpy",
      fastmath={"reassoc", "nsz", "arcp", "contract"})
def eigh_batched(C, w_out, V_out):
    """Eigen-decomposition of a stack of small symmetric matrices C (M, r, r):
    cyclic Jacobi to convergence, _BLOCK matrices at a time in SIMD lanes.
    Eigenvalues ascending (clipped at 0) in w_out (M, r), eigenvectors as
    columns in V_out (M, r, r)."""
    M, r, _ = C.shape
    B = _BLOCK
    nblocks = (M + B - 1) // B
    for blk in prange(nblocks):
        start = blk * B
        nb = min(B, M - start)
        A = np.zeros((r, r, B), dtype=C.dtype)
        V = np.zeros((r, r, B), dtype=C.dtype)
        for a in range(r):
            for c in range(r):
                for b in range(nb):
                    A[a, c, b] = C[start + b, a, c]
            for b in range(B):
                V[a, a, b] = 1.0
        _jacobi_lanes(A, V, r, B, 1e-24)
        order = np.empty(r, dtype=np.int64)
        for b in range(nb):
            _sorted_eigvals_order(A, r, b, order)
            for j in range(r):
                src = order[j]
                e = A[src, src, b]
                w_out[start + b, j] = e if e > 0.0 else 0.0
                for a in range(r):
                    V_out[start + b, a, j] = V[a, src, b]


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
        # LAPACK's divide and conquer per set: Jacobi's sweeps cost O(L^3)
        # each and lose to it well before L = 20
        M = np.empty((L, L), dtype=A.dtype)
        for s in range(full):
            for a in range(L):
                for c in range(L):
                    M[a, c] = A[a, c, s]
            e, U = np.linalg.eigh(M)
            for j in range(L):
                A[j, j, s] = e[j]
                for a in range(L):
                    V[a, j, s] = U[a, j]
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
def neighbourhood_eigen(Xg, groups, sizes, L, tol, w_out, V_out):
    """Fused covariance + eigen-decomposition of every neighbourhood, per
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
    _check_ids(groups, 0, Xg.shape[0])
    _check_sets(sizes, L, d, d <= width and w_out.shape[0] >= c and w_out.shape[1] >= n_sets
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
                    e1, U1 = np.linalg.eigh(M1)
                    for a in range(r):
                        A1[a, a, 0] = e1[a]
                        for b2 in range(r):
                            V1[a, b2, 0] = U1[a, b2]
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
def score_eq2(Qg, idx, Xg, evecs, evals, sizes, floor, out):
    """Eq. 2's inner sums per (query, neighbour): ``out[u, i]`` is the sum over
    sets and eigen-directions of neighbour ``idx[u, i]`` for grid query ``u``,
    from that neighbour's stored eigen-state (rows ``idx[u, i]`` of ``Xg``,
    ``evecs`` and ``evals``). Floored directions are summed basis-free (see
    ``_local_eigen.project_l1``). Aggregating over ``i`` is the caller's."""
    q, k = idx.shape
    n_sets = sizes.shape[0]
    L = evecs.shape[2]
    _check_ids(idx, 0, min(Xg.shape[0], evecs.shape[0], evals.shape[0]))
    _check_sets(sizes, L, min(Qg.shape[1], Xg.shape[1]),
                Qg.shape[0] >= q and out.shape[0] >= q and out.shape[1] >= k
                and evecs.shape[1] >= n_sets and evecs.shape[3] >= L
                and evals.shape[1] >= n_sets and evals.shape[2] >= L and floor.shape[0] >= n_sets)
    for u in prange(q):
        d = np.empty(L)
        for i in range(k):
            nb = idx[u, i]
            total = 0.0
            for s in range(n_sets):
                off = s * L
                r = sizes[s]
                fl = floor[s]
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


# --------------------------------------------------------------- k-NN search
@njit(cache=True, inline="always")
def _heap_sift_down(hv, hi, k, v, j):
    """Replace the root of the max-heap (hv, hi) of size k, keyed on
    (value, id), by (v, j) and restore the heap."""
    pos = 0
    while True:
        c = 2 * pos + 1
        if c >= k:
            break
        r = c + 1
        if r < k and (hv[r] > hv[c] or (hv[r] == hv[c] and hi[r] > hi[c])):
            c = r
        if hv[c] > v or (hv[c] == v and hi[c] > j):
            hv[pos] = hv[c]
            hi[pos] = hi[c]
            pos = c
        else:
            break
    hv[pos] = v
    hi[pos] = j


@njit(cache=True, inline="always")
def _sort_pairs(hv, hi, k):
    """Insertion sort of (hv, hi) ascending by (value, id)."""
    for a in range(1, k):
        v = hv[a]
        j = hi[a]
        b = a - 1
        while b >= 0 and (hv[b] > v or (hv[b] == v and hi[b] > j)):
            hv[b + 1] = hv[b]
            hi[b + 1] = hi[b]
            b -= 1
        hv[b + 1] = v
        hi[b + 1] = j


@njit(cache=True, parallel=True, error_model="numpy",
      fastmath={"reassoc", "nsz", "arcp", "contract"})
def exact_sq_sorted(X, Q, cand, sq_out, ids_out):
    """Squared Euclidean distances from query ``Q[i]`` to its candidates
    ``X[cand[i]]``, recomputed from the differences (accumulated in float64:
    no cancellation error of the ``|a|^2 - 2ab + |b|^2`` expansion), with
    the candidates sorted by them (stable: ties keep the given order)."""
    nq, m = cand.shape
    d = X.shape[1]
    _check_ids(cand, 0, X.shape[0])
    _check_shapes(Q.shape[0] >= nq and Q.shape[1] >= d and sq_out.shape[0] >= nq
                  and sq_out.shape[1] >= m and ids_out.shape[0] >= nq and ids_out.shape[1] >= m)
    for i in prange(nq):
        acc = np.empty(m)
        ids = np.empty(m, dtype=np.int64)
        for c in range(m):
            row = cand[i, c]
            s = 0.0
            for f in range(d):
                df = np.float64(X[row, f]) - np.float64(Q[i, f])
                s += df * df
            # insertion: stable (strictly greater values move right)
            b = c - 1
            while b >= 0 and acc[b] > s:
                acc[b + 1] = acc[b]
                ids[b + 1] = ids[b]
                b -= 1
            acc[b + 1] = s
            ids[b + 1] = row
        for c in range(m):
            sq_out[i, c] = acc[c]
            ids_out[i, c] = ids[c]


@njit(cache=True, inline="always")
def _heap_offer(hv, hi, k, v, j):
    """Offer (v, j) to the max-heap (hv, hi) of the k smallest (value, id)."""
    if v < hv[0] or (v == hv[0] and j < hi[0]):
        _heap_sift_down(hv, hi, k, v, j)


@njit(cache=True, parallel=True, error_model="numpy",
      fastmath={"reassoc", "nsz", "arcp", "contract"})
def refine_by_neighbours(X, Q, first, graph, fanout, rev_ptr, rev_ids, self_ids, sq_out,
                         ids_out):
    """One round of "neighbours of neighbours" refinement of approximate
    k-NN lists (the local join of NN-descent).

    Query ``Q[i]``'s candidates are its current neighbours ``first[i]`` and
    the graph neighbours ``graph[r]`` of the first ``fanout`` of them, plus
    its reverse neighbours ``rev_ids[rev_ptr[i]:rev_ptr[i + 1]]`` (rows that
    list it; an empty ``rev_ptr`` of length 1 for none); each
    distinct candidate other than ``self_ids[i]`` (-1: none) is measured
    (squared Euclidean in the data's precision) and the ``k`` nearest are
    kept, re-measured in float64 and sorted by (distance, id). Writes ``sq_out`` / ``ids_out``
    (nq, k). A true neighbour an index missed is usually a neighbour of a
    neighbour it found, so one round lifts recall at the cost of
    ``fanout * K`` distance evaluations per row."""
    nq, m0 = first.shape
    kg = graph.shape[1]
    k = ids_out.shape[1]
    d = X.shape[1]
    f = min(fanout, m0)
    has_rev = rev_ptr.shape[0] > nq
    # ids < 0 mean "none" here; graph ids are checked where they are read
    _check_ids(first, _NONE_OK, min(graph.shape[0], X.shape[0]))
    _check_ids1(rev_ids, _NONE_OK, X.shape[0])
    _check_ptr(rev_ptr, nq, rev_ids.shape[0], has_rev)
    _check_shapes(fanout >= 0 and Q.shape[0] >= nq and Q.shape[1] >= d
                  and self_ids.shape[0] >= nq and sq_out.shape[0] >= nq
                  and sq_out.shape[1] >= k and ids_out.shape[0] >= nq)
    bad = np.zeros(nq, dtype=np.bool_)
    for i in prange(nq):
        r0 = rev_ptr[i] if has_rev else 0
        r1 = rev_ptr[i + 1] if has_rev else 0
        cand = np.empty(m0 + f * kg + (r1 - r0), dtype=np.int64)
        c = 0
        for a in range(m0):
            cand[c] = first[i, a]
            c += 1
        for a in range(r0, r1):
            cand[c] = rev_ids[a]
            c += 1
        for a in range(f):
            r = first[i, a]
            if r < 0:
                continue
            for b in range(kg):
                cand[c] = graph[r, b]
                c += 1
        cs = np.sort(cand[:c])
        hv = np.full(k, np.inf)
        hi = np.full(k, np.iinfo(np.int64).max, dtype=np.int64)
        me = self_ids[i]
        prev = -1
        for t in range(c):
            j = cs[t]
            if j == prev or j == me or j < 0:
                continue
            if j >= X.shape[0]:
                bad[i] = True
                continue
            prev = j
            # ranking value in the data's precision (SIMD-wide); the kept
            # ones are re-measured in float64 below
            s = X.dtype.type(0)
            for ff in range(d):
                df = X[j, ff] - Q[i, ff]
                s += df * df
            _heap_offer(hv, hi, k, np.float64(s), j)
        for a in range(k):
            j = hi[a]
            if j == np.iinfo(np.int64).max:
                continue
            s64 = 0.0
            for ff in range(d):
                df = np.float64(X[j, ff]) - np.float64(Q[i, ff])
                s64 += df * df
            hv[a] = s64
        _sort_pairs(hv, hi, k)
        for a in range(k):
            sq_out[i, a] = hv[a]
            ids_out[i, a] = hi[a]
    for i in range(nq):
        if bad[i]:
            raise IndexError("nonn kernel: a graph id is out of range")


#: candidates checked at once (SIMD minimum) before any heap work
_SCAN = 64


@njit(cache=True, error_model="numpy",
      fastmath={"reassoc", "nsz", "arcp", "contract", "nnan", "ninf"})
def _merge_rows(G, half_norm, row0, col0, heap_v, heap_i, skip_self):
    """Row ``i`` of the block ``G`` (point ``row0 + i``) takes the
    candidates ``col0 + j`` with ranking values ``half_norm[col0 + j] -
    G[i, j]`` into its heap (``skip_self``: never its own id)."""
    b, nc = G.shape
    k = heap_v.shape[1]
    hn = half_norm[col0:col0 + nc]
    for i in range(b):
        gi = row0 + i
        hv = heap_v[gi]
        hi = heap_i[gi]
        Gi = G[i]
        for j in range(0, nc, _SCAN):
            stop = min(j + _SCAN, nc)
            thr = hv[0]
            mn = thr
            for t in range(j, stop):
                x = hn[t] - Gi[t]
                mn = x if x < mn else mn
            if mn <= thr:
                for t in range(j, stop):
                    v = hn[t] - Gi[t]
                    if v <= hv[0] and not (skip_self and col0 + t == gi):
                        _heap_offer(hv, hi, k, v, col0 + t)


@njit(cache=True, error_model="numpy",
      fastmath={"reassoc", "nsz", "arcp", "contract", "nnan", "ninf"})
def _merge_cols(G, half_norm, row0, col0, heap_v, heap_i, thr):
    """The transposed merge: column ``j`` of ``G`` (point ``col0 + j``)
    takes the candidates ``row0 + i`` with values ``half_norm[row0 + i] -
    G[i, j]``. ``G`` is read row by row (contiguously) with the columns'
    thresholds cached in ``thr``; a stretch of a row is first checked
    against them at once (SIMD)."""
    b, nc = G.shape
    k = heap_v.shape[1]
    for j in range(nc):
        thr[j] = heap_v[col0 + j, 0]
    for i in range(b):
        hn = half_norm[row0 + i]
        Gi = G[i]
        for j in range(0, nc, _SCAN):
            stop = min(j + _SCAN, nc)
            # the largest margin thr - value: >= 0 where a candidate enters
            mx = thr[j] - (hn - Gi[j])
            for t in range(j, stop):
                x = thr[t] - (hn - Gi[t])
                mx = x if x > mx else mx
            if mx >= 0:
                for t in range(j, stop):
                    v = hn - Gi[t]
                    if v <= thr[t]:
                        gj = col0 + t
                        _heap_offer(heap_v[gj], heap_i[gj], k, v, row0 + i)
                        thr[t] = heap_v[gj, 0]


@njit(cache=True, parallel=True, error_model="numpy",
      fastmath={"reassoc", "nsz", "arcp", "contract", "nnan", "ninf"})
def knn_self(X, half_norm, bs, buf, heap_v, heap_i):
    """k-NN graph of the rows of ``X`` (each point excluded by index) into
    the max-heaps ``heap_v``/``heap_i`` (N, k), filled with (+inf, N).

    ``X @ X.T`` is symmetric: only its blocks (``bs`` rows and columns) on
    and above the diagonal are computed, each once (half the GEMM work),
    and merged into the heaps of its rows and, transposed, of its columns.
    Every block is one task that computes its product itself (single-thread
    BLAS: the caller limits the BLAS to one thread) into its thread's
    buffer ``buf`` (n_threads, bs * bs), so the BLAS and this kernel never
    compete for the cores. Off-diagonal blocks run in round-robin rounds
    (the circle method) of disjoint block pairs, so no two concurrent tasks
    touch the same heap. Ranking values: ``|x|^2 / 2 - q.x``."""
    n = X.shape[0]
    nb = (n + bs - 1) // bs
    # the diagonal blocks: rows and columns of one block, itself excluded
    for a in prange(nb):
        lo = a * bs
        hi = min(lo + bs, n)
        h = hi - lo
        G = buf[get_thread_id(), :h * h].reshape((h, h))
        np.dot(X[lo:hi], X[lo:hi].T, G)
        _merge_rows(G, half_norm, lo, lo, heap_v, heap_i, True)
    m = nb + (nb % 2)  # an odd count gets a dummy block (a bye)
    for rnd in range(m - 1):
        for t in prange(m // 2):
            # circle method: position 0 stays, the others rotate by rnd
            u = 0 if t == 0 else 1 + (t - 1 + rnd) % (m - 1)
            w = 1 + (m - 2 - t + rnd) % (m - 1)
            if u >= nb or w >= nb:
                continue
            a = min(u, w)
            c = max(u, w)
            lo_a = a * bs
            hi_a = min(lo_a + bs, n)
            lo_c = c * bs
            hi_c = min(lo_c + bs, n)
            ha = hi_a - lo_a
            hc = hi_c - lo_c
            tid = get_thread_id()
            G = buf[tid, :ha * hc].reshape((ha, hc))
            np.dot(X[lo_a:hi_a], X[lo_c:hi_c].T, G)
            _merge_rows(G, half_norm, lo_a, lo_c, heap_v, heap_i, False)
            thr = np.empty(hc, dtype=heap_v.dtype)
            _merge_cols(G, half_norm, lo_a, lo_c, heap_v, heap_i, thr)
    for i in prange(n):
        _sort_pairs(heap_v[i], heap_i[i], heap_v.shape[1])


@njit(cache=True, parallel=True, error_model="numpy",
      fastmath={"reassoc", "nsz", "arcp", "contract", "nnan", "ninf"})
def knn_query(Q, X, half_norm, rows, bs, buf, heap_v, heap_i):
    """k nearest rows of ``X`` for every row of ``Q`` into the max-heaps
    ``heap_v``/``heap_i`` (nq, k), filled with (+inf, N), then sorted
    ascending by (value, id). One task per ``rows`` queries, which owns
    their heaps and runs through ``X`` in blocks of ``bs`` rows, computing
    each product itself (single-thread BLAS) into its thread's buffer
    ``buf`` (n_threads, rows * bs). Ranking values: ``|x|^2 / 2 - q.x``."""
    nq = Q.shape[0]
    n = X.shape[0]
    ntasks = (nq + rows - 1) // rows
    for task in prange(ntasks):
        lo = task * rows
        hi = min(lo + rows, nq)
        h = hi - lo
        tid = get_thread_id()
        for c in range(0, n, bs):
            w = min(bs, n - c)
            G = buf[tid, :h * w].reshape((h, w))
            np.dot(Q[lo:hi], X[c:c + w].T, G)
            _merge_rows(G, half_norm, lo, c, heap_v, heap_i, False)
        for i in range(lo, hi):
            _sort_pairs(heap_v[i], heap_i[i], heap_v.shape[1])


@njit(cache=True, parallel=True)
def expand_groups(gids, ptr, members, self_ids, groups_of, out):
    """Neighbour ids from neighbour *groups* of exact-duplicate rows.

    Row ``i`` takes, in order: the other members of its own group
    ``groups_of[i]`` (when ``self_ids[i] >= 0``: a training row, excluded by
    index; its copies are at distance 0), then the members of the groups
    ``gids[i]`` (nearest first; its own group skipped), each group's
    members in ascending id (``members[ptr[g]:ptr[g + 1]]``), until
    ``out.shape[1]`` ids are written. ``-1`` in ``gids`` is skipped."""
    nq, kg = gids.shape
    k = out.shape[1]
    n_groups = ptr.shape[0] - 1
    _check_ids(gids, _NONE_OK, n_groups)
    _check_ptr(ptr, n_groups, members.shape[0], True)
    _check_shapes(self_ids.shape[0] >= nq and groups_of.shape[0] >= nq and out.shape[0] >= nq)
    for i in range(nq):
        if self_ids[i] >= 0 and groups_of[i] >= n_groups:
            raise IndexError("nonn kernel: a group id is out of range")
    for i in prange(nq):
        c = 0
        me = self_ids[i]
        own = groups_of[i] if me >= 0 else -1
        if own >= 0:
            for t in range(ptr[own], ptr[own + 1]):
                if c >= k:
                    break
                j = members[t]
                if j != me:
                    out[i, c] = j
                    c += 1
        for a in range(kg):
            if c >= k:
                break
            g = gids[i, a]
            if g < 0 or g == own:
                continue
            for t in range(ptr[g], ptr[g + 1]):
                if c >= k:
                    break
                out[i, c] = members[t]
                c += 1
        for a in range(c, k):
            out[i, a] = -1


# ------------------------------------------------------------- entry checks
# The kernels above that index by ids or sizes they are given check them on
# entry (serially, one pass over the ids: a small share of the kernel's own
# work), so that no input, not even one that skipped nonn's validation (a
# crafted model file, say), makes them read or write out of bounds. numba
# raises these exceptions in the caller as ordinary Python exceptions.

#: lowest id accepted where a negative id means "none" (skipped by the kernel)
_NONE_OK = np.iinfo(np.int64).min


@njit(cache=True)
def _check_ids(ids, low, high):
    """IndexError unless every entry of the 2-D ``ids`` is in [low, high)."""
    for i in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if ids[i, j] < low or ids[i, j] >= high:
                raise IndexError("nonn kernel: an id is out of range")


@njit(cache=True)
def _check_ids1(ids, low, high):
    """:func:`_check_ids` for a 1-D ``ids``."""
    for i in range(ids.shape[0]):
        if ids[i] < low or ids[i] >= high:
            raise IndexError("nonn kernel: an id is out of range")


@njit(cache=True)
def _check_ptr(ptr, n, total, used):
    """ValueError unless ``ptr`` (when ``used``) is a CSR pointer of ``n``
    rows into ``total`` entries: ``n + 1`` non-decreasing offsets in [0, total]."""
    if not used:
        return
    if n < 0 or ptr.shape[0] < n + 1 or ptr[0] < 0 or ptr[n] > total:
        raise ValueError("nonn kernel: invalid CSR pointers")
    for i in range(n):
        if ptr[i + 1] < ptr[i]:
            raise ValueError("nonn kernel: invalid CSR pointers")


@njit(cache=True)
def _check_shapes(ok):
    if not ok:
        raise ValueError("nonn kernel: inconsistent array shapes")


@njit(cache=True)
def _check_sets(sizes, L, width, shapes_ok):
    """ValueError unless the feature sets fit the layout the kernels index
    by: at least one set, each of 0..L features, set ``s`` within the first
    ``width`` columns (``s * L + sizes[s] <= width``), and ``shapes_ok``."""
    _check_shapes(shapes_ok)
    if sizes.shape[0] < 1 or L < 1:
        raise ValueError("nonn kernel: no feature sets")
    for s in range(sizes.shape[0]):
        if sizes[s] < 0 or sizes[s] > L or s * L + sizes[s] > width:
            raise ValueError("nonn kernel: feature-set sizes do not fit the data")
