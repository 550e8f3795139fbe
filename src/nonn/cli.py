"""The ``nonn`` command line: a thin layer over the library.

::

    nonn fit TRAIN -o MODEL [--detector knnn|knn|global|local] [--cluster ADDRESS|local] [options]
    nonn score MODEL QUERIES -o SCORES [--cluster ADDRESS|local]
    nonn info MODEL [--verify]      (also image models from `nonn fit-images`)
    nonn demo [--out DIR] [--seeds N] [--sizes 100,200,...] [--quick]

TRAIN and QUERIES are a matrix file or a folder of .npy/.parquet shards;
``--cluster`` runs fit and score on Dask (``nonn.distributed``).

Every command has ``--help``. Errors print one ``nonn: error: ...`` line on
stderr and exit with status 2; success exits with 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

from . import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN, __version__
from . import _io
from .neighbors import BACKENDS, METRICS
from .persistence import ModelFileError, load, read_meta

#: --detector name -> estimator class
DETECTORS = {
    "knnn": KNNN,
    "knn": KNN,
    "global": GlobalEigenKNN,
    "local": LocalEigenKNN,
}


def _contamination(text):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a float in (0, 0.5], got {text!r}") from None


def _int_or_auto(text):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'auto', got {text!r}") from None


def _float_or_auto(text):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _backend_param(text):
    """KEY=VALUE -> (key, value); VALUE as int, float, true/false/none, or text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE such as index=HNSW32 or refine=2, got {text!r}")
    low = value.strip().lower()
    if low in ("true", "false"):
        return key.strip(), low == "true"
    if low == "none":
        return key.strip(), None
    for conv in (int, float):
        try:
            return key.strip(), conv(value)
        except ValueError:
            pass
    return key.strip(), value


#: fit options: (flag, parameter name, argparse keywords). Defaults are the
#: estimators' own: an option the user does not give is not passed at all.
_FIT_OPTIONS = (
    ("--n-neighbors", "n_neighbors",
     dict(type=_int_or_auto, metavar="K|auto",
          help="k, neighbours of a query; auto = chosen from the training data "
          "(knnn only) (default: 3)")),
    ("--n-neighbors-of-neighbors", "n_neighbors_of_neighbors",
     dict(type=_int_or_auto, metavar="KP|auto", help="K', size of each training point's "
          "neighbourhood, itself included (knnn only; default: 50)")),
    ("--set-size", "set_size",
     dict(type=_int_or_auto, metavar="L|auto",
          help="L, features per set (knnn, local; default: 5)")),
    ("--aggregate", "aggregate",
     dict(choices=("min", "sum"), help="how a query's k per-neighbour sums combine: "
          "sum = the paper's Eq. 2 (knnn only; default: min)")),
    ("--memory", "memory",
     dict(choices=("precomputed", "lean"), help="store every training point's eigen-state, "
          "or only the neighbour graph and compute it when scoring (knnn only; "
          "default: precomputed)")),
    ("--reorder", "reorder",
     dict(choices=("greedy", "none"), help="correlation re-ordering of the features before "
          "they are cut into sets (knnn, local; default: greedy)")),
    ("--metric", "metric",
     dict(choices=sorted(METRICS), help="distance used to find neighbours "
          "(default: euclidean)")),
    ("--backend", "backend",
     dict(metavar="NAME", help="search backend: 'auto' or one of "
          f"{', '.join(sorted(BACKENDS))} (default: auto)")),
    ("--backend-param", "backend_params",
     dict(type=_backend_param, action="append", metavar="KEY=VALUE",
          help="an option of the search backend, repeatable; e.g. --backend faiss "
          "--backend-param index=HNSW32 --backend-param efConstruction=80 "
          "--backend-param refine=2 (default: None)")),
    ("--contamination", "contamination",
     dict(type=_contamination, metavar="auto|FLOAT",
          help="share of training points to flag, in (0, 0.5]; auto = 0.01 "
          "(default: auto)")),
    ("--eig-floor", "eig_floor",
     dict(type=_float_or_auto, metavar="FLOAT|auto", help="relative eigenvalue floor "
          "(knnn, global, local; default: 0.001)")),
)


def _sizes(text):
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints such as 100,200,300, got {text!r}")
    return sizes


def _human_bytes(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _note(message):
    print(f"nonn: {message}", file=sys.stderr)


# --------------------------------------------------------------------- fit
def _cmd_fit(args):
    cls = DETECTORS[args.detector]
    cluster = getattr(args, "cluster", None)
    if cluster is not None and cls is not KNNN:
        raise ValueError(f"--cluster fits --detector knnn only; got --detector {args.detector}. "
                         "Drop --cluster to fit it on this machine.")
    accepted = cls().get_params()
    params = {}
    for flag, name, _ in _FIT_OPTIONS:
        if name not in vars(args):
            continue
        if name in accepted:
            value = getattr(args, name)
            params[name] = dict(value) if name == "backend_params" else value
        else:
            _note(f"note: {flag} does not apply to --detector {args.detector}; ignored.")
    # Fail before the (possibly long) fit, not after it.
    _io.check_output_folder(args.output)
    if cluster is not None:
        return _fit_on_cluster(args, cluster, params)
    X = _io.read_matrix_or_shards(args.train, key=args.key)
    det = cls(verbose=True, **params)
    start = time.perf_counter()
    det.fit(X)
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
    print(f"  saved to {output} ({_human_bytes(os.path.getsize(output))})")


def _client_arg(cluster):
    """--cluster value -> DistributedKNNN's client (None: an embedded LocalCluster)."""
    return None if cluster == "local" else cluster


def _fit_on_cluster(args, cluster, params):
    from .distributed import DistributedKNNN, read_shards

    if _io.is_shard_folder(args.train):
        X = read_shards(args.train, key=args.key)  # read on the workers
    else:
        X = _io.read_matrix(args.train, key=args.key)
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
    if cluster is not None:
        return _score_on_cluster(args, cluster)
    _io.check_scores_path(args.output)
    det = load(args.model)
    det.set_params(verbose=True)
    Q = _io.read_matrix_or_shards(args.queries, key=args.key)
    start = time.perf_counter()
    anomaly = det.anomaly_score(Q)
    # score_samples and predict would each recompute the search and Eq. 2;
    # these are their definitions in BaseDetector, applied to the one result.
    samples = -anomaly
    labels = np.where(samples - det.offset_ < 0, -1, 1)
    seconds = time.perf_counter() - start
    _io.write_scores(args.output, anomaly, samples, labels)
    _print_score(det, len(anomaly), int((labels == -1).sum()), seconds, args.output)
    return 0


def _print_score(det, n, n_out, seconds, output, where=""):
    print(f"scored {n} queries with {type(det).__name__}{where} in {seconds:.2f} s: "
          f"{n_out} flagged as anomalies (label -1)")
    print(f"  wrote {output}")


def _score_on_cluster(args, cluster):
    """Score with the model spread over the cluster. SCORES is a file (the
    scores are gathered here, then written as without --cluster) or a folder
    (no extension): Parquet part files written by the workers, or a Zarr
    store (a path ending in .zarr) written by the workers."""
    from .distributed import DistributedKNNN, read_shards

    zarr_out = args.output.rstrip("/\\").endswith(".zarr")
    folder = zarr_out or _io._extension(args.output) == "" or os.path.isdir(args.output)
    if folder:
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"Cannot write {args.output!r}: the folder {parent!r} "
                                    "does not exist.")
        if not zarr_out and os.path.isdir(args.output) and os.listdir(args.output):
            raise FileExistsError(f"Cannot write Parquet parts into {args.output!r}: the "
                                  "folder is not empty. Give a new or empty folder.")
    else:
        _io.check_scores_path(args.output)
    model = load(args.model)
    if type(model) is not KNNN:
        raise ValueError(f"--cluster scores KNNN models; {args.model!r} holds a "
                         f"{type(model).__name__}. Drop --cluster to score it here.")
    if _io.is_shard_folder(args.queries):
        Q = read_shards(args.queries, key=args.key)
    else:
        Q = _io.read_matrix(args.queries, key=args.key)
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
            samples = -anomaly
            labels = np.where(samples - det.offset_ < 0, -1, 1)
            _io.write_scores(args.output, anomaly, samples, labels)
            n, n_out = len(anomaly), int((labels == -1).sum())
        seconds = time.perf_counter() - start
        _print_score(det, n, n_out, seconds, args.output, where)
    return 0


def _count_flagged(folder, zarr_out=False):
    if zarr_out:
        import zarr

        return int((zarr.open_group(folder, mode="r")["label"][:] == -1).sum())
    _, pq = _io._pyarrow()
    return int((pq.read_table(folder, columns=["label"]).column("label").to_numpy() == -1).sum())


# -------------------------------------------------------------------- info
def _cmd_info(args):
    try:
        meta = read_meta(args.model)
    except ModelFileError:
        # an image model (`nonn fit-images`) is refused by the core reader;
        # anything else keeps the core reader's message
        from .vision import systems as vision

        if vision.is_image_model(args.model):
            return _info_image(args)
        raise
    print(f"model:        {args.model} ({_human_bytes(os.path.getsize(args.model))} on disk)")
    print(f"format:       {meta.get('format')} version {meta.get('format_version')}")
    print(f"nonn version: {meta.get('nonn_version')}")
    print(f"estimator:    {meta.get('estimator')}")
    print(f"n_features:   {meta.get('n_features_in')} ({meta.get('dtype')})")
    _print_values("params:", meta.get("params"))
    _print_values("fitted:", meta.get("fitted"))
    total = _print_arrays("arrays:", meta.get("arrays"))
    print(f"memory:       {_human_bytes(total)} of arrays when loaded")
    if args.verify:
        load(args.model)
        print("verified:     every array matches its metadata; the model loads")
    return 0


def _print_values(title, values, indent="  "):
    print(title)
    for name, value in (values or {}).items():
        print(f"{indent}{name} = {value!r}")


def _array_bytes(spec):
    shape = tuple(spec.get("shape", ()))
    return shape, np.dtype(spec.get("dtype", "V")), int(np.prod(shape, dtype=np.int64))


def _print_arrays(title, arrays, indent="  "):
    """Print a metadata array table; returns the bytes the arrays take."""
    print(title)
    arrays = arrays or {}
    width = max((len(k) for k in arrays), default=0)
    total = 0
    for name, spec in arrays.items():
        shape, dtype, size = _array_bytes(spec)
        nbytes = size * dtype.itemsize
        total += nbytes
        print(f"{indent}{name:<{width}}  {str(shape):<20} {dtype.name:<8} {_human_bytes(nbytes)}")
    return total


def _info_image(args):
    """``nonn info`` of a model written by ``nonn fit-images``."""
    from .vision import systems as vision

    meta = vision.read_meta(args.model)
    det = meta["detector"]
    params = meta["params"]
    arrays = meta["arrays"]
    fitted = det.get("fitted") or {}
    feats = arrays.get("train_features", {})
    n_train, dim = (list(feats.get("shape", [])) + [None, None])[:2]
    print(f"model:        {args.model} ({_human_bytes(os.path.getsize(args.model))} on disk)")
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
    print(f"threshold:    offset_ = {fitted.get('offset_')!r}, contamination_ = "
          f"{fitted.get('contamination_')!r} (contamination = {params.get('contamination')!r})")
    maps = arrays.get("train_maps")
    if maps is not None:
        shape, dtype, n = _array_bytes(maps)
        print(f"pixel maps:   stored: {shape[0]} pyramids of {shape[1]} channels x "
              f"{shape[2]} x {shape[3]} ({dtype.name}, {_human_bytes(n * dtype.itemsize)}); "
              f"map_nn = {params.get('map_nn', 'knn')}, n_map_neighbors = "
              f"{params.get('n_map_neighbors')}, sigma = {params.get('sigma')}")
    else:
        print(f"pixel maps:   none (a {meta.get('system')} stores no feature pyramids; "
              "fit with --system spade for heat maps)")
    _print_values("params:", params)
    print(f"detector:     {det.get('estimator')} on {det.get('n_features_in')} features "
          f"({det.get('dtype')}), nonn-model version {det.get('format_version')}")
    _print_values("  params:", det.get("params"), indent="    ")
    _print_values("  fitted:", fitted, indent="    ")
    total = _print_arrays("arrays:", arrays)
    total += _print_arrays("  detector arrays:", det.get("arrays"), indent="    ")
    print(f"memory:       {_human_bytes(total)} of arrays when loaded")
    if args.verify:
        vision.load(args.model)
        print("verified:     the model loads; every array matches its metadata (the zip's "
              "CRC-32 checked as it is read; the format has no other checksum), the "
              "detector passes the core checks, and the features, pyramids and "
              "detector agree in shape")
    return 0


# -------------------------------------------------------------------- demo
def _cmd_demo(args):
    from .synthetic import run_demo

    kwargs = {"out_dir": args.out, "verbose": True, "quick": args.quick}
    if args.quick and (args.seeds is not None or args.sizes is not None):
        _note("note: --quick overrides --seeds and --sizes (2 seeds, sizes 100,300).")
    if args.seeds is not None:
        kwargs["seeds"] = args.seeds
    if args.sizes is not None:
        kwargs["sizes"] = args.sizes
    run_demo(**kwargs)
    return 0


# ------------------------------------------------------------------- bench
def _cmd_bench(args):
    from .evaluation import run_benchmark

    suites = ["mvtec", "classical", "cifar10", "mvtec_union"] if args.suite == "all" else [args.suite]
    for suite in suites:
        out = os.path.join(args.out, suite)
        run_benchmark(suite, out, detectors=args.detectors, seeds=tuple(range(args.seeds)),
                      datasets=args.datasets, progress=True, resume=args.resume)
        print(f"wrote {out}/summary.md, summary.csv, summary.png, results.csv")
    return 0


# ------------------------------------------------------------------ parser
def build_parser():
    """The argparse parser of the ``nonn`` command."""
    parser = argparse.ArgumentParser(
        prog="nonn",
        description="k-NNN anomaly detection (nearest neighbours of neighbours; "
        "Nizan & Tal, WACV Workshops 2024).",
    )
    parser.add_argument("--version", action="version", version=f"nonn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    for flag, name, kwargs in _FIT_OPTIONS:
        fit.add_argument(flag, dest=name, default=argparse.SUPPRESS, **kwargs)
    fit.add_argument("--key", metavar="NAME",
                     help="array in a .npz file (default: 'X' or the only array), or "
                     "embedding column in a .parquet file")
    fit.add_argument("--cluster", metavar="ADDRESS|local",
                     help="fit on a Dask cluster (knnn only; needs nonn[distributed]): a "
                     "scheduler address such as tcp://host:8786, or 'local' for a LocalCluster "
                     "on this machine. Shards of a TRAIN folder are read by the workers")
    fit.set_defaults(handler=_cmd_fit)

    score = sub.add_parser(
        "score", help="score queries with a saved model",
        description="Score QUERIES with MODEL and write one row per query: index, "
        "anomaly_score (higher = more anomalous), score_samples (higher = more normal) "
        "and label (+1 inlier, -1 outlier).",
    )
    score.add_argument("model", metavar="MODEL", help="model file written by `nonn fit`")
    score.add_argument("queries", metavar="QUERIES",
                       help="query matrix: .npy, .npz, .csv or .parquet, one sample per row; "
                       "or a folder of .npy/.parquet shards")
    score.add_argument("-o", "--output", metavar="SCORES", required=True,
                       help="scores file: .csv, .npy (structured array), .npz or .parquet; "
                       "with --cluster also a folder (no extension) that receives Parquet "
                       "part files, or a .zarr store, written by the workers")
    score.add_argument("--key", metavar="NAME",
                       help="array in a .npz file, or embedding column in a .parquet file")
    score.add_argument("--cluster", metavar="ADDRESS|local",
                       help="score on a Dask cluster (KNNN models; needs nonn[distributed]): "
                       "a scheduler address, or 'local' for a LocalCluster on this machine")
    score.set_defaults(handler=_cmd_score)

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
    info.set_defaults(handler=_cmd_info)

    demo = sub.add_parser(
        "demo", help="run the synthetic demonstration",
        description="Run the synthetic demonstration: fit the detectors on generated "
        "data, print a table and write its files into DIR.",
    )
    demo.add_argument("--out", metavar="DIR", default="nonn-demo",
                      help="output folder (default: nonn-demo)")
    demo.add_argument("--seeds", type=int, metavar="N",
                      help="random seeds per dataset and size (default: 5)")
    demo.add_argument("--sizes", type=_sizes, metavar="N,N,...",
                      help="training set sizes, comma-separated (default: 100,200,300,400,500)")
    demo.add_argument("--quick", action="store_true",
                      help="a fast smoke run: 2 seeds, sizes 100,300 and a coarser figure "
                      "(overrides --seeds and --sizes)")
    demo.set_defaults(handler=_cmd_demo)

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
    bench.set_defaults(handler=_cmd_bench)

    # Image subcommands (fit-images, score-images) live with the vision extra;
    # the module imports without torch and loads it only when a command runs.
    from .vision import cli as vision_cli

    vision_cli.register(sub)
    return parser


def _csv_list(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def _one_line(exc):
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"nonn: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv=None):
    """Run the ``nonn`` command with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status: 0 on success, 2 on a usage or input error.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.handler(args)
    except (OSError, ValueError, ImportError) as exc:
        # ModelFileError is a ValueError; a missing optional dependency an ImportError.
        print(f"nonn: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nonn: interrupted", file=sys.stderr)
        return 130
    except MemoryError as exc:
        print(f"nonn: error: out of memory ({_one_line(exc)}). Use a smaller input, or a "
              "machine with more memory.", file=sys.stderr)
        return 2
    except RecursionError:
        print("nonn: error: an input is nested too deeply to process.", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's promise: one line, exit 2
        print(f"nonn: error: unexpected {type(exc).__name__}: {_one_line(exc)} (this is a "
              "bug in nonn; please report it with the command that gave it)", file=sys.stderr)
        return 2
