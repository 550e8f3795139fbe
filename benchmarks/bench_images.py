#!/usr/bin/env python
"""The paper's Tables 2 and 3 on images (k-NN vs k-NNN): Feature, SPADE's image
level and PANDA at the extractor's 224 px on every CIFAR-10 and Fashion-MNIST
image, features extracted once (onnxruntime) and cached. The reduced-size run
it replaced (96 / 64 px, sampled): ``git show 01133df:benchmarks/bench_images.py``.
Protocols: benchmarks/README.md.

Usage::

    python benchmarks/bench_images.py --datasets cifar10,fashion \
        --out benchmarks/results/images/full224_all
    python benchmarks/bench_images.py --systems PANDA --datasets cifar10 --tables 2
    nice -n 19 python benchmarks/bench_images.py --timing-only --out benchmarks/results/images
    python benchmarks/bench_images.py --quick --datasets fashion --tables 2 --classes 0 \
        --out /tmp/img                                                  # smoke
"""

import argparse
import csv
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_of, log, markdown_table  # noqa: E402

from nonn.vision import datasets as vds  # noqa: E402

PANDA_EPOCHS, PANDA_LR = 2, 1e-4
SYSTEMS = {"Feature": 3, "SPADE": 50, "PANDA": 2}
#: the paper's AUROC, (dataset, table) -> system -> (k-NN, k-NNN)
PAPER = {
    ("cifar10", 2): {"Feature": (0.841, 0.871), "SPADE": (0.893, 0.922), "PANDA": (0.939, 0.943)},
    ("fashion", 2): {"Feature": (0.935, 0.936), "SPADE": (0.911, 0.919), "PANDA": (0.954, 0.958)},
    ("cifar10", 3): {"Feature": (0.662, 0.719), "SPADE": (0.694, 0.667), "PANDA": (0.599, 0.610)},
    ("fashion", 3): {"Feature": (0.760, 0.780), "SPADE": (0.729, 0.739), "PANDA": (0.683, 0.698)},
}
NAMES = {"cifar10": "CIFAR-10", "fashion": "Fashion-MNIST"}
TABLE = {2: "Table 2 — one class normal, the rest anomalous",
         3: "Table 3 — all classes but one normal"}


def split(table, ytr, yte, c):
    """Training rows and test labels (1 = anomalous) of class ``c``'s run."""
    return (vds.one_class_split if table == 2 else vds.leave_one_class_out_split)(ytr, yte, c)


def write_csv(path, rows, mode="w"):
    with open(path, mode, newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if mode == "w" or fh.tell() == 0:
            w.writeheader()
        w.writerows(rows)


def images(ds, part, quick=False):
    """Every image of ``ds``'s split ``part`` and the labels (quick: 50 / 20 per class)."""
    load = vds.load_cifar10 if ds == "cifar10" else vds.load_fashion_mnist
    return load(part, **({"n_per_class": 50 if part == "train" else 20, "random_state": 0}
                         if quick else {}))


def panda_features(Ztr, Zte, seed):
    """PANDA's fine-tuned tail (with its collapse guard) on cached trunk outputs."""
    from nonn.vision.features import ImageFeatureExtractor
    from nonn.vision.systems import PANDA, panda_finetune

    sys_ = PANDA(epochs=PANDA_EPOCHS, lr=PANDA_LR, random_state=seed, device="cpu",
                 verbose=False, batch_size=64)
    sys_.extractor_ = ImageFeatureExtractor(device="cpu", verbose=False).fit()
    sys_.history_ = panda_finetune(sys_.extractor_.backbone_, Ztr, epochs=PANDA_EPOCHS,
                                   lr=PANDA_LR, batch_size=64, random_state=seed)
    return sys_.features_from_trunk(Ztr), sys_.features_from_trunk(Zte), sys_.history_


def timing_only(args):
    """Seconds per image on a quiet machine: extraction at 224 px in torch and
    in onnxruntime (the exported extractor), k-NN / k-NNN fit and score."""
    from nonn.vision.export import export_onnx, onnx_features
    from nonn.vision.features import ImageFeatureExtractor, import_torch
    from nonn.vision.systems import FeatureDetector, make_detector

    import_torch().set_num_threads(2)
    X = vds.load_cifar10("train", n_per_class=26, random_state=1)[0][:256]
    ext = ImageFeatureExtractor(batch_size=64, device="cpu", verbose=False).fit()
    onnx = Path(args.cache) / "timing.onnx"
    onnx.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(FeatureDetector(verbose=False).fit(X[:20]), onnx)
    ext.transform(X[:8]), onnx_features(onnx, X[:8], 224)  # warm-up
    rows = [("feature extraction, 224 px, torch", len(X), best_of(lambda: ext.transform(X))[0]),
            ("feature extraction, 224 px, onnxruntime", len(X),
             best_of(lambda: onnx_features(onnx, X, 224))[0])]
    F, FQ = (onnx_features(onnx, vds.load_cifar10(p, n_per_class=n, random_state=2)[0], 224)[0]
             for p, n in (("train", 100), ("test", 50)))
    for nn in ("knn", "knnn"):
        make_detector(nn, 3).fit(F[:100])  # compile
        t_fit, det = best_of(lambda: make_detector(nn, 3).fit(F))
        rows += [(f"{nn.upper()} fit, k=3 ({len(F)} x {F.shape[1]} features)", len(F), t_fit),
                 (f"{nn.upper()} score, k=3", len(FQ), best_of(lambda: det.anomaly_score(FQ))[0])]
    md = "\n".join([
        "# Seconds per image (this CPU, 2 threads)", "",
        f"`nice -n 19 python benchmarks/bench_images.py --timing-only --out {args.out}`", "",
        markdown_table(["step", "images", "seconds", "s / image"],
                       [[w, n, f"{dt:.2f}", f"{dt / n:.5f}"] for w, n, dt in rows]), "",
        "Paper (Sec. 5.2, AMD EPYC 7763): k-NNN pre-processing 0.074 s per training image; "
        "0.014 s per test image (k=3, K'=25); feature extraction not included.", ""])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "timings.md").write_text(md)
    print(md)


OPERATORS = {"knn": {}, "knn_l2": {"normalize": "l2"}, "knnn": {},
             "knnn_paper": dict(n_neighbors_of_neighbors=25, set_size=5, aggregate="sum"),
             "knnn_embed": dict(normalize="l2", whiten="auto", eig_floor="auto", set_size="all")}


def operator(name, k):
    import nonn

    return getattr(nonn, name.split("_")[0].upper())(n_neighbors=k, **OPERATORS[name])


def resolved(det):
    """The parameters a fitted detector used (the "auto" ones resolved)."""
    keys = ("n_neighbors_", "n_neighbors_of_neighbors_", "set_size_", "eig_floor_rel_",
            "normalize_", "whiten_")
    p = {k.rstrip("_"): getattr(det, k) for k in keys if hasattr(det, k)}
    p.update({k: v for k, v in det.get_params().items()
              if k in ("aggregate", "metric") and v is not None})
    return ";".join(f"{k}={v}" for k, v in p.items())


def load_features(cache, ds, quick=False):
    """Pooled 224-px features of every training and test image: cached
    (``{ds}_{train,test}.npz``, or an earlier cache's train1000 + trainrest),
    else extracted by the exported extractor in onnxruntime, and cached."""
    out = []
    for part in ("train", "test"):
        path = Path(cache) / f"{ds}_{part}.npz"
        parts = [Path(cache) / f"{ds}_train{s}.npz" for s in ("1000", "rest")]
        if not path.is_file() and part == "train" and all(p.is_file() for p in parts):
            z = [np.load(p) for p in parts]
            idx = np.concatenate([q["idx"] for q in z])
            if not np.array_equal(np.sort(idx), np.arange(len(idx))):
                raise ValueError(f"{ds}: the cached training parts overlap or miss images")
            X, y = (np.concatenate([q[k] for q in z])[np.argsort(idx)] for k in "Xy")
        elif not path.is_file():
            from nonn.vision.export import export_onnx, onnx_features
            from nonn.vision.systems import FeatureDetector
            X0, y = images(ds, part, quick)
            Path(cache).mkdir(parents=True, exist_ok=True)
            export_onnx(FeatureDetector(verbose=False).fit(X0[:20]), path.with_suffix(".onnx"))
            t = time.perf_counter()
            X = onnx_features(path.with_suffix(".onnx"), X0, 224)[0]
            log(f"{ds} {part}: {len(X)} images in {time.perf_counter() - t:.0f} s (onnxruntime)")
        if not path.is_file():
            np.savez(str(path) + ".tmp.npz", X=X, y=y)
            os.replace(str(path) + ".tmp.npz", path)
        z = np.load(path)
        out += [z["X"].astype(np.float32), z["y"].astype(np.int64)]
    return (*out, "50 training images per class" if quick else "all training images")


def load_trunks(cache, ds, quick=False):
    """The frozen trunk's 224-px output (before PANDA's tail) of every training
    and test image, float16, cached; else run by an ONNX export of the trunk."""
    from nonn.vision.backbones import load_backbone
    from nonn.vision.export import onnx_features
    from nonn.vision.features import import_torch

    torch, out = import_torch(), []
    for part in ("train", "test"):
        path = Path(cache) / f"{ds}_{part}_trunk.npy"
        if not path.is_file():
            bb, onnx = load_backbone("efficientnet_lite0").eval(), path.with_suffix(".onnx")
            path.parent.mkdir(parents=True, exist_ok=True)
            trunk = type("Trunk", (torch.nn.Module,), {"forward": lambda self, x: bb.run_stages(
                bb.preprocess(x), 0, bb.tail_start)[0]})()
            torch.onnx.export(trunk, (torch.zeros(2, 3, 224, 224),), str(onnx), dynamo=False,
                              input_names=["images"], dynamic_axes={"images": {0: "n"}})
            X0 = images(ds, part, quick)[0]
            t, Z = time.perf_counter(), None
            for s in range(0, len(X0), 5000):
                z = onnx_features(onnx, X0[s:s + 5000], 224)[0]
                if Z is None:
                    Z = np.lib.format.open_memmap(f"{path}.tmp.npy", "w+", np.float16,
                                                  (len(X0), *z.shape[1:]))
                Z[s:s + len(z)] = z
                log(f"{ds} {part} trunk: {s + len(z)}/{len(X0)} ({time.perf_counter() - t:.0f} s)")
            Z.flush()
            del Z
            os.replace(f"{path}.tmp.npy", path)
        out.append(np.load(path, mmap_mode="r"))
    return out


def class_features(system, data, trunks, tr, c):
    """Training and test features of class ``c``'s run, and notes (PANDA: fine-tuned
    on every training image of the run, its held-out split seeded by ``c``)."""
    Xtr, _, Xte, _, _ = data
    if system != "PANDA":
        return Xtr[tr], Xte, ""
    import torch

    t, (Ztr, Zte) = time.perf_counter(), (torch.from_numpy(np.asarray(Z[i], np.float32))
                                          for Z, i in zip(trunks, (tr, slice(None))))
    Ftr, Fte, hist = panda_features(Ztr, Zte, seed=c)
    undone = sum(bool(h.get("collapsed")) for h in hist)
    return Ftr, Fte, (f";finetune_s={time.perf_counter() - t:.0f}"
                      f";epochs_kept={len(hist) - 1 - undone};collapsed={undone}")


def summarise_full(rows, out, total_s, operators):
    lines = ["# The paper's Tables 2 and 3 at 224 px (EfficientNet-Lite0)", "",
             f"`python benchmarks/bench_images.py {' '.join(sys.argv[1:])}`; this run "
             f"{total_s / 60:.1f} min (with any extraction it made). Mean AUROC over the "
             "classes done (n/10 says how many).", ""]
    for table in (2, 3):
        body = []
        for ds in NAMES:
            for system in SYSTEMS:
                sel = [r for r in rows if (int(r["table"]), r["dataset"], r["system"]) ==
                       (table, ds, system)]
                if sel:
                    cells = [[float(r["auroc"]) for r in sel if r["operator"] == op]
                             for op in operators]
                    body.append([NAMES[ds], system, sel[0]["scale"]]
                                + [f"{np.mean(c):.3f} ({len(c)}/10)" if c else "—"
                                   for c in cells]
                                + list(PAPER.get((ds, table), {}).get(system, (None, None))))
        if body:
            lines += [f"## {TABLE[table]}", "", markdown_table(
                ["dataset", "system", "training scale", *operators, "paper k-NN",
                 "paper k-NNN"], body), ""]
    lines += ["Per-class AUROC, timings and every resolved operator parameter: "
              "`results.csv`.", ""]
    (out / "summary.md").write_text("\n".join(lines))


def full224(args):
    out, operators = Path(args.out), args.operators.split(",")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.csv"
    rows = list(csv.DictReader(open(path, newline=""))) if path.is_file() else []
    done = {(r["dataset"], r["table"], r["class"], r["system"], r["operator"]) for r in rows}
    t_start, data = time.perf_counter(), {}
    # the systems in the order given (Feature is cheap, PANDA fine-tunes per class)
    for system in args.systems.split(","):
        for ds in args.datasets.split(","):
            if ds not in data:
                try:
                    data[ds] = load_features(args.cache, ds, args.quick)
                except FileNotFoundError as exc:
                    log(f"{ds}: no cached features ({exc}); skipped")
                    data[ds] = None
            if data[ds] is None:
                continue
            trunks = load_trunks(args.cache, ds, args.quick) if system == "PANDA" else None
            for table in args.tables:
                for c in args.classes:
                    tr, lab = split(table, data[ds][1], data[ds][3], c)
                    F = None
                    for op in operators:
                        if (ds, str(table), str(c), system, op) in done:
                            continue
                        F = F or class_features(system, data[ds], trunks, tr, c)
                        t_fit, det = best_of(lambda: operator(op, SYSTEMS[system]).fit(F[0]))
                        t_score, s = best_of(lambda: det.anomaly_score(F[1]))
                        row = {"dataset": ds, "table": table, "class": c, "system": system,
                               "operator": op, "auroc": f"{roc_auc_score(lab, s):.5f}",
                               "n_train": len(tr), "n_test": len(lab), "scale": data[ds][4],
                               "fit_s": f"{t_fit:.2f}", "score_s": f"{t_score:.2f}",
                               "params": resolved(det) + F[2]}
                        write_csv(path, [row], mode="a")
                        rows.append({k: str(v) for k, v in row.items()})
                        log(f"  T{table} {ds} class {c} {system} {op}: {row['auroc']}")
                    summarise_full(rows, out, time.perf_counter() - t_start, operators)
    summarise_full(rows, out, time.perf_counter() - t_start, operators)
    print((out / "summary.md").read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/images/full224_all")
    ap.add_argument("--cache", help="features and trunks ($NONN_FEATURE_CACHE, "
                    "~/.cache/nonn-bench-images/224)")
    ap.add_argument("--datasets", default="cifar10,fashion")
    ap.add_argument("--tables", default="2,3")
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--operators", default="knn,knn_l2,knnn,knnn_paper")
    ap.add_argument("--systems", default="Feature,SPADE,PANDA")
    ap.add_argument("--full224", action="store_true", help="no effect (the only protocol now)")
    ap.add_argument("--timing-only", action="store_true", help="seconds per image only")
    ap.add_argument("--quick", action="store_true", help="smoke run: 50 / 20 images per class")
    args = ap.parse_args(argv)
    args.tables = [int(t) for t in args.tables.split(",")]
    args.classes = [int(c) for c in args.classes.split(",")]
    warnings.simplefilter("ignore")
    args.cache = Path(args.cache or os.environ.get("NONN_FEATURE_CACHE", os.path.expanduser(
        "~/.cache/nonn-bench-images/224"))) / ("quick" * args.quick)
    return timing_only(args) if args.timing_only else full224(args)


if __name__ == "__main__":
    sys.exit(main())
