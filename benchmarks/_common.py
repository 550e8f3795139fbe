"""Shared helpers of the benchmark scripts: data, timing, memory, recall,
the machine's description and result files. Not part of the library."""

from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np


def embedding_like(n_train, n_queries, d, seed=0, latent=32, n_clusters=8, anomaly_share=0.1):
    """ResNet-pooled-feature-like float32 data: ``relu(Z @ A + b + noise)``,
    ``Z`` around one of ``n_clusters`` centres in ``latent`` dimensions (low
    intrinsic dimension, correlated, sparse, non-negative features).
    Queries: held-out normals plus ``anomaly_share`` from unseen centres.
    Returns ``X, Q, labels`` (1 = anomalous query)."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(latent, d)) / math.sqrt(latent)
    b = rng.normal(0.2, 0.3, size=d)
    centres = rng.normal(0.0, 1.5, size=(n_clusters, latent))
    novel = rng.normal(0.0, 1.5, size=(max(n_clusters // 2, 1), latent))

    def draw(n, cents):
        Z = cents[rng.integers(len(cents), size=n)] + rng.normal(size=(n, latent))
        return np.maximum(Z @ A + b + 0.1 * rng.normal(size=(n, d)), 0.0).astype(np.float32)

    n_anom = int(round(anomaly_share * n_queries))
    X = draw(n_train, centres)
    Q = np.vstack([draw(n_queries - n_anom, centres), draw(n_anom, novel)])
    return X, Q, np.r_[np.zeros(n_queries - n_anom), np.ones(n_anom)]


def best_of(fn, repeats=1):
    """``(best wall seconds, last result)`` of ``repeats`` calls."""
    best, out = math.inf, None
    for _ in range(max(int(repeats), 1)):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def rss_bytes():
    """Resident set size of this process (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class PeakRSS:
    """Peak RSS increase over a block, sampled every 5 ms by a thread (it
    sees native libraries' memory too)."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta = self.peak - self.start
        return False


def recall(found, truth):
    """Mean share of each row's true neighbours that ``found`` holds."""
    found, truth = np.asarray(found), np.asarray(truth)
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


def environment():
    """What the numbers were measured on."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    import nonn

    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_average_1min": load, "nonn": nonn.__version__,
            "numpy": np.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def markdown_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_results(out, name, result, markdown):
    """``<out>/<name>.json`` and ``.md``; returns the Markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown + "\n")
    return out / f"{name}.md"
