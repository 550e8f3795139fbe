#!/usr/bin/env python
"""Approximate search against exact search on real data: does KNNN keep its
AUROC when the k-NN graph and queries come from FAISS HNSW or IVF?
(protocol: benchmarks/README.md).

Usage::

    python benchmarks/bench_approx_auroc.py                 # ~5-10 min on 2 cores
    python benchmarks/bench_approx_auroc.py --backends HNSW32 --name approx_auroc_dedupe
    python benchmarks/bench_approx_auroc.py --datasets 6_cardio --seeds 0 \
        --backends "HNSW32, efSearch=64," --out /tmp/approx                    # smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_of, markdown_table, query_neighbours, recall  # noqa: E402

BACKENDS = {
    "faiss HNSW32, efSearch=64": ("faiss", {"index": "HNSW32", "efSearch": 64}),
    "faiss IVF1024,Flat, nprobe=32": ("faiss", {"index": "IVF1024,Flat", "nprobe": 32}),
    # neighbours-of-neighbours refinement: the graph once, each query's k once
    "faiss HNSW32, efSearch=64, refine=1": ("faiss", {"index": "HNSW32", "efSearch": 64,
                                                      "refine": 1}),
    "faiss IVF1024,Flat, nprobe=32, refine=1": ("faiss", {"index": "IVF1024,Flat",
                                                          "nprobe": 32, "refine": 1}),
}


def main(argv=None):
    from sklearn.metrics import roc_auc_score

    from nonn import KNNN
    from nonn.datasets import load_adbench
    from nonn.evaluation import novelty_split

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="8_celeba,10_cover,11_donors,1_ALOI")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--max-train", type=int, default=100_000)
    p.add_argument("--max-test", type=int, default=10_000)
    p.add_argument("--out", default="benchmarks/results/approx")
    p.add_argument("--backends", default=None,
                   help="comma-separated labels (or label substrings) of BACKENDS to run "
                   "beside exact; default: all")
    p.add_argument("--name", default="approx_auroc", help="output file stem")
    a = p.parse_args(argv)
    chosen = dict(BACKENDS)
    if a.backends:
        keys = [k.strip() for k in a.backends.split(",")]
        chosen = {b: v for b, v in BACKENDS.items() if any(k == b or k in b for k in keys)}
    rows = []
    for name in a.datasets.split(","):
        X, y = load_adbench(name)
        for seed in (int(s) for s in a.seeds.split(",")):
            tr, te = novelty_split(y, seed, max_train=a.max_train, max_test=a.max_test)
            lo, hi = X[tr].min(axis=0), X[tr].max(axis=0)
            scale = np.where(hi > lo, hi - lo, 1.0)
            Xtr = ((X[tr] - lo) / scale).astype(np.float32)
            Xte = ((X[te] - lo) / scale).astype(np.float32)
            ref = None
            for label, (backend, params) in [("exact (brute)", ("brute", None))] + list(
                    chosen.items()):
                fit_s, det = best_of(lambda: KNNN(backend=backend,
                                                  backend_params=params).fit(Xtr))
                score_s, s = best_of(lambda: det.anomaly_score(Xte))
                qidx = query_neighbours(det, Xte[:1000])
                auc = roc_auc_score(y[te], s)
                row = dict(dataset=name, seed=seed, n_train=len(tr), d=X.shape[1],
                           backend=label, auroc=auc, fit_s=fit_s, score_s=score_s)
                if ref is None:
                    ref = (auc, det.neighborhoods_[:, 1:], qidx)
                else:
                    sample = np.random.default_rng(seed).choice(len(tr), min(1000, len(tr)),
                                                                replace=False)
                    row.update(d_auroc=auc - ref[0],
                               recall_graph=recall(det.neighborhoods_[sample, 1:],
                                                   ref[1][sample]),
                               recall_query=recall(qidx, ref[2]))
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
                      flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(
        ["dataset", "seed", "N train", "D", "backend", "AUROC", "Δ vs exact",
         "recall@K'-1 graph", "recall@k query", "fit s", "score s"],
        [[r["dataset"], r["seed"], f"{r['n_train']:,}", r["d"], r["backend"],
          f"{r['auroc']:.4f}",
          f"{r.get('d_auroc', 0):+.4f}", f"{r.get('recall_graph', 1):.3f}",
          f"{r.get('recall_query', 1):.3f}", f"{r['fit_s']:.1f}", f"{r['score_s']:.1f}"]
         for r in rows])
    worst = {b: max(abs(r["d_auroc"]) for r in rows if r["backend"] == b) for b in chosen}
    md = table + "\n\nLargest |Δ AUROC| vs exact: " + "; ".join(
        f"{b}: {v:.4f}" for b, v in worst.items())
    (out / f"{a.name}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
