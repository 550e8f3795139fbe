"""Synthetic defects on real images: image AUROC, pixel AUROC and AUPRO of
SPADE's maps with k-NN vs k-NNN pixel matching, the image scores (global,
map, combined), and the coreset memory bank's memory/accuracy trade-off.

Declared up front
-----------------
- Normal images (three sets, each its own model):
  ``cifar_horse``: CIFAR-10 horses (32 x 32, JPEG as packed), 200 training
  images of the official training split, test images from the test split;
  ``fashion_tshirt``: Fashion-MNIST class 0 (28 x 28 grey) likewise;
  ``textures``: 128 x 128 crops of scikit-image's real texture photographs
  ``brick``, ``grass`` and ``gravel`` (512 x 512 grey, tiled with mirror
  padding so that crops straddle no seam), 70 training crops per texture,
  disjoint test crops (``--textures`` off when scikit-image is missing).
- Test set per normal set: ``N_TEST`` clean test images, and the same
  images with one defect each of every type, seeded (``random_state``), a
  ground-truth mask per defect:
  ``patch``: a square (1/4 of the image side) pasted from an image of
  another class (CIFAR: another class's test image; Fashion: a bag or
  sneaker; textures: another texture);
  ``scratch``: a 1-2 px wide straight line (length 1/2-3/4 side) of a
  random dark or bright colour, antialiased; mask: the pixels it changed
  by more than 25 grey levels;
  ``blotch``: an elliptic colour stain (axes 1/8-1/4 side), blended with
  a soft edge; mask: blend weight > 0.5;
  ``texture``: an elliptic region replaced by the same region of a crop of
  a different scikit-image texture (brick/grass/gravel; for the texture
  set, one of the other two); mask: the ellipse.
- Model: ``SPADE(nn=..., map_nn=...)`` with EfficientNet-Lite0 at 224 px,
  the library's other defaults, fitted on the normal training images;
  pyramids extracted once and cached under ``--cache``; every variant is
  scored from them (``SPADE.score_pyramids``).
- Image scores: ``global`` (the pooled-feature k-NN/k-NNN), ``map`` (top
  1 % mean of the map), ``map_max`` (its maximum), ``combined`` (global +
  map, each standardised by its held-out normal median/MAD).
- Metrics per defect type: image AUROC (clean vs. defective), pixel AUROC
  and AUPRO (PRO up to 30 % FPR) over the clean and defective images'
  maps at the images' own size.
- Coreset: ``coreset_ratio`` None (SPADE's per-query galleries of stored
  pyramids) vs. 0.1 and 0.01 (PatchCore's greedy k-center memory bank);
  memory per training image from the model file, image and pixel AUROC,
  and (``cifar_horse``) one-class CIFAR-10 AUROC (horses vs. ``N_OC`` test
  images of the other classes).

Run (about 75 min on 2 heavily shared cores, most of it the k-NNN pixel maps)::

    nice -n 10 python benchmarks/bench_defects.py --out benchmarks/results/images/defects
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from nonn.vision import datasets as vds
from nonn.vision.metrics import aupro, image_metrics, pixel_auroc
from nonn.vision.systems import _resize_map, _top_mean

N_TRAIN = 200
N_TEST = 50
N_OC = 180  # other-class test images for the one-class check (20 per class)
DEFECTS = ("patch", "scratch", "blotch", "texture")
TEXTURES = ("brick", "grass", "gravel")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------ images
def texture_photos():
    from skimage import data

    return {name: getattr(data, name)() for name in TEXTURES}


def crops(img, n, size, rng):
    """``n`` random ``size`` crops of a grey image tiled by mirroring."""
    big = np.pad(img, ((0, size), (0, size)), mode="reflect")
    out = []
    for _ in range(n):
        y, x = rng.integers(0, img.shape[0]), rng.integers(0, img.shape[1])
        out.append(np.repeat(big[y:y + size, x:x + size, None], 3, axis=2))
    return np.stack(out).astype(np.uint8)


def normal_sets(args):
    """name -> (train images, test images, donor images for pasted patches)."""
    sets = {}
    Xtr, _ = vds.load_cifar10("train", classes=[7], n_per_class=N_TRAIN, random_state=0)
    Xte, _ = vds.load_cifar10("test", classes=[7], n_per_class=N_TEST, random_state=0)
    Xoc, yoc = vds.load_cifar10("test", classes=[c for c in range(10) if c != 7],
                                n_per_class=N_OC // 9, random_state=1)
    sets["cifar_horse"] = (Xtr, Xte, Xoc)
    Ftr, _ = vds.load_fashion_mnist("train", classes=[0], n_per_class=N_TRAIN, random_state=0)
    Fte, _ = vds.load_fashion_mnist("test", classes=[0], n_per_class=N_TEST, random_state=0)
    Fdon, _ = vds.load_fashion_mnist("test", classes=[7, 8], n_per_class=50, random_state=1)
    rgb = lambda a: np.repeat(a[..., None], 3, axis=3)  # noqa: E731
    sets["fashion_tshirt"] = (rgb(Ftr), rgb(Fte), rgb(Fdon))
    if args.textures:
        photos = texture_photos()
        rng = np.random.default_rng(0)
        tr, te = [], []
        for name, img in photos.items():
            # training crops from the top half, test crops from the bottom
            half = img.shape[0] // 2
            tr.append(crops(img[:half], N_TRAIN // 3 + 3, 128, rng))
            te.append(crops(img[half:], N_TEST // 3 + 1, 128, rng))
        sets["textures"] = (np.concatenate(tr)[:N_TRAIN], np.concatenate(te)[:N_TEST], None)
    return sets


# ----------------------------------------------------------------- defects
def ellipse_mask(h, w, rng, lo, hi):
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    ay, ax = rng.uniform(lo, hi) * h, rng.uniform(lo, hi) * w
    t = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    return (u / ax) ** 2 + (v / ay) ** 2


def add_defect(img, kind, rng, donors, photos, own_texture=None):
    """A copy of ``img`` (H, W, 3 uint8) with one defect, and its mask."""
    h, w = img.shape[:2]
    out = img.astype(np.float64).copy()
    if kind == "patch":
        s = max(2, h // 4)
        y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        if donors is None:  # textures: a crop of another texture
            other = [t for t in TEXTURES if t != own_texture]
            src = crops(photos[other[rng.integers(len(other))]], 1, h, rng)[0]
        else:
            src = donors[rng.integers(len(donors))]
            if src.shape[:2] != (h, w):
                src = np.asarray(src)
        sy, sx = rng.integers(0, src.shape[0] - s + 1), rng.integers(0, src.shape[1] - s + 1)
        out[y:y + s, x:x + s] = src[sy:sy + s, sx:sx + s]
        mask = np.zeros((h, w), bool)
        mask[y:y + s, x:x + s] = True
    elif kind == "scratch":
        from skimage.draw import line_aa

        length = rng.uniform(0.5, 0.75) * h
        t = rng.uniform(0, np.pi)
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        dy, dx = np.sin(t) * length / 2, np.cos(t) * length / 2
        r0, c0, r1, c1 = (int(np.clip(v, 0, lim - 1)) for v, lim in
                          ((cy - dy, h), (cx - dx, w), (cy + dy, h), (cx + dx, w)))
        colour = np.array([235.0, 235, 225]) if rng.random() < 0.5 else np.array([20.0, 20, 30])
        width = 1 if h <= 64 else 2
        for off in range(width):
            rr, cc, val = line_aa(min(r0 + off, h - 1), c0, min(r1 + off, h - 1), c1)
            out[rr, cc] = (1 - val[:, None]) * out[rr, cc] + val[:, None] * colour
        mask = np.abs(out - img).max(axis=2) > 25
    elif kind == "blotch":
        e = ellipse_mask(h, w, rng, 0.125, 0.25)
        weight = np.clip(1.5 - e, 0, 1)  # soft edge: 1 inside, 0 beyond 1.5
        colour = rng.uniform(0, 255, 3)
        out = (1 - 0.8 * weight[..., None]) * out + 0.8 * weight[..., None] * colour
        mask = weight > 0.5
    elif kind == "texture":
        e = ellipse_mask(h, w, rng, 0.15, 0.3)
        other = [t for t in TEXTURES if t != own_texture]
        src = crops(photos[other[rng.integers(len(other))]], 1, max(h, 32), rng)[0]
        if src.shape[0] != h:
            from PIL import Image

            src = np.asarray(Image.fromarray(src).resize((w, h), Image.BILINEAR))
        mask = e <= 1
        out[mask] = src[mask]
    else:
        raise ValueError(kind)
    return np.clip(out, 0, 255).round().astype(np.uint8), mask


def test_images(name, test, donors, photos, seed):
    """[(images, masks, labels)] per defect type, clean images first."""
    rng = np.random.default_rng(seed)
    out = {}
    own = None
    for kind in DEFECTS:
        imgs, masks = [], []
        for i, img in enumerate(test):
            if name == "textures":
                own = TEXTURES[min(i * 3 // len(test), 2)]
            d, m = add_defect(img, kind, rng, donors, photos, own)
            imgs.append(d)
            masks.append(m)
        out[kind] = (np.stack(imgs), masks)
    return out


# ------------------------------------------------------------------ run
def pyramids(ext, X, map_size, cache, key):
    path = Path(cache) / f"{key}.npz"
    if path.is_file():
        z = np.load(path)
        return z["feats"], z["maps"]
    feats, maps = ext.transform_pyramid(X, map_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, feats=feats, maps=maps)
    return feats, maps


def model_bytes(system):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "m.nonn")
        system.save(p)
        return os.path.getsize(p)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/images/defects")
    ap.add_argument("--cache", default=os.environ.get(
        "NONN_BENCH_CACHE", os.path.expanduser("~/.cache/nonn-bench-images")) + "/defects")
    ap.add_argument("--sets", default="cifar_horse,fashion_tshirt,textures")
    ap.add_argument("--coreset", default="0.1,0.01")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-textures", dest="textures", action="store_false")
    ap.add_argument("--quick", action="store_true", help="smoke run on a few images")
    args = ap.parse_args(argv)
    global N_TRAIN, N_TEST, N_OC
    if args.quick:
        N_TRAIN, N_TEST, N_OC = 30, 9, 45
        args.cache += "_quick"
    warnings.simplefilter("ignore")
    import torch

    from nonn.vision import SPADE
    from nonn.vision.features import ImageFeatureExtractor

    torch.set_num_threads(2)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        photos = texture_photos()
    except ImportError:
        photos, args.textures = None, False
        log("scikit-image missing: no texture defects or texture set")
    sets = normal_sets(args)
    ext = ImageFeatureExtractor(image_size=224, batch_size=32, device="cpu",
                                verbose=False).fit()
    rows_path = out / "results.csv"
    rows = []
    for name in args.sets.split(","):
        train, test, donors = sets[name]
        defects = test_images(name, test, donors, photos, args.seed)
        log(f"{name}: train {train.shape}, test {test.shape}")
        ftr, mtr = pyramids(ext, train, 28, args.cache, f"{name}_train")
        fcl, mcl = pyramids(ext, test, 28, args.cache, f"{name}_clean_s{args.seed}")
        fdef = {k: pyramids(ext, v[0], 28, args.cache, f"{name}_{k}_s{args.seed}")
                for k, v in defects.items()}
        sizes = [t.shape[:2] for t in test]
        one_class = None
        if name == "cifar_horse":
            one_class = pyramids(ext, donors, 28, args.cache, "cifar_others")
        # k-NNN pixel maps cost ~3 s per image on the shared 2 cores: last
        variants = [("knnn", "knn", None), ("knn", "knn", None)]
        variants += [("knnn", "knn", float(r)) for r in args.coreset.split(",") if r]
        variants += [("knnn", "knnn", None)]
        for nn, map_nn, ratio in variants:
            t0 = time.perf_counter()
            # a k-NNN over the memory bank is refitted without each calibration
            # image's own locations: fewer calibration images keep that affordable
            spade = SPADE(nn=nn, map_nn=map_nn, coreset_ratio=ratio, image_score="global",
                          n_map_calibration=30 if (ratio and map_nn == "knnn") else 100,
                          device="cpu", verbose=False)
            spade.fit_features(ftr, mtr)
            fit_s = time.perf_counter() - t0
            size = model_bytes(spade)
            variant = f"nn={nn} map_nn={map_nn} coreset={ratio}"
            # the maps do not depend on the image score: score every image once,
            # then derive each image score from its global score and its map
            t1 = time.perf_counter()
            g_clean, m_clean = spade.score_pyramids(fcl, mcl)
            clean_s = time.perf_counter() - t1
            scored = {k: spade.score_pyramids(*fdef[k]) for k in DEFECTS}
            scored_oc = None if one_class is None else spade.score_pyramids(*one_class)
            pix = {}
            for kind in DEFECTS:
                all_maps = [_resize_map(m, hw, torch) for m, hw in
                            zip(list(m_clean) + list(scored[kind][1]), sizes + sizes)]
                all_masks = [np.zeros(hw, bool) for hw in sizes] + list(defects[kind][1])
                pix[kind] = (pixel_auroc(all_maps, all_masks), aupro(all_maps, all_masks))
            for mode in ("global", "map", "map_max", "combined"):
                spade.set_params(image_score="map" if mode == "map_max" else mode,
                                 map_score_q=0.0 if mode == "map_max" else 0.01)

                def image_score(glob, maps):
                    if mode == "global":
                        return np.asarray(glob)
                    cal, _ = spade._calibration()
                    return spade._combine(glob, [_top_mean(m, spade.map_score_q)
                                                 for m in maps], cal)

                s_clean = image_score(g_clean, m_clean)
                oc = None
                if scored_oc is not None:
                    s_oc = image_score(*scored_oc)
                    oc = image_metrics(np.r_[s_clean, s_oc],
                                       np.r_[np.zeros(len(s_clean)), np.ones(len(s_oc))])
                for kind in DEFECTS:
                    s_def = image_score(*scored[kind])
                    im = image_metrics(np.r_[s_clean, s_def],
                                       np.r_[np.zeros(len(s_clean)), np.ones(len(s_def))])
                    row = {"set": name, "defect": kind, "nn": nn, "map_nn": map_nn,
                           "coreset": ratio, "image_score": mode,
                           "image_auroc": round(im["auroc"], 4), "image_ap": round(im["ap"], 4),
                           "one_class_auroc": None if oc is None else round(oc["auroc"], 4),
                           "pixel_auroc": round(pix[kind][0], 4),
                           "aupro30": round(pix[kind][1], 4),
                           "model_bytes": size, "bytes_per_image": size // len(train),
                           "fit_s": round(fit_s, 1),
                           "score_s_per_image": round(clean_s / len(test), 3)}
                    rows.append(row)
                log(f"  {variant} score={mode}: image AUROC " + " ".join(
                    f"{r['defect']} {r['image_auroc']:.3f}" for r in rows[-len(DEFECTS):])
                    + ("" if oc is None else f"  one-class {oc['auroc']:.3f}")
                    + (f"  pixel AUROC {np.mean([r['pixel_auroc'] for r in rows[-4:]]):.3f}"
                       f" AUPRO {np.mean([r['aupro30'] for r in rows[-4:]]):.3f}"
                       if mode == "global" else "")
                    + f"  [{size / 2**20:.1f} MiB, fit {fit_s:.0f} s]")
            fields = list(dict.fromkeys(k for r in rows for k in r))
            with open(rows_path, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=fields)
                w.writeheader()
                w.writerows(rows)
            write_summary(rows, out, time.perf_counter() - t_start, quiet=True)
    write_summary(rows, out, time.perf_counter() - t_start)
    return 0


def write_summary(rows, out, total_s, quiet=False):
    lines = ["# Synthetic defects on real images: SPADE maps, k-NN vs k-NNN", "",
             f"`python benchmarks/bench_defects.py {' '.join(sys.argv[1:])}` in "
             f"{total_s / 60:.1f} min (2 shared CPU cores). See the script's docstring for "
             "the sets and defects.", "",
             "## Maps (pixel AUROC / AUPRO up to 30 % FPR), per defect type", "",
             "| set | nn / map_nn / coreset | " + " | ".join(DEFECTS) + " | mean |",
             "|---|---|" + "---|" * (len(DEFECTS) + 1)]
    groups = {}
    for r in rows:
        groups.setdefault((r["set"], r["nn"], r["map_nn"], r["coreset"]), []).append(r)
    for (s, nn, mnn, c), rs in groups.items():
        g = {r["defect"]: r for r in rs if r["image_score"] == "global"}
        cells = [f"{g[d]['pixel_auroc']:.3f} / {g[d]['aupro30']:.3f}" for d in DEFECTS]
        lines.append(f"| {s} | {nn} / {mnn} / {c} | " + " | ".join(cells) +
                     f" | {np.mean([g[d]['pixel_auroc'] for d in DEFECTS]):.3f} / "
                     f"{np.mean([g[d]['aupro30'] for d in DEFECTS]):.3f} |")
    lines += ["", "## Image AUROC (clean vs. defective) by image score", "",
              "| set | nn / map_nn / coreset | image score | " + " | ".join(DEFECTS)
              + " | one-class CIFAR-10 |", "|---|---|---|" + "---|" * (len(DEFECTS) + 1)]
    for (s, nn, mnn, c), rs in groups.items():
        for mode in ("global", "map", "map_max", "combined"):
            g = {r["defect"]: r for r in rs if r["image_score"] == mode}
            oc = g[DEFECTS[0]]["one_class_auroc"]
            lines.append(f"| {s} | {nn} / {mnn} / {c} | {mode} | "
                         + " | ".join(f"{g[d]['image_auroc']:.3f}" for d in DEFECTS)
                         + f" | {'—' if oc is None else f'{oc:.3f}'} |")
    lines += ["", "## Memory", "", "| set | nn / map_nn / coreset | model file | per training "
              "image | fit s | score s / image |", "|---|---|---|---|---|---|"]
    for (s, nn, mnn, c), rs in groups.items():
        r = rs[0]
        lines.append(f"| {s} | {nn} / {mnn} / {c} | {r['model_bytes'] / 2**20:.1f} MiB | "
                     f"{r['bytes_per_image'] / 1024:.0f} KiB | {r['fit_s']} | "
                     f"{r['score_s_per_image']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
