"""The image subcommands of ``nonn`` (the ``vision`` extra)::

    nonn fit-images DIR -o MODEL [--system feature|spade] [--nn knnn|knn]
                    [--backbone NAME] [--weights FILE] [options]
    nonn score-images MODEL DIR_OR_FILES... -o SCORES.csv [--heatmaps OUTDIR]
                      [--map-nn knn|knnn] [--map-neighbors-of-neighbors KP]

This module imports without torch; the commands load it when they run and
say how to install it when it is missing.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from pathlib import Path

import numpy as np

# one parser for the contamination option, one set of progress flags, one
# phrasing of errors in flags
from ..cli import _contamination, _fdr, _in_flags, add_progress_option


def _note(message):
    print(f"nonn: {message}", file=sys.stderr)


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return v


def _verbose(args):
    """Progress bars: --progress / --no-progress, else "auto" (a terminal)."""
    return "auto" if args.progress is None else bool(args.progress)


def _given_paths(sources):
    """The image files named on the command line (not those found in folders)."""
    return [("an input image", p) for p in sources if os.path.isfile(p)]


def _require_vision():
    from .features import import_torch

    import_torch()
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise ImportError("nonn's image commands need Pillow: "
                          "pip install torch==2.13.0 \"nonn[vision]\"") from None


# --------------------------------------------------------------- fit-images
def _cmd_fit_images(args):
    _require_vision()
    from nonn import _io

    from . import _images
    from .systems import SYSTEMS

    _io.check_output_folder(args.output)
    _io.check_not_an_input(args.output, _given_paths(args.images))
    images = []
    for src in args.images:
        images += _images.as_image_list(src)
    params = dict(nn=args.nn, backbone=args.backbone, weights=args.weights,
                  image_size=args.image_size, batch_size=args.batch_size, device=args.device,
                  verbose=_verbose(args), contamination=args.contamination)
    if args.n_neighbors is not None:
        params["n_neighbors"] = args.n_neighbors
    if args.n_neighbors_of_neighbors is not None:
        params["n_neighbors_of_neighbors"] = args.n_neighbors_of_neighbors
    if args.normalize:
        params["normalize"] = True
    if args.system == "spade":
        params["n_map_neighbors"] = args.map_neighbors
        params["map_size"] = args.map_size
        params["map_nn"] = args.map_nn
        if args.map_neighbors_of_neighbors is not None:
            params["map_n_neighbors_of_neighbors"] = args.map_neighbors_of_neighbors
    elif args.map_nn != "knn" or args.map_neighbors_of_neighbors is not None:
        _note("note: --map-nn and --map-neighbors-of-neighbors apply to --system spade; "
              "ignored.")
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
def _colormap(v):
    """Values in [0, 1] -> uint8 RGB with a jet-like ramp (no matplotlib)."""
    anchors = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
    r = np.interp(v, anchors, [0.0, 0.0, 0.0, 1.0, 1.0, 0.5])
    g = np.interp(v, anchors, [0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    b = np.interp(v, anchors, [0.5, 1.0, 1.0, 0.0, 0.0, 0.0])
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(image, amap, vmin, vmax, alpha=0.5):
    """Blend an RGB uint8 image with the colour-mapped anomaly map."""
    v = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    heat = _colormap(v).astype(np.float32)
    return (alpha * heat + (1 - alpha) * image.astype(np.float32)).round().astype(np.uint8)


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


def _refuse_detector_model(path):
    """A model from `nonn fit` (not an image model): name the command for it."""
    from nonn.persistence import ModelFileError, read_meta

    try:
        read_meta(path)
    except (ModelFileError, OSError):
        return
    raise ValueError(f"{path!r} is a detector model (from `nonn fit`), not an image model; "
                     f"score feature rows with it: nonn score {path} QUERIES -o SCORES")


def _cmd_score_images(args):
    from nonn import _io

    if not args.output.lower().endswith(".csv"):
        raise ValueError(f"--output must be a .csv file; got {args.output!r}.")
    _io.check_output_folder(args.output)
    _io.check_not_an_input(args.output, [("MODEL", args.model)] + _given_paths(args.images))
    _refuse_detector_model(args.model)
    _require_vision()
    from . import _images
    from .systems import SPADE, load

    system = load(args.model)
    if args.heatmaps is not None and not isinstance(system, SPADE):
        raise ValueError(f"--heatmaps needs a SPADE model (fit-images --system spade); "
                         f"{args.model!r} holds a {type(system).__name__}.")
    map_options = {"map_nn": args.map_nn,
                   "map_n_neighbors_of_neighbors": args.map_neighbors_of_neighbors}
    map_options = {k: v for k, v in map_options.items() if v is not None}
    if map_options and args.heatmaps is None:
        _note("note: --map-nn and --map-neighbors-of-neighbors apply to --heatmaps; ignored.")
    elif map_options:
        system.set_params(**map_options)
    system.set_params(verbose=_verbose(args))
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
    from nonn._base import conformal_pvalues, fdr_labels

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
    from ..cli import flagged_how

    print(f"scored {len(paths)} images with {type(system).__name__} in {seconds:.2f} s "
          f"({seconds / len(paths):.3f} s/image): {n_out} flagged as anomalies (label -1) "
          f"{flagged_how(system.detector_, args.fdr, len(paths))}")
    print(f"  wrote {args.output}")
    if maps is not None:
        from PIL import Image

        out = Path(args.heatmaps)
        out.mkdir(parents=True, exist_ok=True)
        # one colour scale for the whole run, so maps compare across images
        vmin = float(min(m.min() for m in maps))
        vmax = float(max(m.max() for m in maps))
        for p, name, m in zip(paths, _heatmap_names(paths), maps):
            img = _images.load_rgb(p)
            Image.fromarray(overlay(img, m, vmin, vmax)).save(out / f"{name}_heatmap.png")
            np.save(out / f"{name}_map.npy", m)
        print(f"  wrote {len(maps)} overlays (<name>_heatmap.png) and raw maps (<name>_map.npy) "
              f"to {out} (pixel matching {system.map_nn}, colour scale {vmin:.4g} .. "
              f"{vmax:.4g})")
    return 0


# ----------------------------------------------------------------- register
def register(subparsers):
    """Add ``fit-images`` and ``score-images`` to the ``nonn`` parser."""
    fit = subparsers.add_parser(
        "fit-images", help="fit an image anomaly detector on a folder of normal images",
        description="Extract pretrained features of the normal (good) images in DIR and fit "
        "a nearest-neighbour detector on them; save the model (backbone name + detector "
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
                     help="nearest-neighbour operator (default: knnn, the paper's)")
    fit.add_argument("--backbone", default="efficientnet_lite0",
                     choices=("efficientnet_lite0", "resnet18", "resnet50", "wide_resnet50_2",
                              "dino_vits8"),
                     help="pretrained network (default: efficientnet_lite0, works offline; "
                     "the others need their weight file, see docs/vision.md)")
    fit.add_argument("--weights", metavar="FILE", help="weight file of the backbone")
    fit.add_argument("--image-size", type=_positive_int, default=224, metavar="PX",
                     help="images are resized to PX x PX (default: 224)")
    fit.add_argument("--batch-size", type=_positive_int, default=32, metavar="N")
    fit.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    fit.add_argument("--n-neighbors", type=_positive_int, metavar="K",
                     help="k (default: 3 for feature, 50 for spade)")
    fit.add_argument("--n-neighbors-of-neighbors", type=_positive_int, metavar="KP",
                     help="K' of k-NNN (default: 25)")
    fit.add_argument("--contamination", type=_contamination, default="auto",
                     metavar="auto|FLOAT", help="share of training images flagged; sets the "
                     "label threshold (default: auto = 0.01)")
    fit.add_argument("--normalize", action="store_true",
                     help="scale pooled features to unit length before the detector "
                     "(default: raw features, as in the paper)")
    fit.add_argument("--map-neighbors", type=_positive_int, default=5, metavar="N",
                     help="spade: normal images matched per query for the heat map (default: 5)")
    fit.add_argument("--map-size", type=_positive_int, default=28, metavar="M",
                     help="spade: side of the stored feature pyramids (default: 28)")
    fit.add_argument("--map-nn", choices=("knn", "knnn"), default="knn",
                     help="spade: pixel matching stored as the model's default for heat maps "
                     "(score-images --map-nn overrides it) (default: knn, SPADE's)")
    fit.add_argument("--map-neighbors-of-neighbors", type=_positive_int, metavar="KP",
                     help="spade: K' of the knnn pixel matching (default: 25)")
    add_progress_option(fit)
    fit.set_defaults(handler=_in_flags(_cmd_fit_images))

    score = subparsers.add_parser(
        "score-images", help="score images with a model from fit-images",
        description="Score images and write one CSV row per image: path, anomaly_score "
        "(higher = more anomalous), score_samples (= -anomaly_score), label (+1 normal, "
        "-1 anomaly, by the model's threshold, or with --fdr at a false-discovery rate) and "
        "p_value (the share of the model's calibration normals scoring at least as high; "
        "small = unusual). With --heatmaps (spade models), also write an overlay PNG and "
        "the raw map (.npy) per image.")
    score.add_argument("model", metavar="MODEL", help="model file written by `nonn fit-images`")
    score.add_argument("images", metavar="DIR_OR_FILES", nargs="+",
                       help="folder(s) (searched recursively) or image files")
    score.add_argument("-o", "--output", metavar="SCORES.csv", required=True,
                       help="CSV file to write")
    score.add_argument("--fdr", type=_fdr, metavar="Q",
                       help="label the images as one batch at false-discovery rate Q in (0, "
                       "1): Benjamini-Hochberg on the p-values flags the largest set in which, "
                       "on average, at most a share Q are normal (default: the model's "
                       "threshold, set by fit-images --contamination or `nonn calibrate`)")
    score.add_argument("--heatmaps", metavar="OUTDIR",
                       help="write <name>_heatmap.png overlays and <name>_map.npy (spade)")
    score.add_argument("--map-nn", choices=("knn", "knnn"),
                       help="pixel matching of the heat maps: knn = distance to the nearest "
                       "gallery location (SPADE's), knnn = the paper's Eq. 2 against the "
                       "gallery (a k-NNN fitted on the gallery locations; 0.2-0.4 s more per "
                       "image on 2 CPU cores) (default: the model's, knn unless fitted with "
                       "--map-nn)")
    score.add_argument("--map-neighbors-of-neighbors", type=_positive_int, metavar="KP",
                       help="K' of the knnn pixel matching (default: the model's, 25)")
    score.add_argument("--device", choices=("auto", "cpu", "cuda"),
                       help="override the device saved in the model")
    add_progress_option(score)
    score.set_defaults(handler=_in_flags(_cmd_score_images))
    return subparsers
