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
pool, one class at a time, through ``nonn.vision.FeatureDetector``),
``spade`` and ``panda`` (the image systems ``nonn.vision.SPADE`` and
``nonn.vision.PANDA`` at their defaults, 224 px, on the first
``--images-per-class`` images of each CIFAR-10 class's seeded training
pool; SPADE's feature pyramids and PANDA's frozen-trunk outputs are
extracted once per class and cached under ``$NONN_CACHE``).

Usage::

    python benchmarks/bench_thresholds.py --suites mvtec --seeds 10
    python benchmarks/bench_thresholds.py --suites mvtec,tabular,cifar10 --seeds 10 \
        --out benchmarks/results/thresholds
    python benchmarks/bench_thresholds.py --suites spade,panda --seeds 3 \
        --out benchmarks/results/thresholds_systems
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
    elif suite in ("spade", "panda"):
        for c in IMAGE_CLASSES:
            yield f"cifar10-class{c}", _ImageRows(suite, c), None
    else:
        raise SystemExit(f"unknown suite {suite!r}")


IMAGES_PER_CLASS = 400
IMAGE_CLASSES = tuple(range(10))


class _ImageRows:
    """The cached inputs of one CIFAR-10 class for an image system, indexed
    like an array of rows: (pooled features, pyramids) for SPADE, the frozen
    trunk's outputs for PANDA."""

    def __init__(self, suite, c):
        from nonn.evaluation import IMAGE_POOL_PER_CLASS, feature_cache_dir

        n = IMAGES_PER_CLASS
        path = feature_cache_dir() / f"cifar10-pool-c{c}-first{n}-{suite}.npz"
        if not path.is_file():
            from nonn._io import atomic_write
            from nonn.vision import datasets as vds
            from nonn.vision.features import ImageFeatureExtractor

            images, _ = vds.load_cifar10(split="train", classes=[c], random_state=0,
                                         n_per_class=IMAGE_POOL_PER_CLASS)
            ext = ImageFeatureExtractor(verbose=False).fit()
            if suite == "spade":
                X, M = ext.transform_pyramid(images[:n], 28)
                arrays = {"X": X, "M": M}
            else:
                arrays = {"T": ext.transform_trunk(images[:n]).numpy()}
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda fh: np.savez(fh, **arrays))
        with np.load(path, allow_pickle=False) as z:
            self.arrays = {k: z[k] for k in z.files}
        self.suite = suite

    def __len__(self):
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, rows):
        return {k: v[rows] for k, v in self.arrays.items()}


def _minmax(train, test):
    lo, hi = train.min(0), train.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (train - lo) / span, (test - lo) / span


def _detectors(suite):
    if suite == "spade":
        from nonn.vision import SPADE

        return {"SPADE(knnn)": lambda: _Spade(SPADE()),
                "SPADE(knn)": lambda: _Spade(SPADE(nn="knn"))}
    if suite == "panda":
        from nonn.vision import PANDA

        return {"PANDA(knnn)": lambda: _Panda(PANDA(verbose=False)),
                "PANDA(knn)": lambda: _Panda(PANDA(nn="knn", verbose=False))}
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


class _Spade:
    """SPADE at its defaults (image score from the map and the pooled
    feature) fitted on cached pooled features and pyramids. Fitted with
    ``contamination=0.01``; that fit's own ``offset_`` is checked against
    the threshold recomputed from ``calibration_scores_``."""

    def __init__(self, system):
        self.system = system.set_params(contamination=RATES[0], verbose=False)

    def fit(self, rows):
        self.system.fit_features(rows["X"], maps=rows["M"])
        self.calibration_scores_ = self.system.calibration_scores_
        return self

    def score_samples(self, rows):
        ss = -self.system.score_pyramids(rows["X"], rows["M"])[0]
        assert self.system.offset_ == threshold(self.calibration_scores_, RATES[0])
        return ss


class _Panda:
    """PANDA at its defaults, fine-tuned from cached frozen-trunk outputs."""

    def __init__(self, system):
        self.system = system

    def fit(self, rows):
        import torch

        self.system.fit_trunk(torch.from_numpy(rows["T"]))
        self.calibration_scores_ = self.system.calibration_scores_
        return self

    def score_samples(self, rows):
        import torch

        return -self.system.anomaly_score_features(
            self.system.features_from_trunk(torch.from_numpy(rows["T"])))


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
                train, held = normals[perm[:cut][:MAX_TRAIN]], normals[perm[cut:]]
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
            f"{seeds}" + (f" --classes {','.join(map(str, IMAGE_CLASSES))}"
                          if {"spade", "panda"} & set(suites) else "") + "`\n\n{table}\n")
        with open(out / "thresholds.csv", "w") as fh:
            fh.write("suite,dataset,seed,detector,rate,flagged,held_out,seconds\n")
            fh.writelines(",".join(map(str, r)) + "\n" for r in rows)
    return rows


def main(argv=None):
    global IMAGES_PER_CLASS, IMAGE_CLASSES
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", default="mvtec",
                    help="comma-separated: mvtec,tabular,cifar10,spade,panda")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--detectors", help="comma-separated subset of "
                    + ",".join(DETECTORS) + " (default: all)")
    ap.add_argument("--images-per-class", type=int, default=IMAGES_PER_CLASS,
                    help="spade/panda: images of each class's pool used (75 %% fit, 25 %% "
                    "held out)")
    ap.add_argument("--out", help="folder for thresholds.md and thresholds.csv")
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9",
                    help="spade/panda: the CIFAR-10 classes taken as normal, one at a time")
    args = ap.parse_args(argv)
    IMAGE_CLASSES = tuple(int(c) for c in args.classes.split(","))
    IMAGES_PER_CLASS = args.images_per_class
    keep = [d.strip() for d in args.detectors.split(",")] if args.detectors else None
    run([s.strip() for s in args.suites.split(",") if s.strip()], args.seeds, args.out, keep)


if __name__ == "__main__":
    main()
