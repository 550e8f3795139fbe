"""The paper's Tables 2 and 3 at 224 px from cached EfficientNet-Lite0 features.

Nizan & Tal, "k-NNN", WACV-W 2024, Table 2 (one class normal, the other
nine anomalous) and Table 3 (all classes but one normal), mean AUROC over the
10 classes, for Feature + k-NN and SPADE (image level) with k-NN and k-NNN.
PANDA, which fine-tunes the backbone, is run by ``bench_images_panda.py``.

Declared up front
-----------------
- Features: EfficientNet-Lite0 (the ImageNet weights that install offline;
  the paper used ResNet-18 for Feature and WideResNet-50-2 for SPADE),
  ``ImageFeatureExtractor(image_size=224)``, global average pooled, 1280-d,
  float32, read from ``--cache`` (``<ds>_test.npz``, ``<ds>_train1000.npz``
  and, when present, ``<ds>_trainrest.npz``; each with ``X``, ``y`` and
  ``idx`` into the official split). Written by ``--extract`` (or any job
  that writes the same files).
- Protocol: the full official test set (10,000 images). Training: every
  training image of the normal class(es) when ``<ds>_trainrest.npz`` is
  there (the paper's protocol), else the seeded subsample of 1,000 per class
  (``nonn.vision.datasets``' ``n_per_class=1000, random_state=0``). The
  scale used is written into every result row and the summary.
- Systems at image level: Feature (k = 3) and SPADE (k = 50: SPADE's image
  score is the k-NN distance of the pooled feature; the paper's k-NNN
  variant replaces that operator). The pixel maps play no part in these
  tables.
- Operators (each row says which): ``knn`` Euclidean k-NN (mean distance,
  the paper's), ``knn_l2`` k-NN of unit-length features (cosine), ``knnn``
  ``KNNN(n_neighbors=k)`` with the library's defaults as they are when
  run (every resolved parameter is recorded), ``knnn_paper`` the
  paper-exact operator (K' = 25, L = 5, sum), ``knnn_embed`` the embedding
  recipe ``KNNN(normalize='l2', whiten='auto', eig_floor='auto',
  set_size='all')``.
- Deterministic given the features (no seeds): k-NN and k-NNN have no
  randomness here.

Every finished (dataset, table, class, system, operator) is appended to
``results.csv`` at once, and a rerun skips what is there, so an interrupted
run resumes. ``summary.md`` is rewritten after every class.

Run::

    nice -n 10 python benchmarks/bench_images_full.py \
        --cache /work/cache/effnet224 --out benchmarks/results/images/full224
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

PAPER = {
    ("cifar10", 2): {"Feature": (0.841, 0.871), "SPADE": (0.893, 0.922)},
    ("fashion", 2): {"Feature": (0.935, 0.936), "SPADE": (0.911, 0.919)},
    ("cifar10", 3): {"Feature": (0.662, 0.719), "SPADE": (0.694, 0.667)},
    ("fashion", 3): {"Feature": (0.760, 0.780), "SPADE": (0.729, 0.739)},
}
NAMES = {"cifar10": "CIFAR-10", "fashion": "Fashion-MNIST"}
SYSTEMS = (("Feature", 3), ("SPADE", 50))
FIELDS = ["dataset", "table", "class", "system", "operator", "auroc", "n_train", "n_test",
          "scale", "fit_s", "score_s", "params"]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def operator(name, k):
    from nonn import KNN, KNNN

    if name == "knn":
        return KNN(n_neighbors=k)
    if name == "knn_l2":
        return KNN(n_neighbors=k, normalize="l2")
    if name == "knnn":
        return KNNN(n_neighbors=k)
    if name == "knnn_paper":
        return KNNN(n_neighbors=k, n_neighbors_of_neighbors=25, set_size=5, aggregate="sum")
    if name == "knnn_embed":
        return KNNN(n_neighbors=k, normalize="l2", whiten="auto", eig_floor="auto",
                    set_size="all")
    raise ValueError(f"unknown operator {name!r}")


def resolved(det):
    """The parameters a fitted detector used (the "auto" ones resolved)."""
    keys = ("n_neighbors_", "n_neighbors_of_neighbors_", "set_size_", "eig_floor_rel_",
            "normalize_", "whiten_")
    p = {k.rstrip("_"): getattr(det, k) for k in keys if hasattr(det, k)}
    p.update({k: v for k, v in det.get_params().items()
              if k in ("aggregate", "metric") and v is not None})
    return ";".join(f"{k}={v}" for k, v in p.items())


def load_features(cache, ds):
    cache = Path(cache)
    te = np.load(cache / f"{ds}_test.npz")
    parts = [np.load(cache / f"{ds}_train1000.npz")]
    rest = cache / f"{ds}_trainrest.npz"
    if rest.is_file():
        parts.append(np.load(rest))
        scale = "all training images"
    else:
        scale = "1000 training images per class (seed 0)"
    Xtr = np.concatenate([p["X"] for p in parts]).astype(np.float32)
    ytr = np.concatenate([p["y"] for p in parts]).astype(np.int64)
    idx = np.concatenate([p["idx"] for p in parts])
    if len(np.unique(idx)) != len(idx):
        raise ValueError(f"{ds}: the cached training parts overlap")
    return Xtr, ytr, te["X"].astype(np.float32), te["y"].astype(np.int64), scale


def done_keys(path):
    if not path.is_file():
        return set(), []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {(r["dataset"], r["table"], r["class"], r["system"], r["operator"]) for r in rows}, rows


def summarise(rows, out, total_s, operators):
    def mean(sel):
        return float(np.mean([float(r["auroc"]) for r in sel])) if sel else None

    lines = ["# The paper's Tables 2 and 3 at 224 px (EfficientNet-Lite0 pooled features)", "",
             f"`python benchmarks/bench_images_full.py {' '.join(sys.argv[1:])}`; "
             f"compute in this run {total_s / 60:.1f} min (the feature extraction is not "
             "included; see the cache's log). Mean AUROC over the classes done "
             "(n/10 says how many).", ""]
    for table in (2, 3):
        sel_t = [r for r in rows if int(r["table"]) == table]
        if not sel_t:
            continue
        lines += [f"## Table {table} — " + ("one class normal, the rest anomalous" if table == 2
                                            else "all classes but one normal"), "",
                  "| dataset | system | training scale | " + " | ".join(operators)
                  + " | paper k-NN | paper k-NNN |",
                  "|---|---|---|" + "---|" * (len(operators) + 2)]
        for ds in NAMES:
            for system, _ in SYSTEMS:
                sel = [r for r in sel_t if r["dataset"] == ds and r["system"] == system]
                if not sel:
                    continue
                cells = []
                for op in operators:
                    s = [r for r in sel if r["operator"] == op]
                    m = mean(s)
                    cells.append("—" if m is None else f"{m:.3f} ({len(s)}/10)")
                p = PAPER.get((ds, table), {}).get(system, (None, None))
                lines.append(f"| {NAMES[ds]} | {system} | {sel[0]['scale']} | "
                             + " | ".join(cells) + f" | {p[0]} | {p[1]} |")
        lines.append("")
    lines += ["Per-class AUROC, timings and every resolved operator parameter: "
              "`results.csv`.", ""]
    (out / "summary.md").write_text("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default=os.environ.get("NONN_FEATURE_CACHE",
                                                      "/work/cache/effnet224"))
    ap.add_argument("--out", default="benchmarks/results/images/full224")
    ap.add_argument("--datasets", default="cifar10,fashion")
    ap.add_argument("--tables", default="2,3")
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--operators", default="knn,knn_l2,knnn,knnn_embed")
    ap.add_argument("--systems", default="Feature,SPADE")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.csv"
    done, rows = done_keys(path)
    operators = args.operators.split(",")
    systems = [s for s in SYSTEMS if s[0] in args.systems.split(",")]
    t_start = time.perf_counter()
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            w.writeheader()
        # Feature (cheap) for every dataset and table first, then SPADE (k = 50:
        # a k-NNN fit with its held-out threshold takes minutes)
        data = {}
        for system, k in systems:
            for ds in args.datasets.split(","):
                if ds not in data:
                    try:
                        data[ds] = load_features(args.cache, ds)
                    except FileNotFoundError as exc:
                        log(f"{ds}: no cached features yet ({exc}); skipped")
                        data[ds] = None
                if data[ds] is None:
                    continue
                Xtr, ytr, Xte, yte, scale = data[ds]
                log(f"{system} {ds}: train {Xtr.shape} ({scale}), test {Xte.shape}")
                for table in (int(t) for t in args.tables.split(",")):
                    for c in (int(c) for c in args.classes.split(",")):
                        if table == 2:
                            tr, lab = np.flatnonzero(ytr == c), (yte != c).astype(int)
                        else:
                            tr, lab = np.flatnonzero(ytr != c), (yte == c).astype(int)
                        for op in operators:
                            key = (ds, str(table), str(c), system, op)
                            if key in done:
                                continue
                            det = operator(op, k)
                            t0 = time.perf_counter()
                            det.fit(Xtr[tr])
                            t1 = time.perf_counter()
                            s = det.anomaly_score(Xte)
                            t2 = time.perf_counter()
                            row = {"dataset": ds, "table": table, "class": c,
                                   "system": system, "operator": op,
                                   "auroc": f"{roc_auc_score(lab, s):.5f}",
                                   "n_train": len(tr), "n_test": len(lab), "scale": scale,
                                   "fit_s": f"{t1 - t0:.2f}", "score_s": f"{t2 - t1:.2f}",
                                   "params": resolved(det)}
                            w.writerow(row)
                            fh.flush()
                            rows.append({k_: str(v) for k_, v in row.items()})
                            done.add(key)
                            log(f"  T{table} {ds} class {c} {system} {op}: {row['auroc']} "
                                f"(fit {t1 - t0:.1f} s, score {t2 - t1:.1f} s)")
                        summarise(rows, out, time.perf_counter() - t_start, operators)
    summarise(rows, out, time.perf_counter() - t_start, operators)
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
