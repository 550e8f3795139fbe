"""Synthetic defects on real images, with ground-truth masks.

Check an image model on defects whose place is known: paste a patch of
another image, draw a scratch, stain a colour blotch or swap a region's
texture, each with its mask. :func:`write_defect_set` writes a labelled
folder in MVTec AD's layout, which ``nonn eval-images`` and
:func:`nonn.vision.datasets.load_test_folder` read::

    <folder>/train/good/000.png               training images (optional)
    <folder>/test/good/000.png                the clean test images
    <folder>/test/<kind>/000.png              the same images, one defect each
    <folder>/ground_truth/<kind>/000_mask.png the defects' masks

The kinds (``h`` = the image's shorter side):

- ``patch``: a square of side ``h / 4`` pasted from a donor image (another
  class, another texture); mask: the square;
- ``scratch``: an antialiased straight line (1 px wide up to 64 px images,
  2 px above; length ``h / 2``-``3h / 4``), dark or bright, whichever
  differs more from the pixels under it; mask: the pixels it changed by more
  than 25 grey levels;
- ``blotch``: an elliptic colour stain (axes ``h / 8``-``h / 4``) blended at
  80 % in its core with a soft edge; mask: blend weight > 0.5 (the ellipse);
- ``texture``: an elliptic region (axes ``3h / 20``-``3h / 10``) replaced by
  the same region of a donor image; mask: the ellipse.

A pasted region (patch, texture) is redrawn, at most four times, until at
least half its pixels change by more than 25 grey levels (a black patch on a
black background is no defect); otherwise the most visible draw is kept.

The synthesis is pure numpy. Writing the PNG files needs Pillow (the vision
extra); :func:`preset` reads CIFAR-10 / Fashion-MNIST from the data folder
and scikit-image's bundled texture photographs (``pip install scikit-image``).

Examples
--------
>>> import numpy as np
>>> from nonn.vision.defects import add_defect
>>> image = np.full((32, 32, 3), 128, np.uint8)
>>> scratched, mask = add_defect(image, "scratch", rng=0)
>>> bool(mask.any()), scratched.shape
(True, (32, 32, 3))
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .._io import current_umask

__all__ = ["KINDS", "PRESETS", "add_defect", "write_defect_set", "write_image_folder",
           "preset"]

#: the defect kinds, in the order their seeds are derived
KINDS = ("patch", "scratch", "blotch", "texture")
#: kinds pasted from donor images
NEEDS_DONORS = ("patch", "texture")
#: the built-in sets of :func:`preset`
PRESETS = ("cifar_horse", "fashion_tshirt", "textures")
#: a pixel changed when a channel moved by more than this many grey levels
CHANGED = 25
#: images smaller than this on a side leave no room for a defect
MIN_SIDE = 8
#: draws of a pasted region before the most visible one is kept
_TRIES = 4
_TEXTURES = ("brick", "grass", "gravel")


# --------------------------------------------------------------- inputs
def _check_image(image, what="image"):
    a = np.asarray(image)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"The {what} must be a uint8 array of shape (H, W) (grey) or "
                         f"(H, W, 3) (RGB); got {a.dtype} of shape {a.shape}.")
    if min(a.shape[:2]) < MIN_SIDE:
        raise ValueError(f"The {what} is {a.shape[1]} x {a.shape[0]} pixels; a defect needs "
                         f"at least {MIN_SIDE} x {MIN_SIDE}.")
    return a


def _load(item, what):
    """A path (read as RGB) or an array, checked."""
    if isinstance(item, (str, os.PathLike)):
        from . import _images

        return _images.read_image(item)
    return _check_image(item, what)


def _as_list(images, what):
    if isinstance(images, (str, os.PathLike)):
        raise ValueError(f"The {what} must be a sequence of images or paths; got one path "
                         f"{os.fspath(images)!r} (list a folder's images first).")
    if isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] == 3:
        raise ValueError(f"The {what} must be a sequence of images; got one array of shape "
                         f"{images.shape} (wrap a single image in a list).")
    items = list(images)
    if not items:
        raise ValueError(f"No {what} given (an empty sequence).")
    return items


def _pool(donors, kind):
    """The donor images of ``kind``: ``donors`` or its entry for ``kind``."""
    if isinstance(donors, dict):
        donors = donors.get(kind)
    if donors is None:
        raise ValueError(f"A {kind} defect is pasted from donor images: give donors (other "
                         "images, e.g. another class or texture).")
    return _as_list(donors, f"{kind} donor images")


def _check_kinds(kinds):
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"The defect kinds must be among {', '.join(KINDS)}; got "
                         f"{', '.join(map(repr, bad)) or 'none'}.")
    return list(dict.fromkeys(kinds))


# ------------------------------------------------------------- geometry
def _resize(a, h, w):
    """Bilinear resize of a float (H, W, C) array to (h, w, C), pixel centres aligned."""
    def axis(n_out, n_in):
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.intp)
        return lo, np.minimum(lo + 1, n_in - 1), pos - lo

    y0, y1, fy = axis(h, a.shape[0])
    x0, x1, fx = axis(w, a.shape[1])
    rows = a[y0] * (1 - fy)[:, None, None] + a[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def _donor(donors, like, rng):
    """A random donor as float (h, w, C) like ``like``: its channels matched
    (grey <-> RGB by luminance), enlarged when smaller, randomly cropped."""
    h, w, c = like.shape
    d = _load(donors[rng.integers(len(donors))], "donor image").astype(np.float64)
    if d.ndim == 2:
        d = d[..., None]
    if d.shape[2] != c:
        d = (np.repeat(d, 3, axis=2) if c == 3 else
             (d @ np.array([0.299, 0.587, 0.114]))[..., None])
    scale = max(h / d.shape[0], w / d.shape[1])
    if scale > 1:
        d = _resize(d, max(h, int(np.ceil(d.shape[0] * scale))),
                    max(w, int(np.ceil(d.shape[1] * scale))))
    y = rng.integers(0, d.shape[0] - h + 1)
    x = rng.integers(0, d.shape[1] - w + 1)
    return d[y:y + h, x:x + w]


def _ellipse(h, w, rng, lo, hi):
    """Squared normalised radius of a random rotated ellipse at every pixel
    centre (<= 1 inside); semi-axes ``lo``-``hi`` times the shorter side."""
    side = min(h, w)
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    ay, ax = rng.uniform(lo, hi, size=2) * side
    t = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
    v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
    return (u / ax) ** 2 + (v / ay) ** 2


def _changed(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max(axis=-1) > CHANGED


# ---------------------------------------------------------------- kinds
def _pasted(x, rng, draw):
    """Paste ``draw(rng) -> (mask, source)`` into ``x``: the first draw that
    changes at least half the masked pixels visibly, else the most visible."""
    best = None
    for _ in range(_TRIES):
        mask, src = draw(rng)
        seen = _changed(src[mask], x[mask]).mean()
        if best is None or seen > best[0]:
            best = (seen, mask, src)
        if seen >= 0.5:
            break
    _, mask, src = best
    out = x.copy()
    out[mask] = src[mask]
    return out, mask


def _patch(x, rng, donors):
    h, w = x.shape[:2]
    s = max(2, round(min(h, w) / 4))

    def draw(rng):
        y, x0 = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        sy, sx = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        src = np.zeros_like(x)
        src[y:y + s, x0:x0 + s] = _donor(donors, x, rng)[sy:sy + s, sx:sx + s]
        mask = np.zeros((h, w), bool)
        mask[y:y + s, x0:x0 + s] = True
        return mask, src

    return _pasted(x, rng, draw)


def _texture(x, rng, donors):
    h, w = x.shape[:2]
    return _pasted(x, rng, lambda rng: (_ellipse(h, w, rng, 0.15, 0.3) <= 1,
                                        _donor(donors, x, rng)))


def _scratch(x, rng, donors=None):
    h, w = x.shape[:2]
    side = min(h, w)
    half = rng.uniform(0.5, 0.75) * side / 2
    t = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    p0 = np.array([cy - np.sin(t) * half, cx - np.cos(t) * half])
    p1 = np.array([cy + np.sin(t) * half, cx + np.cos(t) * half])
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    # distance of every pixel centre to the segment
    d = p1 - p0
    s = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / (d @ d), 0, 1)
    dist = np.hypot(yy - p0[0] - s * d[0], xx - p0[1] - s * d[1])
    width = 1.0 if side <= 64 else 2.0
    # antialiased: full cover within half the width, fading out over one pixel
    alpha = np.clip(width / 2 + 0.5 - dist, 0, 1)[..., None]
    under = x[alpha[..., 0] > 0].mean()
    colour = np.array([20.0, 20, 30] if under > 127.5 else [235.0, 235, 225])[:x.shape[2]]
    return x * (1 - alpha) + alpha * colour, None  # mask: the changed pixels


def _blotch(x, rng, donors=None):
    h, w = x.shape[:2]
    e = _ellipse(h, w, rng, 0.125, 0.25)
    # 1 within half the ellipse's radius, 0.5 on the ellipse, 0 beyond 1.22 x
    weight = np.clip(1.5 - e, 0, 1)
    mask = weight > 0.5
    # of a few random colours, the farthest from the stained region's mean
    mean = x[mask].mean(axis=0)
    colours = rng.uniform(0, 255, size=(8, x.shape[2]))
    colour = colours[np.abs(colours - mean).max(axis=1).argmax()]
    a = 0.8 * weight[..., None]
    return x * (1 - a) + a * colour, mask


_MAKERS = {"patch": _patch, "scratch": _scratch, "blotch": _blotch, "texture": _texture}


def add_defect(image, kind, rng=None, donors=None):
    """One synthetic defect on a copy of ``image``, and its mask.

    Parameters
    ----------
    image : ndarray (H, W) or (H, W, 3) uint8
        Grey or RGB; at least 8 x 8 pixels.
    kind : {'patch', 'scratch', 'blotch', 'texture'}
        See the module's description.
    rng : numpy Generator, int or None
        The randomness (a seed gives the same defect every time).
    donors : sequence of images or paths, or dict kind -> sequence
        Images to paste from (``patch`` and ``texture``); any size, grey or
        RGB: their channels are matched to ``image``, a smaller donor is
        enlarged, a random crop of the image's size is used.

    Returns
    -------
    defective : ndarray, ``image``'s shape and dtype
    mask : ndarray (H, W) bool
        The defect's ground truth.
    """
    a = _check_image(image)
    if kind not in KINDS:
        raise ValueError(f"The defect kind must be one of {', '.join(KINDS)}; got {kind!r}.")
    pool = _pool(donors, kind) if kind in NEEDS_DONORS else None
    rng = np.random.default_rng(rng)
    x = a.reshape(a.shape[0], a.shape[1], -1).astype(np.float64)
    out, mask = _MAKERS[kind](x, rng, pool)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if mask is None:
        mask = _changed(out, x)
    return out.reshape(a.shape), mask


# --------------------------------------------------------------- writing
@contextlib.contextmanager
def _new_folder(folder):
    """Yield a temporary folder that becomes ``folder`` on success: built as a
    sibling of ``folder``'s highest missing ancestor and renamed into place,
    so that an error (or an interrupt) leaves nothing behind."""
    folder = Path(folder).expanduser().absolute()
    if folder.exists() or folder.is_symlink():
        raise FileExistsError(f"{str(folder)!r} already exists; give a new folder (or remove "
                              "it first).")
    top = folder
    while not top.parent.exists():
        top = top.parent
    if not top.parent.is_dir():
        raise NotADirectoryError(f"Cannot write {str(folder)!r}: {str(top.parent)!r} is not "
                                 "a folder.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{top.name}.", suffix=".tmp", dir=top.parent))
    try:
        inner = tmp.joinpath(*folder.relative_to(top).parts)
        inner.mkdir(parents=True, exist_ok=True)
        yield inner
        # mkdtemp makes the folder private (0700): give it a new folder's permissions
        os.chmod(tmp, 0o777 & ~current_umask())
        if top.exists():
            raise FileExistsError(f"{str(top)!r} appeared while it was written; "
                                  "nothing was written.")
        os.rename(tmp, top)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_png(path, array):
    from . import _images

    _images._pil().fromarray(np.ascontiguousarray(array)).save(path)


def _names(n):
    width = max(3, len(str(n - 1)))
    return [f"{i:0{width}d}" for i in range(n)]


def _write_pngs(folder, images, what):
    folder.mkdir(parents=True, exist_ok=True)
    images = _as_list(images, what)
    for name, item in zip(_names(len(images)), images):
        _save_png(folder / f"{name}.png", _load(item, what))
    return len(images)


def write_image_folder(folder, images):
    """Write ``images`` (arrays or paths) as ``folder/000.png``, ``001.png``,
    ... all at once: ``folder`` (and any missing parent) appears only when
    every file is written. E.g. the ``train/good/`` of an MVTec-layout set.

    Returns ``folder`` as a Path. Raises FileExistsError when it exists.
    """
    with _new_folder(folder) as out:
        _write_pngs(out, images, "images")
    return Path(folder)


def write_defect_set(folder, images, kinds=KINDS, donors=None, random_state=0, *,
                     train_images=None, verbose=False):
    """Write a labelled test set in MVTec AD's layout (see the module).

    Every test image is written clean to ``test/good/`` and once per kind
    with one defect to ``test/<kind>/`` under the same name, with its mask
    in ``ground_truth/<kind>/<name>_mask.png``. The folder appears only when
    complete: it is built beside its destination and renamed into place.

    Parameters
    ----------
    folder : str or Path
        A new folder (FileExistsError when it exists).
    images : sequence of images or paths
        The normal test images, uint8 (H, W) or (H, W, 3); sizes may differ.
    kinds : sequence of str, default: all of ``KINDS``
    donors : sequence of images or paths, dict kind -> sequence, or callable
        What ``patch`` and ``texture`` paste from (see :func:`add_defect`);
        a callable takes a test image's index and returns its donors (e.g.
        crops of the other textures). Not needed for scratch and blotch.
    random_state : int, default=0
        Image ``i``'s defect of kind ``k`` is seeded by ``(random_state, k,
        i)``: the same with any other kinds or images.
    train_images : sequence of images or paths, optional
        Also written to ``train/good/``.
    verbose : bool or 'auto', default=False
        Progress bar ('auto': only on a terminal).

    Returns
    -------
    Path of ``folder``.
    """
    from .._chunks import progress
    from .features import show_progress

    kinds = _check_kinds(kinds)
    if (isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer))
            or random_state < 0):
        raise ValueError(f"The 'random_state' parameter of write_defect_set must be an int "
                         f"in the range [0, inf). Got {random_state!r} instead.")
    images = _as_list(images, "test images")
    if not callable(donors):
        for kind in set(kinds) & set(NEEDS_DONORS):
            for item in _pool(donors, kind):
                if not isinstance(item, (str, os.PathLike)):
                    _check_image(item, "donor image")
    with _new_folder(folder) as out:
        if train_images is not None:
            _write_pngs(out / "train" / "good", train_images, "training images")
        for kind in ["good"] + kinds:
            (out / "test" / kind).mkdir(parents=True)
            if kind != "good":
                (out / "ground_truth" / kind).mkdir(parents=True)
        steps = zip(_names(len(images)), images)
        for i, (name, item) in enumerate(progress(steps, show_progress(verbose), "defects",
                                                  total=len(images))):
            img = _load(item, "test image")
            _save_png(out / "test" / "good" / f"{name}.png", img)
            pool = donors(i) if callable(donors) else donors
            for kind in kinds:
                rng = np.random.default_rng([int(random_state), KINDS.index(kind), i])
                bad, mask = add_defect(img, kind, rng, pool)
                _save_png(out / "test" / kind / f"{name}.png", bad)
                _save_png(out / "ground_truth" / kind / f"{name}_mask.png",
                          mask.astype(np.uint8) * 255)
    return Path(folder)


# --------------------------------------------------------------- presets
def _texture_photos():
    try:
        from skimage import data
    except ImportError:
        raise ImportError("The textures set and the texture donors are scikit-image's bundled "
                          "photographs: pip install scikit-image (or leave 'texture' out of "
                          "the kinds)") from None
    return {name: getattr(data, name)() for name in _TEXTURES}


def _crops(photo, n, size, rng, out_size=None):
    """``n`` random ``size`` crops of a grey photo tiled by mirroring (no crop
    straddles a seam), block-averaged to ``out_size`` (a divisor of it)."""
    if n == 0:
        return np.empty((0, out_size or size, out_size or size), np.uint8)
    big = np.pad(photo, ((0, size), (0, size)), mode="reflect")
    ys, xs = rng.integers(0, photo.shape[0], n), rng.integers(0, photo.shape[1], n)
    out = np.stack([big[y:y + size, x:x + size] for y, x in zip(ys, xs)])
    if out_size is not None and out_size != size:
        f = size // out_size
        out = out.reshape(n, out_size, f, out_size, f).mean(axis=(2, 4)).round()
    return out.astype(np.uint8)


def preset(name, n_train=200, n_test=50, *, kinds=KINDS, home=None, random_state=0):
    """A built-in normal set: ``(train, test, donors)`` for :func:`write_defect_set`.

    - ``cifar_horse``: CIFAR-10 horses (class 7; 32 x 32 RGB), training
      images from the official training split, test images from the test
      split; patches from the test images of the other nine classes;
    - ``fashion_tshirt``: Fashion-MNIST T-shirts (class 0; 28 x 28 grey)
      likewise; patches from sneakers and bags (classes 7, 8);
    - ``textures``: 128 x 128 crops of scikit-image's photographs ``brick``,
      ``grass`` and ``gravel`` (a third each; mirror-tiled): training crops
      from the photographs' top halves, test crops from the bottom halves;
      patches and textures from crops of the two other textures.

    For CIFAR and Fashion, ``texture`` swaps in crops of the three texture
    photographs, 4x block-averaged to the images' size. Images are sampled
    with ``random_state``; CIFAR-10 and Fashion-MNIST are read from the data
    folder (``home``, else ``NONN_DATA``).
    """
    from . import datasets

    if name not in PRESETS:
        raise ValueError(f"The preset must be one of {', '.join(PRESETS)}; got {name!r}.")
    kinds = _check_kinds(kinds)
    rng = np.random.default_rng(random_state)
    photos = _texture_photos() if name == "textures" or "texture" in kinds else None
    if name == "textures":
        half = photos[_TEXTURES[0]].shape[0] // 2
        split = lambda n: [n // 3 + (j < n % 3) for j in range(3)]  # noqa: E731
        train = np.concatenate([_crops(p[:half], m, 128, rng)
                                for p, m in zip(photos.values(), split(n_train))])
        test = np.concatenate([_crops(p[half:], m, 128, rng)
                               for p, m in zip(photos.values(), split(n_test))])
        own = np.repeat(np.arange(3), split(n_test))
        pools = [_crops(p[half:], 20, 128, rng) for p in photos.values()]
        others = [[c for j in range(3) if j != t for c in pools[j]] for t in range(3)]
        return train, test, lambda i: others[own[i]]
    if name == "cifar_horse":
        load, cls, other = datasets.load_cifar10, 7, [c for c in range(10) if c != 7]
        n_other, side = 20, 32
    else:
        load, cls, other, n_other, side = datasets.load_fashion_mnist, 0, [7, 8], 90, 28
    train, _ = load("train", home=home, classes=[cls], n_per_class=n_train,
                    random_state=random_state)
    test, _ = load("test", home=home, classes=[cls], n_per_class=n_test,
                   random_state=random_state)
    donors = {}
    if "patch" in kinds:
        donors["patch"] = load("test", home=home, classes=other, n_per_class=n_other,
                               random_state=random_state + 1)[0]
    if photos is not None:
        donors["texture"] = np.concatenate([_crops(p, 20, 4 * side, rng, side)
                                            for p in photos.values()])
    return train, test, donors
