"""Reading images and turning them into fixed-size float batches.

Pure numpy + Pillow; torch is imported only by the functions that return
tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: file suffixes read as images (lower case)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
                  ".pgm")


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("Reading image files needs Pillow. Install it with: "
                          "pip install torch==2.13.0 \"nonn[vision]\"") from None
    return Image


def list_images(folder, recursive=True):
    """Sorted image files under ``folder`` (recursively by default).

    Raises FileNotFoundError for a missing folder and ValueError when it
    holds no image.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"The image folder {str(folder)!r} does not exist.")
    it = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise ValueError(f"No image files ({', '.join(IMAGE_SUFFIXES[:4])}, ...) in "
                         f"{str(folder)!r}.")
    return files


def read_image(path):
    """An image file as a uint8 RGB array (H, W, 3)."""
    Image = _pil()
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise OSError(f"{path}: not a readable image ({exc})") from None


def as_image_list(X):
    """Normalise the accepted inputs to a list whose items are file paths or
    uint8 arrays (H, W) / (H, W, C), or to an (N, H, W[, C]) array.

    Accepts a folder (all its images), one file path, a list of paths and/or
    arrays, or an array of shape (N, H, W) or (N, H, W, C) with C in 1, 3, 4.
    """
    if isinstance(X, (str, os.PathLike)):
        p = Path(X).expanduser()
        if p.is_dir():
            return [str(f) for f in list_images(p)]
        if not p.exists():
            raise FileNotFoundError(f"No image file or folder at {str(p)!r}.")
        return [str(p)]
    if isinstance(X, np.ndarray):
        if X.ndim == 4 and X.shape[-1] not in (1, 3, 4):
            raise ValueError(f"An image array must be (N, H, W) or (N, H, W, C) with C in "
                             f"1, 3, 4 (channels last); got shape {X.shape}.")
        if X.ndim not in (3, 4):
            raise ValueError(f"An image array must be (N, H, W) or (N, H, W, C); got shape "
                             f"{X.shape}. For one image use X[None].")
        return X
    items = list(X)
    if not items:
        raise ValueError("No images given (an empty list).")
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            out.append(os.fspath(item))
        else:
            out.append(np.asarray(item))
    return out


def _to_rgb(a):
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"An image must be (H, W) or (H, W, C) with C in 1, 3, 4; got shape "
                         f"{a.shape}.")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and a.max() <= 1.0:
            a = a * 255.0
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a[..., :3]


def load_rgb(item):
    """One list item (path or array) as uint8 RGB (H, W, 3)."""
    if isinstance(item, str):
        return read_image(item)
    return _to_rgb(item)


def original_size(item):
    """(H, W) of a path or array item, without decoding a file fully."""
    if isinstance(item, str):
        Image = _pil()
        with Image.open(item) as im:
            return im.size[1], im.size[0]
    a = np.asarray(item)
    return a.shape[0], a.shape[1]


def batch_tensor(items, size):
    """Items (paths or arrays) -> float32 tensor (B, 3, size, size), values in
    [0, 255], resized with antialiased bilinear interpolation."""
    import torch
    import torch.nn.functional as F

    out = []
    for item in items:
        t = torch.from_numpy(np.array(load_rgb(item), copy=True)).permute(2, 0, 1)
        t = t[None].float()
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)
        out.append(t)
    return torch.cat(out, 0)
