"""Image and pixel metrics of anomaly maps: image AUROC/AP, pixel AUROC, AUPRO.

Pure numpy + scipy + scikit-learn (no torch). Maps and masks are lists of
2-D arrays of equal shapes pairwise (one per image; images may differ in
size); a normal image's mask is all False.

AUPRO follows Bergmann et al. (MVTec AD, IJCV 2021): for a threshold, each
connected ground-truth region's overlap is the share of its pixels above
the threshold (PRO = the mean over all regions of all images), the false
positive rate is the share of normal pixels (outside every mask) above it;
the PRO-vs-FPR curve is integrated up to ``max_fpr`` (30 % by default) and
divided by ``max_fpr``, so 1 is perfect and a random map scores about
``max_fpr / 2``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["image_metrics", "pixel_auroc", "aupro", "pro_curve"]


def _check(maps, masks):
    maps = [np.asarray(m, dtype=np.float64) for m in maps]
    masks = [np.asarray(k, dtype=bool) for k in masks]
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks.")
    for i, (m, k) in enumerate(zip(maps, masks)):
        if m.ndim != 2 or m.shape != k.shape:
            raise ValueError(f"Map {i} has shape {m.shape} but its mask {k.shape}; each map "
                             "and its mask must be 2-D of the same shape.")
        if not np.isfinite(m).all():
            raise ValueError(f"Map {i} holds non-finite values.")
    return maps, masks


def image_metrics(scores, labels):
    """``{'auroc', 'ap'}`` of image scores (higher = more anomalous) against
    labels (1 = anomalous); NaN when only one class is present."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    if len(np.unique(y)) < 2:
        return {"auroc": float("nan"), "ap": float("nan")}
    return {"auroc": float(roc_auc_score(y, s)), "ap": float(average_precision_score(y, s))}


def pixel_auroc(maps, masks):
    """AUROC of every pixel of every map against the masks; NaN without
    both anomalous and normal pixels."""
    from sklearn.metrics import roc_auc_score

    maps, masks = _check(maps, masks)
    y = np.concatenate([k.ravel() for k in masks])
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.concatenate([m.ravel() for m in maps])))


def pro_curve(maps, masks, n_thresholds=500):
    """``(fpr, pro)`` arrays over ``n_thresholds`` thresholds spread evenly
    between the maps' smallest and largest values, FPR ascending."""
    from scipy import ndimage

    maps, masks = _check(maps, masks)
    lo = min(float(m.min()) for m in maps)
    hi = max(float(m.max()) for m in maps)
    thresholds = np.linspace(hi, lo, n_thresholds)
    normal = np.concatenate([m[~k] for m, k in zip(maps, masks)])
    if normal.size == 0:
        raise ValueError("AUPRO needs normal pixels (outside every mask).")
    # FPR at each threshold: the share of normal pixels >= it
    normal.sort()
    fpr = 1.0 - np.searchsorted(normal, thresholds, side="left") / normal.size
    pro_sum = np.zeros(n_thresholds)
    n_regions = 0
    for m, k in zip(maps, masks):
        labels, n = ndimage.label(k, structure=np.ones((3, 3)))
        for r in range(1, n + 1):
            v = np.sort(m[labels == r])
            pro_sum += 1.0 - np.searchsorted(v, thresholds, side="left") / v.size
            n_regions += 1
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one anomalous region in the masks.")
    return fpr, pro_sum / n_regions


def aupro(maps, masks, max_fpr=0.3, n_thresholds=500):
    """Area under the PRO curve up to ``max_fpr``, divided by ``max_fpr``;
    NaN without an anomalous region or a normal pixel."""
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1]; got {max_fpr!r}.")
    maps, masks = _check(maps, masks)
    if not any(k.any() for k in masks) or all(k.all() for k in masks):
        return float("nan")
    fpr, pro = pro_curve(maps, masks, n_thresholds)
    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[0.0], pro])
    # the curve up to max_fpr, closed by interpolation at max_fpr
    keep = fpr <= max_fpr
    x, y = fpr[keep], pro[keep]
    if x[-1] < max_fpr:
        j = np.searchsorted(fpr, max_fpr)
        if j < len(fpr):
            x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
            yi = y0 + (y1 - y0) * (max_fpr - x0) / max(x1 - x0, 1e-300)
        else:
            yi = y[-1]
        x, y = np.append(x, max_fpr), np.append(y, yi)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0) / max_fpr)
