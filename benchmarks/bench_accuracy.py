#!/usr/bin/env python
"""Accuracy benchmark: nonn's detectors and their peers under the novelty protocol.

Runs :func:`nonn.evaluation.run_benchmark` on one or more suites of the real
data (``NONN_DATA``, default ``../shared/data``) and writes, per suite, into
``--out/<suite>/``: ``results.csv`` (every dataset x seed x detector run,
with times and errors), ``auroc.csv`` (dataset x detector, mean over seeds),
``summary.csv`` (per detector: mean AUROC, mean AP, mean rank, wins,
times), ``summary.md`` (the tables printed below) and ``summary.png``
(per-dataset AUROC dots and mean ranks).

Protocol (see ``nonn.evaluation``): train on the normal rows except a random
hold-out of normal rows as large as the anomaly count; test on that hold-out
plus all anomalies; AUROC and AP; averaged over the seeds. Training normals
are capped at ``--max-train`` rows and test sets at ``--max-test`` rows
(same rows for every detector); the tabular suite is min-max scaled on the
training normals (ADBench's preprocessing), the embeddings are used raw.

Usage::

    python benchmarks/bench_accuracy.py --suite mvtec              # ~1-2 min on 2 cores
    python benchmarks/bench_accuracy.py --suite classical          # ~1 h on 2 cores
    python benchmarks/bench_accuracy.py --suite all --seeds 0,1,2
    python benchmarks/bench_accuracy.py --suite mvtec --detectors 'KNNN*,KNN-mean-*,authors-*'
    python benchmarks/bench_accuracy.py --list-detectors
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

SUITE_CHOICES = ("mvtec", "classical", "cifar10", "mvtec_union", "all")
#: what "--suite all" runs, in this order
ALL_SUITES = ("mvtec", "classical", "cifar10", "mvtec_union")


def _ints(text):
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}")


def _cap(text):
    if text.lower() in ("none", "0", "off"):
        return None
    return int(text)


def build_parser():
    p = argparse.ArgumentParser(
        prog="bench_accuracy.py",
        description="Novelty-protocol accuracy of nonn's detectors and peers on real data.",
    )
    p.add_argument("--suite", choices=SUITE_CHOICES, default="mvtec",
                   help="mvtec: 15 MVTec AD categories (ResNet-18 embeddings, paper Table 1); "
                        "classical: 43 ADBench tabular sets; cifar10: ADBench CIFAR-10 "
                        "embeddings; mvtec_union: 5/7/11/15 MVTec categories united (paper "
                        f"Table 4); all: {', '.join(ALL_SUITES)}. Default: mvtec.")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2],
                   help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--detectors", default=None,
                   help="comma-separated names or patterns ('KNN-*'); default: all registered")
    p.add_argument("--datasets", default=None,
                   help="comma-separated dataset names to run instead of the whole suite")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy"),
                   help="output folder; each suite writes into OUT/<suite>/ "
                        "(default benchmarks/results/accuracy)")
    p.add_argument("--max-train", type=_cap, default=10_000,
                   help="cap on training normals per run ('none' lifts it; default 10000)")
    p.add_argument("--max-test", type=_cap, default=10_000,
                   help="cap on test rows per run, kept balanced ('none' lifts it; "
                        "default 10000)")
    p.add_argument("--scale", choices=("auto", "none", "minmax", "standard"), default="auto",
                   help="auto: minmax for classical, none for embeddings")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/<suite>/results.csv (written after every dataset)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--list-detectors", action="store_true",
                   help="print the registered detectors and exit")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from nonn import evaluation

    if args.list_detectors:
        for name, det in evaluation.DETECTORS.items():
            missing = det.missing()
            flag = f"  [missing: {', '.join(missing)}]" if missing else ""
            print(f"{name:22s} {det.family:5s} {det.description}{flag}")
        return 0
    suites = ALL_SUITES if args.suite == "all" else (args.suite,)
    datasets = args.datasets.split(",") if args.datasets else None
    scale = {"none": None}.get(args.scale, args.scale)
    print(f"# nonn accuracy benchmark — {time.strftime('%Y-%m-%d %H:%M')}, "
          f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"seeds {args.seeds}, max_train={args.max_train}, max_test={args.max_test}")
    t_all = time.perf_counter()
    for suite in suites:
        t0 = time.perf_counter()
        _, summary, md = evaluation.run_benchmark(
            suite, args.out / suite, detectors=args.detectors, seeds=args.seeds,
            datasets=datasets, max_train=args.max_train, max_test=args.max_test, scale=scale,
            progress=not args.no_progress, resume=args.resume, plot=not args.no_plot,
        )
        dt = time.perf_counter() - t0
        md += f"\nRun time: {dt:.0f} s wall.\n"
        (args.out / suite / "summary.md").write_text(md)
        print()
        print(md)
        print(f"[{suite}] {dt:.0f} s; results in {args.out / suite}/", flush=True)
    if len(suites) > 1:
        print(f"\nTotal run time: {time.perf_counter() - t_all:.0f} s wall.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
