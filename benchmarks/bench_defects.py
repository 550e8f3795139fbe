"""Synthetic defects on real images: SPADE's image AUROC, pixel AUROC, AUPRO and
model MiB per training image, k-NN vs k-NNN pixel matching, with and without a 10 %
coreset, by ``nonn make-defects --preset`` (200 training, 50 test images per set;
see nonn.vision.defects), ``fit-images --system spade`` (224 px) and ``eval-images``::

    nice -n 10 python benchmarks/bench_defects.py --out benchmarks/results/images/defects_v3
    python benchmarks/bench_defects.py --quick --out /tmp/defects        # smoke

``--fit-args="--image-score map --map-score-q 0.05"`` passes more options to
every ``fit-images`` (the image score measured for pasted patches);
``--n-train 5000`` trains on more images (CIFAR-10 has 5,000 per class);
``--n-test 300 --kinds patch`` measures one kind on more test images (50 per
kind give an image AUROC near 0.95 a standard error of about 0.02).
"""

import argparse
import csv
import shlex
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, markdown_table, write_results

from nonn.cli import main as nonn


def run(*args):
    """``nonn ARGS`` in this process (kernels and backbone stay loaded)."""
    if nonn([str(a) for a in args]) != 0:
        raise SystemExit(f"failed: nonn {' '.join(map(str, args))}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/images/defects_v3")
    ap.add_argument("--sets", default="cifar_horse,fashion_tshirt,textures")
    ap.add_argument("--variants", default="knn,knnn,knn:0.1,knnn:0.1", help="MAP_NN[:CORESET]")
    ap.add_argument("--fit-args", default="", help="more fit-images options, one string")
    ap.add_argument("--n-train", type=int, default=200, help="training images per set")
    ap.add_argument("--n-test", type=int, default=50,
                    help="test images per set, each clean and once per kind")
    ap.add_argument("--kinds", default=None, help="defect kinds, K,... (default: all)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 12 / 3 images, 64 px")
    args = ap.parse_args(argv)
    n_train, n_test = (12, 3) if args.quick else (args.n_train, args.n_test)
    small = ["--image-size", 64, "--map-size", 8] if args.quick else []
    rows, start, tmp = [], time.perf_counter(), tempfile.TemporaryDirectory()
    for name in args.sets.split(","):
        data, model, ev = (Path(tmp.name) / x for x in (name, "m.nonn", "ev"))
        run("make-defects", "--preset", name, "-o", data, "--n-train", n_train, "--n-test", n_test,
            *(["--kinds", args.kinds] if args.kinds else []))
        for map_nn, _, ratio in (v.partition(":") for v in args.variants.split(",")):
            run("fit-images", data / "train" / "good", "-o", model, "--system", "spade",
                "--map-nn", map_nn, *small, *(["--coreset-ratio", ratio] if ratio else []),
                *shlex.split(args.fit_args))
            run("eval-images", model, data / "test", "-o", ev, "--no-progress")
            mib = model.stat().st_size / 2**20 / n_train
            with open(ev / "metrics.csv", newline="") as fh:  # all, then each kind
                rows += [[name, map_nn, ratio or None, r[0], r[3], *r[5:7], f"{mib:.4f}"]
                         for r in [r for r in csv.reader(fh) if len(r) > 3][1:]]
    minutes = (time.perf_counter() - start) / 60
    text = (f"# Synthetic defects: SPADE, k-NN vs k-NNN maps, coreset\n\n`python benchmarks/"
            f"bench_defects.py {shlex.join(sys.argv[1:])}` in {minutes:.1f} min. Subsets: each "
            "kind with the good images; all: every kind.\n\n" + markdown_table(
                ["set", "map_nn", "coreset", "subset", "image AUROC", "pixel AUROC",
                 "AUPRO (FPR <= 30 %)", "MiB / training image"], rows))
    write_results(args.out, "summary", {"rows": rows, "environment": environment()}, text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
