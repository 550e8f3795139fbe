#!/usr/bin/env python
"""Held-out false-alarm rate of each detector's own threshold.

For every data set and seed the normal rows are split 75 % / 25 % (seeded);
a detector is fitted on the 75 % with ``contamination=rate`` and flags some
of the held-out 25 % normals. The table gives, per suite, detector and
requested rate, the pooled share of held-out normals flagged (all data sets
and seeds together) and its ratio to the rate asked for; a threshold users
can trust has a ratio near 1 (the acceptance band is [0.5, 2]).

Suites: ``mvtec`` (ADBench ResNet-18 embeddings of the 15 MVTec AD
categories, normals only), ``tabular`` (the 43 ADBench tabular sets,
min-max scaled on the training part, training part capped at 10,000 rows),
``cifar10`` (EfficientNet-Lite0 224 px features of the CIFAR-10 training
pool, one class at a time, through ``nonn.vision.FeatureDetector``).

Usage::

    python benchmarks/bench_thresholds.py --suites mvtec --seeds 10
    python benchmarks/bench_thresholds.py --suites mvtec,tabular,cifar10 --seeds 10 \
        --out benchmarks/results/thresholds
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from nonn import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN
from nonn import datasets as nd
from nonn._base import threshold

RATES = (0.01, 0.05)
DETECTORS = {"KNNN": KNNN, "KNN": KNN, "GlobalEigenKNN": GlobalEigenKNN,
             "LocalEigenKNN": LocalEigenKNN}
MAX_TRAIN = 10_000


def _normals(suite):
    """(name, normal rows, per-seed preprocessing) of every data set."""
    if suite == "mvtec":
        for name in nd.list_adbench("mvtec"):
            X, y = nd.load_adbench(name)
            yield name, X[y == 0], None
    elif suite == "tabular":
        for name in nd.list_adbench("classical"):
            X, y = nd.load_adbench(name)
            yield name, X[y == 0], "minmax"
    elif suite == "cifar10":
        from nonn.evaluation import image_features

        X, y = image_features("cifar10", "pool")
        for c in range(10):
            yield f"cifar10-class{c}", X[y == c], None
    else:
        raise SystemExit(f"unknown suite {suite!r}")


def _minmax(train, test):
    lo, hi = train.min(0), train.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (train - lo) / span, (test - lo) / span


def _detectors(suite):
    if suite == "cifar10":
        from nonn.vision import FeatureDetector

        return {"FeatureDetector(knnn)": lambda: _Features(FeatureDetector()),
                "FeatureDetector(knn)": lambda: _Features(FeatureDetector(nn="knn"))}
    return {name: cls for name, cls in DETECTORS.items()}


class _Features:
    """An image system fitted on cached pooled features."""

    def __init__(self, system):
        self.system = system

    def fit(self, X):
        self.system.fit_features(X)
        self.calibration_scores_ = self.system.calibration_scores_
        return self

    def score_samples(self, X):
        return -self.system.anomaly_score_features(X)


def _flagged(det, held):
    """Held-out normals flagged at each rate. One fit serves every rate: a
    fit with ``contamination=rate`` sets ``offset_ = threshold(
    calibration_scores_, rate)`` from the same held-out training scores
    (nonn._base), so the offsets are computed here exactly as that fit would."""
    ss = np.asarray(det.score_samples(held), dtype=np.float64)
    return {rate: int((ss - threshold(det.calibration_scores_, rate) < 0).sum())
            for rate in RATES}


def run(suites, seeds, out=None, keep=None):
    rows = []
    for suite in suites:
        for name, normals, prep in _normals(suite):
            for seed in range(seeds):
                rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
                perm = rng.permutation(len(normals))
                cut = int(round(0.75 * len(normals)))
                train, held = normals[perm[:cut]][:MAX_TRAIN], normals[perm[cut:]]
                if prep == "minmax":
                    train, held = _minmax(train, held)
                for det_name, make in _detectors(suite).items():
                    if keep is not None and det_name not in keep:
                        continue
                    t = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        flagged = _flagged(make().fit(train), held)
                    seconds = time.perf_counter() - t
                    for rate in RATES:
                        rows.append((suite, name, seed, det_name, rate, flagged[rate],
                                     len(held), seconds))
            print(f"{suite} {name}: done", file=sys.stderr, flush=True)
    lines = ["| suite | detector | rate asked | held-out normals flagged | ratio |",
             "|---|---|---:|---:|---:|"]
    keys = dict.fromkeys((r[0], r[3], r[4]) for r in rows)
    for suite, det, rate in keys:
        sel = [r for r in rows if (r[0], r[3], r[4]) == (suite, det, rate)]
        share = sum(r[5] for r in sel) / max(sum(r[6] for r in sel), 1)
        lines.append(f"| {suite} | {det} | {rate:.0%} | {share:.2%} | {share / rate:.2f} |")
    table = "\n".join(lines)
    print(table)
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "thresholds.md").write_text(
            f"`python benchmarks/bench_thresholds.py --suites {','.join(suites)} --seeds "
            f"{seeds}`\n\n{table}\n")
        with open(out / "thresholds.csv", "w") as fh:
            fh.write("suite,dataset,seed,detector,rate,flagged,held_out,seconds\n")
            fh.writelines(",".join(map(str, r)) + "\n" for r in rows)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", default="mvtec", help="comma-separated: mvtec,tabular,cifar10")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--detectors", help="comma-separated subset of "
                    + ",".join(DETECTORS) + " (default: all)")
    ap.add_argument("--out", help="folder for thresholds.md and thresholds.csv")
    args = ap.parse_args(argv)
    keep = [d.strip() for d in args.detectors.split(",")] if args.detectors else None
    run([s.strip() for s in args.suites.split(",") if s.strip()], args.seeds, args.out, keep)


if __name__ == "__main__":
    main()
