"""Independent, naive implementations used as test oracles.

Written from the paper's text and METHOD.md with plain Python loops, sharing
no code with the library.
"""

import numpy as np


def naive_greedy_order(X, L):
    """Sec. 3 re-ordering, loop by loop."""
    n, d = X.shape
    corr = np.zeros((d, d))
    for a in range(d):
        for b in range(d):
            xa, xb = X[:, a] - X[:, a].mean(), X[:, b] - X[:, b].mean()
            den = np.sqrt((xa**2).sum() * (xb**2).sum())
            corr[a, b] = 0.0 if den == 0 else abs((xa * xb).sum() / den)
        corr[a, a] = 1.0
    order = [0]
    while len(order) < d:
        pos = len(order)
        rest = [c for c in range(d) if c not in order]
        if pos % L == 0:
            ref = order[-2:]
            best = min(rest, key=lambda c: (np.mean([corr[r, c] for r in ref]), c))
        else:
            start = (pos // L) * L
            ref = order[start:][-2:]
            best = max(rest, key=lambda c: (np.mean([corr[r, c] for r in ref]), -c))
        order.append(best)
    return np.array(order)


def eq2_term(diff, e, V, floor):
    """sum_j |diff . v_j| / sqrt(e_j) for one neighbor and one set. Floored
    eigenvalues (e_j <= floor) share the weight 1/sqrt(floor); their
    directions are summed in the basis aligned with the difference (the L2
    norm of the projection), as nonn documents."""
    total, floored_sq = 0.0, 0.0
    for j in range(len(e)):
        p = diff @ V[:, j]
        if e[j] <= floor:
            floored_sq += p * p
        else:
            total += abs(p) / np.sqrt(e[j])
    return total + np.sqrt(floored_sq) / np.sqrt(floor)


def naive_sets(d, L):
    return [list(range(s, min(s + L, d))) for s in range(0, d, L)]


def naive_knn_ids(X, q, k, exclude=None):
    dists = []
    for j in range(len(X)):
        if j == exclude:
            continue
        dists.append((np.sqrt(((X[j] - q) ** 2).sum()), j))
    dists.sort()
    return [j for _, j in dists[:k]]


def naive_floor(X, sets, rel):
    floors = []
    for s in sets:
        v = np.mean([X[:, c].var() for c in s])
        if v <= 0:
            v = np.mean([X[:, c].var() for c in range(X.shape[1])]) or 1.0
        floors.append(rel * v)
    return floors


def naive_knnn_scores(X, Q, k, Kp, L, order, rel_floor, loo=False, aggregate="sum",
                      floors=None, local=None):
    """Eq. 2 with explicit sums over i, s, j; ``aggregate="min"`` takes the
    smallest per-neighbor sum instead of summing over i. ``floors``
    overrides the per-set floors computed from ``X``. ``local``: each
    neighbor's floor in a set is ``max(floors[s], local * trace(C) / |s|)``,
    ``C`` its neighborhood's covariance in the set (a floor relative to
    the neighborhood)."""
    Xr = X[:, order]
    Qr = Q[:, order]
    d = Xr.shape[1]
    sets = naive_sets(d, L)
    if floors is None:
        floors = naive_floor(Xr, sets, rel_floor)
    eig_cache = {}

    def eigen(i, si):
        if (i, si) not in eig_cache:
            hood = [i] + naive_knn_ids(Xr, Xr[i], Kp - 1, exclude=i)
            P = Xr[hood][:, sets[si]]
            P = P - P.mean(axis=0)
            C = P.T @ P / len(hood)
            eig_cache[(i, si)] = np.linalg.eigh(C)
        return eig_cache[(i, si)]

    out = []
    for qi, q in enumerate(Qr):
        nbrs = naive_knn_ids(Xr, q, k, exclude=qi if loo else None)
        per_neighbor = []
        for i in nbrs:
            total = 0.0
            for si, s in enumerate(sets):
                e, V = eigen(i, si)
                fl = floors[si]
                if local is not None:
                    fl = max(fl, local * e.sum() / len(s))
                total += eq2_term(q[s] - Xr[i][s], e, V, fl)
            per_neighbor.append(total)
        out.append(sum(per_neighbor) if aggregate == "sum" else min(per_neighbor))
    return np.array(out)


def naive_global_scores(X, Q, k, rel_floor):
    mu = X.mean(axis=0)
    C = (X - mu).T @ (X - mu) / len(X)
    e, V = np.linalg.eigh(C)
    floor = rel_floor * np.trace(C) / X.shape[1]
    out = []
    for q in Q:
        total = 0.0
        for i in naive_knn_ids(X, q, k):
            for j in range(X.shape[1]):
                total += abs((q - X[i]) @ V[:, j]) / np.sqrt(max(e[j], floor))
        out.append(total)
    return np.array(out)


def naive_local_scores(X, Q, k, L, order, rel_floor):
    Xr, Qr = X[:, order], Q[:, order]
    sets = naive_sets(Xr.shape[1], L)
    floors = naive_floor(Xr, sets, rel_floor)
    out = []
    for q in Qr:
        nbrs = naive_knn_ids(Xr, q, k)
        total = 0.0
        for si, s in enumerate(sets):
            P = Xr[nbrs][:, s]
            P = P - P.mean(axis=0)
            e, V = np.linalg.eigh(P.T @ P / len(nbrs))
            for i in nbrs:
                total += eq2_term(q[s] - Xr[i][s], e, V, floors[si])
        out.append(total)
    return np.array(out)


def naive_held_out_scores(X, k, Kp, L, order, rel_floor, aggregate="sum"):
    """Each training row scored by a model fitted on the other rows (same
    feature order and floors as the model on all rows): the out-of-sample
    scores nonn's threshold is set on."""
    Xr = X[:, order]
    floors = naive_floor(Xr, naive_sets(X.shape[1], L), rel_floor)
    out = []
    for p in range(len(X)):
        rest = np.delete(X, p, axis=0)
        out.append(naive_knnn_scores(rest, X[p:p + 1], min(k, len(rest)), min(Kp, len(rest)),
                                     L, order, rel_floor, aggregate=aggregate,
                                     floors=floors)[0])
    return np.array(out)


# ------------------------------------------ the vectorised numpy reference
# (the library's former numpy engine: LAPACK's eigh on each covariance, and
# Eq. 2's sums vectorised; the compiled kernels are checked against it)
def _pad(A, width):
    out = np.zeros(A.shape[:-1] + (width,), dtype=A.dtype)
    out[..., :A.shape[-1]] = A
    return out


def reference_neighborhood_eigen(Xg, groups, sizes, set_size):
    """Primal eigen-state of each neighborhood ``groups`` (c, M) of the grid
    data ``Xg``, per feature set: eigenvalues (c, S, L) ascending, clipped at
    0 (padding 0), eigenvectors (c, S, L, L) as columns (padding 0);
    covariance divisor M."""
    n_sets, L = len(sizes), set_size
    c, m = groups.shape
    G = _pad(Xg[groups], n_sets * L).reshape(c, m, n_sets, L)
    G -= G.mean(axis=1, keepdims=True)
    G = np.ascontiguousarray(G.transpose(0, 2, 1, 3))  # (c, S, M, L)
    C = np.matmul(G.transpose(0, 1, 3, 2), G)
    C /= m
    evals = np.zeros((c, n_sets, L), dtype=Xg.dtype)
    evecs = np.zeros((c, n_sets, L, L), dtype=Xg.dtype)
    full = int(np.sum(sizes == L))
    if full:
        w, v = np.linalg.eigh(C[:, :full].reshape(-1, L, L))
        evals[:, :full] = w.reshape(c, full, L)
        evecs[:, :full] = v.reshape(c, full, L, L)
    if full < n_sets:  # the shorter last set, on its own r x r covariance
        r = int(sizes[-1])
        w, v = np.linalg.eigh(C[:, -1, :r, :r])
        evals[:, -1, :r] = w
        evecs[:, -1, :r, :r] = v
    np.maximum(evals, 0, out=evals)
    return evals, evecs


def reference_score_terms(Qg, idx, Xg, evecs, evals, sizes, floor):
    """Eq. 2's per-neighbor sums (q, k) of grid queries ``Qg`` against the
    training rows ``idx`` with their primal eigen-states (rows ``idx`` of
    ``evecs``/``evals``), the floored subspace summed basis-free."""
    L = evecs.shape[-1]
    S = len(sizes)
    diff = _pad(Qg[:, None, :] - Xg[idx], S * L).reshape(idx.shape + (S, L))
    evecs, evals = evecs[idx], evals[idx]
    valid = np.arange(L)[None, :] < np.asarray(sizes)[:, None]  # (S, L)
    floor = np.asarray(floor, dtype=evals.dtype)
    floored = evals <= floor[:, None]
    proj = np.matmul(diff[..., None, :], evecs)[..., 0, :]
    free = valid & ~floored
    w = np.where(free, 1.0 / np.sqrt(np.where(free, evals, 1)), 0).astype(proj.dtype)
    sq = np.where(floored & valid, proj * proj, 0).sum(axis=-1)  # (..., S)
    out = (np.abs(proj) * w).sum(axis=(-2, -1))
    out += (np.sqrt(sq) / np.sqrt(floor)).sum(axis=-1)
    return out.astype(Qg.dtype, copy=False)
