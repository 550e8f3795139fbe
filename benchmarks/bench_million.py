#!/usr/bin/env python
"""One million points, D = 512: KNNN on an approximate backend, end to end.

The scale issue's target: N = 1M, D = 512 fits on the 2-core, 24 GB machine
with an approximate backend in under 30 minutes, with recall@K' >= 0.9
against exact search on a sample. This script fits ``KNNN`` once (no separate
floor run: at this size the floor alone costs as much as the fit; the 100k
floors are in ``bench_scale.py``), then measures:

* fit wall time and the process's peak RSS;
* recall@(K'-1) of the fitted neighbourhoods against exact FAISS flat search
  on ``--sample`` random training rows (self excluded);
* recall of the same index at other ``efSearch`` values on those rows, and
  their search time, so the recall / time trade-off is visible;
* ``anomaly_score`` on 10k queries (90 % normal, 10 % anomalies), its time and
  AUROC.

Data: ``_common.embedding_like`` (the same generator and seed as
``bench_scale.py``).

Usage (repository root, venv active)::

    python benchmarks/bench_million.py                          # ~20-30 min
    python benchmarks/bench_million.py -N 200000 --ef 64        # smaller check
    python benchmarks/bench_million.py --ef 64 --ef-construction 80 --refine 2
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rss_peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    import faiss
    from sklearn.metrics import roc_auc_score

    from _common import embedding_like
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
    p.add_argument("--refine-fanout", type=int, default=None)
    p.add_argument("--refine-reverse", type=int, default=None)
    p.add_argument("--verbose", action="store_true", help="progress bars of every phase")
    p.add_argument("--sample", type=int, default=1000)
    p.add_argument("--out", default="benchmarks/results/scale_1m_lean")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    log = []

    def say(msg):
        print(msg, flush=True)
        log.append(msg)

    t0 = time.perf_counter()
    X, Q, labels = embedding_like(a.N, a.Q, a.D, seed=a.seed)
    say(f"data: X {X.shape} {X.dtype}, Q {Q.shape}, generated in {time.perf_counter() - t0:.1f} s; "
        f"peak RSS {rss_peak_mib():.0f} MiB")
    params = {"index": a.index, "efSearch": a.ef}
    if a.ef_construction:
        params["efConstruction"] = a.ef_construction
    for name in ("refine", "refine_fanout", "refine_reverse"):
        if getattr(a, name):
            params[name] = getattr(a, name)
    det = KNNN(backend="faiss", backend_params=params, memory=a.memory, verbose=a.verbose)
    t0 = time.perf_counter()
    det.fit(X)
    fit_s = time.perf_counter() - t0
    say(f"KNNN(memory={a.memory!r}, backend=faiss {params}).fit: {fit_s:.1f} s "
        f"({fit_s / 60:.1f} min); peak RSS {rss_peak_mib():.0f} MiB; "
        f"K'={det.n_neighbors_of_neighbors_}, k={det.n_neighbors_}, L={det.set_size_}")

    rng = np.random.default_rng(a.seed + 7)
    rows = np.sort(rng.choice(a.N, a.sample, replace=False))
    kp1 = det.n_neighbors_of_neighbors_ - 1
    flat = faiss.IndexFlatL2(a.D)
    flat.add(np.ascontiguousarray(det._fit_X))
    t0 = time.perf_counter()
    _, exact = flat.search(np.ascontiguousarray(det._fit_X[rows]), kp1 + 1)
    del flat
    exact = np.array([[j for j in e if j != r][:kp1] for e, r in zip(exact, rows)])
    say(f"exact reference ({a.sample} rows, FAISS flat): {time.perf_counter() - t0:.1f} s")

    def recall(ids):
        return float(np.mean([len(np.intersect1d(i, e)) / kp1 for i, e in zip(ids, exact)]))

    rec_fit = recall(det.neighborhoods_[rows, 1:])
    say(f"recall@{kp1} of the fitted neighbourhoods: {rec_fit:.4f}")
    if a.refine:
        say(f"  (after {a.refine} refinement round(s); the efSearch sweep below is the bare "
            "index, unrefined)")
    index = det._search.index_
    curve = []
    for ef in sorted({32, 64, 128, 256, 512, a.ef}):
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", ef)
        t0 = time.perf_counter()
        _, ids = index.search(np.ascontiguousarray(det._fit_X[rows]), kp1 + 1)
        dt = time.perf_counter() - t0
        ids = np.array([[j for j in e if j != r][:kp1] for e, r in zip(ids, rows)])
        curve.append({"efSearch": ef, "recall": recall(ids), "s_per_1000": dt})
        say(f"  efSearch={ef}: recall@{kp1} {curve[-1]['recall']:.4f}, "
            f"{dt:.2f} s per {a.sample} rows -> ~{dt * a.N / a.sample / 60:.1f} min for the graph")
    faiss.ParameterSpace().set_index_parameter(index, "efSearch", a.ef)
    t0 = time.perf_counter()
    s = det.anomaly_score(Q)
    score_s = time.perf_counter() - t0
    auc = roc_auc_score(labels, s)
    say(f"anomaly_score({a.Q} queries): {score_s:.1f} s, AUROC {auc:.4f}; peak RSS "
        f"{rss_peak_mib():.0f} MiB")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"million_N{a.N}_{a.index}_ef{a.ef}_{a.memory}"
                  + (f"_refine{a.refine}" if a.refine else ""))
    stem.with_suffix(".json").write_text(json.dumps(dict(
        args=vars(a), fit_s=fit_s, score_s=score_s, auroc=auc, recall_fit=rec_fit,
        curve=curve, peak_rss_mib=rss_peak_mib()), indent=2))
    stem.with_suffix(".md").write_text("\n".join(["```"] + log + ["```"]) + "\n")
    say(f"saved {stem}.json / .md")


if __name__ == "__main__":
    main()
