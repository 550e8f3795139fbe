#!/usr/bin/env python
"""What ``fit_predict`` gives on contaminated training data (PyOD's setting;
protocol: benchmarks/README.md). Writes ``results.csv`` and ``summary.md``.

    python benchmarks/bench_contamination.py --seeds 3 --out benchmarks/results/contamination
    python benchmarks/bench_contamination.py --datasets 6_cardio --seeds 1 --out /tmp/c  # smoke
"""

import argparse
import csv
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import MinMaxScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table  # noqa: E402

from nonn import KNN, KNNN  # noqa: E402
from nonn import datasets as nd  # noqa: E402

MAX_ROWS = 10_000
#: share of rows the "clean first" recipe sets aside (declared, not tuned)
TRIM = 0.10
COLUMNS = ["dataset", "n", "d", "anomaly_rate", "seed", "detector", "auroc", "ap", "seconds"]


def out_of_sample(make, X, drop):
    """Every row's score from a nonn detector fitted on the rows not in
    ``drop``: the kept rows' held-out training scores, the others as queries."""
    det = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fit_predict on contaminated data
        det.fit_predict(X[~drop])
    out = np.empty(len(X))
    out[~drop] = -np.asarray(det.train_scores_, dtype=np.float64)
    if drop.any():
        out[drop] = det.anomaly_score(X[drop])
    return out


def forest(X, seed):
    from pyod.models.iforest import IForest

    return IForest(random_state=seed).fit(X).decision_scores_


def trimmed(X, seed):
    """The rows IsolationForest (seeded) finds most anomalous, ``TRIM`` of them."""
    drop = np.zeros(len(X), dtype=bool)
    drop[np.argsort(-forest(X, seed), kind="stable")[:int(round(TRIM * len(X)))]] = True
    return drop


def detectors():
    """{name: (scores(X, seed, y), deterministic)}."""
    from pyod.models.knn import KNN as PyodKNN

    none = lambda X: np.zeros(len(X), dtype=bool)  # noqa: E731
    auto = lambda: KNNN(set_size="all", normalize="auto", whiten="auto",  # noqa: E731
                        eig_floor="auto")
    return {
        "KNNN()": (lambda X, seed, y: out_of_sample(KNNN, X, none(X)), True),
        "KNNN(set_size='all', auto)": (lambda X, seed, y: out_of_sample(auto, X, none(X)), True),
        "KNN()": (lambda X, seed, y: out_of_sample(KNN, X, none(X)), True),
        "PyOD KNN": (lambda X, seed, y: PyodKNN().fit(X).decision_scores_, True),
        "PyOD IForest": (lambda X, seed, y: forest(X, seed), False),
        f"IForest {TRIM:.0%} trim, then KNNN()":
            (lambda X, seed, y: out_of_sample(KNNN, X, trimmed(X, seed)), False),
        "reference: KNNN() fitted on the normal rows only":
            (lambda X, seed, y: out_of_sample(KNNN, X, y == 1), True),
    }


def run(datasets, seeds, out, max_rows=MAX_ROWS, resume=False):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.csv"
    done = set()
    if resume and path.exists():
        done = {(r["dataset"], int(r["seed"]), r["detector"])
                for r in csv.DictReader(open(path, newline=""))}
    else:
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerow(COLUMNS)

    def size(name):
        with np.load(nd.resolve_adbench(name)) as z:
            return min(len(z["X"]), max_rows) * z["X"].shape[1]

    dets = detectors()
    # seed-major, smallest sets first: an interrupted run has every set of
    # the first seed before any of the second
    for seed in range(seeds):
        for name in sorted(datasets, key=size):
            X, y = nd.load_adbench(name)
            X, y = np.asarray(X, dtype=np.float64), (np.asarray(y) == 1).astype(np.int64)
            whole = len(X) <= max_rows
            if not whole:
                idx = np.sort(train_test_split(np.arange(len(X)), train_size=max_rows,
                                               stratify=y, random_state=seed)[0])
                X, y = X[idx], y[idx]
            X = MinMaxScaler().fit_transform(X)
            for det_name, (scores, deterministic) in dets.items():
                if (name, seed, det_name) in done or (whole and deterministic and seed > 0):
                    continue  # done, or the same rows and the same scores as seed 0
                t = time.perf_counter()
                s = np.asarray(scores(X, seed, y), dtype=np.float64)
                row = [name, len(X), X.shape[1], f"{y.mean():.4f}", seed, det_name,
                       f"{roc_auc_score(y, s):.6f}", f"{average_precision_score(y, s):.6f}",
                       f"{time.perf_counter() - t:.2f}"]
                with open(path, "a", newline="") as fh:
                    csv.writer(fh).writerow(row)
                print(" ".join(map(str, row)), file=sys.stderr, flush=True)
    summary = summarize(path, seeds, max_rows)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    print(summary)
    return path


def summarize(path, seeds, max_rows=MAX_ROWS):
    """Per data set and detector: mean AUROC over the runs; then the means,
    mean ranks and wins / ties / losses against PyOD KNN over the data sets."""
    from scipy.stats import rankdata

    rows = list(csv.DictReader(open(path, newline="")))
    dets = list(dict.fromkeys(r["detector"] for r in rows))
    sets = list(dict.fromkeys(r["dataset"] for r in rows))
    auc, ap, info = {}, {}, {}
    for r in rows:
        auc.setdefault((r["dataset"], r["detector"]), []).append(float(r["auroc"]))
        ap.setdefault((r["dataset"], r["detector"]), []).append(float(r["ap"]))
        info[r["dataset"]] = (r["n"], r["d"], float(r["anomaly_rate"]))
    complete = [s for s in sets if all((s, d) in auc for d in dets)]
    mean = {k: float(np.mean(v)) for k, v in auc.items()}
    ranks = np.array([rankdata([-round(mean[(s, d)], 3) for d in dets]) for s in complete])
    ref = "PyOD KNN"
    table = []
    for j, d in enumerate(dets):
        a = np.array([mean[(s, d)] for s in complete])
        p = np.array([np.mean(ap[(s, d)]) for s in complete])
        wtl = "—"
        if d != ref and ref in dets:
            diff = np.round(a, 3) - np.round([mean[(s, ref)] for s in complete], 3)
            wtl = f"{(diff > 0).sum()}/{(diff == 0).sum()}/{(diff < 0).sum()}"
        table.append([d, f"{a.mean():.3f}", f"{np.median(a):.3f}", f"{p.mean():.3f}",
                      f"{ranks[:, j].mean():.2f}", (a < 0.5).sum(), wtl])
    per_set = [[s, *info[s][:2], f"{info[s][2]:.1%}"]
               + [f"{mean[(s, x)]:.3f}" if (s, x) in mean else "" for x in dets] for s in sets]
    return "\n".join([
        "# fit_predict on contaminated training data (PyOD's setting)", "",
        f"`python benchmarks/bench_contamination.py --seeds {seeds} --out {Path(path).parent}`",
        "", f"Fit on all rows of each ADBench tabular set (anomalies included), score the same "
        f"rows, AUROC against the labels. Columns min-max scaled on all rows; sets above "
        f"{max_rows:,} rows subsampled (stratified, per seed); {len(complete)} data sets; "
        f"{seeds} seeds where the rows or the detector are random. nonn: the out-of-sample "
        "training scores of `fit_predict`; PyOD: `decision_scores_`. Defaults everywhere.", "",
        markdown_table(["detector", "mean AUROC", "median AUROC", "mean AP", "mean rank",
                        "sets below 0.5", f"W/T/L vs {ref}"], table), "",
        "Per data set (mean AUROC over the runs):", "",
        markdown_table(["data set", "n", "d", "anomalies", *dets], per_set)]) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", help="comma-separated ADBench names (default: all 43)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-rows", type=int, default=MAX_ROWS)
    ap.add_argument("--out", default="benchmarks/results/contamination")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an earlier run's results.csv and add the missing")
    args = ap.parse_args(argv)
    names = ([s.strip() for s in args.datasets.split(",") if s.strip()] if args.datasets
             else nd.list_adbench("classical"))
    run(names, args.seeds, args.out, args.max_rows, args.resume)


if __name__ == "__main__":
    main()
