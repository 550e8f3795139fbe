"""Loaders for the real benchmark data (ADBench ``.npz`` files).

The data is never shipped with nonn. It lives in a folder laid out as the
project's shared data folder::

    <data home>/adbench/Classical/4_breastw.npz         tabular (ODDS and more)
    <data home>/adbench/CV_by_ResNet18/MVTec-AD_*.npz    ResNet-18 embeddings
    <data home>/adbench/CV_by_ResNet18/CIFAR10_*.npz

Every file holds ``X`` (n_samples, n_features) and ``y`` with ``y == 1`` for
an anomaly (ADBench's convention).

Where the data folder is
------------------------
:func:`data_home` answers, in this order:

1. the environment variable ``NONN_DATA`` (an error if it names a missing
   folder: a typo should not silently fall back to another copy);
2. ``../shared/data`` relative to the current working directory (the
   project's layout: the checkout beside ``shared/``);
3. a ``shared/data`` folder found by walking up from this file (a checkout
   that carries ``shared/`` inside it, or a run started from elsewhere).

Licences travel with the data (MVTec AD: CC BY-NC-SA 4.0, non-commercial);
see the data folder's README.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

import numpy as np

__all__ = [
    "DATA_ENV",
    "MVTEC_CATEGORIES",
    "SUITES",
    "data_home",
    "list_adbench",
    "load_adbench",
    "mvtec_union",
    "resolve_adbench",
]

#: environment variable naming the data folder
DATA_ENV = "NONN_DATA"

#: the 15 MVTec AD categories in the row order of the paper's Table 1
#: (textures first, then objects); :func:`mvtec_union` with an int ``n``
#: takes the first ``n`` of them.
MVTEC_CATEGORIES = (
    "carpet", "grid", "leather", "tile", "wood",
    "bottle", "cable", "capsule", "hazelnut", "metal_nut",
    "pill", "screw", "toothbrush", "transistor", "zipper",
)

_MVTEC_PREFIX = "MVTec-AD_"

#: suite name -> (folder under ``adbench/``, file-name filter)
SUITES = {
    "classical": ("Classical", None),
    "cv_resnet18": ("CV_by_ResNet18", None),
    "mvtec": ("CV_by_ResNet18", _MVTEC_PREFIX),
}


def data_home(path=None):
    """The folder holding the real data (see the module docstring).

    Parameters
    ----------
    path : str or Path, default=None
        Use this folder instead of looking it up (it must exist).

    Returns
    -------
    Path

    Raises
    ------
    FileNotFoundError
        When no data folder is found; the message names ``NONN_DATA``.
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"The data folder {str(p)!r} does not exist.")
        return p
    env = os.environ.get(DATA_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(
                f"The environment variable {DATA_ENV}={env!r} names a folder that does not "
                f"exist. Point {DATA_ENV} at the folder that holds 'adbench/', or unset it "
                "to use ../shared/data."
            )
        return p
    tried = []
    cwd_guess = Path.cwd().parent / "shared" / "data"
    tried.append(cwd_guess)
    if cwd_guess.is_dir():
        return cwd_guess.resolve()
    for parent in Path(__file__).resolve().parents:
        guess = parent / "shared" / "data"
        if guess.is_dir():
            return guess
        tried.append(guess)
    raise FileNotFoundError(
        f"No data folder found. Set the environment variable {DATA_ENV} to the folder "
        f"that holds 'adbench/' (for example: export {DATA_ENV}=/path/to/shared/data). "
        f"Looked in: {', '.join(str(t) for t in tried[:3])}, ..."
    )


def _adbench_root(home=None):
    root = data_home(home) / "adbench"
    if not root.is_dir():
        raise FileNotFoundError(
            f"The data folder {str(root.parent)!r} has no 'adbench/' folder. Set "
            f"{DATA_ENV} to a folder that holds 'adbench/Classical' and "
            "'adbench/CV_by_ResNet18'."
        )
    return root


def _check_suite(suite):
    if suite not in SUITES:
        raise ValueError(
            f"The 'suite' parameter of list_adbench must be a str among "
            f"{{{', '.join(repr(s) for s in SUITES)}}}. Got {suite!r} instead. "
            "For example: list_adbench('classical')."
        )


def _numeric_key(stem):
    m = re.match(r"(\d+)_", stem)
    return (int(m.group(1)) if m else 10**9, stem.lower())


def list_adbench(suite="classical", *, home=None):
    """Names of the ADBench files of a suite, for :func:`load_adbench`.

    Parameters
    ----------
    suite : {"classical", "cv_resnet18", "mvtec"}, default="classical"
        ``"classical"``: the tabular sets (``adbench/Classical``), in
        ADBench's numeric order. ``"cv_resnet18"``: every ResNet-18
        embedding file. ``"mvtec"``: the 15 MVTec AD categories of it, in
        the paper's Table 1 order.
    home : str or Path, default=None
        Data folder (default: :func:`data_home`).

    Returns
    -------
    list of str
        File names without ``.npz`` (e.g. ``"4_breastw"``,
        ``"MVTec-AD_carpet"``).

    Examples
    --------
    >>> from nonn.datasets import list_adbench
    >>> names = list_adbench("mvtec")      # doctest: +SKIP
    >>> len(names), names[0]               # doctest: +SKIP
    (15, 'MVTec-AD_carpet')
    """
    _check_suite(suite)
    folder, prefix = SUITES[suite]
    d = _adbench_root(home) / folder
    if not d.is_dir():
        raise FileNotFoundError(f"The ADBench folder {str(d)!r} does not exist.")
    stems = [p.stem for p in d.glob("*.npz")]
    if prefix is not None:
        stems = [s for s in stems if s.startswith(prefix)]
    if suite == "mvtec":
        rank = {c: i for i, c in enumerate(MVTEC_CATEGORIES)}
        return sorted(stems, key=lambda s: (rank.get(s[len(_MVTEC_PREFIX):], 99), s))
    return sorted(stems, key=_numeric_key)


def _index(home=None):
    """{stem: path} of every ADBench file, over all folders."""
    root = _adbench_root(home)
    out = {}
    for folder in sorted({f for f, _ in SUITES.values()}):
        for p in sorted((root / folder).glob("*.npz")):
            out[p.stem] = p
    return out


def _aliases(stem):
    """Other names a file answers to: without ADBench's numeric prefix,
    without the ``MVTec-AD_`` prefix; all case-insensitive."""
    out = {stem.lower()}
    m = re.match(r"\d+_(.+)$", stem)
    if m:
        out.add(m.group(1).lower())
    if stem.startswith(_MVTEC_PREFIX):
        out.add(stem[len(_MVTEC_PREFIX):].lower())
    return out


def resolve_adbench(name, *, home=None):
    """The path of the ADBench file called ``name`` (see :func:`load_adbench`)."""
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"A dataset name must be a str. Got {name!r} instead.")
    key = Path(str(name)).name
    if key.endswith(".npz"):
        key = key[:-4]
    index = _index(home)
    if key in index:
        return index[key]
    hits = sorted({stem for stem in index if key.lower() in _aliases(stem)})
    if len(hits) == 1:
        return index[hits[0]]
    if len(hits) > 1:
        raise ValueError(
            f"The dataset name {name!r} is ambiguous: it matches {hits}. Use the full name."
        )
    vocabulary = {}
    for stem in index:
        for alias in _aliases(stem):
            vocabulary.setdefault(alias, stem)
    close = difflib.get_close_matches(key.lower(), list(vocabulary), n=5, cutoff=0.5)
    close = list(dict.fromkeys(vocabulary[c] for c in close))
    hint = f" Close matches: {close}." if close else ""
    raise FileNotFoundError(
        f"No ADBench dataset called {name!r} under "
        f"{str(_adbench_root(home))!r}.{hint} See list_adbench('classical') and "
        "list_adbench('cv_resnet18') for the names."
    )


def load_adbench(name, *, home=None):
    """Load one ADBench file.

    Parameters
    ----------
    name : str
        The file name without ``.npz`` (``"4_breastw"``,
        ``"MVTec-AD_bottle"``, ``"CIFAR10_0"``), case-insensitive; the name
        without ADBench's numeric prefix (``"breastw"``) or, for MVTec, the
        bare category (``"bottle"``) also work when unambiguous.
    home : str or Path, default=None
        Data folder (default: :func:`data_home`).

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
        Floating point: float32 files (the embeddings) stay float32, integer
        columns become float64.
    y : ndarray of shape (n_samples,), int64
        1 = anomaly, 0 = normal.

    Raises
    ------
    FileNotFoundError
        Unknown name (the message lists close matches) or no data folder.

    Examples
    --------
    >>> from nonn.datasets import load_adbench
    >>> X, y = load_adbench("4_breastw")   # doctest: +SKIP
    >>> X.shape, int(y.sum())              # doctest: +SKIP
    ((683, 9), 239)
    """
    path = resolve_adbench(name, home=home)
    with np.load(path, allow_pickle=False) as f:
        if "X" not in f.files or "y" not in f.files:
            raise ValueError(f"{str(path)!r} is not an ADBench file: it lacks 'X' or 'y' "
                             f"(keys: {f.files}).")
        X, y = f["X"], f["y"]
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise ValueError(f"{str(path)!r}: expected X (n, d) and y (n,); got "
                         f"{X.shape} and {y.shape}.")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    y = y.astype(np.int64)
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{str(path)!r}: y must hold 0 (normal) and 1 (anomaly) only; "
                         f"found {np.unique(y).tolist()}.")
    return np.ascontiguousarray(X), y


def _mvtec_names(categories):
    if isinstance(categories, (int, np.integer)) and not isinstance(categories, bool):
        n = int(categories)
        if not 1 <= n <= len(MVTEC_CATEGORIES):
            raise ValueError(
                f"The 'categories' parameter of mvtec_union must be an int in the range "
                f"[1, {len(MVTEC_CATEGORIES)}] or a list of category names. Got {n} instead."
            )
        return list(MVTEC_CATEGORIES[:n])
    if isinstance(categories, str):
        categories = [categories]
    names = []
    for c in categories:
        c = str(c)
        bare = c[len(_MVTEC_PREFIX):] if c.startswith(_MVTEC_PREFIX) else c
        if bare.lower() not in MVTEC_CATEGORIES:
            close = difflib.get_close_matches(bare.lower(), MVTEC_CATEGORIES, n=3)
            hint = f" Close matches: {close}." if close else ""
            raise ValueError(f"Unknown MVTec AD category {c!r}.{hint} "
                             f"Categories: {list(MVTEC_CATEGORIES)}.")
        names.append(bare.lower())
    if not names or len(set(names)) != len(names):
        raise ValueError(f"mvtec_union needs distinct categories; got {list(categories)!r}.")
    return names


def mvtec_union(categories=15, *, home=None, return_categories=False):
    """Several MVTec AD categories as one diverse normal set (paper Table 4).

    The normals of every chosen category are normal and the anomalies of
    every chosen category are anomalies; no class information is used. With
    the novelty protocol of :func:`nonn.evaluation.novelty_split` this is
    the paper's Table 4 (and, with all 15 categories, its Table 7 setting).

    Parameters
    ----------
    categories : int or list of str, default=15
        An int ``n`` takes the first ``n`` categories of
        :data:`MVTEC_CATEGORIES` (the paper's Table 1 order; the paper does
        not say which categories its 5-, 7- and 11-class rows used), or
        explicit names (``"bottle"`` or ``"MVTec-AD_bottle"``).
    home : str or Path, default=None
    return_categories : bool, default=False
        Also return each row's category name.

    Returns
    -------
    X : ndarray (n_samples, 512) float32
    y : ndarray (n_samples,) int64, 1 = anomaly
    category : ndarray (n_samples,) of str, only with ``return_categories``
    """
    names = _mvtec_names(categories)
    Xs, ys, cs = [], [], []
    for c in names:
        X, y = load_adbench(_MVTEC_PREFIX + c, home=home)
        Xs.append(X)
        ys.append(y)
        cs.append(np.full(len(y), c))
    X, y = np.concatenate(Xs), np.concatenate(ys)
    if return_categories:
        return X, y, np.concatenate(cs)
    return X, y
