"""What the ``nonn`` commands share: option types and options, messages in
flags, progress, model loading and the lines that report on a model."""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys

import numpy as np

from .. import _io
from ..neighbors import BACKENDS, METRICS
from ..persistence import ModelFileError, load


# ------------------------------------------------------------ option types
def parse_contamination(text):
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
parse_fdr = _unit_interval("a false-discovery rate", "0.05")
parse_rate = _unit_interval("a false-alarm rate", "0.01")


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
FIT_OPTIONS = (
    ("--n-neighbors", "n_neighbors",
     dict(type=_int_or_auto, metavar="K|auto",
          help="k, neighbors of a query; auto = chosen from the training data "
          "(knnn only) (default: 3)")),
    ("--n-neighbors-of-neighbors", "n_neighbors_of_neighbors",
     dict(type=_int_or_auto, metavar="KP|auto", help="K', size of each training point's "
          "neighborhood, itself included (knnn only; default: 25)")),
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
     dict(choices=("min", "sum"), help="how a query's k per-neighbor sums combine: "
          "sum = the paper's Eq. 2 (knnn only; default: min)")),
    ("--memory", "memory",
     dict(choices=("precomputed", "lean"), help="store every training point's eigen-state, "
          "or only the neighbor graph and compute it when scoring (knnn only; "
          "default: precomputed)")),
    ("--reorder", "reorder",
     dict(choices=("greedy", "none"), help="correlation re-ordering of the features before "
          "they are cut into sets (knnn, local; default: greedy)")),
    ("--metric", "metric",
     dict(choices=sorted(METRICS), help="distance used to find neighbors "
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
     dict(type=parse_contamination, metavar="auto|FLOAT",
          help="share of training points to flag, in (0, 0.5]; auto = 0.01 "
          "(default: auto)")),
    ("--eig-floor", "eig_floor",
     dict(type=_float_or_auto, metavar="FLOAT|auto", help="relative eigenvalue floor; auto "
          "(knnn only) = 0.1 with 64 features or more, 1.0 below (knnn, global, local; "
          "global and local default to 0.001; default: auto)")),
    ("--eig-floor-ref", "eig_floor_ref",
     dict(choices=("auto", "data", "neighborhood"), help="what --eig-floor is relative to "
          "(knnn only): the data's mean feature variance, or each neighbor's neighborhood's "
          "(for normal data made of several populations of different spread); auto = "
          "neighborhood for 64+ features whose neighborhoods' variances spread widely, "
          "else data (default: auto)")),
    ("--scale", "scale",
     dict(choices=("none", "standard", "minmax", "robust"),
          help="per-column scaling learned from TRAIN and applied to every query, for "
          "tabular data whose columns have different units: standard (mean 0, "
          "variance 1), minmax (to [0, 1]) or robust (median 0, inter-quartile range "
          "1); scikit-learn's scalers' statistics, stored in the model (default: none)")),
)


#: parameter name -> its flag (for messages phrased in flags)
FLAGS = {name: flag for flag, name, _ in FIT_OPTIONS}
FLAGS.update({"device": "--device", "weights": "--weights", "nn": "--nn",
              "normalize": "--normalize", "image_size": "--image-size",
              "batch_size": "--batch-size", "map_nn": "--map-nn",
              "map_score_q": "--map-score-q", "coreset_ratio": "--coreset-ratio",
              "map_normalize": "--map-normalize", "test_time_flip": "--test-time-flip",
              "map_score_border": "--map-score-border", "gallery_grid": "--gallery-grid"})


def parse_positive_int(text):
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return v


def parse_nonnegative_int(text):
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text!r}")
    return v


def parse_grid(text):
    """``--gallery-grid``: a positive int, or 'none' (the pooled feature)."""
    if text == "none":
        return text
    try:
        return parse_positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'none', got {text!r}") \
            from None


def human_bytes(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def note(message):
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
    flag = FLAGS.get(name)
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
        flag = FLAGS.get(m.group("name"))
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


def phrased_in_flags(handler):
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


# ---------------------------------------------------------------- options
def progress(args):
    """Progress bars: on a terminal, unless --progress / --no-progress says."""
    chosen = getattr(args, "progress", None)
    return sys.stderr.isatty() if chosen is None else bool(chosen)


def image_verbose(args):
    """Progress bars: --progress / --no-progress, else "auto" (a terminal)."""
    return "auto" if args.progress is None else bool(args.progress)


def add_header_option(parser, what):
    """--header auto|yes|no for the CSV input ``what``."""
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


#: --key of an input table (beside a command's own default, if any)
KEY_HELP = "array in a .npz file, or embedding column in a .parquet file"
#: the QUERIES argument of the commands that read feature rows
QUERIES_HELP = ("query matrix: .npy, .npz, .csv or .parquet, one sample per row; or a folder "
                "of .npy/.parquet shards")


def add_shared_options(parser, *, table=None, key_help=KEY_HELP, fdr=None, device=None,
                       progress=True):
    """Add the options several commands share, each phrased once.

    ``table``: the name of the command's table input ("QUERIES"): ``--key``
    (with ``key_help``) and ``--header`` for it. ``fdr``: ``(what, set_by)``,
    the rows labelled ("queries") and what sets the model's threshold:
    ``--fdr``. ``device``: ``--device``, which overrides an image model's;
    the value starts its help ("" or "image models: "). ``progress``:
    ``--progress`` / ``--no-progress``.
    """
    if table is not None:
        parser.add_argument("--key", metavar="NAME", help=key_help)
        add_header_option(parser, table)
    if fdr is not None:
        what, set_by = fdr
        parser.add_argument("--fdr", type=parse_fdr, metavar="Q",
                            help=f"label the {what} as one batch at false-discovery rate Q in "
                            "(0, 1): Benjamini-Hochberg on the p-values flags the largest set "
                            "in which, on average, at most a share Q are normal (independent "
                            f"{what}; default: the model's threshold, set by {set_by})")
    if device is not None:
        parser.add_argument("--device", choices=("auto", "cpu", "cuda"),
                            help=f"{device}override the device saved in the model")
    if progress:
        add_progress_option(parser)


# ----------------------------------------------------------------- models
def as_frame(X, names):
    """``X`` with its column names (a DataFrame) so that the estimator stores
    them as ``feature_names_in_``; ``X`` itself without names."""
    if names is None:
        return X
    import pandas as pd

    return pd.DataFrame(X, columns=names, copy=False)


def looks_like_model(path):
    """Whether ``path`` is a zip holding nonn metadata (a model file)."""
    import zipfile

    try:
        if not os.path.isfile(path) or not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            return "__meta__.npy" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def load_detector(args):
    """The model of `nonn score`, refused with the right command when it is
    an image model or when MODEL and QUERIES are swapped."""
    if (_io.extension(args.model) in _io.MATRIX_FORMATS
        and not looks_like_model(args.model) and looks_like_model(args.queries)):
        raise ValueError(f"MODEL and QUERIES look swapped: {args.queries!r} is the model file "
                         f"and {args.model!r} the data. The model comes first: nonn score "
                         f"{args.queries} {args.model} -o {args.output}")
    try:
        return load(args.model)
    except ModelFileError:
        from ..vision.systems import is_image_model

        if is_image_model(args.model):
            raise ValueError(f"{args.model!r} is an image model (from `nonn fit-images`); "
                             "score images with it: nonn score-images "
                             f"{args.model} IMAGES... -o SCORES.csv") from None
        raise


def align_columns(Q, names, det, path):
    """Queries in the model's column order, as the estimator wants them.

    Same names in another order are reordered (with a note); missing or
    unexpected names are refused, listing them. Without names on one side
    the columns are taken in order (the estimator checks their number)."""
    fitted = getattr(det, "feature_names_in_", None)
    if fitted is None:
        return Q
    fitted = [str(n) for n in fitted]
    if names is None:
        note(f"note: {path!r} has no column names; its columns are taken in the order of "
             f"the model's ({_short_list(fitted)}).")
        return as_frame(Q, fitted)
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
        note(f"note: {path!r} has the model's columns in another order; reordered to match "
             "the model.")
    return as_frame(Q, fitted)


def _short_list(names, limit=8):
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def flagged_how(det, fdr, n):
    """How the labels were set, for the line that counts the flagged rows."""
    if fdr is not None:
        return f"at false-discovery rate {fdr:g} (Benjamini-Hochberg over these {n})"
    rate = getattr(det, "contamination_", None)
    return ("at the model's threshold" if rate is None else
            f"at the model's threshold (false-alarm rate {rate:g})")


# ---------------------------------------------------------------- reports
def warn_few(n, rate, what):
    """A note when ``n`` calibration samples cannot resolve ``rate``."""
    import math

    need = math.ceil(1 / rate - 1e-9)
    if n < need:
        note(f"note: {n} {what} are too few for a false-alarm rate of {rate:g} (it needs at "
             f"least {need}); the threshold falls among their lowest scores, so expect about "
             f"{1 / (n + 1):.1%}-{min(2 / (n + 1), 1):.1%} of new normal data flagged. Give "
             "more held-out normals for the rate asked.")


def threshold_summary(det):
    return (det.offset_, getattr(det, "contamination_", None),
            getattr(det, "threshold_source_", "training"))


def print_calibrate(model, det, n, what, seconds, before, output):
    offset, rate, source = before
    print(f"calibrated {type(model).__name__} on {n} {what} in {seconds:.2f} s: "
          f"false-alarm rate {det.contamination_:g}")
    was = f"rate {rate:g}, " if rate is not None else ""
    print(f"  offset_: {offset:.6g} -> {det.offset_:.6g} (was {was}{source})")
    print(f"  {len(det.calibration_scores_)} calibration scores now set the threshold and "
          "the p-values")
    print(f"  saved to {output} ({human_bytes(os.path.getsize(output))})")


def print_threshold(fitted, arrays, line=None):
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


def print_values(title, values, indent="  "):
    print(title)
    for name, value in (values or {}).items():
        print(f"{indent}{name} = {value!r}")


def array_bytes(spec):
    shape = tuple(spec.get("shape", ()))
    return shape, np.dtype(spec.get("dtype", "V")), int(np.prod(shape, dtype=np.int64))


def print_arrays(title, arrays, indent="  "):
    """Print a metadata array table; returns the bytes the arrays take."""
    print(title)
    arrays = arrays or {}
    width = max((len(k) for k in arrays), default=0)
    total = 0
    for name, spec in arrays.items():
        shape, dtype, size = array_bytes(spec)
        nbytes = size * dtype.itemsize
        total += nbytes
        print(f"{indent}{name:<{width}}  {str(shape):<20} {dtype.name:<8} {human_bytes(nbytes)}")
    return total
