#!/usr/bin/env python
"""KNNN against the bare search of each backend at growing N; ``million``:
1M points end to end on HNSW (protocols, backend specs: benchmarks/README.md).

Usage::

    python benchmarks/bench_scale.py million --ef 64 --ef-construction 80 --refine 2  # ~20 min
    python benchmarks/bench_scale.py million -N 20000 -D 64 -Q 1000 --sample 200 \
        --out /tmp/m                                                                # smoke

    python benchmarks/bench_scale.py --sizes 10000,100000 \
        --backends "brute;faiss:IVF1024,Flat@nprobe=32;faiss:HNSW32@efSearch=64" \
        --peers pyod,knnn
    python benchmarks/bench_scale.py --sizes 2000,5000 -D 64 -Q 500 --out /tmp/scale  # smoke
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import against_floors, best_of, embedding_like, environment, \
    exact_neighbors, fitted_search, markdown_table, peak_rss_mib, recall, searched_data, \
    write_results  # noqa: E402

MAIN_OPTION = {"faiss": "index", "torch": "device", "sklearn": "algorithm"}


def parse_backends(text):
    specs = []
    for item in filter(None, (t.strip() for t in text.split(";"))):
        head, *opts = item.split("@")
        name, _, main = head.partition(":")
        params = {MAIN_OPTION[name]: main} if main else {}
        for opt in opts:
            key, _, val = opt.partition("=")
            try:
                params[key] = json.loads(val)
            except ValueError:
                params[key] = val
        specs.append((item, name, params))
    return specs


def one(n, spec, X, Q, labels, args, sample):
    from nonn import KNNN

    label, name, params = spec
    det, row, (Xp, Qp, found) = against_floors(
        lambda: KNNN(backend=name, backend_params=params or None, memory=args.memory), X, Q,
        labels, backend_params=params, build_in_graph=True)
    row = {"N": n, "backend": label, **row, "data_mib": X.nbytes / 2**20}
    if name != "brute":  # recall against exact search on a sample of rows and queries
        Kp, k = row["K'"], row["k"]
        rows = np.sort(np.random.default_rng(7).choice(n, min(sample, n), replace=False))
        row["recall_graph"] = recall(det.neighborhoods_[rows, 1:],
                                     exact_neighbors(Xp, Xp[rows], min(Kp, n - 1) - 1, rows))
        row["recall_query"] = recall(found[:sample], exact_neighbors(Xp, Qp[:sample], k))
    return row


def peers(n, X, Q, labels, names):
    """PyOD's KNN (k = 3) and the authors' knnn 0.1.0 (float64, Euclidean)."""
    from sklearn.metrics import roc_auc_score

    rows = []
    for name in (x for x in names if x in ("pyod", "knnn")):
        if name == "pyod":
            from pyod.models.knn import KNN

            label, fit, score = "PyOD KNN", lambda: KNN(n_neighbors=3).fit(X), \
                lambda m: m.decision_function(Q)
        else:
            from knnn import KNNN

            label, fit, score = "authors' knnn", lambda: KNNN(distance_function="euclidean").fit(
                X.astype(np.float64)), lambda m: m.predict(Q.astype(np.float64))
        t_fit, m = best_of(fit)
        t_score, s = best_of(lambda: score(m))
        rows.append({"N": n, "backend": label, "fit_s": t_fit, "score_s": t_score,
                     "auroc": float(roc_auc_score(labels, s))})
    return rows


def million(argv=None):
    """``bench_scale.py million``: one fit at 1M x 512 on an approximate backend."""
    import faiss
    from sklearn.metrics import roc_auc_score

    from nonn import KNNN

    p = argparse.ArgumentParser(prog="bench_scale.py million", description=million.__doc__)
    p.add_argument("-N", type=int, default=1_000_000)
    p.add_argument("-D", type=int, default=512)
    p.add_argument("-Q", type=int, default=10_000)
    p.add_argument("--index", default="HNSW32")
    p.add_argument("--ef", type=int, default=128, help="efSearch for the fit (128)")
    p.add_argument("--ef-construction", type=int, default=None)
    p.add_argument("--memory", default="lean", choices=["lean", "precomputed"])
    p.add_argument("--refine", type=int, default=0,
                   help="rounds of neighbors-of-neighbors graph refinement (0)")
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
    params = {k: v for k, v in {"index": a.index, "efSearch": a.ef, "efConstruction":
                                a.ef_construction, "refine": a.refine}.items() if v}
    fit_s, det = best_of(lambda: KNNN(backend="faiss", backend_params=params, memory=a.memory,
                                      verbose=a.verbose).fit(X))
    say(f"KNNN(memory={a.memory!r}, backend=faiss {params}).fit: {fit_s:.1f} s "
        f"({fit_s / 60:.1f} min); peak RSS {peak_rss_mib():.0f} MiB; "
        f"K'={det.n_neighbors_of_neighbors_}, k={det.n_neighbors_}, L={det.set_size_}")
    rows = np.sort(np.random.default_rng(a.seed + 7).choice(a.N, a.sample, replace=False))
    kp1 = det.n_neighbors_of_neighbors_ - 1
    Xp = searched_data(det, Q[:1])[0]  # the rows as KNNN searches them
    Xs = np.ascontiguousarray(Xp[rows])
    exact = exact_neighbors(Xp, Xs, kp1, self_rows=rows)
    rec_fit = recall(det.neighborhoods_[rows, 1:], exact)
    say(f"recall@{kp1} of the fitted neighborhoods: {rec_fit:.4f}"
        + (f" (after {a.refine} refinement round(s); the sweep below is the bare index)"
           if a.refine else ""))
    index, curve = fitted_search(det).index_, []
    for ef in sorted({32, 64, 128, 256, 512, a.ef}):
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", ef)
        dt, (_, ids) = best_of(lambda: index.search(Xs, kp1 + 1))
        ids = np.array([[j for j in e if j != r][:kp1] for e, r in zip(ids, rows)])
        curve.append({"efSearch": ef, "recall": recall(ids, exact), "s_per_1000": dt})
        say(f"  efSearch={ef}: recall@{kp1} {curve[-1]['recall']:.4f}, {dt:.2f} s per "
            f"{a.sample} rows -> ~{dt * a.N / a.sample / 60:.1f} min for the graph")
    faiss.ParameterSpace().set_index_parameter(index, "efSearch", a.ef)
    score_s, s = best_of(lambda: det.anomaly_score(Q))
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["million"]:
        return million(argv[1:])
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
