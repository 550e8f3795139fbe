#!/usr/bin/env python
"""Held-out false-alarm rate of each detector's own threshold.

For every data set and seed the normal rows are split 75 % / 25 % (seeded);
a detector is fitted on the 75 % and its threshold at each requested rate
flags some of the held-out 25 % normals. The table gives, per suite,
detector and rate, the pooled share of held-out normals flagged and its
ratio to the rate asked for (a trustworthy threshold: near 1).

Suites: ``mvtec`` (ADBench ResNet-18 embeddings of the 15 MVTec AD
categories), ``tabular`` (the 43 ADBench tabular sets, min-max scaled on the
training part, at most 10,000 training rows), ``cifar10`` (EfficientNet-Lite0
224 px features of the CIFAR-10 training pool, one class at a time, through
``nonn.vision.FeatureDetector``), ``spade`` and ``panda`` (``nonn.vision.SPADE``
and ``PANDA`` at their defaults, 224 px, on the first ``--images-per-class``
images of each ``--classes`` CIFAR-10 class's pool; pyramids and trunk
outputs cached per class under ``$NONN_CACHE``).

Usage::

    python benchmarks/bench_thresholds.py --suites mvtec,tabular,cifar10 --seeds 10 \
        --out benchmarks/results/thresholds
    python benchmarks/bench_thresholds.py --suites spade,panda --seeds 3 --classes 0,1,2 \
        --out benchmarks/results/thresholds_systems

With ``--out`` every finished (data set, seed, detector) is appended to
``thresholds.csv`` at once and a rerun skips it.
"""

import argparse
import csv
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from _common import log, markdown_table

from nonn import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN
from nonn import datasets as nd
from nonn._base import threshold

RATES = (0.01, 0.05)
DETECTORS = {"KNNN": KNNN, "KNN": KNN, "GlobalEigenKNN": GlobalEigenKNN,
             "LocalEigenKNN": LocalEigenKNN}
MAX_TRAIN = 10_000
FIELDS = ["suite", "dataset", "seed", "detector", "rate", "flagged", "held_out", "seconds"]


def _normals(suite, args):
    """(name, normal rows, min-max scaled?) of every data set of ``suite``."""
    if suite in ("mvtec", "tabular"):
        for name in nd.list_adbench("mvtec" if suite == "mvtec" else "classical"):
            X, y = nd.load_adbench(name)
            yield name, X[y == 0], suite == "tabular"
    elif suite == "cifar10":
        from nonn.evaluation import image_features

        X, y = image_features("cifar10", "pool")
        for c in range(10):
            yield f"cifar10-class{c}", {"X": X[y == c]}, False
    elif suite in ("spade", "panda"):
        for c in args.classes:
            yield f"cifar10-class{c}", _image_inputs(suite, c, args.images_per_class), False
    else:
        raise SystemExit(f"unknown suite {suite!r}")


def _image_inputs(suite, c, n):
    """Pooled features and pyramids (spade) or trunk outputs (panda) of the
    first ``n`` images of class ``c``'s seeded CIFAR-10 pool, cached."""
    from nonn.evaluation import IMAGE_POOL_PER_CLASS, feature_cache_dir

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
        return {k: z[k] for k in z.files}


class _System:
    """An image system fitted and scored on cached inputs (a dict of arrays)."""

    def __init__(self, system):
        self.system = system

    def fit(self, rows):
        import torch

        s = self.system
        if "T" in rows:
            s.fit_trunk(torch.from_numpy(rows["T"]))
        elif "M" in rows:
            s.fit_features(rows["X"], maps=rows["M"])
        else:
            s.fit_features(rows["X"])
        self.calibration_scores_ = s.calibration_scores_
        return self

    def score_samples(self, rows):
        import torch

        s = self.system
        if "T" in rows:
            return -s.anomaly_score_features(s.features_from_trunk(torch.from_numpy(rows["T"])))
        if "M" in rows:  # SPADE's default image score needs the maps
            return -s.score_pyramids(rows["X"], rows["M"])[0]
        return -s.anomaly_score_features(rows["X"])


def _detectors(suite):
    if suite in ("mvtec", "tabular"):
        return DETECTORS
    from nonn import vision

    cls = {"cifar10": vision.FeatureDetector, "spade": vision.SPADE,
           "panda": vision.PANDA}[suite]
    return {f"{cls.__name__}({nn})": (lambda cls=cls, nn=nn: _System(cls(nn=nn, verbose=False)))
            for nn in ("knnn", "knn")}


def _split(normals, seed, minmax):
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    n = len(next(iter(normals.values()))) if isinstance(normals, dict) else len(normals)
    perm = rng.permutation(n)
    cut = int(round(0.75 * n))
    fit, held = perm[:cut][:MAX_TRAIN], perm[cut:]
    if isinstance(normals, dict):
        return ({k: v[fit] for k, v in normals.items()},
                {k: v[held] for k, v in normals.items()}, len(held))
    train, test = normals[fit], normals[held]
    if minmax:
        lo, hi = train.min(0), train.max(0)
        span = np.where(hi > lo, hi - lo, 1.0)
        train, test = (train - lo) / span, (test - lo) / span
    return train, test, len(held)


def run(args):
    """Every (suite, data set, seed, detector) not yet in the CSV; returns all rows."""
    path = Path(args.out) / "thresholds.csv" if args.out else None
    rows = []
    if path and path.is_file():
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    done = {(r["suite"], r["dataset"], r["seed"], r["detector"]) for r in rows}
    for suite in args.suites:
        for name, normals, minmax in _normals(suite, args):
            for seed in range(args.seeds):
                train, held, n_held = _split(normals, seed, minmax)
                for det, make in _detectors(suite).items():
                    if (args.detectors and det not in args.detectors) or \
                            (suite, name, str(seed), det) in done:
                        continue
                    t = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        model = make().fit(train)
                        ss = np.asarray(model.score_samples(held), dtype=np.float64)
                    new = [dict(zip(FIELDS, (suite, name, seed, det, rate,
                                             int((ss < threshold(model.calibration_scores_,
                                                                 rate)).sum()),
                                             n_held, round(time.perf_counter() - t, 2))))
                           for rate in RATES]
                    rows += new
                    if path:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        fresh = not path.is_file()
                        with open(path, "a", newline="") as fh:
                            w = csv.DictWriter(fh, FIELDS)
                            if fresh:
                                w.writeheader()
                            w.writerows(new)
            log(f"{suite} {name}: done")
    return rows


def table(rows):
    """Pooled share flagged per (suite, detector, rate)."""
    out = []
    for key in dict.fromkeys((r["suite"], r["detector"], float(r["rate"])) for r in rows):
        sel = [r for r in rows if (r["suite"], r["detector"], float(r["rate"])) == key]
        share = sum(int(r["flagged"]) for r in sel) / max(sum(int(r["held_out"]) for r in sel), 1)
        out.append((*key[:2], f"{key[2]:.0%}", f"{share:.2%}", f"{share / key[2]:.2f}"))
    return markdown_table(["suite", "detector", "rate asked", "held-out normals flagged",
                           "ratio"], out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", default="mvtec", help="comma-separated: "
                    "mvtec,tabular,cifar10,spade,panda")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--detectors", help="comma-separated detector names (default: all)")
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="spade/panda: the "
                    "CIFAR-10 classes taken as normal, one at a time")
    ap.add_argument("--images-per-class", type=int, default=400, help="spade/panda")
    ap.add_argument("--out", help="folder for thresholds.csv (resumed) and thresholds.md")
    args = ap.parse_args(argv)
    args.suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    args.detectors = args.detectors and [d.strip() for d in args.detectors.split(",")]
    args.classes = [int(c) for c in args.classes.split(",")]
    text = table(run(args))
    print(text)
    if args.out:
        cmd = " ".join(["python benchmarks/bench_thresholds.py", *(argv or sys.argv[1:])])
        (Path(args.out) / "thresholds.md").write_text(f"`{cmd}`\n\n{text}\n")


if __name__ == "__main__":
    main()
