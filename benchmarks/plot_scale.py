#!/usr/bin/env python
"""One log-log plot of time against N from the scale runs: ``bench_scale.py``
JSON files (floors, KNNN fit and score per backend, peers) and
``bench_million.py`` JSON files (the 1M fit and score).

Usage (repository root)::

    python benchmarks/plot_scale.py            # the committed results -> benchmarks/results/scale/time_vs_N.png
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path


def main(argv=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", nargs="*", default=sorted(
        glob.glob("benchmarks/results/scale*/scale_D512_Q10000_*.json")))
    p.add_argument("--million", nargs="*", default=sorted(
        glob.glob("benchmarks/results/scale*/million_*.json")))
    p.add_argument("--out", default="benchmarks/results/scale/time_vs_N.png")
    a = p.parse_args(argv)
    series = {}  # label -> {N: seconds}

    def add(label, n, seconds):
        series.setdefault(label, {})[n] = seconds

    for path in a.scale:
        d = json.loads(Path(path).read_text())
        lean = "lean" if d["config"].get("knnn_params", {}).get("memory") == "lean" else ""
        for r in d["rows"]:
            b = r["backend"].split("@")[0] + (f" [{lean}]" if lean else "")
            for key, what in (("graph", "graph floor"), ("fit", "KNNN.fit"),
                              ("query", "query floor"), ("score", "KNNN.score")):
                if isinstance(r.get(key), dict) and "seconds" in r[key]:
                    add(f"{b}: {what}", r["N"], r[key]["seconds"])
        for r in d.get("peers", []):
            for key in ("fit", "score"):
                if isinstance(r.get(key), dict) and "seconds" in r[key]:
                    add(f"{r.get('peer', 'peer')}: {key}", r["N"], r[key]["seconds"])
    for path in a.million:
        d = json.loads(Path(path).read_text())
        cfg = d["args"]
        b = f"faiss:{cfg['index']} ef{cfg['ef']} [{cfg['memory']}]"
        add(f"{b}: KNNN.fit", cfg["N"], d["fit_s"])
        add(f"{b}: KNNN.score", cfg["N"], d["score_s"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, kind in zip(axes, ("fit", "score")):
        for label, pts in sorted(series.items()):
            is_fit = any(w in label for w in ("graph", "fit"))
            if is_fit != (kind == "fit"):
                continue
            ns = sorted(pts)
            style = "--" if "floor" in label else "-"
            ax.plot(ns, [pts[n] for n in ns], style, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training points N (D = 512)")
        ax.set_ylabel("seconds")
        ax.set_title("fit (dashed: the k-NN graph floor)" if kind == "fit"
                     else "score 10,000 queries (dashed: the k-NN query floor)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"saved {a.out} ({len(series)} series)")


if __name__ == "__main__":
    main()
