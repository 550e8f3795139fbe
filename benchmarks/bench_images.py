#!/usr/bin/env python
"""The paper's Tables 2 and 3 on images (k-NN vs k-NNN), offline backbone:
Feature, SPADE and PANDA at reduced size, or (``--full224``) Feature and
SPADE on 224-px features of every image (extracted once, cached).
Protocols: benchmarks/README.md.

Usage::

    python benchmarks/bench_images.py --tables 2,3 --cache /tmp/fresh_cache \
        --out benchmarks/results/images/full_uncached
    nice -n 19 python benchmarks/bench_images.py --timing-only --out benchmarks/results/images
    python benchmarks/bench_images.py --full224 --datasets cifar10,fashion
    python benchmarks/bench_images.py --quick --datasets mnist --tables 2 --classes 0,1 \
        --no-timing --no-panda --out /tmp/img                                  # smoke
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

SIZE = {"cifar10": 96, "fashion": 64, "mnist": 64}
N_TRAIN, N_TEST, N_TRAIN_T3 = 500, 100, 250
PANDA_EPOCHS, PANDA_LR, PANDA_MAX_TRAIN = 2, 1e-4, 500
SYSTEMS = {"Feature": 3, "SPADE": 50, "PANDA": 2}
#: the paper's AUROC, (dataset, table) -> system -> (k-NN, k-NNN)
PAPER = {
    ("cifar10", 2): {"Feature": (0.841, 0.871), "SPADE": (0.893, 0.922), "PANDA": (0.939, 0.943)},
    ("fashion", 2): {"Feature": (0.935, 0.936), "SPADE": (0.911, 0.919), "PANDA": (0.954, 0.958)},
    ("cifar10", 3): {"Feature": (0.662, 0.719), "SPADE": (0.694, 0.667), "PANDA": (0.599, 0.610)},
    ("fashion", 3): {"Feature": (0.760, 0.780), "SPADE": (0.729, 0.739), "PANDA": (0.683, 0.698)},
}
NAMES = {"cifar10": "CIFAR-10", "fashion": "Fashion-MNIST", "mnist": "MNIST"}
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


def load_images(name, n_train, n_test):
    if name != "mnist":
        load = vds.load_cifar10 if name == "cifar10" else vds.load_fashion_mnist
        return (*load("train", n_per_class=n_train, random_state=0),
                *load("test", n_per_class=n_test, random_state=0))
    X, y = vds.load_mnist()  # one split: disjoint train and test parts
    rng = np.random.default_rng(0)
    perm = [rng.permutation(np.flatnonzero(y == c)) for c in range(10)]
    tr = np.sort(np.concatenate([p[n_test:n_test + n_train] for p in perm]))
    te = np.sort(np.concatenate([p[:n_test] for p in perm]))
    return X[tr], y[tr], X[te], y[te]


def trunk_features(name, X, part, args, timings):
    """The frozen trunk's output of images ``X`` (cached, float16)."""
    from nonn.vision.features import ImageFeatureExtractor, import_torch

    torch, size = import_torch(), SIZE[name]
    path = Path(args.cache) / f"{name}_{part}_s{size}_tr{args.n_train}_te{args.n_test}_trunk.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path).astype(np.float32))
    ext = ImageFeatureExtractor(image_size=size, batch_size=64, device="cpu",
                                verbose=sys.stderr.isatty()).fit()
    dt, Z = best_of(lambda: torch.cat([ext.transform_trunk(X[s:s + 1000])
                                       for s in range(0, len(X), 1000)]))
    timings.append((f"{name} {part}: trunk extraction at {size} px", len(X), dt))
    log(f"  extracted {part} trunk {tuple(Z.shape)} in {dt:.1f} s ({len(X) / dt:.0f} img/s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, Z.numpy().astype(np.float16))
    return Z


def pretrained_tail(Z):
    """Pooled features of the pretrained tail on cached trunk outputs."""
    import torch

    from nonn.vision.backbones import load_backbone

    bb = load_backbone("efficientnet_lite0")
    with torch.inference_mode():
        return np.concatenate([bb.pool(bb.run_stages(Z[s:s + 512], bb.tail_start)[0]).numpy()
                               for s in range(0, Z.shape[0], 512)])


def auroc_pair(k, Ftr, Fte, labels, args, timing=None):
    """``{"knn": AUROC, "knnn": AUROC}`` of the image systems' operators with ``k``."""
    from nonn.vision.systems import make_detector

    if args.normalize:  # unit-length features, what normalize=True does
        Ftr, Fte = (F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-30)
                    for F in (Ftr, Fte))
    out = {}
    for nn in ("knn", "knnn"):
        t_fit, det = best_of(lambda: make_detector(nn, k).fit(Ftr))
        t_score, s = best_of(lambda: det.anomaly_score(Fte))
        out[nn] = roc_auc_score(labels, s)
        if timing is not None:
            timing.append((nn, k, len(Ftr), len(Fte), t_fit, t_score))
    return out


def panda_features(Ztr_fit, Ztr, Zte, seed):
    """PANDA's fine-tuned tail (with its collapse guard) on cached trunk outputs."""
    from nonn.vision.features import ImageFeatureExtractor
    from nonn.vision.systems import PANDA, panda_finetune

    sys_ = PANDA(epochs=PANDA_EPOCHS, lr=PANDA_LR, random_state=seed, device="cpu",
                 verbose=False, batch_size=64)
    sys_.extractor_ = ImageFeatureExtractor(device="cpu", verbose=False).fit()
    sys_.history_ = panda_finetune(sys_.extractor_.backbone_, Ztr_fit, epochs=PANDA_EPOCHS,
                                   lr=PANDA_LR, batch_size=64, random_state=seed)
    return sys_.features_from_trunk(Ztr), sys_.features_from_trunk(Zte), sys_.history_


def run_dataset(name, args, rows, timings, fit_timing):
    Xtr, ytr, Xte, yte = load_images(name, args.n_train, args.n_test)
    log(f"{NAMES[name]}: train {Xtr.shape}, test {Xte.shape}")
    Ztr = trunk_features(name, Xtr, "train", args, timings)
    Zte = trunk_features(name, Xte, "test", args, timings)
    Ftr, Fte = pretrained_tail(Ztr), pretrained_tail(Zte)
    rng = np.random.default_rng(0)
    for table in args.tables:
        for c in args.classes:
            t0 = time.perf_counter()
            tr, lab = split(table, ytr, yte, c)
            if table == 3:  # N_TRAIN_T3 per normal class
                tr = np.sort(np.concatenate([rng.permutation(tr[ytr[tr] == k])[:args.n_train_t3]
                                             for k in np.unique(ytr[tr])]))
            res = {"Feature": auroc_pair(3, Ftr[tr], Fte, lab, args,
                                         fit_timing if table == 2 else None),
                   "SPADE": auroc_pair(50, Ftr[tr], Fte, lab, args)}
            note = ""
            if not args.no_panda:
                fit_idx = rng.permutation(tr)[:PANDA_MAX_TRAIN]
                Ptr, Pte, hist = panda_features(Ztr[fit_idx], Ztr[tr], Zte, seed=c)
                res["PANDA"] = auroc_pair(2, Ptr, Pte, lab, args)
                undone = sum(bool(h.get("collapsed")) for h in hist)
                kept = [h for h in hist[1:] if not h.get("collapsed")]
                if undone:
                    note = (f"  [PANDA: {undone} collapsed epoch(s) undone, "
                            + (f"lr {kept[-1]['lr']:g}]" if kept else "pretrained tail kept]"))
            rows += [{"dataset": name, "table": table, "class": c, "system": s,
                      "knn": r["knn"], "knnn": r["knnn"], "n_train": len(tr),
                      "n_test": len(lab)} for s, r in res.items()]
            log(f"  table {table} class {c}: " + "  ".join(
                f"{s} {r['knn']:.3f}->{r['knnn']:.3f}" for s, r in res.items())
                + f"  ({time.perf_counter() - t0:.1f} s)" + note)


def summarise(rows, timings, fit_timing, args, total_s):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    summary = []
    for name, table in sorted({(r["dataset"], r["table"]) for r in rows}, key=lambda t: t[::-1]):
        for system in SYSTEMS:
            sel = [r for r in rows if (r["dataset"], r["table"], r["system"]) ==
                   (name, table, system)]
            if sel:
                knn, knnn = (float(np.mean([r[o] for r in sel])) for o in ("knn", "knnn"))
                p = PAPER.get((name, table), {}).get(system, (None, None))
                wins = f"{sum(r['knnn'] >= r['knn'] for r in sel)}/{len(sel)}"
                summary.append({"table": table, "dataset": name, "system": system, "knn": knn,
                                "knnn": knnn, "delta": knnn - knn, "knnn_wins": wins,
                                "paper_knn": p[0], "paper_knnn": p[1]})
    write_csv(out / "summary.csv", summary)
    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["# Image benchmark: the paper's Tables 2 and 3, k-NN vs k-NNN", "",
             f"Produced by `python benchmarks/bench_images.py {' '.join(sys.argv[1:])}` in "
             f"{total_s / 60:.1f} min. Backbone EfficientNet-Lite0 for all three systems (not "
             "the paper's), at " + ", ".join(f"{NAMES[k]} {v} px" for k, v in SIZE.items())
             + f"; {args.n_train} training images per class ({args.n_train_t3} per normal class "
             f"in Table 3), {args.n_test} test images per class, one seed; features "
             + ("unit length" if args.normalize else "raw") + ". Compare k-NN with k-NNN "
             "within a row (protocol: benchmarks/README.md).", ""]
    for table in sorted({s["table"] for s in summary}):
        lines += [f"## {TABLE[table]} (mean AUROC over classes)", "", markdown_table(
            ["dataset", "system", "ours k-NN", "ours k-NNN", "Δ", "k-NNN ≥ k-NN",
             "paper k-NN", "paper k-NNN"],
            [[NAMES[s["dataset"]], s["system"], f"{s['knn']:.3f}", f"{s['knnn']:.3f}",
              f"{s['delta']:+.3f}", s["knnn_wins"], f(s["paper_knn"]), f(s["paper_knnn"])]
             for s in summary if s["table"] == table]), ""]
    steps = list(timings) + [
        (f"{nn.upper()} {what} (k=3, Table 2{' fits' * (i == 0)})", sum(t[2 + i] for t in sel),
         sum(t[4 + i] for t in sel)) for nn in ("knn", "knnn")
        for sel in [[t for t in fit_timing if t[0] == nn]] if sel
        for i, what in enumerate(("fit", "score"))]
    lines += ["## Time per image (this CPU)", "", markdown_table(
        ["step", "images", "seconds", "s / image"],
        [[w, n, f"{dt:.1f}", f"{dt / n:.4f}"] for w, n, dt in steps]), ""]
    (out / "summary.md").write_text("\n".join(lines))
    write_csv(out / "timings.csv", [{"step": w, "n_images": n, "seconds": f"{dt:.3f}",
                                     "seconds_per_image": f"{dt / n:.5f}"}
                                    for w, n, dt in steps] or [{"step": ""}])
    return "\n".join(lines)


def time_extraction(X=None, size=224, batch_size=32, warm=8):
    """``(label, images, seconds)`` of pooled-feature extraction at ``size`` px
    (default: 64 CIFAR-10 test images at 224 px)."""
    from nonn.vision.features import ImageFeatureExtractor

    X = vds.load_cifar10("test", n_per_class=7)[0][:64] if X is None else X
    ext = ImageFeatureExtractor(image_size=size, batch_size=batch_size, device="cpu",
                                verbose=False).fit()
    ext.transform(X[:warm])
    return (f"feature extraction at {size} px" + (" (default)" if size == 224 else ""),
            len(X), best_of(lambda: ext.transform(X))[0])


def timing_only(args):
    """Seconds per image: extraction at 224 px and at the benchmark sizes, and
    k-NN / k-NNN fit and score on real features (run on a quiet machine)."""
    from nonn.vision.features import ImageFeatureExtractor
    from nonn.vision.systems import make_detector

    X = vds.load_cifar10("train", n_per_class=100, random_state=1)[0]
    rows = [time_extraction()] + [time_extraction(X, s, 64, 16) for s in sorted(set(SIZE.values()))]
    ext = ImageFeatureExtractor(image_size=96, batch_size=64, device="cpu", verbose=False).fit()
    F = ext.transform(vds.load_cifar10("train", n_per_class=200, random_state=2)[0])
    FQ = ext.transform(vds.load_cifar10("test", n_per_class=100, random_state=2)[0])
    for nn in ("knn", "knnn"):
        make_detector(nn, 3).fit(F[:100])  # compile
        t_fit, det = best_of(lambda: make_detector(nn, 3).fit(F))
        rows += [(f"{nn.upper()} fit, k=3 ({len(F)} x {F.shape[1]} features)", len(F), t_fit),
                 (f"{nn.upper()} score, k=3", len(FQ), best_of(lambda: det.anomaly_score(FQ))[0])]
    md = "\n".join([
        "# Seconds per image (this CPU, torch threads = 2)", "",
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


def load_features(cache, ds):
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
            X0, y = (vds.load_cifar10 if ds == "cifar10" else vds.load_fashion_mnist)(part)
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
    return (*out, "all training images")


def summarise_full(rows, out, total_s, operators):
    lines = ["# The paper's Tables 2 and 3 at 224 px (EfficientNet-Lite0 pooled features)", "",
             f"`python benchmarks/bench_images.py {' '.join(sys.argv[1:])}`; compute in this "
             f"run {total_s / 60:.1f} min (feature extraction not included). Mean AUROC over "
             "the classes done (n/10 says how many).", ""]
    for table in (2, 3):
        body = []
        for ds in NAMES:
            for system in ("Feature", "SPADE"):
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
    # Feature (cheap) for every dataset and table first, then SPADE
    for system in args.systems.split(","):
        for ds in args.datasets.split(","):
            if ds not in data:
                try:
                    data[ds] = load_features(args.cache, ds)
                except FileNotFoundError as exc:
                    log(f"{ds}: no cached features ({exc}); skipped")
                    data[ds] = None
            if data[ds] is None:
                continue
            Xtr, ytr, Xte, yte, scale = data[ds]
            for table in args.tables:
                for c in args.classes:
                    tr, lab = split(table, ytr, yte, c)
                    for op in operators:
                        if (ds, str(table), str(c), system, op) in done:
                            continue
                        t_fit, det = best_of(lambda: operator(op, SYSTEMS[system]).fit(Xtr[tr]))
                        t_score, s = best_of(lambda: det.anomaly_score(Xte))
                        row = {"dataset": ds, "table": table, "class": c, "system": system,
                               "operator": op, "auroc": f"{roc_auc_score(lab, s):.5f}",
                               "n_train": len(tr), "n_test": len(lab), "scale": scale,
                               "fit_s": f"{t_fit:.2f}", "score_s": f"{t_score:.2f}",
                               "params": resolved(det)}
                        write_csv(path, [row], mode="a")
                        rows.append({k: str(v) for k, v in row.items()})
                        log(f"  T{table} {ds} class {c} {system} {op}: {row['auroc']}")
                    summarise_full(rows, out, time.perf_counter() - t_start, operators)
    summarise_full(rows, out, time.perf_counter() - t_start, operators)
    print((out / "summary.md").read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full224", action="store_true", help="cached 224-px features")
    ap.add_argument("--out", help="default benchmarks/results/images[/full224]")
    ap.add_argument("--cache", help="trunk cache ($NONN_BENCH_CACHE, ~/.cache/nonn-bench-images)"
                    "; --full224: features ($NONN_FEATURE_CACHE, /work/cache/effnet224)")
    ap.add_argument("--datasets", help="default cifar10,fashion,mnist (--full224: no mnist)")
    ap.add_argument("--tables", default="2,3")
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--operators", default="knn,knn_l2,knnn,knnn_paper", help="--full224")
    ap.add_argument("--systems", default="Feature,SPADE", help="--full224")
    ap.add_argument("--no-panda", action="store_true")
    ap.add_argument("--normalize", action="store_true", help="unit-length pooled features")
    ap.add_argument("--no-timing", action="store_true", help="no 224-px extraction timing")
    ap.add_argument("--timing-only", action="store_true", help="seconds per image only")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny subsample")
    args = ap.parse_args(argv)
    args.tables = [int(t) for t in args.tables.split(",")]
    args.classes = [int(c) for c in args.classes.split(",")]
    warnings.simplefilter("ignore")
    full = args.full224
    args.out = args.out or "benchmarks/results/images" + "/full224" * full
    args.cache = args.cache or (os.environ.get("NONN_FEATURE_CACHE", "/work/cache/effnet224")
                                if full else os.environ.get("NONN_BENCH_CACHE", os.path.expanduser(
                                    "~/.cache/nonn-bench-images")))
    args.datasets = args.datasets or "cifar10,fashion" + ",mnist" * (not full)
    if full:
        return full224(args)
    from nonn.vision.features import import_torch

    args.n_train, args.n_test, args.n_train_t3 = (60, 20, 30) if args.quick else (
        N_TRAIN, N_TEST, N_TRAIN_T3)
    import_torch().set_num_threads(2)
    if args.timing_only:
        return timing_only(args)
    t0, rows, timings, fit_timing = time.perf_counter(), [], [], []
    if not args.no_timing:
        timings.append(time_extraction())
    for name in args.datasets.split(","):
        run_dataset(name.strip(), args, rows, timings, fit_timing)
        md = summarise(rows, timings, fit_timing, args, time.perf_counter() - t0)  # kept if cut
    print(md)


if __name__ == "__main__":
    sys.exit(main())
