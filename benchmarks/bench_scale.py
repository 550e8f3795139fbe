#!/usr/bin/env python
"""KNNN against the bare search of each backend, at growing N (D = 512):
fit / graph and score / query per backend, peak RSS, recall of approximate
backends, AUROC, peers (protocol and backend specs: benchmarks/README.md).

Usage::

    python benchmarks/bench_scale.py --sizes 10000,100000 \
        --backends "brute;faiss:IVF1024,Flat@nprobe=32;faiss:HNSW32@efSearch=64" \
        --peers pyod,knnn
    python benchmarks/bench_scale.py --sizes 2000,5000 -D 64 -Q 500 --out /tmp/scale  # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, best_of, embedding_like, environment, exact_neighbours, \
    markdown_table, recall, searched_data, write_results  # noqa: E402

MAIN_OPTION = {"faiss": "index", "torch": "device", "sklearn": "algorithm"}


def parse_backends(text):
    specs = []
    for item in filter(None, (t.strip() for t in text.split(";"))):
        head, *opts = item.split("@")
        name, _, main = head.partition(":")
        params = {MAIN_OPTION[name]: main} if main else {}
        for opt in opts:
            key, _, val = opt.partition("=")
            params[key] = number(val)
        specs.append((item, name, params))
    return specs


def number(text):
    """``text`` as an int, else a float, else as it is."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def one(n, spec, X, Q, labels, args, sample):
    from sklearn.metrics import roc_auc_score

    from nonn import KNNN
    from nonn.neighbors import make_backend

    label, name, params = spec
    with PeakRSS() as mem:
        t_fit, det = best_of(lambda: KNNN(backend=name, backend_params=params or None,
                                          memory=args.memory).fit(X), 1)
    t_score, scores = best_of(lambda: det.anomaly_score(Q), 1)
    Kp, k = det.n_neighbors_of_neighbors_, det.n_neighbors_
    Xp, Qp = searched_data(det, Q)
    floor = make_backend(name, n_samples=n, n_features=X.shape[1], **params)
    t_build, _ = best_of(lambda: floor.fit(Xp), 1)
    t_graph, _ = best_of(lambda: floor.kneighbors(None, min(Kp, n - 1),
                                                  return_distance=False), 1)
    t_query, found = best_of(lambda: floor.kneighbors(Qp, k, return_distance=False), 1)
    row = {"N": n, "backend": label, "fit_s": t_fit, "graph_s": t_build + t_graph,
           "score_s": t_score, "query_s": t_query, "fit/graph": t_fit / (t_build + t_graph),
           "score/query": t_score / t_query, "fit_peak_rss_mib": mem.delta / 2**20,
           "data_mib": X.nbytes / 2**20, "auroc": float(roc_auc_score(labels, scores)),
           "K'": Kp, "k": k}
    if name != "brute":  # recall against exact search on a sample of rows and queries
        rows = np.sort(np.random.default_rng(7).choice(n, min(sample, n), replace=False))
        row["recall_graph"] = recall(det.neighborhoods_[rows, 1:],
                                     exact_neighbours(Xp, Xp[rows], min(Kp, n - 1) - 1, rows))
        row["recall_query"] = recall(found[:sample], exact_neighbours(Xp, Qp[:sample], k))
    return row


def peers(n, X, Q, labels, names):
    from sklearn.metrics import roc_auc_score

    rows = []
    if "pyod" in names:
        from pyod.models.knn import KNN

        t_fit, m = best_of(lambda: KNN(n_neighbors=3).fit(X), 1)
        t_score, s = best_of(lambda: m.decision_function(Q), 1)
        rows.append({"N": n, "backend": "PyOD KNN", "fit_s": t_fit, "score_s": t_score,
                     "auroc": float(roc_auc_score(labels, s))})
    if "knnn" in names:
        from knnn import KNNN as AuthorsKNNN

        t_fit, m = best_of(lambda: AuthorsKNNN(distance_function="euclidean").fit(
            X.astype(np.float64)), 1)
        t_score, s = best_of(lambda: m.predict(Q.astype(np.float64)), 1)
        rows.append({"N": n, "backend": "authors' knnn", "fit_s": t_fit, "score_s": t_score,
                     "auroc": float(roc_auc_score(labels, s))})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("-D", "--dim", type=int, default=512)
    ap.add_argument("-Q", "--queries", type=int, default=10000)
    ap.add_argument("--backends", default="brute;faiss:HNSW32@efSearch=64")
    ap.add_argument("--memory", default="precomputed", choices=["precomputed", "lean"])
    ap.add_argument("--peers", default="", help="comma-separated: pyod,knnn")
    ap.add_argument("--sample", type=int, default=1000, help="rows for the recall reference")
    ap.add_argument("--out", default="benchmarks/results/scale")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    from nonn import KNNN

    KNNN().fit(embedding_like(1500, 100, args.dim, seed=1)[0])  # compile, warm up
    rows, specs = [], parse_backends(args.backends)
    for n in (int(s) for s in args.sizes.split(",")):
        X, Q, labels = embedding_like(n, args.queries, args.dim)
        for spec in specs:
            rows.append(one(n, spec, X, Q, labels, args, args.sample))
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                              for k, v in rows[-1].items()}), flush=True)
        rows += peers(n, X, Q, labels, args.peers.split(","))
    cols = ["N", "backend", "fit_s", "graph_s", "fit/graph", "score_s", "query_s",
            "score/query", "fit_peak_rss_mib", "recall_graph", "recall_query", "auroc"]
    table = markdown_table(cols, [[(f"{r[c]:.3g}" if isinstance(r.get(c), float) else
                                    r.get(c, "")) for c in cols] for r in rows])
    md = (f"D={args.dim}, {args.queries} queries, memory={args.memory}, "
          f"load average {environment()['load_average_1min']}\n\n{table}")
    print(md)
    write_results(args.out, f"scale_D{args.dim}_Q{args.queries}_N{args.sizes.replace(',', '-')}",
                  {"environment": environment(), "args": vars(args), "rows": rows}, md)


if __name__ == "__main__":
    main()
