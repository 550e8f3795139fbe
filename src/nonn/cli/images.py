"""The image commands of ``nonn`` (the ``vision`` extra)::

    nonn fit-images DIR -o MODEL [--system feature|spade] [--nn knnn|knn]
                    [--backbone NAME] [--weights FILE] [options]
    nonn score-images MODEL DIR_OR_FILES... -o SCORES.csv [--heatmaps OUTDIR]
                      [--map-nn knn|knnn] [--map-neighbors-of-neighbors KP]
    nonn eval-images MODEL TEST_DIR [--masks DIR] [-o OUTDIR]
    nonn make-defects DIR_OR_FILES... -o OUTDIR [--donors DIR] [--kinds K,...]
                      [--random-state N]
    nonn make-defects --preset cifar_horse|fashion_tshirt|textures -o OUTDIR
    nonn export MODEL -o MODEL.onnx

and the image-model half of ``nonn calibrate`` and ``nonn info``. This
module imports without torch; the commands load it when they run and say
how to install it when it is missing.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import time
from pathlib import Path

import numpy as np

from .. import _io
from .._base import conformal_pvalues, fdr_labels
from ..persistence import ModelFileError, read_meta
from ..vision.defects import KINDS, NEEDS_DONORS, PRESETS
from ._common import (add_progress_option, add_shared_options, array_bytes, flagged_how,
                      human_bytes, image_verbose, note, parse_contamination,
                      parse_grid, parse_nonnegative_int, parse_positive_int, phrased_in_flags,
                      print_arrays, print_calibrate, print_threshold, print_values,
                      threshold_summary, warn_few)

def _given_paths(sources):
    """The image files named on the command line (not those found in folders)."""
    return [("an input image", p) for p in sources if os.path.isfile(p)]


def require_vision():
    from ..vision.features import import_torch

    import_torch()
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise ImportError("nonn's image commands need Pillow: "
                          "pip install torch==2.13.0 \"nonn[vision]\"") from None


# --------------------------------------------------------------- fit-images
def _cmd_fit_images(args):
    require_vision()
    from ..vision import _images
    from ..vision.systems import SYSTEMS

    _io.check_output_folder(args.output)
    _io.check_not_an_input(args.output, _given_paths(args.images))
    images = []
    for src in args.images:
        images += _images.as_image_list(src)
    params = dict(nn=args.nn, backbone=args.backbone, weights=args.weights,
                  image_size=args.image_size, batch_size=args.batch_size, device=args.device,
                  verbose=image_verbose(args), contamination=args.contamination)
    if args.n_neighbors is not None:
        params["n_neighbors"] = args.n_neighbors
    if args.n_neighbors_of_neighbors is not None:
        params["n_neighbors_of_neighbors"] = args.n_neighbors_of_neighbors
    if args.normalize is not None:
        params["normalize"] = args.normalize
    spade_only = {"image_score": args.image_score, "coreset_ratio": args.coreset_ratio,
                  "map_score_q": args.map_score_q, "map_normalize": args.map_normalize,
                  "map_n_neighbors_of_neighbors": args.map_neighbors_of_neighbors,
                  "test_time_flip": True if args.test_time_flip else None,
                  "map_score_border": args.map_score_border, "gallery_grid": args.gallery_grid}
    if args.system == "spade":
        params["n_map_neighbors"] = args.map_neighbors
        params["map_size"] = args.map_size
        params["map_nn"] = args.map_nn
        # given options only; --map-normalize none means map_normalize=None
        params.update({k: None if v == "none" else v for k, v in spade_only.items()
                       if v is not None})
    elif args.map_nn != "knn" or any(v is not None for v in spade_only.values()):
        note("note: --map-nn, --map-neighbors-of-neighbors, --image-score, --map-score-q, "
             "--map-score-border, --map-normalize, --coreset-ratio, --test-time-flip and "
             "--gallery-grid apply "
             "to --system spade; ignored.")
    if args.layers is not None:
        if args.system != "feature":
            raise ValueError("--layers applies to --system feature.")
        params["layers"] = args.layers
    system = SYSTEMS[args.system](**params)
    start = time.perf_counter()
    system.fit(images)
    seconds = time.perf_counter() - start
    # a saved model does not print progress bars when a library user loads it
    system.set_params(verbose="auto")
    system.save(args.output)
    det = system.detector_
    print(f"fitted {type(system).__name__} ({args.nn}, backbone {args.backbone}) on "
          f"{len(images)} images in {seconds:.2f} s ({seconds / len(images):.3f} s/image)")
    print(f"  detector: {type(det).__name__}  offset_: {det.offset_:.6g}  "
          f"contamination_: {det.contamination_:g}")
    print(f"  saved to {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB)")
    return 0


# ------------------------------------------------------------- score-images
def _heatmap_names(paths):
    """Unique output stems for the input paths."""
    seen = {}
    names = []
    for p in paths:
        stem = Path(p).stem
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        names.append(stem if n == 0 else f"{stem}_{n}")
    return names


def refuse_detector_model(path):
    """A model from `nonn fit` (not an image model): name the command for it."""
    try:
        read_meta(path)
    except (ModelFileError, OSError):
        return
    raise ValueError(f"{path!r} is a detector model (from `nonn fit`), not an image model; "
                     f"score feature rows with it: nonn score {path} QUERIES -o SCORES")


def _cmd_score_images(args):
    if not args.output.lower().endswith(".csv"):
        raise ValueError(f"--output must be a .csv file; got {args.output!r}.")
    _io.check_output_folder(args.output)
    _io.check_not_an_input(args.output, [("MODEL", args.model)] + _given_paths(args.images))
    refuse_detector_model(args.model)
    require_vision()
    from ..vision import _images
    from ..vision.systems import SPADE, load

    system = load(args.model)
    if args.heatmaps is not None and not isinstance(system, SPADE):
        raise ValueError(f"--heatmaps needs a SPADE model (fit-images --system spade); "
                         f"{args.model!r} holds a {type(system).__name__}.")
    map_options = {"map_nn": args.map_nn,
                   "map_n_neighbors_of_neighbors": args.map_neighbors_of_neighbors}
    map_options = {k: v for k, v in map_options.items() if v is not None}
    if map_options and args.heatmaps is None:
        note("note: --map-nn and --map-neighbors-of-neighbors apply to --heatmaps; ignored.")
    elif map_options:
        system.set_params(**map_options)
    system.set_params(verbose=image_verbose(args))
    if args.device is not None:
        system.set_params(device=args.device)
    paths = []
    for src in args.images:
        paths += _images.as_image_list(src)
    start = time.perf_counter()
    maps = None
    if args.heatmaps is not None:
        anomaly, maps = system.score_with_maps(paths)
    else:
        anomaly = system.anomaly_score(paths)
    seconds = time.perf_counter() - start
    pvalues = conformal_pvalues(anomaly, system.calibration_scores_)
    if args.fdr is None:
        labels = system.labels_from_scores(anomaly)
    else:
        labels = fdr_labels(pvalues, args.fdr)

    def write(fh):
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        w = csv.writer(text)
        w.writerow(["path", "anomaly_score", "score_samples", "label", "p_value"])
        for p, a, lab, pv in zip(paths, anomaly, labels, pvalues):
            w.writerow([p, f"{float(a):.9g}", f"{-float(a):.9g}", int(lab), repr(float(pv))])
        text.flush()
        text.detach()  # leave the binary file to atomic_write

    _io.atomic_write(args.output, write)
    n_out = int((labels == -1).sum())
    print(f"scored {len(paths)} images with {type(system).__name__} in {seconds:.2f} s "
          f"({seconds / len(paths):.3f} s/image): {n_out} flagged as anomalies (label -1) "
          f"{flagged_how(system.detector_, args.fdr, len(paths))}")
    print(f"  wrote {args.output}")
    if maps is not None:
        from ..vision.render import save_pictures

        out = Path(args.heatmaps)
        out.mkdir(parents=True, exist_ok=True)
        # one absolute colour scale, set at fit from held-out normal images:
        # an image's picture does not depend on the others of the run
        median, threshold = system.map_median_, system.pixel_threshold_
        for p, name, m in zip(paths, _heatmap_names(paths), maps):
            save_pictures(str(out / name), _images.load_rgb(p), m, median, threshold)
            np.save(out / f"{name}_map.npy", m)
        n_mask = sum(int((m > threshold).any()) for m in maps)
        print(f"  wrote {len(maps)} pictures (<name>_heatmap.png: the image | the map over it), "
              f"masks (<name>_mask.png) and raw maps (<name>_map.npy) to {out} (pixel "
              f"matching {system.map_nn}; colour 0 = median normal pixel {median:.4g}, "
              f"mid-scale = pixel threshold {threshold:.4g}; {n_mask} images have pixels "
              "above it)")
    return 0


# -------------------------------------------------------------- eval-images
def _grid_tile(system, path, amap, size=160):
    """One tile of the worst-misses grid: the image, or (SPADE) its picture."""
    from PIL import Image

    from ..vision import _images

    img = _images.load_rgb(path)
    if amap is not None:
        from ..vision.render import render

        img = render(img, amap, system.map_median_, system.pixel_threshold_)[0]
    im = Image.fromarray(img)
    im.thumbnail((2 * size if amap is not None else size, size))
    return im


def _worst_grid(system, paths, labels, scores, maps, out, n=4):
    """A PNG of the ``n`` highest-scoring good images (false alarms) above
    the ``n`` lowest-scoring defective ones (misses), each captioned."""
    from PIL import Image, ImageDraw

    good = [i for i in np.argsort(-scores, kind="stable") if labels[i] == 0][:n]
    bad = [i for i in np.argsort(scores, kind="stable") if labels[i] == 1][:n]
    rows = [("highest-scoring good images (false alarms first)", good),
            ("lowest-scoring defective images (misses first)", bad)]
    tiles = {i: _grid_tile(system, paths[i], None if maps is None else maps[i])
             for _, idx in rows for i in idx}
    tw = max(t.size[0] for t in tiles.values()) + 8
    th = max(t.size[1] for t in tiles.values()) + 30
    canvas = Image.new("RGB", (max(1, n) * tw, len(rows) * (th + 18)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, idx) in enumerate(rows):
        y0 = r * (th + 18)
        draw.text((4, y0 + 2), title, fill="black")
        for c, i in enumerate(idx):
            canvas.paste(tiles[i], (c * tw + 4, y0 + 18))
            label = "good" if labels[i] == 0 else "defect"
            draw.text((c * tw + 4, y0 + 18 + tiles[i].size[1] + 2),
                      f"{Path(paths[i]).parent.name}/{Path(paths[i]).name}"[:28], fill="black")
            draw.text((c * tw + 4, y0 + 18 + tiles[i].size[1] + 14),
                      f"{label} score {scores[i]:.4g}", fill="black")
    canvas.save(out)


def _cmd_eval_images(args):
    out = os.path.abspath(args.output)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output {args.output!r} is a file; give a folder.")
    if not os.path.isdir(os.path.dirname(out)):
        raise FileNotFoundError(f"Cannot write to {args.output!r}: the folder "
                                f"{os.path.dirname(out)!r} does not exist.")
    refuse_detector_model(args.model)
    require_vision()
    from ..vision import datasets, metrics
    from ..vision.systems import SPADE, load

    paths, labels, defects, mask_paths = datasets.load_test_folder(args.test_dir, args.masks)
    system = load(args.model)
    system.set_params(verbose=image_verbose(args))
    if args.device is not None:
        system.set_params(device=args.device)
    is_spade = isinstance(system, SPADE)
    start = time.perf_counter()
    if is_spade:
        scores, maps = system.score_with_maps(paths)
    else:
        scores, maps = system.anomaly_score(paths), None
    seconds = time.perf_counter() - start
    scores = np.asarray(scores, dtype=np.float64)
    predicted = system.labels_from_scores(scores)
    rows = [("all", metrics.image_metrics(scores, labels), labels.sum(), (labels == 0).sum())]
    for d in sorted(set(defects) - {"good"}):
        sel = np.array([x in ("good", d) for x in defects])
        rows.append((d, metrics.image_metrics(scores[sel], labels[sel]),
                     int(labels[sel].sum()), int((labels[sel] == 0).sum())))
    pixel = None
    n_masks = sum(m is not None for m in mask_paths)
    if is_spade and n_masks:
        keep = [i for i in range(len(paths)) if labels[i] == 0 or mask_paths[i] is not None]
        gts = []
        for i in keep:
            shape = maps[i].shape
            gt = datasets.read_mask(mask_paths[i], shape)
            if gt.shape != shape:
                raise ValueError(f"The mask {mask_paths[i]!r} is {gt.shape[1]} x {gt.shape[0]} "
                                 f"pixels but its image {paths[i]!r} is {shape[1]} x "
                                 f"{shape[0]}.")
            gts.append(gt)

        def pixel_metrics(subset):
            idx = [j for j, i in enumerate(keep)
                   if subset == "all" or defects[i] in ("good", subset)]
            sub, sub_gts = [maps[keep[j]] for j in idx], [gts[j] for j in idx]
            return {"pixel_auroc": metrics.pixel_auroc(sub, sub_gts),
                    "aupro30": metrics.aupro(sub, sub_gts, max_fpr=0.3), "images": len(idx)}

        # overall, and per defect type against the good images (as the image metrics)
        pixel = {name: pixel_metrics(name) for name, *_ in rows}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    def write_scores(fh):
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        w = csv.writer(text)
        w.writerow(["path", "defect", "label", "anomaly_score", "predicted"])
        for p, d, y, s_, l_ in zip(paths, defects, labels, scores, predicted):
            w.writerow([p, d, int(y), f"{float(s_):.9g}", int(l_)])
        text.flush()
        text.detach()

    def write_metrics(fh):
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        w = csv.writer(text)
        w.writerow(["subset", "n_defective", "n_good", "image_auroc", "image_ap",
                    "pixel_auroc", "aupro_30"])
        for name, m, n_bad, n_good in rows:
            px = ["", ""] if pixel is None else [f"{pixel[name]['pixel_auroc']:.6g}",
                                                 f"{pixel[name]['aupro30']:.6g}"]
            w.writerow([name, int(n_bad), int(n_good), f"{m['auroc']:.6g}", f"{m['ap']:.6g}"]
                       + px)
        if pixel is not None:
            w.writerow([])
            w.writerow(["pixel_auroc", f"{pixel['all']['pixel_auroc']:.6g}"])
            w.writerow(["aupro_30", f"{pixel['all']['aupro30']:.6g}"])
        text.flush()
        text.detach()

    _io.atomic_write(str(out / "scores.csv"), write_scores)
    _io.atomic_write(str(out / "metrics.csv"), write_metrics)
    _worst_grid(system, paths, labels, scores, maps, out / "worst_misses.png", n=args.worst)
    n_good, n_bad = int((labels == 0).sum()), int(labels.sum())
    flagged = predicted == -1
    print(f"evaluated {len(paths)} images ({n_good} good, {n_bad} defective) with "
          f"{type(system).__name__} in {seconds:.2f} s")
    print(f"  image AUROC {rows[0][1]['auroc']:.4f}  AP {rows[0][1]['ap']:.4f}  at the model's "
          f"threshold: {int(flagged[labels == 1].sum())}/{n_bad} defective and "
          f"{int(flagged[labels == 0].sum())}/{n_good} good images flagged")
    for name, m, nb, ng in rows[1:]:
        px = "" if pixel is None else (f"  pixel AUROC {pixel[name]['pixel_auroc']:.4f}  "
                                       f"AUPRO {pixel[name]['aupro30']:.4f}")
        print(f"    {name:<20} AUROC {m['auroc']:.4f}  AP {m['ap']:.4f}{px}  ({nb} vs {ng} "
              "good)")
    if pixel is not None:
        print(f"  pixel AUROC {pixel['all']['pixel_auroc']:.4f}  AUPRO (FPR <= 30%) "
              f"{pixel['all']['aupro30']:.4f}  ({n_masks} masks)")
    elif is_spade:
        print("  no ground-truth masks found: no pixel metrics (give --masks DIR)")
    else:
        print("  pixel metrics need a SPADE model (fit-images --system spade)")
    print(f"  wrote {out / 'scores.csv'}, {out / 'metrics.csv'}, {out / 'worst_misses.png'}")
    return 0


# ------------------------------------------------------------- make-defects
def _parse_kinds(text):
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        raise argparse.ArgumentTypeError(
            f"expected defect kinds among {','.join(KINDS)} separated by commas, got {text!r}")
    return list(dict.fromkeys(kinds))


def _cmd_make_defects(args):
    from ..vision import _images, defects

    if (args.preset is None) == (not args.images):
        raise ValueError("Give the normal test images (folders or files) or --preset NAME"
                         + (", not both." if args.images else "."))
    if os.path.lexists(args.output):
        raise FileExistsError(f"--output {args.output!r} already exists; give a new folder.")
    _images._pil()  # Pillow writes the files: say how to install it before any work
    if args.preset is not None:
        if args.donors is not None:
            raise ValueError("--donors applies to your own images; a --preset brings its own.")
        kinds = args.kinds or list(KINDS)
        train, images, donors = defects.preset(args.preset, args.n_train, args.n_test,
                                               kinds=kinds, random_state=args.random_state)
    else:
        if args.n_train != 200 or args.n_test != 50:
            note("note: --n-train and --n-test apply to --preset; ignored.")
        train, images, donors = None, [], None
        for src in args.images:
            images += _images.as_image_list(src)
        if args.donors is not None:
            donors = _images.as_image_list(args.donors)
        pasted = [k for k in args.kinds or () if k in NEEDS_DONORS]
        if donors is None and pasted:
            raise ValueError(f"--kinds {','.join(pasted)}: pasted from donor images; give "
                             "--donors DIR (images of another class or texture) or leave "
                             "them out.")
        kinds = args.kinds or [k for k in KINDS if donors is not None or k not in NEEDS_DONORS]
        if args.kinds is None and donors is None:
            note("note: without --donors only scratch and blotch (patch and texture paste "
                 "from donor images)")
    start = time.perf_counter()
    defects.write_defect_set(args.output, images, kinds, donors, args.random_state,
                             train_images=train, verbose=image_verbose(args))
    seconds = time.perf_counter() - start
    out = args.output.rstrip("/")
    n = len(images)
    print(f"wrote {n} normal test images, clean and with one defect each of "
          f"{', '.join(kinds)} ({n * (1 + len(kinds))} images, {n * len(kinds)} masks), to "
          f"{out}/ in {seconds:.2f} s"
          f"{'' if train is None else f'; {len(train)} training images to {out}/train/good/'}")
    print(f"  {out}/test/good/, {out}/test/<kind>/, {out}/ground_truth/<kind>/<name>_mask.png "
          f"(random state {args.random_state})")
    if train is not None:
        print(f"  fit a model:     nonn fit-images {out}/train/good -o model.nonn --system spade")
    print(f"  measure a model: nonn eval-images MODEL {out}/test -o eval")
    return 0


# ------------------------------------------------------------------- export
def _cmd_export(args):
    if not args.output.lower().endswith(".onnx"):
        raise ValueError(f"--output must be a .onnx file; got {args.output!r}.")
    _io.check_output_folder(args.output)
    _io.check_not_an_input(args.output, [("MODEL", args.model)])
    refuse_detector_model(args.model)
    require_vision()
    from ..vision.export import export_onnx
    from ..vision.systems import load

    system = load(args.model)
    tmp = args.output + ".tmp.onnx"
    try:
        outputs = export_onnx(system, tmp, opset=args.opset)
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    s = system.image_size
    print(f"exported the feature extractor of {type(system).__name__} ({system.backbone}) to "
          f"{args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB, opset {args.opset})")
    print(f"  input:   images float32 (N, 3, {s}, {s}), RGB in [0, 255], resized to {s} x {s}")
    print(f"  outputs: {', '.join(outputs)} (the backbone's normalisation is inside)")
    print("  not included: image reading and resizing, normalize, the k-NN/k-NNN detector and "
          "its threshold, map matching and calibration (they stay in the .nonn model)")
    if getattr(system, "test_time_flip", False):
        print("  mirror:  this model averages every map with its mirror image's: run the "
              "flipped batch too (images[..., ::-1]) and pass its pyramid to "
              "score_pyramids(..., mirror_maps=...)")
    return 0


# ------------------------------------------------ calibrate and info (images)
def calibrate_image_model(args, output):
    """``nonn calibrate`` of a model written by ``nonn fit-images``."""
    from ..vision import _images
    from ..vision import systems as vision

    for flag, given in (("--key", args.key), ("--header", args.header != "auto")):
        if given:
            note(f"note: {flag} applies to tables, not to images; ignored.")
    require_vision()
    system = vision.load(args.model)
    system.set_params(verbose=image_verbose(args))
    if args.device is not None:
        system.set_params(device=args.device)
    paths = []
    for src in args.normals:
        paths += _images.as_image_list(src)
    before = threshold_summary(system.detector_)
    start = time.perf_counter()
    system.calibrate(paths, args.false_alarm_rate)
    seconds = time.perf_counter() - start
    warn_few(len(paths), args.false_alarm_rate, "images")
    # a saved model does not print progress bars when a library user loads it
    system.set_params(verbose="auto")
    system.save(output)
    print_calibrate(system, system.detector_, len(paths), "held-out normal images", seconds,
                    before, output)
    return 0


def info_image(args):
    """``nonn info`` of a model written by ``nonn fit-images``."""
    from ..vision import systems as vision

    meta = vision.read_meta(args.model)
    det = meta["detector"]
    params = meta["params"]
    arrays = meta["arrays"]
    fitted = det.get("fitted") or {}
    feats = arrays.get("train_features", {})
    n_train, dim = (list(feats.get("shape", [])) + [None, None])[:2]
    print(f"model:        {args.model} ({human_bytes(os.path.getsize(args.model))} on disk)")
    print(f"format:       {meta.get('format')} version {meta.get('format_version')} "
          "(image model, `nonn fit-images`)")
    print(f"nonn version: {meta.get('nonn_version') or det.get('nonn_version')}")
    print(f"system:       {meta.get('system')} (nn = {params.get('nn')}: "
          f"{det.get('estimator')} detector)")
    weights = params.get("weights")
    print(f"backbone:     {params.get('backbone')} "
          f"(weights: {weights if weights else 'the packaged/default file'})")
    size = params.get("image_size")
    print(f"image_size:   {size} x {size}")
    print(f"training:     {n_train} images, feature dimension {dim} "
          f"(normalize = {params.get('normalize')})")
    print_threshold(fitted, det.get("arrays"),
                    f"offset_ = {fitted.get('offset_')!r}, contamination_ = "
                    f"{fitted.get('contamination_')!r} (contamination = "
                    f"{params.get('contamination')!r})")
    if meta.get("system") == "SPADE":
        score = params.get("image_score", "global")
        border = params.get("map_score_border") or 0
        print(f"image score:  {score}" + (
            " (the detector's score of the pooled feature; offset_ above)" if score == "global"
            else f" (map_score_q = {params.get('map_score_q')}"
            + (f", map_score_border = {border} px" if border else "")
            + "; its threshold comes from the held-out map calibration, not the detector's "
            "offset_)"))
    maps = arrays.get("train_maps")
    bank = arrays.get("memory_bank")
    if bank is not None:
        shape, dtype, n = array_bytes(bank)
        print(f"pixel maps:   memory bank: {shape[0]} locations of {shape[1]} channels "
              f"(coreset_ratio = {params.get('coreset_ratio')}; {dtype.name}, "
              f"{human_bytes(n * dtype.itemsize)}); map_nn = {params.get('map_nn', 'knn')}, "
              f"sigma = {params.get('sigma')}")
    elif maps is not None:
        shape, dtype, n = array_bytes(maps)
        grid = params.get("gallery_grid")
        if grid is None:  # and files before it
            by = "the pooled feature"
        elif isinstance(grid, int) and not isinstance(grid, bool) and grid >= 1:
            by = f"a {min(grid, shape[2])} x {min(grid, shape[2])} grid of the pyramid"
        else:  # as the file says; loading it refuses it
            by = f"gallery_grid = {grid!r}"
        print(f"pixel maps:   stored: {shape[0]} pyramids of {shape[1]} channels x "
              f"{shape[2]} x {shape[3]} ({dtype.name}, {human_bytes(n * dtype.itemsize)}); "
              f"map_nn = {params.get('map_nn', 'knn')}, n_map_neighbors = "
              f"{params.get('n_map_neighbors')} (nearest by {by}), sigma = "
              f"{params.get('sigma')}")
    else:
        print(f"pixel maps:   none (a {meta.get('system')} stores no feature pyramids; "
              "fit with --system spade for heat maps)")
    print_values("params:", params)
    print(f"detector:     {det.get('estimator')} on {det.get('n_features_in')} features "
          f"({det.get('dtype')}), nonn-model version {det.get('format_version')}")
    print_values("  params:", det.get("params"), indent="    ")
    print_values("  fitted:", fitted, indent="    ")
    total = print_arrays("arrays:", arrays)
    total += print_arrays("  detector arrays:", det.get("arrays"), indent="    ")
    print(f"memory:       {human_bytes(total)} of arrays when loaded")
    if args.verify:
        vision.load(args.model)
        print("verified:     the model loads; every array matches its metadata (the zip's "
              "CRC-32 checked as it is read; the format has no other checksum), the "
              "detector passes the core checks, and the features, pyramids and "
              "detector agree in shape")
    return 0


# ----------------------------------------------------------------- register
def register(subparsers):
    """Add the image commands (fit-images, score-images, eval-images, export)
    to the ``nonn`` subcommands ``subparsers``."""
    fit = subparsers.add_parser(
        "fit-images", help="fit an image anomaly detector on a folder of normal images",
        description="Extract pretrained features of the normal (good) images in DIR and fit "
        "a nearest-neighbor detector on them; save the model (backbone name + detector "
        "arrays; never weights or pickle). Needs the vision extra: "
        "pip install torch==2.13.0 \"nonn[vision]\".")
    fit.add_argument("images", metavar="DIR", nargs="+",
                     help="folder(s) (searched recursively) or image files of normal images")
    fit.add_argument("-o", "--output", metavar="MODEL", required=True,
                     help="model file to write (for example good.nonn)")
    fit.add_argument("--system", choices=("feature", "spade"), default="feature",
                     help="feature: pooled features + k-NN/k-NNN; spade: also pixel heat maps "
                     "(stores every training image's feature pyramid) (default: feature)")
    fit.add_argument("--nn", choices=("knnn", "knn"), default="knnn",
                     help="nearest-neighbor operator (default: knnn, the paper's)")
    fit.add_argument("--backbone", default="efficientnet_lite0",
                     choices=("efficientnet_lite0", "resnet18", "resnet50", "wide_resnet50_2",
                              "dino_vits8"),
                     help="pretrained network (default: efficientnet_lite0, works offline; "
                     "the others need their weight file, see docs/vision.md)")
    fit.add_argument("--weights", metavar="FILE", help="weight file of the backbone")
    fit.add_argument("--image-size", type=parse_positive_int, default=224, metavar="PX",
                     help="images are resized to PX x PX (default: 224)")
    fit.add_argument("--batch-size", type=parse_positive_int, default=32, metavar="N")
    fit.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    fit.add_argument("--n-neighbors", type=parse_positive_int, metavar="K",
                     help="k (default: 3 for feature, 50 for spade)")
    fit.add_argument("--n-neighbors-of-neighbors", type=parse_positive_int, metavar="KP",
                     help="K' of k-NNN (default: KNNN's)")
    fit.add_argument("--contamination", type=parse_contamination, default="auto",
                     metavar="auto|FLOAT", help="share of training images flagged; sets the "
                     "label threshold (default: auto = 0.01)")
    fit.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                     help="scale pooled features to unit length before the detector (default: "
                     "on; measured better for k-NN and k-NNN with EfficientNet-Lite0, see "
                     "docs/vision.md; --no-normalize for raw features, as in the paper)")
    fit.add_argument("--layers", choices=("last", "multi"),
                     help="feature: the last pooled feature (default) or mid-level blocks "
                     "pooled and concatenated with it (multi)")
    fit.add_argument("--image-score", choices=("global", "map", "combined"),
                     help="spade: the image score: the pooled-feature score (global), the "
                     "mean of the heat map's top --map-score-q share (map), or both "
                     "standardised and summed (combined, the default)")
    fit.add_argument("--map-score-q", type=float, metavar="Q",
                     help="spade: share of the heat map's pixels averaged for its score, in "
                     "[0, 1); 0 = the maximum (default: 0.01; 0.05 with --image-score map "
                     "ranked pasted patches best, see docs/vision.md)")
    fit.add_argument("--map-score-border", type=parse_nonnegative_int, metavar="PX",
                     help="spade: pixels (at --image-size) along each edge that the heat map's "
                     "score leaves out; the maps keep them (default: 0)")
    fit.add_argument("--gallery-grid", type=parse_grid, metavar="G|none",
                     help="spade: choose each image's --map-neighbors gallery images by its "
                     "pyramid averaged over a G x G grid (like things in like places), or by "
                     "its pooled feature (none, SPADE's) (default: 4; see docs/vision.md)")
    fit.add_argument("--coreset-ratio", type=float, metavar="R",
                     help="spade: keep a greedy k-center coreset of this share (0 < R <= 1) of "
                     "all training locations as one memory bank (PatchCore), instead of every "
                     "training pyramid (default: keep every pyramid)")
    fit.add_argument("--map-normalize", choices=("soft", "none"),
                     help="spade: divide every pyramid location's feature v by sqrt(|v|^2 + "
                     "s^2), s the median training location norm, before matching (soft, the "
                     "default: evens out local contrast), or match raw features (none, "
                     "SPADE's)")
    fit.add_argument("--test-time-flip", action="store_true",
                     help="spade: map every image and its mirror image and average the two "
                     "maps (twice the map time; off where a mirror image is itself a defect; "
                     "see docs/vision.md)")
    fit.add_argument("--map-neighbors", type=parse_positive_int, default=20, metavar="N",
                     help="spade: normal images matched per query for the heat map (default: 20)")
    fit.add_argument("--map-size", type=parse_positive_int, default=28, metavar="M",
                     help="spade: side of the stored feature pyramids (default: 28)")
    fit.add_argument("--map-nn", choices=("knn", "knnn"), default="knn",
                     help="spade: pixel matching stored as the model's default for heat maps "
                     "(score-images --map-nn overrides it) (default: knn, SPADE's)")
    fit.add_argument("--map-neighbors-of-neighbors", type=parse_positive_int, metavar="KP",
                     help="spade: K' of the knnn pixel matching (default: 25)")
    add_shared_options(fit)
    fit.set_defaults(handler=phrased_in_flags(_cmd_fit_images))

    score = subparsers.add_parser(
        "score-images", help="score images with a model from fit-images",
        description="Score images and write one CSV row per image: path, anomaly_score "
        "(higher = more anomalous), score_samples (= -anomaly_score), label (+1 normal, "
        "-1 anomaly, by the model's threshold, or with --fdr at a false-discovery rate) and "
        "p_value (the share of the model's calibration normals scoring at least as high; "
        "small = unusual). With --heatmaps (spade models), also write a picture (the image "
        "beside its map, on the model's absolute colour scale), a binary mask PNG of the "
        "pixels above the model's pixel threshold, and the raw map (.npy) per image.")
    score.add_argument("model", metavar="MODEL", help="model file written by `nonn fit-images`")
    score.add_argument("images", metavar="DIR_OR_FILES", nargs="+",
                       help="folder(s) (searched recursively) or image files")
    score.add_argument("-o", "--output", metavar="SCORES.csv", required=True,
                       help="CSV file to write")
    score.add_argument("--heatmaps", metavar="OUTDIR",
                       help="write <name>_heatmap.png (image | map over it), <name>_mask.png and "
                       "<name>_map.npy per image (spade)")
    score.add_argument("--map-nn", choices=("knn", "knnn"),
                       help="pixel matching of the heat maps: knn = distance to the nearest "
                       "gallery location (SPADE's), knnn = the paper's Eq. 2 against the "
                       "gallery (a k-NNN fitted on the gallery locations; 0.2-0.4 s more per "
                       "image on 2 CPU cores) (default: the model's, knn unless fitted with "
                       "--map-nn)")
    score.add_argument("--map-neighbors-of-neighbors", type=parse_positive_int, metavar="KP",
                       help="K' of the knnn pixel matching (default: the model's, 25)")
    add_shared_options(score, fdr=("images", "fit-images --contamination or `nonn "
                                   "calibrate`"), device="")
    score.set_defaults(handler=phrased_in_flags(_cmd_score_images))

    ev = subparsers.add_parser(
        "eval-images", help="measure an image model on a labelled MVTec-layout folder",
        description="Score a labelled test folder (good/ and one folder per defect type, "
        "MVTec AD's layout; ground-truth masks in ground_truth/<defect>/<stem>_mask.png) and "
        "report image AUROC/AP and, for SPADE models with masks, pixel AUROC and AUPRO (up "
        "to 30%% FPR), overall and per defect type (against the good images). Writes "
        "scores.csv, metrics.csv and worst_misses.png (the highest-scoring good and "
        "lowest-scoring defective images) to OUTDIR.")
    ev.add_argument("model", metavar="MODEL", help="model file written by `nonn fit-images`")
    ev.add_argument("test_dir", metavar="TEST_DIR",
                    help="folder with good/ and defect-type folders (or a category folder "
                    "holding test/)")
    ev.add_argument("--masks", metavar="DIR", help="ground-truth mask folder (default: "
                    "TEST_DIR/../ground_truth when it exists)")
    ev.add_argument("-o", "--output", metavar="OUTDIR", default="eval",
                    help="folder for scores.csv, metrics.csv, worst_misses.png (default: eval)")
    ev.add_argument("--worst", type=parse_positive_int, default=4, metavar="N",
                    help="images per row of worst_misses.png (default: 4)")
    add_shared_options(ev, device="")
    ev.set_defaults(handler=phrased_in_flags(_cmd_eval_images))

    mk = subparsers.add_parser(
        "make-defects", help="write a labelled test set of synthetic defects (MVTec layout)",
        description="Write the normal test images clean (OUTDIR/test/good/) and once per "
        "defect kind with one synthetic defect each (OUTDIR/test/<kind>/, same names), with "
        "ground-truth masks (OUTDIR/ground_truth/<kind>/<name>_mask.png): the layout "
        "`nonn eval-images MODEL OUTDIR/test` measures. Kinds: patch (a square of 1/4 the "
        "side pasted from a donor image), scratch (a thin antialiased line), blotch (a "
        "soft-edged elliptic colour stain), texture (an elliptic region taken from a donor "
        "image). OUTDIR appears only when complete. Needs Pillow (the vision extra).")
    mk.add_argument("images", metavar="DIR_OR_FILES", nargs="*",
                    help="folder(s) (searched recursively) or files of normal test images "
                    "(not the training images of the model to measure)")
    mk.add_argument("-o", "--output", metavar="OUTDIR", required=True,
                    help="new folder to write (must not exist)")
    mk.add_argument("--donors", metavar="DIR",
                    help="images that patch and texture paste from: another class or "
                    "texture, any size (needed for patch and texture)")
    mk.add_argument("--kinds", type=_parse_kinds, metavar="K,...",
                    help=f"defect kinds among {','.join(KINDS)} (default: all with --donors "
                    "or --preset, else scratch,blotch)")
    mk.add_argument("--random-state", type=parse_nonnegative_int, default=0, metavar="N",
                    help="seed: the same N writes the same defects (default: 0)")
    mk.add_argument("--preset", choices=PRESETS,
                    help="a built-in set instead of your images, with training images in "
                    "OUTDIR/train/good/: CIFAR-10 horses or Fashion-MNIST T-shirts (read "
                    "from NONN_DATA), or 128 px crops of scikit-image's brick, grass and "
                    "gravel photographs (pip install scikit-image; also for the texture "
                    "kind of the other two)")
    mk.add_argument("--n-train", type=parse_positive_int, default=200, metavar="N",
                    help="--preset: training images (default: 200)")
    mk.add_argument("--n-test", type=parse_positive_int, default=50, metavar="N",
                    help="--preset: normal test images (default: 50)")
    add_progress_option(mk)
    mk.set_defaults(handler=phrased_in_flags(_cmd_make_defects))

    ex = subparsers.add_parser(
        "export", help="write an image model's feature extractor as ONNX",
        description="Write the backbone of an image model (from `nonn fit-images`) as an ONNX "
        "file: float32 images (N, 3, S, S) in [0, 255] -> pooled features (and, for SPADE, "
        "the feature pyramid). Image resizing, the detector and its threshold are not "
        "included. Needs the onnx extra: pip install \"nonn[onnx]\".")
    ex.add_argument("model", metavar="MODEL", help="model file written by `nonn fit-images`")
    ex.add_argument("-o", "--output", metavar="MODEL.onnx", required=True,
                    help="ONNX file to write")
    ex.add_argument("--opset", type=parse_positive_int, default=17, metavar="N",
                    help="ONNX opset version (default: 17)")
    ex.set_defaults(handler=phrased_in_flags(_cmd_export))
    return subparsers
