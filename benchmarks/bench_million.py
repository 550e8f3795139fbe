#!/usr/bin/env python
"""One million points, D = 512: KNNN on an approximate backend, end to end:
fit time and peak RSS, recall@(K'-1) against exact search on a sample, the
bare index's efSearch sweep, scoring time and AUROC (protocol:
benchmarks/README.md).

Usage::

    python benchmarks/bench_million.py --ef 64 --ef-construction 80 --refine 2   # ~20 min
    python benchmarks/bench_million.py -N 20000 -D 64 -Q 1000 --sample 200 --out /tmp/m  # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import embedding_like, environment, exact_neighbours, fitted_search, \
    peak_rss_mib, recall, searched_data, write_results  # noqa: E402


def main(argv=None):
    import faiss
    from sklearn.metrics import roc_auc_score

    from nonn import KNNN

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-N", type=int, default=1_000_000)
    p.add_argument("-D", type=int, default=512)
    p.add_argument("-Q", type=int, default=10_000)
    p.add_argument("--index", default="HNSW32")
    p.add_argument("--ef", type=int, default=128, help="efSearch for the fit (128)")
    p.add_argument("--ef-construction", type=int, default=None)
    p.add_argument("--memory", default="lean", choices=["lean", "precomputed"])
    p.add_argument("--refine", type=int, default=0,
                   help="rounds of neighbours-of-neighbours graph refinement (0)")
    p.add_argument("--verbose", action="store_true", help="progress bars of every phase")
    p.add_argument("--sample", type=int, default=1000)
    p.add_argument("--out", default="benchmarks/results/scale_1m_lean")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    log = []

    def say(msg):
        print(msg, flush=True)
        log.append(msg)

    X, Q, labels = embedding_like(a.N, a.Q, a.D, seed=a.seed)
    params = {"index": a.index, "efSearch": a.ef, "efConstruction": a.ef_construction,
              "refine": a.refine or None}
    params = {k: v for k, v in params.items() if v}
    det = KNNN(backend="faiss", backend_params=params, memory=a.memory, verbose=a.verbose)
    t0 = time.perf_counter()
    det.fit(X)
    fit_s = time.perf_counter() - t0
    say(f"KNNN(memory={a.memory!r}, backend=faiss {params}).fit: {fit_s:.1f} s "
        f"({fit_s / 60:.1f} min); peak RSS {peak_rss_mib():.0f} MiB; "
        f"K'={det.n_neighbors_of_neighbors_}, k={det.n_neighbors_}, L={det.set_size_}")
    rows = np.sort(np.random.default_rng(a.seed + 7).choice(a.N, a.sample, replace=False))
    kp1 = det.n_neighbors_of_neighbors_ - 1
    Xp = searched_data(det, Q[:1])[0]  # the rows as KNNN searches them
    Xs = np.ascontiguousarray(Xp[rows])
    exact = exact_neighbours(Xp, Xs, kp1, self_rows=rows)
    rec_fit = recall(det.neighborhoods_[rows, 1:], exact)
    say(f"recall@{kp1} of the fitted neighbourhoods: {rec_fit:.4f}"
        + (f" (after {a.refine} refinement round(s); the sweep below is the bare index)"
           if a.refine else ""))
    index, curve = fitted_search(det).index_, []
    for ef in sorted({32, 64, 128, 256, 512, a.ef}):
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", ef)
        t0 = time.perf_counter()
        ids = index.search(Xs, kp1 + 1)[1]
        dt = time.perf_counter() - t0
        ids = np.array([[j for j in e if j != r][:kp1] for e, r in zip(ids, rows)])
        curve.append({"efSearch": ef, "recall": recall(ids, exact), "s_per_1000": dt})
        say(f"  efSearch={ef}: recall@{kp1} {curve[-1]['recall']:.4f}, {dt:.2f} s per "
            f"{a.sample} rows -> ~{dt * a.N / a.sample / 60:.1f} min for the graph")
    faiss.ParameterSpace().set_index_parameter(index, "efSearch", a.ef)
    t0 = time.perf_counter()
    s = det.anomaly_score(Q)
    score_s = time.perf_counter() - t0
    auc = roc_auc_score(labels, s)
    say(f"anomaly_score({a.Q} queries): {score_s:.1f} s, AUROC {auc:.4f}; peak RSS "
        f"{peak_rss_mib():.0f} MiB")
    stem = (f"million_N{a.N}_{a.index}_ef{a.ef}_{a.memory}"
            + (f"_refine{a.refine}" if a.refine else ""))
    path = write_results(a.out, stem, dict(
        args=vars(a), environment=environment(), fit_s=fit_s, score_s=score_s, auroc=auc,
        recall_fit=rec_fit, curve=curve, peak_rss_mib=peak_rss_mib()),
        "\n".join(["```"] + log + ["```"]))
    say(f"saved {path} and .json")


if __name__ == "__main__":
    main()
