#!/usr/bin/env python
"""How much KNNN's scores move with the order of tied training rows
(protocol: benchmarks/README.md)::

    python benchmarks/tie_order.py [--shuffles 5] [--backend brute]
"""

import argparse
import warnings

import numpy as np

from nonn import KNNN


def datasets(seed=0):
    rng = np.random.default_rng(seed)
    binary = rng.integers(0, 2, size=(1000, 12)).astype(float)
    # queries off the lattice, so that none is a training row (score 0)
    qb = rng.integers(0, 2, size=(200, 12)) + rng.normal(scale=0.01, size=(200, 12))
    dup = np.repeat(rng.normal(size=(250, 8)), 4, axis=0)
    gauss = rng.normal(size=(1000, 8))
    return {
        "binary, 1000 x 12": (binary, qb),
        "250 rows x 4 copies, 8 features": (dup, rng.normal(size=(200, 8))),
        "normal, 1000 x 8 (no ties)": (gauss, rng.normal(size=(200, 8))),
    }


def worst_change(X, Q, shuffles, **params):
    det = KNNN(**params).fit(X)
    a, ta = det.anomaly_score(Q), -det.train_scores_
    wq = wt = 0.0
    for s in range(shuffles):
        p = np.random.default_rng(s).permutation(len(X))
        d2 = KNNN(**params).fit(X[p])
        b = d2.anomaly_score(Q)
        tb = np.empty_like(ta)
        tb[p] = -d2.train_scores_
        wq = max(wq, float(np.max(np.abs(b - a) / np.abs(a))))
        pos = ta > 0
        if pos.any():
            wt = max(wt, float(np.max(np.abs(tb - ta)[pos] / ta[pos])))
    return wq, wt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shuffles", type=int, default=5)
    ap.add_argument("--backend", default="brute")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print("| data | aggregate | max change, query scores | max change, LOO scores |")
    print("|---|---|---|---|")
    for name, (X, Q) in datasets().items():
        for agg in ("min", "sum"):
            wq, wt = worst_change(X, Q, args.shuffles, backend=args.backend, aggregate=agg)
            print(f"| {name} | {agg} | {wq:.1%} | {wt:.1%} |")


if __name__ == "__main__":
    main()
