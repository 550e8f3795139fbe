"""The paper's 2-D synthetic benchmark (Sec. 4.2, Table 5, Figure 8).

Three normal shapes from scikit-learn's generators: two interleaving half
circles (``"moons"``), two concentric circles (``"circles"``) and a rolled-up
spiral (``"swiss_roll"``, the x and z columns of the 3-D roll). As in the
paper, ``2 * n_train`` normal points are generated: half train the detector,
the other half are the normal test points; the anomalies are sampled
uniformly over the plane, here the bounding box of the normal points
enlarged by :data:`MARGIN` (10 %) of its width and height on every side.

Noise levels
------------
Chosen once, before any method was run, and never tuned per method:

- moons: ``noise=0.05``, circles: ``noise=0.05, factor=0.5`` — the values of
  scikit-learn's own clustering-comparison example; 5 % of the unit radius.
- swiss roll: ``noise=0.5`` — the same ratio to its scale: the roll's radius
  runs from 1.5*pi to 4.5*pi, mean 3*pi ~ 9.4, and 0.05 * 9.4 ~ 0.5.

Protocol choices the paper leaves open
--------------------------------------
- The paper tests on 5,000 points; here the normal test half has
  ``n_train`` points and there are ``n_anomalies`` (default 1,000) anomalies.
- Uniform anomalies that happen to fall on a noisy curve are still labelled
  anomalies (the paper's protocol), so no method can reach AUROC 1.
- Every method uses the paper's defaults: k = 3 neighbors, K' = 25
  neighbors of neighbors; ``set_size=2`` (the whole 2-D vector is one set,
  which is Eq. 1 of the paper) for k-NNN and the local baseline.

:func:`run_demo` reproduces Table 5 (every dataset x training size x seed)
and Figure 8 (heat maps of each method's anomaly score over the plane).
"""

from __future__ import annotations

import csv
import numbers
import time
from pathlib import Path

import numpy as np

from ._baselines import KNN, GlobalEigenKNN, LocalEigenKNN
from ._knnn import KNNN

__all__ = [
    "DATASETS",
    "MARGIN",
    "METHODS",
    "NOISE",
    "PAPER_TABLE5",
    "make_detectors",
    "make_synthetic",
    "plot_figure8",
    "run_demo",
]

#: the three normal shapes, in the paper's order
DATASETS = ("moons", "circles", "swiss_roll")

#: scikit-learn generator arguments per dataset (see the module docstring)
NOISE = {
    "moons": {"noise": 0.05},
    "circles": {"noise": 0.05, "factor": 0.5},
    "swiss_roll": {"noise": 0.5},
}

#: anomalies are uniform over the normal points' bounding box, enlarged by
#: this fraction of its width/height on each side
MARGIN = 0.1

#: the methods of Table 5, in its column order
METHODS = ("k-NN", "Local", "Global", "k-NNN")

#: Table 5 of the paper (AUROC), for comparison only
PAPER_TABLE5 = {
    "moons": {"k-NN": 0.8214, "Local": 0.8408, "Global": 0.8860, "k-NNN": 0.9162},
    "circles": {"k-NN": 0.8079, "Local": 0.8123, "Global": 0.8109, "k-NNN": 0.8163},
    "swiss_roll": {"k-NN": 0.9496, "Local": 0.9496, "Global": 0.9794, "k-NNN": 0.9816},
}

_LABELS = {"moons": "Moons", "circles": "Circles", "swiss_roll": "Swiss roll"}

#: Figure 8 is drawn at this training size and seed
FIGURE_SIZE, FIGURE_SEED = 200, 0
#: heat-map resolution (cells per side): full run, quick run
_GRID, _GRID_QUICK = 200, 60


def _check_int(value, name, low, func):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or value < low:
        raise ValueError(
            f"The '{name}' parameter of {func} must be an int in the range [{low}, inf). "
            f"Got {value!r} instead."
        )
    return int(value)


def make_synthetic(name, n_train, n_anomalies=1000, seed=0):
    """One draw of a synthetic benchmark.

    Parameters
    ----------
    name : {"moons", "circles", "swiss_roll"}
    n_train : int
        Training (normal) points; as many normal test points are drawn.
    n_anomalies : int, default=1000
        Anomalies, uniform over the normal points' bounding box enlarged by
        10 % per side.
    seed : int, default=0
        Same seed, same data.

    Returns
    -------
    X_train : ndarray of shape (n_train, 2)
    X_test : ndarray of shape (n_train + n_anomalies, 2)
        The normal test points first, then the anomalies.
    y_test : ndarray of shape (n_train + n_anomalies,), int
        0 = normal, 1 = anomaly.

    Examples
    --------
    >>> from nonn.synthetic import make_synthetic
    >>> X_train, X_test, y_test = make_synthetic("moons", 100, 50, seed=0)
    >>> X_train.shape, X_test.shape, int(y_test.sum())
    ((100, 2), (150, 2), 50)
    """
    from sklearn.datasets import make_circles, make_moons, make_swiss_roll

    if name not in DATASETS:
        raise ValueError(
            f"The 'name' parameter of make_synthetic must be a str among "
            f"{{{', '.join(repr(d) for d in DATASETS)}}}. Got {name!r} instead. "
            "For example: make_synthetic('moons', 200)."
        )
    n_train = _check_int(n_train, "n_train", 1, "make_synthetic")
    n_anomalies = _check_int(n_anomalies, "n_anomalies", 0, "make_synthetic")
    seed = _check_int(seed, "seed", 0, "make_synthetic")

    # independent streams for the normal shape, the split and the anomalies
    normal_ss, split_ss, anomaly_ss = np.random.SeedSequence(seed).spawn(3)
    state = int(normal_ss.generate_state(1)[0])
    n = 2 * n_train
    if name == "moons":
        X, _ = make_moons(n, random_state=state, **NOISE[name])
    elif name == "circles":
        X, _ = make_circles(n, random_state=state, **NOISE[name])
    else:
        X3, _ = make_swiss_roll(n, random_state=state, **NOISE[name])
        X = X3[:, [0, 2]]
    X = X[np.random.default_rng(split_ss).permutation(n)]

    lo, hi = X.min(axis=0), X.max(axis=0)
    pad = MARGIN * (hi - lo)
    anomalies = np.random.default_rng(anomaly_ss).uniform(lo - pad, hi + pad, (n_anomalies, 2))
    X_test = np.vstack([X[n_train:], anomalies])
    y_test = np.r_[np.zeros(n_train, dtype=np.int64), np.ones(n_anomalies, dtype=np.int64)]
    return np.ascontiguousarray(X[:n_train]), X_test, y_test


def make_detectors():
    """Fresh, unfitted detectors of Table 5 with the paper's defaults,
    ``{method name: estimator}`` in :data:`METHODS` order (2-D data)."""
    return {
        "k-NN": KNN(n_neighbors=3),
        "Local": LocalEigenKNN(n_neighbors=3, set_size=2),
        "Global": GlobalEigenKNN(n_neighbors=3),
        # the paper's operator (its Table 5): K' = 25, Eq. 2's sum, no floor
        # beyond the safe one. KNNN()'s floor for data under 64 features (1.0
        # x the mean variance) floors every local direction of these thin 2-D
        # shapes and scores them as plain k-NN does.
        "k-NNN": KNNN.paper(set_size=2),
    }


def _plane_box(X):
    lo, hi = X.min(axis=0), X.max(axis=0)
    pad = MARGIN * (hi - lo)
    return lo - pad, hi + pad


def plot_figure8(path, n_train=FIGURE_SIZE, seed=FIGURE_SEED, grid=_GRID):
    """Figure 8: anomaly-score heat maps, datasets x methods, saved to ``path``.

    Each panel is coloured by the rank of the score among the panel's grid
    cells (so every panel uses the whole colour scale, whatever the score's
    units): dark blue = most normal, yellow = most anomalous, as in the
    paper. Training points are cyan. Needs matplotlib (``nonn[plot]``);
    raises ImportError without it.
    """
    # The Agg canvas on a bare Figure: no display, and no pyplot, so the
    # user's global backend and figure registry are left untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from scipy.stats import rankdata

    fig = Figure(figsize=(3.4 * len(METHODS), 3.0 * len(DATASETS)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(DATASETS), len(METHODS), squeeze=False)
    for r, name in enumerate(DATASETS):
        X_train, _, _ = make_synthetic(name, n_train, 0, seed)
        lo, hi = _plane_box(X_train)
        xs, ys = np.linspace(lo[0], hi[0], grid), np.linspace(lo[1], hi[1], grid)
        G = np.column_stack([g.ravel() for g in np.meshgrid(xs, ys)])
        for c, (method, det) in enumerate(make_detectors().items()):
            score = det.fit(X_train).anomaly_score(G)
            shade = rankdata(score).reshape(grid, grid) / score.size
            ax = axes[r, c]
            ax.imshow(shade, origin="lower", extent=(lo[0], hi[0], lo[1], hi[1]),
                      cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            ax.scatter(X_train[:, 0], X_train[:, 1], s=3, c="cyan", linewidths=0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"({'abcd'[c]}) {method}")
            if c == 0:
                ax.set_ylabel(_LABELS[name])
    fig.suptitle(f"Anomaly score over the plane (rank-normalised; blue = normal), "
                 f"n_train={n_train}, seed {seed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _markdown(summary, per_size, sizes, seeds, n_anomalies):
    head = "| Dataset | | " + " | ".join(METHODS) + " | k-NNN - k-NN |"
    rule = "|---|---|" + "---|" * (len(METHODS) + 1)
    lines = [
        "# Synthetic 2-D benchmark (paper Sec. 4.2, Table 5)",
        "",
        f"AUROC, anomalies = positives. {len(sizes)} training sizes "
        f"({', '.join(map(str, sizes))}) x {seeds} seeds; per run n_train normal test "
        f"points and {n_anomalies} uniform anomalies. k=3, K'=25. Noise: "
        + "; ".join(f"{_LABELS[d]} " + ", ".join(f"{k}={v}" for k, v in NOISE[d].items())
                    for d in DATASETS) + ".",
        "",
        f"## Mean ± std over all {len(sizes) * seeds} runs per dataset, beside the paper",
        "",
        head,
        rule,
    ]
    for d in DATASETS:
        if d not in summary:
            continue
        m = summary[d]
        lines.append(f"| {_LABELS[d]} | measured | "
                     + " | ".join(f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}" for k in METHODS)
                     + f" | {m['k-NNN']['mean'] - m['k-NN']['mean']:+.4f} |")
        p = PAPER_TABLE5[d]
        lines.append(f"| | paper | " + " | ".join(f"{p[k]:.4f}" for k in METHODS)
                     + f" | {p['k-NNN'] - p['k-NN']:+.4f} |")
    lines += [
        "",
        f"## Per training size (mean over {seeds} seeds)",
        "",
        "| Dataset | n_train | " + " | ".join(METHODS) + " | k-NNN - k-NN |",
        "|---|---|" + "---|" * (len(METHODS) + 1),
    ]
    for d in DATASETS:
        for s in sizes:
            if d not in per_size:
                continue
            m = per_size[d][s]
            lines.append(f"| {_LABELS[d]} | {s} | " + " | ".join(f"{m[k]:.4f}" for k in METHODS)
                         + f" | {m['k-NNN'] - m['k-NN']:+.4f} |")
    return "\n".join(lines) + "\n"


def run_demo(out_dir="nonn-demo", seeds=5, sizes=(100, 200, 300, 400, 500),
             n_anomalies=1000, verbose=True, quick=False, progress=None):
    """Run the synthetic benchmark: Table 5 and Figure 8 of the paper.

    For every dataset x training size x seed, fits k-NN, local and global
    eigen-normalised k-NN and k-NNN (paper defaults) and measures AUROC.
    Writes into ``out_dir``:

    - ``table5.csv``: every run (dataset, size, seed, method, auroc);
    - ``table5.md``: mean ± std per dataset and method beside the paper's
      Table 5, and the per-size means;
    - ``figure8.png``: anomaly-score heat maps at n_train=200, seed 0
      (skipped, with a printed note, when matplotlib is not installed).

    Parameters
    ----------
    out_dir : str or path, default="nonn-demo"
        Created if needed.
    seeds : int, default=5
        Seeds 0 .. seeds-1 per dataset and size.
    sizes : sequence of int, default=(100, 200, 300, 400, 500)
        Training sizes (the paper used 100-500).
    n_anomalies : int, default=1000
    verbose : bool, default=True
        Progress bar, then print the markdown tables.
    progress : bool or None, default=None
        A progress bar on stderr (None: as ``verbose``).
    quick : bool, default=False
        A smoke run for tests: overrides ``seeds`` with 2 and ``sizes`` with
        (100, 300), and draws a coarser figure grid.

    Returns
    -------
    dict with keys ``summary`` ({dataset: {method: {"mean", "std"}}}),
    ``per_size`` ({dataset: {size: {method: mean}}}), ``paper`` (Table 5),
    ``markdown`` (the table text), ``files`` ({"csv", "md", "png"}: paths as
    str; "png" is None when skipped), ``n_runs`` and ``seconds``.
    """
    from sklearn.metrics import roc_auc_score

    if quick:
        seeds, sizes = 2, (100, 300)
    seeds = _check_int(seeds, "seeds", 1, "run_demo")
    # k = 3 neighbors need at least 4 training points
    sizes = tuple(_check_int(s, "sizes", 4, "run_demo") for s in sizes)
    if not sizes:
        raise ValueError("The 'sizes' parameter of run_demo must hold at least one training "
                         "size. Got () instead. For example: sizes=(100, 200).")
    n_anomalies = _check_int(n_anomalies, "n_anomalies", 1, "run_demo")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    jobs = [(d, s, k) for d in DATASETS for s in sizes for k in range(seeds)]
    steps = jobs
    bar = None
    if verbose if progress is None else progress:
        from tqdm.auto import tqdm

        bar = tqdm(jobs, desc="nonn demo", unit="run")
        steps = bar
    rows = []
    for d, s, k in steps:
        X_train, X_test, y_test = make_synthetic(d, s, n_anomalies, k)
        for method, det in make_detectors().items():
            score = det.fit(X_train).anomaly_score(X_test)
            rows.append((d, s, k, method, float(roc_auc_score(y_test, score))))
    if bar is not None:
        bar.close()

    auc = {}
    for d, s, k, method, a in rows:
        auc.setdefault(d, {}).setdefault(method, {}).setdefault(s, []).append(a)
    summary = {
        d: {m: {"mean": float(np.mean([a for v in auc[d][m].values() for a in v])),
                "std": float(np.std([a for v in auc[d][m].values() for a in v]))}
            for m in METHODS}
        for d in DATASETS
    }
    per_size = {d: {s: {m: float(np.mean(auc[d][m][s])) for m in METHODS} for s in sizes}
                for d in DATASETS}

    csv_path = out / "table5.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "size", "seed", "method", "auroc"])
        w.writerows((d, s, k, m, f"{a:.6f}") for d, s, k, m, a in rows)

    md = _markdown(summary, per_size, sizes, seeds, n_anomalies)
    md_path = out / "table5.md"
    md_path.write_text(md, encoding="utf-8")

    png_path = out / "figure8.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        png_path = None
        print("nonn demo: matplotlib is not installed, so figure8.png was skipped "
              "(pip install 'nonn[plot]').")
    else:
        plot_figure8(png_path, grid=_GRID_QUICK if quick else _GRID)

    seconds = time.perf_counter() - t0
    if verbose:
        print(md)
        print(f"Wrote {csv_path}, {md_path}" + (f", {png_path}" if png_path else "")
              + f" in {seconds:.1f} s.")
    return {
        "summary": summary,
        "per_size": per_size,
        "paper": PAPER_TABLE5,
        "markdown": md,
        "files": {"csv": str(csv_path), "md": str(md_path),
                  "png": None if png_path is None else str(png_path)},
        "n_runs": len(jobs),
        "seconds": seconds,
    }
