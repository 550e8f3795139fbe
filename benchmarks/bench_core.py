#!/usr/bin/env python
"""KNNN against the neighbor search under it, at N = 20,000, D = 512: fit /
exact graph, score / exact query, stored bytes per point (protocol:
benchmarks/README.md). It reports, it does not fail.

    python benchmarks/bench_core.py --out benchmarks/results/core_default
    python benchmarks/bench_core.py --params '{"set_size": 5, "n_neighbors_of_neighbors": 50}'
    python benchmarks/bench_core.py --quick --out /tmp/core   # smoke (N=2000, D=64, Q=200)
"""

import argparse
import json
import sys
import warnings

import numpy as np

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from _common import against_floors, best_of, embedding_like, environment, markdown_table, \
    state_bytes, write_results  # noqa: E402

from nonn import KNNN  # noqa: E402


def run(n, d, q, backend, params, repeats, peer, out):
    X, Q, labels = embedding_like(n, q, d)
    Xs, Qs, _ = embedding_like(1500, 100, d, seed=1)
    KNNN(backend=backend, **params).fit(Xs).anomaly_score(Qs)  # compile, warm up
    det, r, _ = against_floors(lambda: KNNN(backend=backend, **params), X, Q, labels, repeats)
    t_fit, t_graph, t_score, t_query = r["fit_s"], r["graph_s"], r["score_s"], r["query_s"]
    Kp, k = det.n_neighbors_of_neighbors_, det.n_neighbors_
    state = state_bytes(det)
    result = {
        "environment": environment(), "n_train": n, "n_features": d, "n_queries": q,
        "backend": det.backend_, "params": det.get_params(),
        "fitted": {"k": k, "K'": Kp, "L": det.set_size_, "normalize": det.normalize_,
                   "whiten": det.whiten_, "eig_floor": det.eig_floor_rel_},
        "seconds": {"fit": t_fit, "graph": t_graph, "score": t_score, "query": t_query},
        "ratios": {"fit/graph": r["fit/graph"], "score/query": r["score/query"]},
        "fit_peak_rss_mib": r["fit_peak_rss_mib"],
        "state_bytes_per_point": {name: b / n for name, b in state.items()},
        "state_bytes_per_point_total": sum(state.values()) / n,
        "auroc_synthetic": r["auroc"],
    }
    rows = [["KNNN.fit / exact graph (K' others)", f"{t_fit:.2f} s / {t_graph:.2f} s",
             f"{t_fit / t_graph:.2f}", "<= 2.0"],
            ["KNNN.anomaly_score / exact query (k)", f"{t_score:.2f} s / {t_query:.2f} s",
             f"{t_score / t_query:.2f}", "<= 1.5"]]
    if peer:  # the authors' knnn 0.1.0: float64 only; Euclidean like nonn's search
        from knnn import KNNN as AuthorsKNNN

        t_peer, _ = best_of(lambda: AuthorsKNNN(
            number_of_neighbors=k, number_of_neighbors_of_neighbors=Kp,
            distance_function="euclidean").fit(X.astype(np.float64)))
        result["seconds"]["authors_knnn_fit"] = t_peer
        result["ratios"]["authors_knnn_fit/fit"] = t_peer / t_fit
        rows.append(["authors' knnn fit / KNNN.fit", f"{t_peer:.1f} s / {t_fit:.2f} s",
                     f"{t_peer / t_fit:.1f}", ""])
    md = (f"N={n}, D={d}, {q} queries, backend {det.backend_}, k={k}, K'={Kp}, "
          f"L={det.set_size_}, normalize={det.normalize_}, whiten={det.whiten_}, "
          f"load average {result['environment']['load_average_1min']}\n\n"
          + markdown_table(["", "seconds", "ratio", "target"], rows)
          + f"\n\nStored state: {result['state_bytes_per_point_total']:.0f} bytes per training "
          f"point ({', '.join(f'{a} {b / n:.0f}' for a, b in state.items())})."
          f" Fit peak RSS +{result['fit_peak_rss_mib']:.0f} MiB.")
    print(md)
    write_results(out, f"bench_core_{det.backend_}_N{n}_D{d}_Q{q}", result, md)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-N", "--n-train", type=int, default=20000)
    ap.add_argument("-D", "--n-features", type=int, default=512)
    ap.add_argument("-Q", "--n-queries", type=int, default=2000)
    ap.add_argument("--backend", default="brute")
    ap.add_argument("--params", type=json.loads, default={},
                    help="KNNN parameters as JSON (default: KNNN's defaults)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer", action="store_true", help="also time the authors' knnn fit")
    ap.add_argument("--quick", action="store_true", help="smoke size: N=2000, D=64, Q=200")
    ap.add_argument("--out", default="benchmarks/results/core")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_features, args.n_queries, args.repeats = 2000, 64, 200, 1
    warnings.simplefilter("ignore")
    run(args.n_train, args.n_features, args.n_queries, args.backend, args.params,
        args.repeats, args.peer, args.out)


if __name__ == "__main__":
    main()
