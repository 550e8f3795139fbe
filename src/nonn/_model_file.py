"""The detectors' model file: fitted state to arrays and metadata, and back.

The core's half of persistence (:mod:`nonn.persistence` is the public face):
``estimator.save(path)`` writes with :func:`save_detector`, ``nonn.load``
reads with :func:`load`, and the image systems store their detector with
:func:`detector_state` and read it back with :func:`load_detector`, inside
their own archive (one archive format, :mod:`nonn._archive`).

A ``.nonn`` file is a zip (numpy ``.npz``) holding the fitted arrays plus one
JSON document (``__meta__``) with the format version, the estimator's class
name, its parameters and its fitted scalars. Nothing is ever unpickled, the
class is looked up in a fixed table of nonn's own estimators (filled by
:func:`register` when the package is imported), and the file is validated
as a whole before any of it is used: the archive by :mod:`nonn._archive`
(uncompressed members whose sizes agree with the file, capped metadata), the
parameters by the estimator's own validation, and every fitted array and
scalar by the estimator's ``_state_spec`` (shapes, dtypes and values against
each other and against the parameters: ids in range, a real permutation, set
sizes that add up, finite values; see :mod:`nonn._state`). A file from a
stranger can therefore neither run code nor make a kernel read or write out
of bounds, and a truncated, corrupted, crafted or newer file is refused with
a :class:`ModelFileError` that names what is wrong.

Files are written to a temporary file in the target folder and renamed into
place, so a crash never leaves a half-written model behind.

This module sits below the estimators (it imports none of them): the
classes register themselves by name, so ``save`` on the base class needs no
import of anything above it.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np

from . import _archive
from ._archive import ModelFileError
from ._state import DATA_DTYPES, Array, StateError, check_state
from ._threads import resolve_n_jobs

FORMAT = "nonn-model"
#: 2: calibration arrays, dual-form eigen-states, input transforms (format-1
#: files load: their leave-one-out training scores become the calibration)
FORMAT_VERSION = 2
#: the arrays format 2 added (a format-1 file has neither: its leave-one-out
#: training scores are its calibration)
_FORMAT_2_ARRAYS = ("calibration_rows_", "calibration_scores_")
#: metadata keys every model file has
_REQUIRED = {"params": dict, "fitted": dict, "n_features_in": int, "dtype": str,
             "arrays": dict}

#: class name -> class of the detectors a model file may hold
_CLASSES = {}


def register(*classes):
    """Make ``classes`` savable and loadable under their names (nonn's
    package registers its four detectors when it is imported)."""
    for cls in classes:
        _CLASSES[cls.__name__] = cls


def model_classes():
    """``{name: class}`` of the detectors a model file may hold."""
    return dict(_CLASSES)


def jsonable(value):
    """``value`` as JSON holds it (numpy scalars to Python's, tuples to
    lists, keys to str); a ``TypeError`` for anything else."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in a nonn model file")


#: fitted values a model may store besides its class's ``_state_scalars``:
#: scikit-learn's column names (only when fitted on a table that had them),
#: and the number of training samples seen (fit's plus partial_fit's)
_OPTIONAL_SCALARS = ("feature_names_in_", "n_samples_seen_")


def _state_names(cls, params, optional=()):
    """The fitted arrays and scalars a model of ``cls`` with ``params`` stores
    (with those of the class's ``_optional_arrays`` named in ``optional``)."""
    arrays = tuple(cls._state_arrays_for(params)) + tuple(
        a for a in cls._optional_arrays if a in optional)
    return arrays, tuple(cls._state_scalars) + _OPTIONAL_SCALARS


def _spec(cls, params, optional=()):
    """The estimator's state spec, restricted to what a model with
    ``params`` stores (``memory="lean"`` stores no eigen-state)."""
    arrays, scalars = _state_names(cls, params, optional)
    missing = [n for n in arrays + scalars if n not in cls._state_spec]
    if missing:  # pragma: no cover - a test checks every estimator
        raise TypeError(f"{cls.__name__}._state_spec has no entry for {missing}.")
    return {n: cls._state_spec[n] for n in arrays + scalars}


def _fitted_value(estimator, name):
    """A fitted scalar as stored: column names as a list of str (None when
    the model was fitted without them)."""
    value = getattr(estimator, name, None)
    if name == "feature_names_in_" and value is not None:
        return [str(v) for v in value]
    return value


def detector_state(estimator):
    """``(arrays, meta)`` of a fitted detector: the member arrays and the
    JSON metadata of its model file, checked as ``load`` checks them."""
    from . import __version__

    cls = type(estimator)
    if _CLASSES.get(cls.__name__) is not cls:
        raise TypeError(f"save() takes a nonn estimator; got {cls.__name__}.")
    if not hasattr(estimator, "offset_"):
        raise ValueError(f"This {cls.__name__} instance is not fitted yet. Call 'fit' "
                         "before saving it.")
    params = estimator.get_params()
    optional = [a for a in cls._optional_arrays if getattr(estimator, a, None) is not None]
    names, scalars = _state_names(cls, params, optional)
    arrays = {name.lstrip("_"): np.ascontiguousarray(getattr(estimator, name))
              for name in names}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "nonn_version": __version__,
        "estimator": cls.__name__,
        "params": jsonable(params),
        "fitted": {name: jsonable(_fitted_value(estimator, name)) for name in scalars},
        "n_features_in": int(estimator.n_features_in_),
        "dtype": np.dtype(estimator.dtype_).name,
        "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str} for k, v in arrays.items()},
    }
    # what is saved must load: the same checks as load, on the live state
    try:
        _check(cls, meta, {n: (a.shape, a.dtype) for n, a in arrays.items()},
               lambda key: arrays[key])
    except ModelFileError as exc:
        raise ValueError(f"Refusing to save this {cls.__name__}: {exc}") from None
    return arrays, meta


def save_detector(estimator, path):
    """Write a fitted nonn estimator to ``path`` atomically."""
    arrays, meta = detector_state(estimator)
    return _archive.write(path, arrays, meta)


def read_meta(path):
    """The JSON metadata of a model file (cheap: arrays are not read), its
    format, version and top-level keys checked."""
    with _archive.Archive.open(path) as ar:
        meta = ar.meta()
        check_meta(meta, ar.where)
        return meta


def check_meta(meta, where):
    """The estimator class of a model's metadata ``meta`` (a dict), after
    checking its format, version and top-level keys."""
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{where} is not a nonn model file (format "
                             f"{meta.get('format')!r}).")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(f"{where} has an invalid format version {version!r}.")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{where} was written by a newer nonn (format version {version}, "
            f"nonn {meta.get('nonn_version')}); this nonn reads format versions up to "
            f"{FORMAT_VERSION}. Upgrade nonn (pip install -U nonn) to load it."
        )
    registry = _CLASSES
    cls_name = meta.get("estimator")
    if not isinstance(cls_name, str) or cls_name not in registry:
        raise ModelFileError(f"{where} names an unknown estimator {cls_name!r}; "
                             f"this nonn knows {sorted(registry)}.")
    for key, kind in _REQUIRED.items():
        if key not in meta:
            raise ModelFileError(f"{where}: the metadata key {key!r} is missing; the file "
                                 "is incomplete or corrupted.")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise ModelFileError(f"{where}: the metadata key {key!r} must be a "
                                 f"{kind.__name__}; got {meta[key]!r}.")
    if meta["dtype"] not in DATA_DTYPES:
        raise ModelFileError(f"{where}: the metadata key 'dtype' must be one of "
                             f"{list(DATA_DTYPES)}; got {meta['dtype']!r}.")
    if meta["n_features_in"] < 1:
        raise ModelFileError(f"{where}: the metadata key 'n_features_in' must be >= 1; got "
                             f"{meta['n_features_in']!r}.")
    check_array_table(meta["arrays"], where)
    return registry[cls_name]


def check_array_table(arrays, where, dims=None):
    """Check the metadata's table of arrays ``{name: {"shape": [...], "dtype":
    "<f4"}}`` (what ``nonn info`` prints without reading the arrays);
    ``dims``: ``{name: number of dimensions}`` of arrays that must be listed."""
    for name, spec in arrays.items():
        ok = (isinstance(spec, dict) and isinstance(spec.get("dtype"), str)
              and len(spec["dtype"]) <= 8 and isinstance(spec.get("shape"), list)
              and len(spec["shape"]) <= 8
              and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                      for n in spec["shape"]))
        if ok:
            try:
                ok = np.dtype(spec["dtype"]).kind in "biuf"
            except TypeError:
                ok = False
        if not ok:
            raise ModelFileError(f"{where}: the metadata's entry for the array {name!r} "
                                 "must be {'shape': [ints >= 0], 'dtype': a numeric numpy "
                                 f"dtype}}; got {spec!r}.")
    for name, n in (dims or {}).items():
        if name not in arrays or len(arrays[name]["shape"]) != n:
            raise ModelFileError(f"{where}: the metadata does not list the {n}-dimensional "
                                 f"array {name!r}; the file is corrupted.")


@contextlib.contextmanager
def params_errors(where):
    """Turn the TypeError / ValueError of building an estimator from a file's
    parameters into a :class:`ModelFileError` that names the file."""
    try:
        yield
    except TypeError as exc:
        raise ModelFileError(f"{where}: the metadata key 'params' holds parameters this "
                             f"nonn does not accept ({exc}).") from None
    except ValueError as exc:
        raise ModelFileError(f"{where}: the metadata key 'params' is invalid: {exc}") \
            from None


def _make(cls, params, where):
    """``cls(**params)``, validated as ``fit`` validates them."""
    if not all(isinstance(k, str) for k in params):
        raise ModelFileError(f"{where}: the metadata key 'params' has non-string keys.")
    with params_errors(where):
        est = cls(**params)
        est._check_params()
    return est


def _check(cls, meta, headers, read, where="the model"):
    """Check a detector's state (see :mod:`nonn._state`): ``headers`` maps
    member names to (shape, dtype), ``read(member)`` gives the data. Returns
    ``(estimator with the state set, member names used)``."""
    est = _make(cls, meta["params"], where)
    optional = [a for a in cls._optional_arrays if a.lstrip("_") in headers]
    spec = _spec(cls, meta["params"], optional)
    members = {name: name.lstrip("_") for name, s in spec.items() if isinstance(s, Array)}
    legacy = meta["format_version"] < 2
    if legacy:  # format 1 had no calibration arrays
        for name in _FORMAT_2_ARRAYS:
            members.pop(name, None)
            spec.pop(name, None)
    announced = meta["arrays"]
    extra = sorted(set(headers) - set(members.values()))
    if extra:
        raise ModelFileError(f"{where} holds the member {extra[0]!r}, which a "
                             f"{cls.__name__} model does not have; the file is corrupted or "
                             "crafted.")
    for attr, key in members.items():
        if key not in headers:
            raise ModelFileError(f"{where} lacks the array {key!r}; the file is incomplete.")
        shape, dtype = headers[key]
        a = announced.get(key)
        if a is None or list(shape) != a["shape"] or np.dtype(dtype).str != a["dtype"]:
            raise ModelFileError(
                f"{where}: the array {key!r} has shape {tuple(shape)} and dtype "
                f"{np.dtype(dtype)}, but the metadata announces {a}. The file is corrupted.")
    unknown = sorted(set(meta["fitted"]) - set(cls._state_scalars) - set(_OPTIONAL_SCALARS))
    if unknown:
        raise ModelFileError(f"{where}: the metadata's fitted values include {unknown[0]!r}, "
                             f"which a {cls.__name__} does not have; the file is corrupted, "
                             "or from a newer nonn.")
    sym = {"dtype": np.dtype(meta["dtype"]), "D": meta["n_features_in"]}
    try:
        values, scalars = check_state(spec, sym, {a: headers[k] for a, k in members.items()},
                                      meta["fitted"], lambda attr: read(members[attr]))
    except StateError as exc:
        what = (f"the array {members[exc.name]!r}" if exc.name in members
                else f"the fitted value {exc.name!r}")
        raise ModelFileError(f"{where}: {what} {exc} The file is corrupted or crafted.") \
            from None
    names = scalars.pop("feature_names_in_", None)
    if names is not None:
        if len(set(names)) != len(names):
            raise ModelFileError(f"{where}: the fitted value 'feature_names_in_' repeats a "
                                 "column name. The file is corrupted or crafted.")
        est.feature_names_in_ = np.asarray(names, dtype=object)
    for name, value in {**values, **scalars}.items():
        setattr(est, name, value)
    if legacy:
        est.calibration_scores_ = est.train_scores_
        est.calibration_rows_ = np.arange(len(est.train_scores_), dtype=np.int64)
    return est


def load_detector(ar, meta, prefix="", where=None):
    """The detector stored in the archive ``ar`` (members under ``prefix``)
    with the metadata ``meta``; see :func:`load`."""
    where = where or ar.where
    cls = check_meta(meta, where)
    names = {n[len(prefix):]: n for n in ar.names() if n.startswith(prefix)
             and n != _archive.META}
    headers = {key: ar.header(name) for key, name in names.items()}
    est = _check(cls, meta, headers, lambda key: ar.read(names[key]), where)
    est.n_features_in_ = meta["n_features_in"]
    # threads are a property of the machine that loads the model, not the one that saved it
    est.n_jobs_ = resolve_n_jobs(est.n_jobs)
    est.dtype_ = np.dtype(meta["dtype"])
    # The search index is rebuilt from the stored training data, with the
    # backend the model was fitted with; if that one cannot run here (say a
    # CUDA model on a CPU machine), "auto" picks one and backend_ says which.
    saved = est.backend_
    try:
        try:
            est._search = est._make_backend(est._fit_X, name=saved)
        except (ImportError, RuntimeError) as exc:
            warnings.warn(f"{where} was fitted with backend {saved!r}, which cannot run here "
                          f"({exc}); searching with backend='auto' instead.", stacklevel=3)
            est._search = est._make_backend(est._fit_X, name="auto")
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{where}: the search backend cannot be built from the "
                             f"metadata's 'params' ({exc}).") from None
    return est


def load(path):
    """Load a model saved with ``estimator.save(path)``.

    Never unpickles: loading a file from a stranger cannot run code. The
    file is validated as a whole before it is used; a truncated, corrupted,
    crafted or future-version file raises :class:`ModelFileError` (a
    ``ValueError``) naming what is wrong.
    """
    with _archive.Archive.open(path) as ar:
        return load_detector(ar, ar.meta())

