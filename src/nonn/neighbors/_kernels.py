"""Compiled kernels (numba) of the search backends: exact blocked k-NN
(``X @ X.T`` blocks merged into top-k heaps), exact re-measurement of
candidates, "neighbors of neighbors" refinement of approximate lists, and
the expansion of groups of duplicate rows.

Ties are broken by (value, id) everywhere: the lowest id wins.
"""

from __future__ import annotations

import numpy as np
from numba import get_thread_id, njit, prange

from .._kernel_checks import NONE_OK, check_ids, check_ids1, check_ptr, check_shapes


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
    check_ids(cand, 0, X.shape[0])
    check_shapes(Q.shape[0] >= nq and Q.shape[1] >= d and sq_out.shape[0] >= nq
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
def refine_by_neighbors(X, Q, first, graph, fanout, rev_ptr, rev_ids, self_ids, sq_out,
                         ids_out):
    """One round of "neighbors of neighbors" refinement of approximate
    k-NN lists (the local join of NN-descent).

    Query ``Q[i]``'s candidates are its current neighbors ``first[i]`` and
    the graph neighbors ``graph[r]`` of the first ``fanout`` of them, plus
    its reverse neighbors ``rev_ids[rev_ptr[i]:rev_ptr[i + 1]]`` (rows that
    list it; an empty ``rev_ptr`` of length 1 for none); each
    distinct candidate other than ``self_ids[i]`` (-1: none) is measured
    (squared Euclidean in the data's precision) and the ``k`` nearest are
    kept, re-measured in float64 and sorted by (distance, id). Writes ``sq_out`` / ``ids_out``
    (nq, k). A true neighbor an index missed is usually a neighbor of a
    neighbor it found, so one round lifts recall at the cost of
    ``fanout * K`` distance evaluations per row."""
    nq, m0 = first.shape
    kg = graph.shape[1]
    k = ids_out.shape[1]
    d = X.shape[1]
    f = min(fanout, m0)
    has_rev = rev_ptr.shape[0] > nq
    # ids < 0 mean "none" here; graph ids are checked where they are read
    check_ids(first, NONE_OK, min(graph.shape[0], X.shape[0]))
    check_ids1(rev_ids, NONE_OK, X.shape[0])
    check_ptr(rev_ptr, nq, rev_ids.shape[0], has_rev)
    check_shapes(fanout >= 0 and Q.shape[0] >= nq and Q.shape[1] >= d
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


@njit(cache=True, error_model="numpy")
def _flag_rows(G, q_thr, x_thr, row0, col0, flags):
    """``flags[col0 + j] = 1`` where a row ``i`` of the block ``G`` (query
    ``row0 + i``) has ``G[i, j] - x_thr[col0 + j] > q_thr[row0 + i]``.
    Tasks only ever write 1, so concurrent ones cannot disagree."""
    b, nc = G.shape
    xt = x_thr[col0:col0 + nc]
    for i in range(b):
        qi = q_thr[row0 + i]
        Gi = G[i]
        for t in range(nc):
            if np.float64(Gi[t]) - xt[t] > qi:
                flags[col0 + t] = 1


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
def knn_query(Q, X, half_norm, rows, bs, buf, heap_v, heap_i, q_thr, x_thr, flags):
    """k nearest rows of ``X`` for every row of ``Q`` into the max-heaps
    ``heap_v``/``heap_i`` (nq, k), filled with (+inf, N), then sorted
    ascending by (value, id). One task per ``rows`` queries, which owns
    their heaps and runs through ``X`` in blocks of ``bs`` rows, computing
    each product itself (single-thread BLAS) into its thread's buffer
    ``buf`` (n_threads, rows * bs). Ranking values: ``|x|^2 / 2 - q.x``.

    With a non-empty ``flags`` (N, uint8), the same products also mark the
    rows ``j`` of ``X`` that some query ``i`` passes ``q.x_j - x_thr[j] >
    q_thr[i]`` (float64 thresholds; see :func:`_flag_rows`)."""
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
            if flags.shape[0]:
                _flag_rows(G, q_thr, x_thr, lo, c, flags)
        for i in range(lo, hi):
            _sort_pairs(heap_v[i], heap_i[i], heap_v.shape[1])


@njit(cache=True, parallel=True)
def expand_groups(gids, ptr, members, self_ids, groups_of, out):
    """Neighbor ids from neighbor *groups* of exact-duplicate rows.

    Row ``i`` takes, in order: the other members of its own group
    ``groups_of[i]`` (when ``self_ids[i] >= 0``: a training row, excluded by
    index; its copies are at distance 0), then the members of the groups
    ``gids[i]`` (nearest first; its own group skipped), each group's
    members in ascending id (``members[ptr[g]:ptr[g + 1]]``), until
    ``out.shape[1]`` ids are written. ``-1`` in ``gids`` is skipped."""
    nq, kg = gids.shape
    k = out.shape[1]
    n_groups = ptr.shape[0] - 1
    check_ids(gids, NONE_OK, n_groups)
    check_ptr(ptr, n_groups, members.shape[0], True)
    check_shapes(self_ids.shape[0] >= nq and groups_of.shape[0] >= nq and out.shape[0] >= nq)
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


@njit(cache=True, parallel=True)
def canonical_duplicates(heap_v, heap_i, inv, ptr, members, row0, self_query):
    """Sorted top-k lists (rows of ``heap_v`` / ``heap_i``, queries ``row0 +
    i``) made to follow the tie rule among exact duplicate rows, whatever
    products the BLAS gave them: the copies of one row (group ``inv[j]``, its
    rows ``members[ptr[g]:ptr[g + 1]]`` ascending) that a list holds become
    that group's lowest ids (``self_query``: the query's own id excluded),
    all with the smallest of their values, and the list is sorted again by
    (value, id). A GEMM may round the same product differently at different
    positions of its tiles, so copies can come out a last bit apart."""
    nq, k = heap_i.shape
    for i in prange(nq):
        hv = heap_v[i]
        hi = heap_i[i]
        me = row0 + i if self_query else -1
        done = np.zeros(k, dtype=np.bool_)
        changed = False
        for a in range(k):
            if done[a]:
                continue
            g = inv[hi[a]]
            if ptr[g + 1] - ptr[g] == 1:
                continue
            v = hv[a]
            for b in range(a, k):
                if not done[b] and inv[hi[b]] == g:
                    done[b] = True
                    v = min(v, hv[b])
            # the lowest ids of the group, in list order
            t = ptr[g]
            for b in range(a, k):
                if inv[hi[b]] == g:
                    while members[t] == me:
                        t += 1
                    if hi[b] != members[t] or hv[b] != v:
                        changed = True
                    hi[b] = members[t]
                    hv[b] = v
                    t += 1
        if changed:
            _sort_pairs(hv, hi, k)
