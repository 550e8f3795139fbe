"""Pictures of anomaly maps on an absolute scale (numpy + Pillow, no torch).

A map's colour depends only on the map and two levels fixed by the model
at fit from held-out normal images (:class:`~nonn.vision.SPADE`'s
``map_median_`` and ``pixel_threshold_``), never on the other images of a
run: colour 0 (dark violet) is the median normal pixel, the middle of the
scale (teal-green) is the pixel threshold, and the top (yellow) is twice as
far above the median as the threshold. The colour map is viridis
(perceptually uniform, readable in grey and by most colour-blind viewers);
pixels above the threshold are outlined in white.
"""

from __future__ import annotations

import numpy as np

#: viridis (matplotlib's, CC0) sampled at 33 evenly spaced points
_VIRIDIS = np.array([
    (68, 1, 84), (71, 13, 96), (72, 24, 106), (72, 35, 116), (71, 45, 123), (69, 55, 129),
    (66, 64, 134), (62, 73, 137), (59, 82, 139), (55, 91, 141), (51, 99, 141), (47, 107, 142),
    (44, 114, 142), (41, 122, 142), (38, 130, 142), (35, 137, 142), (33, 145, 140),
    (31, 152, 139), (31, 160, 136), (34, 167, 133), (40, 174, 128), (50, 182, 122),
    (63, 188, 115), (78, 195, 107), (94, 201, 98), (112, 207, 87), (132, 212, 75),
    (152, 216, 62), (173, 220, 48), (194, 223, 35), (216, 226, 25), (236, 229, 27),
    (253, 231, 37)], dtype=np.float64)

#: pictures smaller than this (longer side, pixels) are scaled up to it
MIN_SIDE = 256


def colormap(v):
    """Values in [0, 1] (clipped) -> uint8 RGB, viridis."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0)
    x = np.linspace(0.0, 1.0, len(_VIRIDIS))
    rgb = np.stack([np.interp(v, x, _VIRIDIS[:, c]) for c in range(3)], -1)
    return rgb.round().astype(np.uint8)


def scale_map(amap, median, threshold):
    """The colour-scale position of map values: 0 at ``median``, 0.5 at
    ``threshold``, 1 at ``2 * threshold - median`` (clipped)."""
    span = 2.0 * (float(threshold) - float(median))
    if not np.isfinite(span) or span <= 0:
        raise ValueError(f"The pixel threshold ({threshold!r}) must lie above the median "
                         f"normal pixel value ({median!r}).")
    return np.clip((np.asarray(amap, dtype=np.float64) - float(median)) / span, 0.0, 1.0)


def _outline(mask):
    """Pixels of ``mask`` with a 4-neighbor outside it."""
    m = np.pad(mask, 1, mode="constant")
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def _upscale(image, amap):
    """Small images (and their maps) scaled up to ``MIN_SIDE`` for viewing."""
    from PIL import Image

    h, w = amap.shape
    f = int(np.ceil(MIN_SIDE / max(h, w)))
    if f <= 1:
        return image, amap
    size = (w * f, h * f)
    image = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))
    amap = np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize(
        size, Image.BILINEAR), dtype=np.float64)
    return image, amap


def render(image, amap, median, threshold, alpha=0.5):
    """``(side_by_side, mask)``: the input next to the colour-mapped map
    blended over it (the threshold's outline in white), with a colour bar
    under both (its middle tick: the threshold), and the binary mask (uint8
    0/255) of the pixels above ``threshold`` at the image's own size.

    ``image`` is (H, W, 3) uint8, ``amap`` (H, W); the picture depends on
    them and the two levels only.
    """
    image = np.asarray(image, dtype=np.uint8)
    amap = np.asarray(amap, dtype=np.float64)
    if image.ndim != 3 or image.shape[:2] != amap.shape:
        raise ValueError(f"The image {image.shape} and its map {amap.shape} must have the "
                         "same height and width.")
    mask = amap > float(threshold)
    big, bmap = _upscale(image, amap)
    v = scale_map(bmap, median, threshold)
    heat = colormap(v).astype(np.float64)
    over = (alpha * heat + (1 - alpha) * big.astype(np.float64)).round().astype(np.uint8)
    over[_outline(bmap > float(threshold))] = 255
    h, w = bmap.shape
    gap = np.full((h, 4, 3), 255, np.uint8)
    top = np.concatenate([big, gap, over], 1)
    bar_h = max(6, h // 24)
    bar = colormap(np.linspace(0, 1, top.shape[1]))[None].repeat(bar_h, 0)
    bar[:, top.shape[1] // 2 - 1:top.shape[1] // 2 + 1] = 255
    picture = np.concatenate([top, np.full((2, top.shape[1], 3), 255, np.uint8), bar], 0)
    return picture, (mask * 255).astype(np.uint8)


def save_pictures(stem, image, amap, median, threshold):
    """Write ``<stem>_heatmap.png`` (side by side) and ``<stem>_mask.png``."""
    from PIL import Image

    picture, mask = render(image, amap, median, threshold)
    Image.fromarray(picture).save(f"{stem}_heatmap.png")
    Image.fromarray(mask).save(f"{stem}_mask.png")
