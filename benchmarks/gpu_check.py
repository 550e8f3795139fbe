#!/usr/bin/env python
"""GPU check of nonn's torch backend: correctness against the CPU, then fit
and score at ``--n`` x ``--d`` against the bare torch search (protocol:
benchmarks/README.md). Run through ``benchmarks/gpu_check.sh``. Exit status:
0 = correct, 1 = a check failed; interrupted, it still writes what it measured.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import against_floors, embedding_like, environment, exact_neighbors, log, \
    markdown_table, recall, searched_data, write_results  # noqa: E402


def correctness(a, rows):
    from nonn import KNNN
    from nonn.neighbors import make_backend

    X, Q, _ = embedding_like(a.n_small, 500, a.d_small)
    gpu = {"device": a.device}
    ig = make_backend("torch", **gpu).fit(X).kneighbors(None, 24, return_distance=False)
    ib = make_backend("brute").fit(X).kneighbors(None, 24, return_distance=False)
    agree = recall(ig, ib)
    ok = agree >= a.min_graph_agreement
    rows.append(["k-NN graph ids, torch vs brute", f"{agree:.5f}",
                 f">= {a.min_graph_agreement}", ok])
    cpu, dev = KNNN(backend="brute").fit(X), KNNN(backend="torch", backend_params=gpu).fit(X)
    moved = (np.sort(cpu.neighborhoods_, 1) != np.sort(dev.neighborhoods_, 1)).any(1)
    k = cpu.n_neighbors_
    qn = [make_backend(b, **p).fit(X).kneighbors(searched_data(cpu, Q)[1], k,
                                                 return_distance=False)
          for b, p in (("brute", {}), ("torch", gpu))]
    q_moved = (np.sort(qn[0], 1) != np.sort(qn[1], 1)).any(1) | moved[qn[0]].any(1)
    for what, s_c, s_g, tied in (
            ("query scores", cpu.anomaly_score(Q), dev.anomaly_score(Q), q_moved),
            ("leave-one-out training scores", cpu.train_scores_, dev.train_scores_, moved)):
        close = np.isclose(np.float64(s_g), np.float64(s_c), rtol=a.rtol, atol=0)
        bad = int(np.sum(~close & ~tied))
        ok &= bad == 0
        rows.append([f"KNNN {what}, torch vs brute", f"{close.mean():.4%} within rtol; "
                     f"{bad} differ with the same neighbors", f"rtol {a.rtol:g}", bad == 0])
    return bool(ok)


def speed(a, rows, result):
    from nonn import KNNN

    X, Q, labels = embedding_like(a.n, a.queries, a.d)
    make = lambda: KNNN(backend="torch", backend_params={"device": a.device})  # noqa: E731
    make().fit(X[:2000])  # compile, warm up
    det, r, (Xp, _, _) = against_floors(make, X, Q, labels, backend_params={"device": a.device})
    sample = np.sort(np.random.default_rng(7).choice(a.n, min(1000, a.n), replace=False))
    r["recall_graph"] = recall(det.neighborhoods_[sample, 1:],
                               exact_neighbors(Xp, Xp[sample], r["K'"] - 1, sample))
    result.update(r)
    rows += [["KNNN.fit / bare graph", f"{r['fit_s']:.1f} s / {r['graph_s']:.1f} s",
              f"{r['fit/graph']:.2f}", ""],
             [f"KNNN.anomaly_score / bare query, {a.queries} queries",
              f"{r['score_s']:.2f} s / {r['query_s']:.2f} s", f"{r['score/query']:.2f}", ""],
             [f"recall@{det.n_neighbors_of_neighbors_ - 1} of the fitted graph, AUROC",
              f"{r['recall_graph']:.4f}, {r['auroc']:.4f}", "", ""]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--n-small", type=int, default=5000)
    p.add_argument("--d-small", type=int, default=128)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--min-graph-agreement", type=float, default=0.999)
    p.add_argument("--no-timing", action="store_true", help="correctness only")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_results")
    a = p.parse_args(argv)
    import torch

    env = dict(environment(), torch=torch.__version__, cuda=torch.version.cuda,
               gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    rows, result = [], {"environment": env, "args": vars(a)}
    try:
        result["correct"] = correctness(a, rows)
        if not a.no_timing:
            speed(a, rows, result)
    finally:
        md = (f"nonn GPU check on {env['gpu'] or a.device}, N={a.n}, D={a.d}\n\n"
              + markdown_table(["check", "value", "goal", "pass"], rows))
        log("\n" + md)
        write_results(a.out, "gpu_check", result, md)
    return 0 if result["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
