"""Does ``explain`` find the cause? Top-1 hit rates of injected single-feature
anomalies, k-NNN against plain k-NN's |difference| attribution (protocol:
benchmarks/README.md).

    nice -n 10 python benchmarks/bench_explain.py --out benchmarks/results/explain
    python benchmarks/bench_explain.py --seeds 1 --datasets 6_cardio --out /tmp/ex   # smoke
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, markdown_table, searched_data, write_results  # noqa: E402

from nonn import KNN, KNNN  # noqa: E402


def correlated_pairs(rng, n, n_pairs=6, noise=0.1):
    z = rng.normal(size=(n, n_pairs))
    return np.repeat(z, 2, axis=1) + noise * rng.normal(size=(n, 2 * n_pairs))


def proportional_split(det, Q, neighbor):
    """k-NNN's per-neighbor terms (primal form) split over the features in
    proportion to |d_f v_jf| per direction, and the floored term in
    proportion to (P_F d)_f^2; the neighbor is the explained one."""
    Xg, Qg = searched_data(det, Q)
    S, L = len(det.set_sizes_), det.set_size_
    d = Qg.astype(np.float64) - Xg[neighbor]
    d = np.pad(d, ((0, 0), (0, S * L - d.shape[1]))).reshape(-1, S, L)
    V = det.eigenvectors_[neighbor].astype(np.float64)
    e = det.eigenvalues_[neighbor].astype(np.float64)
    fl = det.eig_floor_.astype(np.float64)
    valid = np.arange(L)[None, :] < det.set_sizes_[:, None]
    P = d[..., :, None] * V  # d_f v_jf (m, S, f, j)
    p = P.sum(axis=2)
    low = (e <= fl[:, None]) & valid
    free = ~low & valid
    w = np.where(free, 1 / np.sqrt(np.where(free, e, 1)), 0)
    absP = np.abs(P)
    den = absP.sum(axis=2, keepdims=True)
    den[den == 0] = 1
    c = (np.abs(p)[:, :, None, :] * w[:, :, None, :] * absP / den).sum(-1)
    pf = np.einsum("msaj,msj->msa", V, np.where(low, p, 0))
    nrm = np.sqrt((pf ** 2).sum(-1, keepdims=True))
    c += np.where(nrm > 0, pf ** 2 / np.where(nrm > 0, nrm, 1), 0) / np.sqrt(fl)[:, None]
    c = c.reshape(len(Q), -1)[:, :Q.shape[1]]
    out = np.empty_like(c)
    out[:, det.feature_order_] = c
    return out


def detectors(set_size):
    base = dict(n_neighbors=3, n_neighbors_of_neighbors=25)
    return {
        f"k-NNN L={set_size} floor=1e-3": KNNN(set_size=set_size, eig_floor=1e-3, **base),
        f"k-NNN L={set_size} floor=1e-3 aggregate=sum": KNNN(set_size=set_size, eig_floor=1e-3,
                                                             aggregate="sum", **base),
        f"k-NNN L={set_size} floor=1": KNNN(set_size=set_size, eig_floor=1.0, **base),
        "k-NNN all-in-one-set floor=1e-3": KNNN(set_size="all", eig_floor=1e-3, **base),
        "KNNN() (the default)": KNNN(),
        "KNNN(aggregate='sum')": KNNN(aggregate="sum"),
        "k-NN (|difference|)": KNN(n_neighbors=3),
    }


def hit_rates(X, Q, f, pair, set_size):
    """{detector: (feature hit rate, pair hit rate or None)} plus the
    proportional split of the first k-NNN."""
    out = {}
    for name, det in detectors(set_size).items():
        det.fit(X)
        ex = det.explain(Q)
        top = ex.top(1)[0][:, 0]
        out[name] = (float(np.mean(top == f)),
                     float(np.mean(top // 2 == f // 2)) if pair else None)
        if name == f"k-NNN L={set_size} floor=1e-3":
            alt = proportional_split(det, Q, ex.neighbor).argmax(axis=1)
            out["k-NNN proportional split (not nonn's rule)"] = (
                float(np.mean(alt == f)), float(np.mean(alt // 2 == f // 2)) if pair else None)
    return out


def synthetic_case(case, seed, n=500, n_q=200):
    rng = np.random.default_rng(seed)
    if case.startswith("independent"):
        X, T = rng.normal(size=(n, 12)), rng.normal(size=(n_q, 12))
    else:
        X, T = correlated_pairs(rng, n), correlated_pairs(rng, n_q)
    sd = X.std(axis=0)
    f = rng.integers(0, 12, size=n_q)
    Q = T.copy()
    if case == "pairs swap":
        for u in range(n_q):
            while True:
                v = X[rng.integers(n), f[u]]
                if abs(v - T[u, f[u]]) >= sd[f[u]]:
                    break
            Q[u, f[u]] = v
    else:
        delta = float(case.split("+")[1][:-2])  # "... +4sd": 4 sd
        Q[np.arange(n_q), f] += rng.choice([-1, 1], size=n_q) * delta * sd[f]
    return X, Q, f, not case.startswith("independent")


def adbench_case(name, delta, seed):
    from nonn.datasets import load_adbench

    Xall, y = load_adbench(name)
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.nonzero(y == 0)[0])
    n_train = int(0.8 * len(normal))
    X, T = Xall[normal[:n_train]], Xall[normal[n_train:]]
    lo, hi = X.min(axis=0), X.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    X, T = (X - lo) / span, (T - lo) / span
    sd = X.std(axis=0)
    usable = np.nonzero(sd > 0)[0]
    f = usable[rng.integers(0, len(usable), size=len(T))]
    Q = T.copy()
    Q[np.arange(len(T)), f] += rng.choice([-1, 1], size=len(T)) * delta * sd[f]
    return X, Q, f, len(usable), X.shape[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--datasets", default="6_cardio,38_thyroid")
    ap.add_argument("--out", default="benchmarks/results/explain")
    args = ap.parse_args(argv)
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()
    results = []

    def add(data, per_seed, chance, **extra):
        for name in per_seed[0]:
            feat, pair = ([r[name][i] for r in per_seed] for i in (0, 1))
            results.append({"data": data, "detector": name, "top1_feature": float(np.mean(feat)),
                            "top1_feature_sd": float(np.std(feat)),
                            "top1_pair": None if pair[0] is None else float(np.mean(pair)),
                            "chance": chance, **extra})
            print(results[-1], flush=True)

    for case in ("pairs +4sd", "pairs +1sd", "pairs swap", "independent +4sd",
                 "independent +6sd", "independent +8sd"):
        add(f"synthetic: {case}", [hit_rates(*synthetic_case(case, s), set_size=4)
                                   for s in range(args.seeds)], 1 / 12)
    for ds in [d for d in args.datasets.split(",") if d]:
        for delta in (2.0, 4.0):
            per_seed = []
            for s in range(args.seeds):
                X, Q, f, usable, d = adbench_case(ds, delta, s)
                per_seed.append(hit_rates(X, Q, f, False, set_size=5))
            add(f"{ds} (min-max), one feature +-{delta:g} sd, {len(Q)} queries x "
                f"{args.seeds} seeds", per_seed, 1 / usable, features=d)
    env = environment()
    md = "\n".join([
        "# explain: does the largest contribution name the injected feature?", "",
        f"- `benchmarks/bench_explain.py`, {args.seeds} seeds, started {started}, "
        f"{time.perf_counter() - t0:.0f} s on {env['cpus']} CPUs, {env['platform']}",
        "- top-1 hit rate: the share of queries whose largest contribution is the changed "
        "feature (mean over seeds, +- their std); pair: is in its correlated pair; chance: "
        "1 / number of features that can be changed",
        "- \"proportional split\" is not nonn's rule (benchmarks/README.md)", "",
        markdown_table(["data", "detector", "top-1 feature", "top-1 pair", "chance"], [
            [r["data"], r["detector"], f"{r['top1_feature']:.3f} +- {r['top1_feature_sd']:.3f}",
             "" if r["top1_pair"] is None else f"{r['top1_pair']:.3f}", f"{r['chance']:.3f}"]
            for r in results])])
    path = write_results(args.out, "hit_rates",
                         {**env, "seeds": args.seeds, "results": results}, md)
    print(f"wrote {path} and .json")


if __name__ == "__main__":
    main()
