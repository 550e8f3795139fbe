"""A real-data demonstration that needs no download: one-class digits.

scikit-learn ships the UCI 8 x 8 handwritten digits (1,797 images, 64 pixel
features, ~180 per digit; :func:`sklearn.datasets.load_digits`). Each digit
in turn is the normal class:

- the images are split once, stratified by digit (seeded): two thirds for
  training, one third for testing;
- a detector is fitted on the training images of the normal digit only
  (~120) and scores every test image: the test images of that digit are
  held-out normals, all other test digits are anomalies;
- AUROC of the anomaly score against "not this digit", and the held-out
  false-alarm rate: the share of the digit's test images flagged at the
  detector's own threshold (``contamination``, 5 % here: with ~60 held-out
  normals per digit, 1 % would rest on a handful of images).

The default detector (``KNNN()`` with the library's current defaults) runs
beside plain k-NN (``KNN()``); only ``contamination`` is set. Nothing is
tuned to this data. :func:`run_digits` prints the table and writes it, with
a figure of each digit's most normal and most anomalous test images and
their p-values (:meth:`nonn.KNNN.pvalue`).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

from ._baselines import KNN
from ._knnn import KNNN

__all__ = ["RATE", "run_digits"]

#: the false-alarm rate asked of each detector's threshold
RATE = 0.05
#: test share of the stratified split, and its seed
TEST_SIZE = 1 / 3
SEED = 0
#: images per row of the figure: this many most normal, then most anomalous
SHOWN = 5


def _detectors(rate):
    """The two detectors, at their defaults except the threshold's rate."""
    return {"k-NNN": KNNN(contamination=rate), "k-NN": KNN(contamination=rate)}


def run_digits(out_dir="nonn-demo", rate=RATE, digits=range(10), verbose=True):
    """One-class digits: AUROC and held-out false-alarm rate per digit.

    Parameters
    ----------
    out_dir : str or path
        Receives ``digits.csv`` (one row per digit and detector),
        ``digits.md`` (the table) and ``digits.png`` (skipped, with a
        printed note, without matplotlib). Created if needed.
    rate : float, default=RATE
        ``contamination`` of both detectors: the false-alarm rate asked.
    digits : iterable of int, default=range(10)
        The digits taken as the normal class in turn.
    verbose : bool, default=True
        Print the table and the summary.

    Returns
    -------
    dict with ``rows`` (digit, method, auroc, held-out normals, flagged),
    ``rate``, ``mean_auroc`` and ``false_alarm`` ({method: value}), ``wins``
    ({method: digits where it has the higher AUROC}), ``markdown``,
    ``files`` ({"csv", "md", "png"}) and ``seconds``.
    """
    from sklearn.datasets import load_digits
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    digits = [int(d) for d in digits]
    if not digits or not set(digits) <= set(range(10)):
        raise ValueError(f"digits must be among 0..9; got {digits!r}.")
    t0 = time.perf_counter()
    X, y = load_digits(return_X_y=True)
    tr, te = train_test_split(np.arange(len(y)), test_size=TEST_SIZE, stratify=y,
                              random_state=SEED)
    X_test, y_test = X[te], y[te]
    rows, shown = [], {}
    for d in digits:
        anomalous = (y_test != d).astype(int)
        for method, det in _detectors(rate).items():
            det.fit(X[tr][y[tr] == d])
            score = det.anomaly_score(X_test)
            flagged = int((det.predict(X_test[anomalous == 0]) == -1).sum())
            rows.append({"digit": d, "method": method,
                         "auroc": float(roc_auc_score(anomalous, score)),
                         "normals": int((anomalous == 0).sum()), "flagged": flagged})
            if method == "k-NNN":
                order = np.argsort(score, kind="stable")
                pick = np.r_[order[:SHOWN], order[-SHOWN:]]
                shown[d] = (X_test[pick], y_test[pick], det.pvalue(X_test[pick]),
                            len(det.calibration_scores_))
    methods = list(_detectors(rate))
    auc = {m: {r["digit"]: r["auroc"] for r in rows if r["method"] == m} for m in methods}
    mean_auroc = {m: float(np.mean(list(auc[m].values()))) for m in methods}
    false_alarm = {m: sum(r["flagged"] for r in rows if r["method"] == m)
                   / sum(r["normals"] for r in rows if r["method"] == m) for m in methods}
    wins = {m: [d for d in digits if auc[m][d] > max(auc[o][d] for o in methods if o != m)]
            for m in methods}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "digits.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["digit", "method", "auroc", "held_out_normals", "flagged"])
        w.writerows((r["digit"], r["method"], f"{r['auroc']:.6f}", r["normals"], r["flagged"])
                    for r in rows)
    md = _markdown(digits, methods, auc, mean_auroc, false_alarm, wins, rate,
                   sum(r["normals"] for r in rows if r["method"] == methods[0]))
    md_path = out / "digits.md"
    md_path.write_text(md, encoding="utf-8")
    png_path = out / "digits.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        png_path = None
        print("nonn demo: matplotlib is not installed, so digits.png was skipped "
              "(pip install 'nonn[plot]').")
    else:
        _plot(png_path, shown)
    seconds = time.perf_counter() - t0
    if verbose:
        print(md)
        print(f"Wrote {csv_path}, {md_path}" + (f", {png_path}" if png_path else "")
              + f" in {seconds:.1f} s.")
    return {"rows": rows, "rate": float(rate), "mean_auroc": mean_auroc,
            "false_alarm": false_alarm, "wins": wins,
            "markdown": md, "seconds": seconds,
            "files": {"csv": str(csv_path), "md": str(md_path),
                      "png": None if png_path is None else str(png_path)}}


def _markdown(digits, methods, auc, mean_auroc, false_alarm, wins, rate, n_normals):
    lines = [
        "## One-class digits (scikit-learn's 8x8 digits, no download)",
        "",
        "Each digit in turn is normal: fitted on its training images (2/3 split, "
        "stratified), tested on all test images (its own = held-out normals, the other "
        f"digits = anomalies). Defaults, threshold at contamination {rate:g}.",
        "",
        "| digit | " + " | ".join(f"{m} AUROC" for m in methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for d in digits:
        best = max(auc[m][d] for m in methods)
        cells = [(f"**{auc[m][d]:.4f}**" if auc[m][d] == best else f"{auc[m][d]:.4f}")
                 for m in methods]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines.append("| mean | " + " | ".join(f"{mean_auroc[m]:.4f}" for m in methods) + " |")
    lines.append(f"| held-out false alarms (asked {rate:.0%}) | "
                 + " | ".join(f"{false_alarm[m]:.1%}" for m in methods) + " |")
    first, second = methods
    lead = first if mean_auroc[first] >= mean_auroc[second] else second
    other = second if lead == first else first
    lines += [
        "",
        f"{lead} has the higher mean AUROC ({mean_auroc[lead]:.4f} against "
        f"{mean_auroc[other]:.4f}); {first} is ahead on {len(wins[first])} of "
        f"{len(digits)} digits, {second} on {len(wins[second])}"
        + (f" (ties on {len(digits) - len(wins[first]) - len(wins[second])})"
           if len(wins[first]) + len(wins[second]) < len(digits) else "")
        + f". Of the {n_normals} held-out normal images, {first} flagged "
        f"{false_alarm[first]:.1%} and {second} {false_alarm[second]:.1%}, for "
        f"{rate:.0%} asked.",
    ]
    return "\n".join(lines) + "\n"


def _plot(path, shown):
    """One mosaic (a single image: fast to draw): a row per digit, its most
    normal test images on the left, its most anomalous on the right, each
    with its p-value above it (red: another digit, an anomaly)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    digits = sorted(shown)
    cols, cell, gap = 2 * SHOWN, 8, 5  # gap: room for the p-value above a tile
    pitch_x, pitch_y = cell + 2, cell + gap
    mosaic = np.full((len(digits) * pitch_y, cols * pitch_x + 2), np.nan)
    fig, ax = plt.subplots(figsize=(0.8 * cols + 1.2, 0.75 * len(digits) + 1.0))
    for i, d in enumerate(digits):
        images, labels, pvalues, _ = shown[d]
        for j in range(cols):
            x = j * pitch_x + (2 if j >= SHOWN else 0)  # a wider gap between the halves
            y = i * pitch_y + gap - 1
            mosaic[y:y + cell, x:x + cell] = images[j].reshape(cell, cell)
            ax.text(x + cell / 2 - 0.5, y - 1.2, f"p={pvalues[j]:.3f}", ha="center",
                    va="bottom", fontsize=6.5,
                    color="black" if labels[j] == d else "crimson")
        ax.text(-1.5, i * pitch_y + gap - 1 + cell / 2, f"normal: {d}", ha="right",
                va="center", fontsize=8)
    ax.imshow(np.ma.masked_invalid(mosaic), cmap="gray_r", vmin=0, vmax=16,
              interpolation="nearest")
    ax.set_axis_off()
    lo, hi = min(v[3] for v in shown.values()), max(v[3] for v in shown.values())
    floor = (f"1/{lo + 1} = {1 / (lo + 1):.3f}" if lo == hi else
             f"1/(n + 1) = {1 / (hi + 1):.3f}-{1 / (lo + 1):.3f}")
    ax.set_title(f"k-NNN, each row fitted on one digit: the {SHOWN} most normal (left) and "
                 f"{SHOWN} most anomalous (right) test images, with their p-values\n(red: "
                 f"another digit, an anomaly; with n = {lo}" + ("" if lo == hi else f"-{hi}")
                 + f" calibration normals the smallest p-value is {floor})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
