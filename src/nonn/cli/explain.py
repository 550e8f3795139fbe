"""The ``nonn explain`` and ``nonn update`` commands::

    nonn explain MODEL QUERIES -o EXPLANATIONS.csv|.npz [--top N] [--plot DIR]
    nonn update MODEL NEW_NORMALS [-o MODEL2]

Thin layers over :meth:`explain` and :meth:`partial_fit` of the detectors.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .. import _io
from ..persistence import ModelFileError, load
from ._common import (QUERIES_HELP, add_shared_options, align_columns, human_bytes,
                      load_detector, phrased_in_flags, progress)

#: at most this many queries get one bar chart each with --plot; more get
#: one summary figure
PLOT_PER_QUERY_MAX = 50


#: output formats of `nonn explain`
EXPLAIN_FORMATS = (".csv", ".npz")


# ----------------------------------------------------------------- explain
def _check_explain_output(path):
    ext = _io.extension(path)
    if ext not in EXPLAIN_FORMATS:
        raise ValueError(f"Cannot write explanations to {path!r}: unknown extension "
                         f"{ext or '(none)'!r}. Expected .csv (the top features of each "
                         "query) or .npz (every contribution).")
    _io.check_output_folder(path)
    return ext


def _check_plot_folder(folder):
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--plot {folder}: it exists and is not a folder; give a folder "
                         "for the PNG files.")
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--plot {folder}: the folder {parent!r} does not exist.")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'nonn[plot]'.") from None


def _cmd_explain(args):
    if args.top < 1:
        raise ValueError(f"--top must be an int >= 1; got {args.top}.")
    _io.check_not_an_input(args.output, {"MODEL": args.model, "QUERIES": args.queries})
    ext = _check_explain_output(args.output)
    if args.plot is not None:
        _check_plot_folder(args.plot)
    det = _load_image_aware(args)
    det.set_params(verbose=progress(args))
    Q, names = _io.read_table_or_shards(args.queries, key=args.key, header=args.header)
    Q = align_columns(Q, names, det, args.queries)
    start = time.perf_counter()
    ex = det.explain(Q)
    seconds = time.perf_counter() - start
    top = min(args.top, ex.contributions.shape[1])
    if ext == ".csv":
        _io.atomic_write(args.output, lambda fh: _write_csv(fh, ex, top))
    else:
        _io.atomic_write(args.output, lambda fh: _write_npz(fh, ex, top))
    written = [args.output]
    if args.plot is not None:
        os.makedirs(args.plot, exist_ok=True)
        written.append(_plot(ex, args.plot, top))
    print(f"explained {len(ex)} queries with {type(det).__name__} in {seconds:.2f} s "
          f"(contributions per {ex.coordinates}; each query's sum to its anomaly score)")
    for what in written:
        print(f"  wrote {what}")
    return 0


def _load_image_aware(args):
    try:
        return load_detector(args)
    except (ModelFileError, ValueError) as exc:
        if "image model" in str(exc):
            raise ValueError(
                f"{args.model!r} is an image model (from `nonn fit-images`); its "
                "explanation is its heat map: nonn score-images "
                f"{args.model} IMAGES... -o SCORES.csv --heatmaps DIR (a --system spade "
                "model).") from None
        raise


def _header(top):
    cols = ["index", "anomaly_score", "neighbor"]
    for r in range(1, top + 1):
        cols += [f"feature_{r}", f"contribution_{r}", f"share_{r}"]
    return cols


def _csv_text(name):
    """A feature name as one CSV field (quoted when it needs it)."""
    if any(c in name for c in ',"\n\r') or name != name.strip():
        return '"' + name.replace('"', '""') + '"'
    return name


def _write_csv(fh, ex, top):
    cols, vals = ex.top(top)
    shares = np.take_along_axis(ex.shares, cols, axis=1)
    scores = np.asarray(ex.anomaly_scores, dtype=np.float64)
    fh.write((",".join(_header(top)) + "\n").encode("utf-8"))
    names = [_csv_text(ex.feature_name(j)) for j in range(ex.contributions.shape[1])]
    lines = []
    for u in range(len(ex)):
        parts = [str(u), repr(float(scores[u])), str(int(ex.neighbor[u]))]
        for r in range(top):
            parts += [names[cols[u, r]], repr(float(vals[u, r])), repr(float(shares[u, r]))]
        lines.append(",".join(parts))
        if len(lines) >= 4096:
            fh.write(("\n".join(lines) + "\n").encode("utf-8"))
            lines = []
    if lines:
        fh.write(("\n".join(lines) + "\n").encode("utf-8"))


def _write_npz(fh, ex, top):
    cols, vals = ex.top(top)
    names = [ex.feature_name(j) for j in range(ex.contributions.shape[1])]
    np.savez(fh, index=np.arange(len(ex), dtype=np.int64),
             anomaly_score=np.asarray(ex.anomaly_scores), neighbor=ex.neighbor,
             neighbors=ex.neighbors, neighbor_terms=np.asarray(ex.neighbor_terms),
             contributions=ex.contributions, feature_names=np.asarray(names, dtype=str),
             top_features=cols, top_contributions=vals)


def _save_png(fig, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    _io.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))


def _plot(ex, folder, top):
    """One horizontal bar chart per query (few queries) or one summary
    figure (many); returns what was written."""
    from matplotlib.figure import Figure

    n = len(ex)
    shares = ex.shares
    if n <= PLOT_PER_QUERY_MAX:
        cols, vals = ex.top(top)
        for u in range(n):
            fig = Figure(figsize=(6, 1.2 + 0.35 * top))
            ax = fig.add_subplot(1, 1, 1)
            labels = [ex.feature_name(c) for c in cols[u]][::-1]
            ax.barh(range(top), shares[u, cols[u]][::-1],
                    color=["#c0392b" if v >= 0 else "#2980b9" for v in vals[u][::-1]])
            ax.set_yticks(range(top))
            ax.set_yticklabels(labels)
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_xlabel("share of the anomaly score")
            nb = "" if ex.neighbor[u] < 0 else f", neighbor {ex.neighbor[u]}"
            ax.set_title(f"query {u}: anomaly score {float(ex.anomaly_scores[u]):.4g}{nb}",
                         fontsize=10)
            fig.tight_layout()
            _save_png(fig, os.path.join(folder, f"query_{u:05d}.png"))
        return f"{n} bar charts into {folder}/ (query_00000.png, ...)"
    d = ex.contributions.shape[1]
    mean_share = shares.mean(axis=0)
    firsts = np.bincount(ex.top(1)[0][:, 0], minlength=d) / n
    show = np.argsort(-mean_share, kind="stable")[:min(d, max(top, 20))]
    fig = Figure(figsize=(10, 1.5 + 0.3 * len(show)))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    labels = [ex.feature_name(c) for c in show][::-1]
    ax1.barh(range(len(show)), mean_share[show][::-1], color="#c0392b")
    ax1.set_yticks(range(len(show)))
    ax1.set_yticklabels(labels)
    ax1.set_xlabel("mean share of the anomaly score")
    ax2.barh(range(len(show)), firsts[show][::-1], color="#7f8c8d")
    ax2.set_yticks(range(len(show)))
    ax2.set_yticklabels([])
    ax2.set_xlabel("share of queries where it contributes most")
    fig.suptitle(f"{n} queries: the features with the largest mean share", fontsize=10)
    fig.tight_layout()
    path = os.path.join(folder, "summary.png")
    _save_png(fig, path)
    return path


# ------------------------------------------------------------------ update
def _cmd_update(args):
    output = args.output or args.model
    _io.check_not_an_input(output, {"NEW_NORMALS": args.new})
    _io.check_output_folder(output)
    det = _load_model(args.model)
    X, names = _io.read_table_or_shards(args.new, key=args.key, header=args.header)
    d = int(det.n_features_in_)
    if X.shape[1] != d:
        raise ValueError(f"{args.new!r} has {X.shape[1]} columns; the model was fitted on "
                         f"{d}. New normal samples must have the model's columns (`nonn info "
                         "MODEL` lists them).")
    X = align_columns(X, names, det, args.new)
    det.set_params(verbose=progress(args))
    before = det.n_samples_seen_
    offset = det.offset_
    start = time.perf_counter()
    det.partial_fit(X)
    seconds = time.perf_counter() - start
    det.set_params(verbose=False)
    det.save(output)
    stats = getattr(det, "_last_update", None) or {}
    print(f"updated {type(det).__name__} with {len(X)} new normal samples in "
          f"{seconds:.2f} s: {before} -> {det.n_samples_seen_} samples seen")
    if stats.get("refit"):
        print(f"  recomputed in full: {stats['refit']}")
    elif "neighborhoods_changed" in stats:
        print(f"  {stats['neighborhoods_changed']} existing neighborhoods changed; "
              f"{stats['calibration_rescored']} calibration rows rescored")
    print(f"  offset_: {offset:.6g} -> {det.offset_:.6g}")
    print(f"  saved to {output} ({human_bytes(os.path.getsize(output))})")
    return 0


def _load_model(path):
    """A detector model file, or a one-line refusal for an image model."""
    try:
        return load(path)
    except ModelFileError:
        from ..vision.systems import is_image_model

        if is_image_model(path):
            raise ValueError(f"{path!r} is an image model (from `nonn fit-images`); `nonn "
                             "update` adds samples to detector models from `nonn fit`. Fit "
                             "the image model again on all images.") from None
        raise


# ------------------------------------------------------------------ parser
def register(sub):
    """Add ``explain`` and ``update`` to the ``nonn`` subcommands ``sub``."""
    ex = sub.add_parser(
        "explain", help="per-feature explanations of anomaly scores",
        description="Explain each query's anomaly score: the contribution of every input "
        "column (they sum to the score; a contribution can be negative) and the training "
        "row(s) the score came from. A .csv output lists, per query, the score, the "
        "training neighbor the score came from (-1 when all k count) and the --top "
        "features with their contributions and shares of the score; a .npz output holds "
        "every contribution.",
    )
    ex.add_argument("model", metavar="MODEL", help="model file written by `nonn fit`")
    ex.add_argument("queries", metavar="QUERIES", help=QUERIES_HELP)
    ex.add_argument("-o", "--output", metavar="EXPLANATIONS", required=True,
                    help="explanations file: .csv (top features per query) or .npz (all "
                    "contributions, neighbors and the top features)")
    ex.add_argument("--top", type=int, default=5, metavar="N",
                    help="features listed (and plotted) per query, largest contribution "
                    "first (default: 5)")
    ex.add_argument("--plot", metavar="DIR",
                    help=f"write a bar chart PNG per query into DIR (up to "
                    f"{PLOT_PER_QUERY_MAX} queries; more get one summary.png); needs "
                    "matplotlib")
    add_shared_options(ex, table="QUERIES")
    ex.set_defaults(handler=phrased_in_flags(_cmd_explain))

    up = sub.add_parser(
        "update", help="add new normal samples to a saved model",
        description="Add NEW_NORMALS to MODEL without refitting from scratch (partial_fit): "
        "the new samples get their neighborhoods, the existing neighborhoods they enter "
        "are updated, and the threshold is re-set on out-of-sample scores. The model's "
        "input transforms and global statistics stay those of its first fit. The model is "
        "rewritten atomically (or written to -o).",
    )
    up.add_argument("model", metavar="MODEL", help="model file written by `nonn fit`")
    up.add_argument("new", metavar="NEW_NORMALS",
                    help="new normal samples: .npy, .npz, .csv or .parquet, one sample per "
                    "row, with the model's columns; or a folder of .npy/.parquet shards")
    up.add_argument("-o", "--output", metavar="MODEL2",
                    help="write the updated model here (default: replace MODEL)")
    add_shared_options(up, table="NEW_NORMALS")
    up.set_defaults(handler=phrased_in_flags(_cmd_update))
