"""The ``nonn`` command line: a thin layer over the library.

::

    nonn fit TRAIN -o MODEL [--detector knnn|knn|global|local] [--scale none|standard|...]
             [--header auto|yes|no] [--cluster ADDRESS|local] [options]
    nonn score MODEL QUERIES -o SCORES [--fdr Q] [--header auto|yes|no]
               [--cluster ADDRESS|local]
    nonn calibrate MODEL NORMALS... [--false-alarm-rate A] [-o MODEL2]
    nonn info MODEL [--verify]      (also image models from `nonn fit-images`)
    nonn explain MODEL QUERIES -o EXPLANATIONS.csv|.npz [--top N] [--plot DIR]
    nonn update MODEL NEW_NORMALS [-o MODEL2]
    nonn demo [--out DIR] [--seeds N] [--sizes 100,200,...] [--quick]
              (synthetic Table 5, then one-class 8x8 digits)

TRAIN and QUERIES are a matrix file or a folder of .npy/.parquet shards;
``--cluster`` runs fit and score on Dask (``nonn.distributed``). Column
names (a CSV header, Parquet columns) are stored in the model and QUERIES
are matched to them by name.

Every command has ``--help``. Errors print one ``nonn: error: ...`` line on
stderr, phrased in flags, and exit with status 2; success exits with 0;
SIGTERM removes any partial output and exits with 143. Progress bars are
drawn only when stderr is a terminal (``--progress`` / ``--no-progress``).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import inspect
import os
import re
import signal
import sys
import threading
import time
import warnings

import numpy as np

from . import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN, __version__
from . import _io
from ._base import conformal_pvalues, fdr_labels
from .neighbors import BACKENDS, METRICS, resolve_backend
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


def _set_size(text):
    if text in ("auto", "all"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an int, 'all' or 'auto', got {text!r}") from None


def _float_or_auto(text):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _unit_interval(what, example):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < 1:
            raise argparse.ArgumentTypeError(
                f"expected {what} in (0, 1) such as {example}, got {text!r}")
        return value
    return parse


#: --fdr Q: a false-discovery rate; --false-alarm-rate A: a share of normals
_fdr = _unit_interval("a false-discovery rate", "0.05")
_rate = _unit_interval("a false-alarm rate", "0.01")


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
          "neighbourhood, itself included (knnn only; default: 25)")),
    ("--set-size", "set_size",
     dict(type=_set_size, metavar="L|all|auto",
          help="L, features per set; all = one set of every feature (knnn, local; "
          "local's default is 5; default: all)")),
    ("--normalize", "normalize",
     dict(choices=("none", "l2", "auto"), help="l2 = rows scaled to unit length before "
          "anything else (cosine geometry); auto = l2 with 64 features or more, none below "
          "(knn, global and local default to none; default: auto)")),
    ("--whiten", "whiten",
     dict(type=_float_or_auto, metavar="W|auto", help="global whitening strength in [0, 1] "
          "after --normalize: the weight of the Ledoit-Wolf covariance blended with an "
          "isotropic one; auto = 0.5 with 64 features or more, 0 below (knn, global and "
          "local default to 0; default: auto)")),
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
     dict(type=_float_or_auto, metavar="FLOAT|auto", help="relative eigenvalue floor; auto "
          "(knnn only) = 0.1 with 64 features or more, 1.0 below (knnn, global, local; "
          "global and local default to 0.001; default: auto)")),
    ("--scale", "scale",
     dict(choices=("none", "standard", "minmax", "robust"),
          help="per-column scaling learned from TRAIN and applied to every query, for "
          "tabular data whose columns have different units: standard (mean 0, "
          "variance 1), minmax (to [0, 1]) or robust (median 0, inter-quartile range "
          "1); scikit-learn's scalers' statistics, stored in the model (default: none)")),
)

#: parameter name -> its flag (for messages phrased in flags)
_FLAGS = {name: flag for flag, name, _ in _FIT_OPTIONS}
_FLAGS.update({"device": "--device", "weights": "--weights", "nn": "--nn",
               "normalize": "--normalize", "image_size": "--image-size",
               "batch_size": "--batch-size", "map_nn": "--map-nn"})


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


# ------------------------------------------------------- messages in flags
_ESTIMATOR_CALL = re.compile(r"\b[A-Z]\w*\(((?:\w+=[^()]*?)(?:, \w+=[^()]*?)*)\)")
_PARAM_GRAMMAR = re.compile(
    r"The '(?P<name>\w+)' parameter of \w+ must be (?P<expected>.+?)\. "
    r"Got (?P<got>.+?) instead\.(?: For example: \w+\((?P=name)=(?P<hint>[^()]*)\)\.)?")


def _unquote(value):
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _flag_value(name, value):
    """``name=value`` (Python) -> ``--flag value`` (``None`` when no flag)."""
    if name == "backend_params":
        items = re.findall(r"['\"](\w+)['\"]\s*:\s*('[^']*'|\"[^\"]*\"|[^,}]+)", value)
        return " ".join(f"--backend-param {k}={_unquote(v)}" for k, v in items) or None
    if name in ("index", "nprobe", "efSearch", "efConstruction", "refine"):
        return f"--backend-param {name}={_unquote(value)}"
    flag = _FLAGS.get(name)
    if flag is None:
        return None
    value = _unquote(value)
    if value == "True" and name == "normalize":
        return flag
    return f"{flag} {'none' if value == 'None' and name == 'scale' else value}"


def in_flags(text):
    """Rephrase the library's Python spellings (``backend='faiss'``,
    ``KNNN(contamination=0.01)``, "The 'k' parameter of KNNN must be ...")
    in the command line's flags; text without them is returned unchanged."""
    def grammar(m):
        flag = _FLAGS.get(m.group("name"))
        if flag is None:
            return m.group(0)
        out = f"{flag} must be {m.group('expected')}; got {m.group('got')}."
        if m.group("hint") is not None:
            out += f" For example: {_flag_value(m.group('name'), m.group('hint'))}."
        return out

    def call(m):
        parts = [_flag_value(*arg.split("=", 1)) for arg in
                 re.split(r", (?=\w+=)", m.group(1))]
        return " ".join(parts) if all(parts) else m.group(0)

    def assignment(m):
        return _flag_value(m.group(1), m.group(2)) or m.group(0)

    text = _PARAM_GRAMMAR.sub(grammar, text)
    text = _ESTIMATOR_CALL.sub(call, text)
    text = re.sub(r"\b(backend_params)=(\{[^}]*\})", assignment, text)
    # (not "--backend-param KEY=VALUE", which is already a flag)
    text = re.sub(r"(?<!-param )(?<![\w.-])(\w+)=('[^']*'|\"[^\"]*\"|[\w.+-]+)",
                  assignment, text)
    text = re.sub(r" The value used is stored as the fitted attribute \w+\.",
                  " `nonn info` shows the value used.", text)
    return text


def _in_flags(handler):
    """Run a command; its input errors say flags, not Python spellings."""
    @functools.wraps(handler)
    def run(args):
        try:
            return handler(args)
        except ValueError as exc:
            if len(exc.args) == 1 and isinstance(exc.args[0], str):
                exc.args = (in_flags(exc.args[0]),)
            raise
    return run


# ---------------------------------------------------------------- progress
def _progress(args):
    """Progress bars: on a terminal, unless --progress / --no-progress says."""
    chosen = getattr(args, "progress", None)
    return sys.stderr.isatty() if chosen is None else bool(chosen)


def _runs_kernels(argv):
    """Whether the command line ``argv`` can run nonn's compiled kernels
    (every command but those that only read metadata or print help)."""
    argv = [str(a) for a in argv]
    words = [a for a in argv if not a.startswith("-")]
    if {"--help", "-h", "--version"} & set(argv):
        return False
    return not (words[:1] == ["info"] and "--verify" not in argv)


class _CompileNotice:
    """One line on stderr when numba compiles nonn's kernels (the first use
    after installing or upgrading, ~20 s); nothing when it loads them from
    its cache. Numba signals real compilations only ("numba:compile" events
    are not sent for cache hits)."""

    def __init__(self, argv):
        self.said = False
        self.listener = None
        self.argv = argv

    def __enter__(self):
        if "numba" not in sys.modules and not _runs_kernels(self.argv):
            return self  # e.g. `nonn info`: no kernel, no need to import numba
        try:
            from numba.core import event
        except ImportError:  # pragma: no cover - numba is a dependency
            return self
        notice = self

        class Listener(event.Listener):
            def on_start(self, ev):
                dispatcher = (ev.data or {}).get("dispatcher")
                module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
                if not notice.said and module.startswith("nonn."):
                    notice.said = True
                    _note("compiling kernels (first use, ~20 s)")

            def on_end(self, ev):
                pass

        self.listener = Listener()
        event.register("numba:compile", self.listener)
        return self

    def __exit__(self, *exc):
        if self.listener is not None:
            from numba.core import event

            event.unregister("numba:compile", self.listener)


# --------------------------------------------------------------------- fit
def _fit_params(args, cls):
    accepted = cls().get_params()
    params = {}
    for flag, name, _ in _FIT_OPTIONS:
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
            _note(f"note: {flag} does not apply to --detector {args.detector}; ignored.")
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


def _as_frame(X, names):
    """``X`` with its column names (a DataFrame) so that the estimator stores
    them as ``feature_names_in_``; ``X`` itself without names."""
    if names is None:
        return X
    import pandas as pd

    return pd.DataFrame(X, columns=names, copy=False)


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
    det = cls(verbose=_progress(args), **params)
    start = time.perf_counter()
    det.fit(_as_frame(X, names))
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
    from .distributed import DistributedKNNN, read_shards

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
def _looks_like_model(path):
    """Whether ``path`` is a zip holding nonn metadata (a model file)."""
    import zipfile

    try:
        if not os.path.isfile(path) or not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            return "__meta__.npy" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _load_detector(args):
    """The model of `nonn score`, refused with the right command when it is
    an image model or when MODEL and QUERIES are swapped."""
    if (_io.extension(args.model) in _io.MATRIX_FORMATS
            and not _looks_like_model(args.model) and _looks_like_model(args.queries)):
        raise ValueError(f"MODEL and QUERIES look swapped: {args.queries!r} is the model file "
                         f"and {args.model!r} the data. The model comes first: nonn score "
                         f"{args.queries} {args.model} -o {args.output}")
    try:
        return load(args.model)
    except ModelFileError:
        from .vision import systems as vision

        if vision.is_image_model(args.model):
            raise ValueError(f"{args.model!r} is an image model (from `nonn fit-images`); "
                             "score images with it: nonn score-images "
                             f"{args.model} IMAGES... -o SCORES.csv") from None
        raise


def _align_columns(Q, names, det, path):
    """Queries in the model's column order, as the estimator wants them.

    Same names in another order are reordered (with a note); missing or
    unexpected names are refused, listing them. Without names on one side
    the columns are taken in order (the estimator checks their number)."""
    fitted = getattr(det, "feature_names_in_", None)
    if fitted is None:
        return Q
    fitted = [str(n) for n in fitted]
    if names is None:
        _note(f"note: {path!r} has no column names; its columns are taken in the order of "
              f"the model's ({_short_list(fitted)}).")
        return _as_frame(Q, fitted)
    if names != fitted:
        have, want = set(names), set(fitted)
        missing = [n for n in fitted if n not in have]
        extra = [n for n in names if n not in want]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {_short_list(missing)}")
            if extra:
                parts.append(f"not in the model {_short_list(extra)}")
            raise ValueError(
                f"{path!r} does not have the columns the model was fitted on: "
                f"{'; '.join(parts)}. Give the model's {len(fitted)} columns "
                f"({_short_list(fitted)}); `nonn info MODEL` lists them.")
        Q = Q[:, [names.index(n) for n in fitted]]
        _note(f"note: {path!r} has the model's columns in another order; reordered to match "
              "the model.")
    return _as_frame(Q, fitted)


def _short_list(names, limit=8):
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _cmd_score(args):
    cluster = getattr(args, "cluster", None)
    _io.check_not_an_input(args.output, {"MODEL": args.model, "QUERIES": args.queries})
    if cluster is not None:
        return _score_on_cluster(args, cluster)
    _io.check_scores_path(args.output)
    det = _load_detector(args)
    det.set_params(verbose=_progress(args))
    Q, names = _io.read_table_or_shards(args.queries, key=args.key, header=args.header)
    Q = _align_columns(Q, names, det, args.queries)
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


def flagged_how(det, fdr, n):
    """How the labels were set, for the line that counts the flagged rows."""
    if fdr is not None:
        return f"at false-discovery rate {fdr:g} (Benjamini-Hochberg over these {n})"
    rate = getattr(det, "contamination_", None)
    return ("at the model's threshold" if rate is None else
            f"at the model's threshold (false-alarm rate {rate:g})")


def _print_score(det, n, n_out, seconds, output, where="", fdr=None):
    print(f"scored {n} queries with {type(det).__name__}{where} in {seconds:.2f} s: "
          f"{n_out} flagged as anomalies (label -1) {flagged_how(det, fdr, n)}")
    print(f"  wrote {output}")


def _score_on_cluster(args, cluster):
    """Score with the model spread over the cluster. SCORES is a file (the
    scores are gathered here, then written as without --cluster) or a folder
    (no extension): Parquet part files written by the workers, or a Zarr
    store (a path ending in .zarr) written by the workers."""
    from .distributed import DistributedKNNN, read_shards

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
    model = _load_detector(args)
    if type(model) is not KNNN:
        raise ValueError(f"--cluster scores KNNN models; {args.model!r} holds a "
                         f"{type(model).__name__}. Drop --cluster to score it here.")
    if _io.is_shard_folder(args.queries):
        Q = read_shards(args.queries, key=args.key)
    else:
        Q, names = _io.read_table(args.queries, key=args.key, header=args.header)
        Q = np.asarray(_align_columns(Q, names, model, args.queries))
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
    swapped = [p for p in args.normals if _looks_like_model(p)]
    if swapped and not _looks_like_model(args.model):
        raise ValueError(f"MODEL and NORMALS look swapped: {swapped[0]!r} is a model file. The "
                         f"model comes first: nonn calibrate {swapped[0]} NORMALS...")
    try:
        det = load(args.model)
    except ModelFileError:
        from .vision import systems as vision

        if vision.is_image_model(args.model):
            return _calibrate_image_model(args, output)
        raise
    if args.device is not None:
        _note("note: --device applies to image models; ignored.")
    parts = []
    for path in args.normals:
        Q, cols = _io.read_table_or_shards(path, key=args.key, header=args.header)
        parts.append(np.asarray(_align_columns(Q, cols, det, path)))
    if len({p.shape[1] for p in parts}) > 1:
        raise ValueError("The NORMALS files have different numbers of columns ("
                         f"{', '.join(str(p.shape[1]) for p in parts)}); give files of the "
                         f"model's {det.n_features_in_} columns.")
    names = getattr(det, "feature_names_in_", None)
    X = np.concatenate(parts) if len(parts) > 1 else parts[0]
    before = _threshold_summary(det)
    det.set_params(verbose=_progress(args))
    start = time.perf_counter()
    det.calibrate(_as_frame(X, None if names is None else [str(n) for n in names]),
                  args.false_alarm_rate)
    seconds = time.perf_counter() - start
    _warn_few(len(X), args.false_alarm_rate, "normals")
    det.set_params(verbose=False)
    det.save(output)
    _print_calibrate(det, det, len(X), "held-out normals", seconds, before, output)
    return 0


def _calibrate_image_model(args, output):
    from .vision import _images
    from .vision import cli as vision_cli
    from .vision import systems as vision

    for flag, given in (("--key", args.key), ("--header", args.header != "auto")):
        if given:
            _note(f"note: {flag} applies to tables, not to images; ignored.")
    vision_cli._require_vision()
    system = vision.load(args.model)
    system.set_params(verbose=vision_cli._verbose(args))
    if args.device is not None:
        system.set_params(device=args.device)
    paths = []
    for src in args.normals:
        paths += _images.as_image_list(src)
    before = _threshold_summary(system.detector_)
    start = time.perf_counter()
    system.calibrate(paths, args.false_alarm_rate)
    seconds = time.perf_counter() - start
    _warn_few(len(paths), args.false_alarm_rate, "images")
    # a saved model does not print progress bars when a library user loads it
    system.set_params(verbose="auto")
    system.save(output)
    _print_calibrate(system, system.detector_, len(paths), "held-out normal images", seconds,
                     before, output)
    return 0


def _warn_few(n, rate, what):
    """A note when ``n`` calibration samples cannot resolve ``rate``."""
    import math

    need = math.ceil(1 / rate - 1e-9)
    if n < need:
        _note(f"note: {n} {what} are too few for a false-alarm rate of {rate:g} (it needs at "
              f"least {need}); the threshold falls among their lowest scores, so expect about "
              f"{1 / (n + 1):.1%}-{min(2 / (n + 1), 1):.1%} of new normal data flagged. Give "
              "more held-out normals for the rate asked.")


def _threshold_summary(det):
    return (det.offset_, getattr(det, "contamination_", None),
            getattr(det, "threshold_source_", "training"))


def _print_calibrate(model, det, n, what, seconds, before, output):
    offset, rate, source = before
    print(f"calibrated {type(model).__name__} on {n} {what} in {seconds:.2f} s: "
          f"false-alarm rate {det.contamination_:g}")
    was = f"rate {rate:g}, " if rate is not None else ""
    print(f"  offset_: {offset:.6g} -> {det.offset_:.6g} (was {was}{source})")
    print(f"  {len(det.calibration_scores_)} calibration scores now set the threshold and "
          "the p-values")
    print(f"  saved to {output} ({_human_bytes(os.path.getsize(output))})")


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
    fitted = dict(meta.get("fitted") or {})
    names = fitted.pop("feature_names_in_", None)
    if isinstance(names, list):
        print(f"features:     {', '.join(map(str, names))}")
    else:
        print("features:     unnamed (fitted on data without column names; queries are "
              "matched by position)")
    _print_threshold(fitted, meta.get("arrays"))
    _print_values("params:", meta.get("params"))
    _print_values("fitted:", fitted)
    total = _print_arrays("arrays:", meta.get("arrays"))
    print(f"memory:       {_human_bytes(total)} of arrays when loaded")
    if args.verify:
        load(args.model)
        print("verified:     every array matches its metadata; the model loads")
    return 0


def _print_threshold(fitted, arrays, line=None):
    """The threshold (``line``, or the default one), where it comes from,
    and the calibration scores behind it and the p-values (a model file
    written before they were stored used its training scores for both)."""
    arrays = arrays or {}
    spec = arrays.get("calibration_scores_") or arrays.get("train_scores_") or {}
    n = (spec.get("shape") or [None])[0]
    if line is None:
        rate = fitted.get("contamination_")
        rate = f" at false-alarm rate {rate:g}" if isinstance(rate, (int, float)) else ""
        offset = fitted.get("offset_")
        offset = f"{offset:.6g}" if isinstance(offset, (int, float)) else repr(offset)
        line = f"offset_ = {offset}{rate}"
    print(f"threshold:    {line}")
    print(f"  set by:     {fitted.get('threshold_source_') or 'training scores'}")
    if isinstance(n, int):
        print(f"calibration:  {n} scores behind the threshold and the p-values (the smallest "
              f"p-value is 1/{n + 1}); `nonn calibrate` re-sets them on held-out normals")


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
    _print_threshold(fitted, det.get("arrays"),
                     f"offset_ = {fitted.get('offset_')!r}, contamination_ = "
                     f"{fitted.get('contamination_')!r} (contamination = "
                     f"{params.get('contamination')!r})")
    if meta.get("system") == "SPADE":
        score = params.get("image_score", "global")
        print(f"image score:  {score}" + (
            " (the detector's score of the pooled feature; offset_ above)" if score == "global"
            else f" (map_score_q = {params.get('map_score_q')}; its threshold comes from the "
            "held-out map calibration, not the detector's offset_)"))
    maps = arrays.get("train_maps")
    bank = arrays.get("memory_bank")
    if bank is not None:
        shape, dtype, n = _array_bytes(bank)
        print(f"pixel maps:   memory bank: {shape[0]} locations of {shape[1]} channels "
              f"(coreset_ratio = {params.get('coreset_ratio')}; {dtype.name}, "
              f"{_human_bytes(n * dtype.itemsize)}); map_nn = {params.get('map_nn', 'knn')}, "
              f"sigma = {params.get('sigma')}")
    elif maps is not None:
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

    kwargs = {"out_dir": args.out, "verbose": True, "progress": _progress(args),
              "quick": args.quick}
    if args.quick and (args.seeds is not None or args.sizes is not None):
        _note("note: --quick overrides --seeds and --sizes (2 seeds, sizes 100,300).")
    if args.seeds is not None:
        kwargs["seeds"] = args.seeds
    if args.sizes is not None:
        kwargs["sizes"] = args.sizes
    table5 = run_demo(**kwargs)
    print()
    from .digits import run_digits

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
    from .evaluation import run_benchmark

    suites = ["mvtec", "classical", "cifar10", "mvtec_union"] if args.suite == "all" else [args.suite]
    for suite in suites:
        out = os.path.join(args.out, suite)
        run_benchmark(suite, out, detectors=args.detectors, seeds=tuple(range(args.seeds)),
                      datasets=args.datasets, progress=_progress(args), resume=args.resume)
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
    _add_header_option(fit, "TRAIN")
    fit.add_argument("--cluster", metavar="ADDRESS|local",
                     help="fit on a Dask cluster (knnn only; needs nonn[distributed]): a "
                     "scheduler address such as tcp://host:8786, or 'local' for a LocalCluster "
                     "on this machine. Shards of a TRAIN folder are read by the workers")
    add_progress_option(fit)
    fit.set_defaults(handler=_in_flags(_cmd_fit))

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
    score.add_argument("queries", metavar="QUERIES",
                       help="query matrix: .npy, .npz, .csv or .parquet, one sample per row; "
                       "or a folder of .npy/.parquet shards")
    score.add_argument("-o", "--output", metavar="SCORES", required=True,
                       help="scores file: .csv, .npy (structured array), .npz or .parquet; "
                       "with --cluster also a folder (no extension) that receives Parquet "
                       "part files, or a .zarr store, written by the workers")
    score.add_argument("--key", metavar="NAME",
                       help="array in a .npz file, or embedding column in a .parquet file")
    _add_header_option(score, "QUERIES")
    score.add_argument("--fdr", type=_fdr, metavar="Q",
                       help="label the queries as one batch at false-discovery rate Q in (0, "
                       "1): Benjamini-Hochberg on the p-values flags the largest set in which, "
                       "on average, at most a share Q are normal (independent queries; "
                       "default: the model's threshold, set by `nonn fit --contamination` or "
                       "`nonn calibrate --false-alarm-rate`)")
    score.add_argument("--cluster", metavar="ADDRESS|local",
                       help="score on a Dask cluster (KNNN models; needs nonn[distributed]): "
                       "a scheduler address, or 'local' for a LocalCluster on this machine. "
                       "A folder or .zarr SCORES written by the workers has no p_value column "
                       "and takes no --fdr")
    add_progress_option(score)
    score.set_defaults(handler=_in_flags(_cmd_score))

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
    calibrate.add_argument("--false-alarm-rate", type=_rate, default=0.01, metavar="A",
                           help="share of normal data to flag, in (0, 1); at least 1/A "
                           "NORMALS rows resolve it (default: 0.01)")
    calibrate.add_argument("-o", "--output", metavar="MODEL2",
                           help="write the calibrated model here (default: replace MODEL)")
    calibrate.add_argument("--key", metavar="NAME",
                           help="array in a .npz file, or embedding column in a .parquet file")
    _add_header_option(calibrate, "NORMALS")
    calibrate.add_argument("--device", choices=("auto", "cpu", "cuda"),
                           help="image models: override the device saved in the model")
    add_progress_option(calibrate)
    calibrate.set_defaults(handler=_in_flags(_cmd_calibrate))

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
    info.set_defaults(handler=_in_flags(_cmd_info))

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
    add_progress_option(demo)
    demo.set_defaults(handler=_in_flags(_cmd_demo))

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
    add_progress_option(bench)
    bench.set_defaults(handler=_in_flags(_cmd_bench))

    # explain and update: per-feature explanations, new normal samples
    from . import _cli_explain

    _cli_explain.register(sub)

    # Image subcommands (fit-images, score-images) live with the vision extra;
    # the module imports without torch and loads it only when a command runs.
    from .vision import cli as vision_cli

    vision_cli.register(sub)
    return parser


def _add_header_option(parser, what):
    parser.add_argument("--header", choices=_io.HEADER_CHOICES, default="auto",
                        help=f"whether the first row of a CSV {what} names the columns: auto "
                        "= yes when it holds text, when it is exactly 0,1,2,... as pandas' "
                        "to_csv(index=False) writes, or when it is integers above columns of "
                        "decimals; any other first row of numbers (and missing values such "
                        "as NA) is data (default: auto)")


def add_progress_option(parser):
    """--progress / --no-progress (default: bars only when stderr is a terminal)."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: only when stderr is a "
                        "terminal, not when it goes to a file or a pipe)")


def _csv_list(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def _one_line(exc):
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"nonn: warning: {in_flags(' '.join(str(message).split()))}", file=sys.stderr)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every clean-up runs (a
    BaseException, like KeyboardInterrupt, so no ``except Exception``
    swallows it)."""


def _clean_exit_on_sigterm(main):
    """Run ``main`` with SIGTERM turned into :class:`Terminated`: temporary
    files are removed as on any error, one line is printed, and the status is
    143 (128 + SIGTERM), what a shell reports for a process SIGTERM ended."""
    @functools.wraps(main)
    def run(argv=None):
        if threading.current_thread() is not threading.main_thread():
            return main(argv)

        def terminate(signum, frame):
            # a second SIGTERM must not interrupt the clean-up of the first
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise Terminated

        previous = signal.signal(signal.SIGTERM, terminate)
        try:
            with _CompileNotice(sys.argv[1:] if argv is None else argv):
                return main(argv)
        except Terminated:
            print("nonn: terminated (SIGTERM); no partial output was left", file=sys.stderr)
            return 128 + signal.SIGTERM
        finally:
            signal.signal(signal.SIGTERM, previous)
    return run


@_clean_exit_on_sigterm
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
