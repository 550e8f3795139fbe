"""Safe, versioned model files.

A ``.nonn`` file is a zip (numpy ``.npz``) holding the fitted arrays plus one
JSON document (``__meta__``) with the format version, the estimator's class
name, its parameters and its fitted scalars. Nothing is ever unpickled
(``allow_pickle=False``), the class is looked up in a fixed table of nonn's
own estimators, and every array is checked against the shape and dtype the
metadata announces, so a file from a stranger cannot run code and a
truncated, corrupted or newer file is refused with a clear error.

Files are written to a temporary file in the target folder and renamed into
place, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile

import numpy as np

FORMAT = "nonn-model"
FORMAT_VERSION = 1
_META = "__meta__"


class ModelFileError(ValueError):
    """A model file that nonn refuses to load."""


def _registry():
    from ._baselines import KNN, GlobalEigenKNN, LocalEigenKNN
    from ._knnn import KNNN

    return {cls.__name__: cls for cls in (KNNN, KNN, GlobalEigenKNN, LocalEigenKNN)}


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} {value!r} in a nonn model file")


def _feature_names_meta(estimator):
    """scikit-learn's ``feature_names_in_`` (set when fitted on a DataFrame
    with string column names) as JSON: a list of str, absent otherwise."""
    names = getattr(estimator, "feature_names_in_", None)
    return {} if names is None else {"feature_names_in_": [str(n) for n in names]}


def _set_feature_names(est, meta, path):
    names = meta["fitted"].get("feature_names_in_")
    if names is None:
        return
    if (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
            or len(names) != est.n_features_in_ or len(set(names)) != len(names)):
        raise ModelFileError(
            f"{path!r}: 'feature_names_in_' must be a list of {est.n_features_in_} distinct "
            "column names (str). The file is corrupted."
        )
    est.feature_names_in_ = np.asarray(names, dtype=object)


def save(estimator, path):
    """Write a fitted nonn estimator to ``path`` atomically."""
    from . import __version__

    cls = type(estimator).__name__
    if cls not in _registry():
        raise TypeError(f"save() takes a nonn estimator; got {cls}.")
    if not hasattr(estimator, "offset_"):
        raise ValueError(
            f"This {cls} instance is not fitted yet. Call 'fit' before saving it."
        )
    arrays = {name.lstrip("_"): np.ascontiguousarray(getattr(estimator, name))
              for name in type(estimator)._state_arrays_for(estimator.get_params())}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "nonn_version": __version__,
        "estimator": cls,
        "params": _jsonable(estimator.get_params()),
        "fitted": {**{name: _jsonable(getattr(estimator, name))
                      for name in estimator._state_scalars},
                   **_feature_names_meta(estimator)},
        "n_features_in": int(estimator.n_features_in_),
        "dtype": np.dtype(estimator.dtype_).name,
        "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str} for k, v in arrays.items()},
    }
    payload = dict(arrays)
    payload[_META] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)

    from ._io import atomic_write

    return atomic_write(path, lambda fh: np.savez(fh, **payload))


def read_meta(path):
    """The JSON metadata of a model file (cheap: arrays are not read)."""
    with _open(path) as npz:
        return _meta(npz, path)


def _open(path, what="model", create="`nonn fit` / estimator.save()"):
    """The .npz archive of a ``what`` file (image models reuse this)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No {what} file at {path!r}. Check the path, or create one "
                                f"with {create}.")
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise ModelFileError(
            f"{path!r} is not a readable nonn {what} file (truncated, corrupted, or not a "
            f"{what} at all: {exc}). Re-save it from the fitted estimator."
        ) from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        # a lone .npy array loads as an ndarray
        raise ModelFileError(f"{path!r} holds a single array, not a nonn {what} file "
                             f"(a {what} is the .npz archive {create} write).")
    return npz


def _meta(npz, path):
    try:
        raw = npz[_META]
        meta = json.loads(bytes(raw).decode("utf-8"))
    except KeyError:
        raise ModelFileError(f"{path!r} has no nonn metadata; it is not a nonn model file.")
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path!r} has corrupted metadata ({exc}).") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path!r} is not a nonn model file (format "
                             f"{meta.get('format') if isinstance(meta, dict) else meta!r}).")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ModelFileError(f"{path!r} has an invalid format version {version!r}.")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path!r} was written by a newer nonn (format version {version}, "
            f"nonn {meta.get('nonn_version')}); this nonn reads format versions up to "
            f"{FORMAT_VERSION}. Upgrade nonn (pip install -U nonn) to load it."
        )
    return meta


def load(path):
    """Load a model saved with ``estimator.save(path)``.

    Never unpickles: loading a file from a stranger cannot run code. A
    truncated, corrupted or future-version file raises
    :class:`ModelFileError` (a ``ValueError``).
    """
    with _open(path) as npz:
        meta = _meta(npz, path)
        registry = _registry()
        cls_name = meta.get("estimator")
        if cls_name not in registry:
            raise ModelFileError(f"{path!r} names an unknown estimator {cls_name!r}; "
                                 f"this nonn knows {sorted(registry)}.")
        cls = registry[cls_name]
        try:
            est = cls(**meta["params"])
        except TypeError as exc:
            raise ModelFileError(f"{path!r} has parameters this nonn does not accept: {exc}")
        expected = meta.get("arrays", {})
        for name in cls._state_arrays_for(meta["params"]):
            key = name.lstrip("_")
            spec = expected.get(key)
            try:
                arr = npz[key]
            except KeyError:
                raise ModelFileError(f"{path!r} lacks the array {key!r}; the file is incomplete.")
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
                raise ModelFileError(
                    f"{path!r}: the array {key!r} is corrupted ({exc}). Re-save the model."
                ) from exc
            if spec is None or list(arr.shape) != spec["shape"] or arr.dtype.str != spec["dtype"]:
                raise ModelFileError(
                    f"{path!r}: the array {key!r} has shape {arr.shape} and dtype {arr.dtype}, "
                    f"but the metadata announces {spec}. The file is corrupted."
                )
            setattr(est, name, arr)
        for name, value in meta["fitted"].items():
            if name in cls._state_scalars:
                setattr(est, name, value)
    from ._base import resolve_n_jobs

    est.n_features_in_ = int(meta["n_features_in"])
    _set_feature_names(est, meta, path)
    # threads are a property of the machine that loads the model, not the one that saved it
    est.n_jobs_ = resolve_n_jobs(est.n_jobs)
    est.dtype_ = np.dtype(meta["dtype"])
    # The search index is rebuilt from the stored training data, with the
    # backend the model was fitted with; if that one cannot run here (say a
    # CUDA model on a CPU machine), "auto" picks one and backend_ says which.
    saved = meta["fitted"].get("backend_")
    try:
        est._search = est._make_backend(est._fit_X, name=saved)
    except (ImportError, RuntimeError) as exc:
        warnings.warn(f"{path!r} was fitted with backend {saved!r}, which cannot run here "
                      f"({exc}); searching with backend='auto' instead.", stacklevel=2)
        est._search = est._make_backend(est._fit_X, name="auto")
    return est

