"""The detector commands of ``nonn``: fit, score, calibrate, info, demo,
bench (calibrate and info also take image models: :mod:`nonn.cli.images`
handles those)."""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
import time
import warnings

import numpy as np

from .. import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN, _io
from .._base import conformal_pvalues, fdr_labels
from ..neighbors import BACKENDS, resolve_backend
from ..persistence import ModelFileError, load, read_meta
from . import images
from ._common import (FIT_OPTIONS, QUERIES_HELP, add_shared_options, align_columns, as_frame,
                      flagged_how, human_bytes, load_detector, looks_like_model, note,
                      parse_rate, phrased_in_flags, print_arrays, print_calibrate,
                      print_threshold, print_values, progress, threshold_summary, warn_few)

#: --detector name -> estimator class
DETECTORS = {
    "knnn": KNNN,
    "knn": KNN,
    "global": GlobalEigenKNN,
    "local": LocalEigenKNN,
}


def _sizes(text):
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints such as 100,200,300, got {text!r}")
    return sizes


def _csv_list(text):
    return [t.strip() for t in text.split(",") if t.strip()]


# --------------------------------------------------------------------- fit
def _fit_params(args, cls):
    accepted = cls().get_params()
    params = {}
    for flag, name, _ in FIT_OPTIONS:
        if name not in vars(args):
            continue
        if name in accepted:
            value = getattr(args, name)
            if name == "backend_params":
                value = dict(value)
            elif name in ("scale", "normalize") and value == "none":
                value = None
            params[name] = value
        else:
            note(f"note: {flag} does not apply to --detector {args.detector}; ignored.")
    # every parameter checked now, before the data are read and the fit runs
    cls(**params)._check_params()
    return params


def _check_backend_params(params, n, d):
    """Refuse --backend-param KEY=VALUE the chosen backend does not take,
    saying which backend that is and what it takes (before the fit)."""
    given = params.get("backend_params") or {}
    if not given:
        return
    name = params.get("backend", "auto")
    resolved = resolve_backend(name, n, d)
    accepted = [p for p in inspect.signature(BACKENDS[resolved]()).parameters
                if p != "metric"]
    unknown = [k for k in given if k not in accepted]
    if not unknown:
        return
    items = " ".join(f"--backend-param {k}={given[k]}" for k in unknown)
    chosen = (f"the {resolved!r} backend, which --backend auto picks for this data"
              if name == "auto" else f"the {resolved!r} backend")
    msg = f"{items}: not an option of {chosen}; it takes {', '.join(accepted)}."
    lower = {a.lower(): a for a in accepted}
    for k in unknown:
        close = [lower[k.lower()]] if k.lower() in lower else difflib.get_close_matches(
            k, accepted, n=1)
        if close:
            msg += f" Did you mean --backend-param {close[0]}={given[k]}?"
    if resolved != "faiss":
        faiss_params = inspect.signature(BACKENDS["faiss"]()).parameters
        if any(k in faiss_params for k in unknown):
            msg += " FAISS index options need --backend faiss."
    raise ValueError(msg)


def _cmd_fit(args):
    cls = DETECTORS[args.detector]
    cluster = getattr(args, "cluster", None)
    if cluster is not None and cls is not KNNN:
        raise ValueError(f"--cluster fits --detector knnn only; got --detector {args.detector}. "
                         "Drop --cluster to fit it on this machine.")
    params = _fit_params(args, cls)
    if cluster is not None and params.get("scale") == "robust":
        raise ValueError("--cluster does not support --scale robust (its medians need every "
                         "row in one place): use --scale standard or minmax, or drop "
                         "--cluster to fit on this machine.")
    # Fail before the (possibly long) fit, not after it.
    _io.check_output_folder(args.output)
    _io.check_not_an_input(args.output, {"TRAIN": args.train})
    if cluster is not None:
        return _fit_on_cluster(args, cluster, params)
    X, names = _io.read_table_or_shards(args.train, key=args.key, header=args.header)
    _check_backend_params(params, *X.shape)
    det = cls(verbose=progress(args), **params)
    start = time.perf_counter()
    det.fit(as_frame(X, names))
    seconds = time.perf_counter() - start
    # The saved model should not print progress bars when a library user loads
    # it; `nonn score` switches them back on.
    det.set_params(verbose=False)
    det.save(args.output)
    _print_fit(det, X.shape, seconds, args.output)
    return 0


def _print_fit(det, shape, seconds, output, where=""):
    n, d = shape
    print(f"fitted {type(det).__name__} on {n} samples x {d} features "
          f"({np.dtype(det.dtype_).name}){where} in {seconds:.2f} s")
    print(f"  backend_: {det.backend_}   offset_: {det.offset_:.6g}   "
          f"contamination_: {det.contamination_:g}")
    print(f"  saved to {output} ({human_bytes(os.path.getsize(output))})")


def _quiet_dask():
    """Silence Dask's advice meant for Dask programmers ("Sending large graph
    ... consider loading the data with Dask directly") and its cluster
    housekeeping below errors (a nanny "killing" a slow worker at shutdown):
    the command already does what it can, and the user has nothing to act on."""
    import logging

    warnings.filterwarnings("ignore", message=r"(?s)Sending large graph", category=UserWarning)
    logging.getLogger("distributed").setLevel(logging.ERROR)


def _client_arg(cluster):
    """--cluster value -> DistributedKNNN's client (None: an embedded LocalCluster)."""
    return None if cluster == "local" else cluster


def _fit_on_cluster(args, cluster, params):
    from ..distributed import DistributedKNNN, read_shards

    _quiet_dask()
    if _io.is_shard_folder(args.train):
        X = read_shards(args.train, key=args.key)  # read on the workers
    else:
        X = _io.read_matrix(args.train, key=args.key, header=args.header)
    with DistributedKNNN(client=_client_arg(cluster), **params) as det:
        start = time.perf_counter()
        det.fit(X)
        seconds = time.perf_counter() - start
        # a regular KNNN model file (the state gathered): `nonn score` and
        # nonn.load read it; `nonn score --cluster` spreads it out again
        det.save(args.output)
        where = f" on {det.n_partitions_} partitions ({_cluster_name(det.client_)})"
        _print_fit(det, X.shape, seconds, args.output, where)
    return 0


def _cluster_name(client):
    workers = client.scheduler_info().get("workers", {})
    return f"{len(workers)} Dask workers at {client.scheduler.address}"


# ------------------------------------------------------------------- score
def _cmd_score(args):
    cluster = getattr(args, "cluster", None)
    _io.check_not_an_input(args.output, {"MODEL": args.model, "QUERIES": args.queries})
    if cluster is not None:
        return _score_on_cluster(args, cluster)
    _io.check_scores_path(args.output)
    det = load_detector(args)
    det.set_params(verbose=progress(args))
    Q, names = _io.read_table_or_shards(args.queries, key=args.key, header=args.header)
    Q = align_columns(Q, names, det, args.queries)
    start = time.perf_counter()
    anomaly = det.anomaly_score(Q)
    seconds = time.perf_counter() - start
    _write_score_table(args, det, anomaly, seconds)
    return 0


def _score_columns(det, anomaly, fdr):
    """``score_samples``, ``label`` and ``p_value`` of the anomaly scores:
    the definitions of ``score_samples``, ``predict`` / ``predict_fdr`` and
    ``pvalue`` (each would recompute the search and Eq. 2), applied to the
    one result."""
    samples = -anomaly
    pvalues = conformal_pvalues(anomaly, det.calibration_scores_)
    if fdr is None:
        labels = np.where(samples - det.offset_ < 0, -1, 1)
    else:
        labels = fdr_labels(pvalues, fdr)
    return samples, labels, pvalues


def _write_score_table(args, det, anomaly, seconds, where="", model=None):
    """Write SCORES; the threshold and calibration scores are ``model``'s
    (default: ``det``, the estimator that scored)."""
    samples, labels, pvalues = _score_columns(model or det, anomaly, args.fdr)
    _io.write_scores(args.output, anomaly, samples, labels, pvalues)
    _print_score(det, len(anomaly), int((labels == -1).sum()), seconds, args.output, where,
                 args.fdr)


def _print_score(det, n, n_out, seconds, output, where="", fdr=None):
    print(f"scored {n} queries with {type(det).__name__}{where} in {seconds:.2f} s: "
          f"{n_out} flagged as anomalies (label -1) {flagged_how(det, fdr, n)}")
    print(f"  wrote {output}")


def _score_on_cluster(args, cluster):
    """Score with the model spread over the cluster. SCORES is a file (the
    scores are gathered here, then written as without --cluster) or a folder
    (no extension): Parquet part files written by the workers, or a Zarr
    store (a path ending in .zarr) written by the workers."""
    from ..distributed import DistributedKNNN, read_shards

    zarr_out = args.output.rstrip("/\\").endswith(".zarr")
    folder = zarr_out or _io.extension(args.output) == "" or os.path.isdir(args.output)
    if folder:
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"Cannot write {args.output!r}: the folder {parent!r} "
                                    "does not exist.")
        if not zarr_out and os.path.isdir(args.output) and os.listdir(args.output):
            raise FileExistsError(f"Cannot write Parquet parts into {args.output!r}: the "
                                  "folder is not empty. Give a new or empty folder.")
        if args.fdr is not None:
            raise ValueError("--fdr labels the queries as one batch, which the workers "
                             "writing a folder or a .zarr store cannot do; give -o a file "
                             "(.csv, .npy, .npz or .parquet) to use --fdr.")
    else:
        _io.check_scores_path(args.output)
    _quiet_dask()
    model = load_detector(args)
    if type(model) is not KNNN:
        raise ValueError(f"--cluster scores KNNN models; {args.model!r} holds a "
                         f"{type(model).__name__}. Drop --cluster to score it here.")
    if _io.is_shard_folder(args.queries):
        Q = read_shards(args.queries, key=args.key)
    else:
        Q, names = _io.read_table(args.queries, key=args.key, header=args.header)
        Q = np.asarray(align_columns(Q, names, model, args.queries))
    with DistributedKNNN.from_knnn(model, client=_client_arg(cluster)) as det:
        start = time.perf_counter()
        where = f" on {det.n_partitions_} partitions ({_cluster_name(det.client_)})"
        if folder:
            n = det.write_scores(Q, args.output)
            n_out = _count_flagged(args.output, zarr_out)
        else:
            # optimize_graph=False keeps each partition's tasks on the worker
            # holding its eigen-state (dask's array optimisation drops that)
            anomaly = np.asarray(det.client_.compute(det.anomaly_score(Q), sync=True,
                                                     optimize_graph=False)
                                 if hasattr(Q, "dask") else det.anomaly_score(Q))
            # the p-values against the loaded model's calibration scores
            _write_score_table(args, det, anomaly, time.perf_counter() - start, where,
                               model=model)
            return 0
        seconds = time.perf_counter() - start
        _print_score(det, n, n_out, seconds, args.output, where)
    return 0


def _count_flagged(folder, zarr_out=False):
    if zarr_out:
        import zarr

        return int((zarr.open_group(folder, mode="r")["label"][:] == -1).sum())
    _, pq = _io.import_pyarrow()
    return int((pq.read_table(folder, columns=["label"]).column("label").to_numpy() == -1).sum())


# --------------------------------------------------------------- calibrate
def _cmd_calibrate(args):
    """Re-set a saved model's threshold and p-values on held-out normals."""
    output = args.output or args.model
    _io.check_output_folder(output)
    _io.check_not_an_input(output, [("NORMALS", p) for p in args.normals])
    swapped = [p for p in args.normals if looks_like_model(p)]
    if swapped and not looks_like_model(args.model):
        raise ValueError(f"MODEL and NORMALS look swapped: {swapped[0]!r} is a model file. The "
                         f"model comes first: nonn calibrate {swapped[0]} NORMALS...")
    try:
        det = load(args.model)
    except ModelFileError:
        from ..vision.systems import is_image_model

        if is_image_model(args.model):
            return images.calibrate_image_model(args, output)
        raise
    if args.device is not None:
        note("note: --device applies to image models; ignored.")
    parts = []
    for path in args.normals:
        Q, cols = _io.read_table_or_shards(path, key=args.key, header=args.header)
        parts.append(np.asarray(align_columns(Q, cols, det, path)))
    if len({p.shape[1] for p in parts}) > 1:
        raise ValueError("The NORMALS files have different numbers of columns ("
                         f"{', '.join(str(p.shape[1]) for p in parts)}); give files of the "
                         f"model's {det.n_features_in_} columns.")
    names = getattr(det, "feature_names_in_", None)
    X = np.concatenate(parts) if len(parts) > 1 else parts[0]
    before = threshold_summary(det)
    det.set_params(verbose=progress(args))
    start = time.perf_counter()
    det.calibrate(as_frame(X, None if names is None else [str(n) for n in names]),
                  args.false_alarm_rate)
    seconds = time.perf_counter() - start
    warn_few(len(X), args.false_alarm_rate, "normals")
    det.set_params(verbose=False)
    det.save(output)
    print_calibrate(det, det, len(X), "held-out normals", seconds, before, output)
    return 0


# -------------------------------------------------------------------- info
def _cmd_info(args):
    try:
        meta = read_meta(args.model)
    except ModelFileError:
        # an image model (`nonn fit-images`) is refused by the core reader;
        # anything else keeps the core reader's message
        from ..vision.systems import is_image_model

        if is_image_model(args.model):
            return images.info_image(args)
        raise
    print(f"model:        {args.model} ({human_bytes(os.path.getsize(args.model))} on disk)")
    print(f"format:       {meta.get('format')} version {meta.get('format_version')}")
    print(f"nonn version: {meta.get('nonn_version')}")
    print(f"estimator:    {meta.get('estimator')}")
    print(f"n_features:   {meta.get('n_features_in')} ({meta.get('dtype')})")
    fitted = dict(meta.get("fitted") or {})
    names = fitted.pop("feature_names_in_", None)
    if isinstance(names, list):
        print(f"features:     {', '.join(map(str, names))}")
    else:
        print("features:     unnamed (fitted on data without column names; queries are "
              "matched by position)")
    print_threshold(fitted, meta.get("arrays"))
    print_values("params:", meta.get("params"))
    print_values("fitted:", fitted)
    total = print_arrays("arrays:", meta.get("arrays"))
    print(f"memory:       {human_bytes(total)} of arrays when loaded")
    if args.verify:
        load(args.model)
        print("verified:     every array matches its metadata; the model loads")
    return 0


# -------------------------------------------------------------------- demo
def _cmd_demo(args):
    from ..synthetic import run_demo

    kwargs = {"out_dir": args.out, "verbose": True, "progress": progress(args),
              "quick": args.quick}
    if args.quick and (args.seeds is not None or args.sizes is not None):
        note("note: --quick overrides --seeds and --sizes (2 seeds, sizes 100,300).")
    if args.seeds is not None:
        kwargs["seeds"] = args.seeds
    if args.sizes is not None:
        kwargs["sizes"] = args.sizes
    table5 = run_demo(**kwargs)
    print()
    from ..digits import run_digits

    digits = run_digits(args.out, digits=(0, 1, 2) if args.quick else range(10))
    print()
    _demo_summary(table5, digits)
    return 0


def _demo_summary(table5, digits):
    """A few lines on who won what, whichever it is."""
    summary = table5["summary"]
    ahead = [d for d in summary if summary[d]["k-NNN"]["mean"] > summary[d]["k-NN"]["mean"]]
    print("Summary:")
    print(f"  synthetic 2-D shapes (the paper's Table 5): k-NNN's mean AUROC is above "
          f"k-NN's on {len(ahead)} of {len(summary)} shapes"
          + (f" ({', '.join(ahead)})" if ahead else "") + ".")
    m, fa = digits["mean_auroc"], digits["false_alarm"]
    lead = "k-NNN" if m["k-NNN"] > m["k-NN"] else "k-NN"
    print(f"  one-class digits: mean AUROC k-NNN {m['k-NNN']:.4f}, k-NN {m['k-NN']:.4f} "
          f"({lead} ahead); held-out false alarms {fa['k-NNN']:.1%} and {fa['k-NN']:.1%} "
          f"for {digits['rate']:.0%} asked.")


# ------------------------------------------------------------------- bench
def _cmd_bench(args):
    from ..evaluation import run_benchmark

    suites = ([args.suite] if args.suite != "all"
              else ["mvtec", "classical", "cifar10", "mvtec_union"])
    for suite in suites:
        out = os.path.join(args.out, suite)
        run_benchmark(suite, out, detectors=args.detectors, seeds=tuple(range(args.seeds)),
                      datasets=args.datasets, progress=progress(args), resume=args.resume)
        print(f"wrote {out}/summary.md, summary.csv, summary.png, results.csv")
    return 0


# ------------------------------------------------------------------ parser
def register(sub):
    """Add the detector commands (fit, score, calibrate, info, demo, bench)
    to the ``nonn`` subcommands ``sub``."""
    fit = sub.add_parser(
        "fit", help="fit a detector on normal training embeddings and save it",
        description="Fit a detector on normal training embeddings TRAIN and save the model. "
        "Options a detector does not have are ignored with a note.",
    )
    fit.add_argument("train", metavar="TRAIN",
                     help="training matrix: .npy, .npz, .csv or .parquet, one sample per row; "
                     "or a folder of .npy/.parquet shards (rows concatenated in file-name "
                     "order)")
    fit.add_argument("-o", "--output", metavar="MODEL", required=True,
                     help="model file to write (for example model.nonn)")
    fit.add_argument("--detector", choices=tuple(DETECTORS), default="knnn",
                     help="knnn (k-NNN, the paper's method), knn (plain k-NN), global or "
                     "local (eigen-normalised k-NN baselines) (default: knnn)")
    for flag, name, kwargs in FIT_OPTIONS:
        fit.add_argument(flag, dest=name, default=argparse.SUPPRESS, **kwargs)
    fit.add_argument("--cluster", metavar="ADDRESS|local",
                     help="fit on a Dask cluster (knnn only; needs nonn[distributed]): a "
                     "scheduler address such as tcp://host:8786, or 'local' for a LocalCluster "
                     "on this machine. Shards of a TRAIN folder are read by the workers")
    add_shared_options(fit, table="TRAIN", key_help="array in a .npz file (default: 'X' or "
                       "the only array), or embedding column in a .parquet file")
    fit.set_defaults(handler=phrased_in_flags(_cmd_fit))

    score = sub.add_parser(
        "score", help="score queries with a saved model",
        description="Score QUERIES with MODEL and write one row per query: index, "
        "anomaly_score (higher = more anomalous), score_samples (higher = more normal), "
        "label (+1 inlier, -1 outlier; at the model's threshold, or with --fdr at a "
        "false-discovery rate) and p_value (the share of the model's calibration normals "
        "scoring at least as high: about uniform on (0, 1] for normal data, small = "
        "unusual, comparable across models).",
    )
    score.add_argument("model", metavar="MODEL", help="model file written by `nonn fit`")
    score.add_argument("queries", metavar="QUERIES", help=QUERIES_HELP)
    score.add_argument("-o", "--output", metavar="SCORES", required=True,
                       help="scores file: .csv, .npy (structured array), .npz or .parquet; "
                       "with --cluster also a folder (no extension) that receives Parquet "
                       "part files, or a .zarr store, written by the workers")
    score.add_argument("--cluster", metavar="ADDRESS|local",
                       help="score on a Dask cluster (KNNN models; needs nonn[distributed]): "
                       "a scheduler address, or 'local' for a LocalCluster on this machine. "
                       "A folder or .zarr SCORES written by the workers has no p_value column "
                       "and takes no --fdr")
    add_shared_options(score, table="QUERIES", fdr=("queries", "`nonn fit --contamination` "
                                                    "or `nonn calibrate --false-alarm-rate`"))
    score.set_defaults(handler=phrased_in_flags(_cmd_score))

    calibrate = sub.add_parser(
        "calibrate", help="re-set a model's threshold on held-out normal data",
        description="Score NORMALS, normal data held out from fitting, with MODEL and set its "
        "threshold so that about a share --false-alarm-rate of data like them is flagged; "
        "their scores also become the calibration scores of the p-values. Nothing is "
        "refitted. Works for models from `nonn fit` (NORMALS: matrix files or shard "
        "folders, rows concatenated) and `nonn fit-images` (NORMALS: image folders or "
        "files). The model's own training rows are refused: their scores are not out of "
        "sample. The model file is replaced atomically (or -o writes a new one).",
    )
    calibrate.add_argument("model", metavar="MODEL",
                           help="model file written by `nonn fit` or `nonn fit-images`")
    calibrate.add_argument("normals", metavar="NORMALS", nargs="+",
                           help="held-out normal data: .npy, .npz, .csv or .parquet files or "
                           "shard folders (detector models), or image folders and files "
                           "(image models)")
    calibrate.add_argument("--false-alarm-rate", type=parse_rate, default=0.01, metavar="A",
                           help="share of normal data to flag, in (0, 1); at least 1/A "
                           "NORMALS rows resolve it (default: 0.01)")
    calibrate.add_argument("-o", "--output", metavar="MODEL2",
                           help="write the calibrated model here (default: replace MODEL)")
    add_shared_options(calibrate, table="NORMALS", device="image models: ")
    calibrate.set_defaults(handler=phrased_in_flags(_cmd_calibrate))

    info = sub.add_parser(
        "info", help="describe a saved model",
        description="Print a model file's format, nonn version, estimator, parameters, "
        "fitted values and arrays, without loading the arrays. Image models (`nonn "
        "fit-images`) also show the system, backbone, image size, training images, "
        "feature dimension and stored pixel-map pyramids.",
    )
    info.add_argument("model", metavar="MODEL",
                      help="model file written by `nonn fit` or `nonn fit-images`")
    info.add_argument("--verify", action="store_true",
                      help="also load the model, checking every array against its metadata "
                      "(image models: and the parts against each other)")
    info.set_defaults(handler=phrased_in_flags(_cmd_info))

    demo = sub.add_parser(
        "demo", help="run the demonstrations (synthetic shapes, one-class digits)",
        description="Run the demonstrations and write their files into DIR: the paper's "
        "synthetic 2-D benchmark (Table 5 and Figure 8: every detector on generated "
        "shapes), then one-class digits on scikit-learn's bundled 8x8 digits (no "
        "download: each digit normal in turn, the default k-NNN beside plain k-NN, AUROC, "
        "the held-out false-alarm rate, and digits.png: the most normal and most "
        "anomalous test images with their p-values).",
    )
    demo.add_argument("--out", metavar="DIR", default="nonn-demo",
                      help="output folder (default: nonn-demo)")
    demo.add_argument("--seeds", type=int, metavar="N",
                      help="random seeds per dataset and size (default: 5)")
    demo.add_argument("--sizes", type=_sizes, metavar="N,N,...",
                      help="training set sizes, comma-separated (default: 100,200,300,400,500)")
    demo.add_argument("--quick", action="store_true",
                      help="a fast smoke run: 2 seeds, sizes 100,300 and a coarser figure, "
                      "and digits 0-2 only (overrides --seeds and --sizes)")
    add_shared_options(demo)
    demo.set_defaults(handler=phrased_in_flags(_cmd_demo))

    bench = sub.add_parser(
        "bench", help="accuracy benchmark on the real datasets (needs NONN_DATA)",
        description="Run the accuracy benchmark: the novelty protocol on ADBench data "
        "(train on normals, test on held-out normals + all anomalies), every detector "
        "and peer side by side, several seeds. Writes CSV, Markdown and a PNG per suite.",
    )
    bench.add_argument("--suite", choices=["mvtec", "classical", "cifar10", "mvtec_union", "all"],
                       default="mvtec", help="which suite (default: mvtec, the paper's Table 1)")
    bench.add_argument("--out", metavar="DIR", default="nonn-bench",
                       help="output folder; one sub-folder per suite (default: nonn-bench)")
    bench.add_argument("--seeds", type=int, default=3, metavar="N",
                       help="seeds 0..N-1 (default: 3)")
    bench.add_argument("--detectors", type=_csv_list, metavar="NAME,...",
                       help="detector names or patterns such as 'KNN-*' (default: all available)")
    bench.add_argument("--datasets", type=_csv_list, metavar="NAME,...",
                       help="only these datasets of the suite")
    bench.add_argument("--resume", action="store_true",
                       help="continue from the suite's results.csv checkpoint")
    add_shared_options(bench)
    bench.set_defaults(handler=phrased_in_flags(_cmd_bench))
    return sub
