#!/usr/bin/env python
"""What ``fit_predict`` gives on contaminated training data (PyOD's setting).

nonn's detectors model clean normal data (novelty detection). Many users
come from PyOD, where the usual call is ``fit(X)`` on *all* rows, anomalies
included, and the training rows' own scores are the result (outlier
detection). This script measures that setting on the 43 ADBench tabular
sets, beside PyOD's k-NN and isolation forest:

- every row of the set (anomalies included) is used to fit, and the same
  rows are scored: nonn's ``fit_predict`` training scores (each row scored
  out of sample, as by a model fitted without it: ``-train_scores_``),
  PyOD's ``decision_scores_``; AUROC and average precision against ``y``;
- columns min-max scaled on all rows (ADBench's preprocessing), the same
  input for every detector;
- sets above ``--max-rows`` (10,000, ADBench's own cap) are subsampled,
  stratified by label, with the seed; a set at or below the cap is used
  whole, so that only the isolation forest (its trees) changes with the
  seed and the deterministic detectors are run once on it;
- detectors at their defaults: ``KNNN()`` as the library ships it,
  ``KNNN(set_size="all", normalize="auto", whiten="auto",
  eig_floor="auto")``, ``KNN()``, PyOD ``KNN()`` (5 neighbours, largest
  distance) and ``IForest(random_state=seed)``;
- the user guide's "clean first" recipe: the isolation forest's top 10 %
  set aside, ``KNNN()`` fitted on the remaining rows, every row scored out
  of sample by it;
- for reference, what clean training data give: ``KNNN()`` fitted on the
  normal rows only (the labels tell which; a user does not know them), every
  row scored out of sample the same way.

Nothing here is tuned; the numbers are reported, not compared with a target.

Usage::

    python benchmarks/bench_contamination.py --seeds 3 \
        --out benchmarks/results/contamination
    python benchmarks/bench_contamination.py --datasets 6_cardio,38_thyroid --seeds 1

Writes ``results.csv`` (one row per data set, seed and detector; a rerun
with ``--resume`` skips the rows already there) and ``summary.md`` into
``--out``.
"""

from __future__ import annotations

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

from nonn import KNN, KNNN
from nonn import datasets as nd

MAX_ROWS = 10_000
#: share of rows the "clean first" recipe sets aside (declared, not tuned)
TRIM = 0.10
COLUMNS = ["dataset", "n", "d", "anomaly_rate", "seed", "detector", "auroc", "ap",
           "seconds"]


class _Nonn:
    """A nonn detector in PyOD's setting: ``fit_predict(X)`` on all rows,
    the training rows' out-of-sample anomaly scores as the result."""

    deterministic = True

    def __init__(self, make):
        self.make = make

    def scores(self, X, seed, y=None):
        det = self.make()
        with warnings.catch_warnings():
            # the warning this benchmark is about: fit_predict on contaminated data
            warnings.simplefilter("ignore", UserWarning)
            det.fit_predict(X)
        return -np.asarray(det.train_scores_, dtype=np.float64)


class _CleanFirst:
    """The guide's "clean first" recipe: an isolation forest (seeded) scores
    all rows, the share ``trim`` it finds most anomalous is set aside, a
    nonn detector is fitted on the rest; every row is then scored out of
    sample (the kept rows by ``fit_predict``'s held-out scores, the rows set
    aside as queries of that model)."""

    deterministic = False

    def __init__(self, make, trim):
        self.make = make
        self.trim = trim

    def scores(self, X, seed, y=None):
        from pyod.models.iforest import IForest

        forest = IForest(random_state=seed).fit(X).decision_scores_
        drop = np.zeros(len(X), dtype=bool)
        drop[np.argsort(-forest, kind="stable")[:int(round(self.trim * len(X)))]] = True
        return self.fit_kept(X, drop)

    def fit_kept(self, X, drop):
        det = self.make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            det.fit_predict(X[~drop])
        out = np.empty(len(X))
        out[~drop] = -np.asarray(det.train_scores_, dtype=np.float64)
        out[drop] = det.anomaly_score(X[drop])
        return out


class _LabelsKnown(_CleanFirst):
    """The reference: the same nonn detector fitted on the normal rows only
    (known from the labels, which a user does not have), every row scored
    out of sample as in :class:`_CleanFirst`. What clean training data give."""

    deterministic = True

    def __init__(self, make):
        self.make = make

    def scores(self, X, seed, y=None):
        return self.fit_kept(X, y == 1)


class _PyOD:
    def __init__(self, make, deterministic):
        self.make = make
        self.deterministic = deterministic

    def scores(self, X, seed, y=None):
        return np.asarray(self.make(seed).fit(X).decision_scores_, dtype=np.float64)


def detectors():
    from pyod.models.iforest import IForest
    from pyod.models.knn import KNN as PyodKNN

    return {
        "KNNN()": _Nonn(KNNN),
        "KNNN(set_size='all', auto)": _Nonn(lambda: KNNN(
            set_size="all", normalize="auto", whiten="auto", eig_floor="auto")),
        "KNN()": _Nonn(KNN),
        "PyOD KNN": _PyOD(lambda seed: PyodKNN(), deterministic=True),
        "PyOD IForest": _PyOD(lambda seed: IForest(random_state=seed), deterministic=False),
        f"IForest {TRIM:.0%} trim, then KNNN()": _CleanFirst(KNNN, TRIM),
        "reference: KNNN() fitted on the normal rows only": _LabelsKnown(KNNN),
    }


def _size(name, max_rows):
    """Entries of a run on ``name`` (rows capped at ``max_rows``)."""
    with np.load(nd.resolve_adbench(name)) as z:
        n, d = z["X"].shape
    return min(n, max_rows) * d


def rows_of(X, y, seed, max_rows):
    """The rows of one run: all of them, or a stratified subsample of ``max_rows``."""
    if len(X) <= max_rows:
        return X, y
    idx, _ = train_test_split(np.arange(len(X)), train_size=max_rows, stratify=y,
                              random_state=seed)
    idx = np.sort(idx)
    return X[idx], y[idx]


def _done(path):
    if not path.exists():
        return set()
    with open(path, newline="") as fh:
        return {(r["dataset"], int(r["seed"]), r["detector"]) for r in csv.DictReader(fh)}


def run(datasets, seeds, out, max_rows=MAX_ROWS, resume=False):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.csv"
    done = _done(path) if resume else set()
    if not resume or not path.exists():
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerow(COLUMNS)
    dets = detectors()
    # seed-major, smallest sets first: an interrupted run (--resume goes on)
    # has every set of the first seed before any of the second
    for seed in range(seeds):
        for name in sorted(datasets, key=lambda name: _size(name, max_rows)):
            X_all, y_all = nd.load_adbench(name)
            y_all = (np.asarray(y_all) == 1).astype(np.int64)
            X, y = rows_of(np.asarray(X_all, dtype=np.float64), y_all, seed, max_rows)
            X = MinMaxScaler().fit_transform(X)
            whole = len(X_all) <= max_rows
            for det_name, det in dets.items():
                if (name, seed, det_name) in done:
                    continue
                if whole and det.deterministic and seed > 0:
                    continue  # the same rows, the same scores: run once
                t = time.perf_counter()
                s = det.scores(X, seed, y)
                seconds = time.perf_counter() - t
                row = [name, len(X), X.shape[1], f"{y.mean():.4f}", seed, det_name,
                       f"{roc_auc_score(y, s):.6f}", f"{average_precision_score(y, s):.6f}",
                       f"{seconds:.2f}"]
                with open(path, "a", newline="") as fh:
                    csv.writer(fh).writerow(row)
                print(" ".join(map(str, row)), file=sys.stderr, flush=True)
    summary = summarize(path, seeds, max_rows)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    print(summary)
    return path


def summarize(path, seeds, max_rows=MAX_ROWS):
    """Per data set and detector: mean AUROC over the runs; then the means,
    mean ranks and counts over data sets."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    dets = list(dict.fromkeys(r["detector"] for r in rows))
    sets = list(dict.fromkeys(r["dataset"] for r in rows))
    auc = {(s, d): [] for s in sets for d in dets}
    ap = {(s, d): [] for s in sets for d in dets}
    info = {}
    for r in rows:
        auc[(r["dataset"], r["detector"])].append(float(r["auroc"]))
        ap[(r["dataset"], r["detector"])].append(float(r["ap"]))
        info[r["dataset"]] = (r["n"], r["d"], float(r["anomaly_rate"]))
    complete = [s for s in sets if all(auc[(s, d)] for d in dets)]
    mean = {k: float(np.mean(v)) for k, v in auc.items() if v}
    mean_ap = {k: float(np.mean(v)) for k, v in ap.items() if v}
    from scipy.stats import rankdata

    ranks = np.array([rankdata([-round(mean[(s, d)], 3) for d in dets]) for s in complete])
    pyod_knn = "PyOD KNN"
    lines = [
        "# fit_predict on contaminated training data (PyOD's setting)",
        "",
        f"`python benchmarks/bench_contamination.py --seeds {seeds} --out "
        f"{Path(path).parent}`",
        "",
        f"Fit on all rows of each ADBench tabular set (anomalies included), score the same "
        f"rows, AUROC against the labels. Columns min-max scaled on all rows; sets above "
        f"{max_rows:,} rows subsampled (stratified, per seed); {len(complete)} data sets; "
        f"{seeds} seeds where the rows or the detector are random. nonn: the out-of-sample "
        "training scores of `fit_predict`; PyOD: `decision_scores_`. Defaults everywhere.",
        "",
        "| detector | mean AUROC | median AUROC | mean AP | mean rank | sets below 0.5 | "
        f"W/T/L vs {pyod_knn} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for j, d in enumerate(dets):
        a = np.array([mean[(s, d)] for s in complete])
        p = np.array([mean_ap[(s, d)] for s in complete])
        if d == pyod_knn or pyod_knn not in dets:
            wtl = "—"
        else:
            ref = np.array([mean[(s, pyod_knn)] for s in complete])
            diff = np.round(a, 3) - np.round(ref, 3)
            wtl = f"{(diff > 0).sum()}/{(diff == 0).sum()}/{(diff < 0).sum()}"
        lines.append(f"| {d} | {a.mean():.3f} | {np.median(a):.3f} | {p.mean():.3f} | "
                     f"{ranks[:, j].mean():.2f} | {(a < 0.5).sum()} | {wtl} |")
    lines += ["", "Per data set (mean AUROC over the runs):", "",
              "| data set | n | d | anomalies | " + " | ".join(dets) + " |",
              "|---|---:|---:|---:|" + "---:|" * len(dets)]
    for s in sets:
        n, d, rate = info[s]
        cells = [f"{mean[(s, x)]:.3f}" if (s, x) in mean else "" for x in dets]
        lines.append(f"| {s} | {n} | {d} | {rate:.1%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
