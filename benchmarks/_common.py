"""The benchmark scripts' one shared helper module: data, timing, memory,
recall, the machine's description and result files. Not part of the
library; the scripts import only from here and from ``nonn``."""

import json
import math
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np


def embedding_like(n_train, n_queries, d, seed=0, latent=32, n_clusters=8, anomaly_share=0.1):
    """Pooled-CNN-feature-like float32 data ``relu(Z @ A + b + noise)``, ``Z`` near
    one of ``n_clusters`` centres in ``latent`` dimensions; queries: held-out
    normals plus ``anomaly_share`` from unseen centres. ``X, Q, labels``."""
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


def log(msg):
    """``msg`` to stdout with the wall-clock time, flushed."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def rss_bytes():
    """Resident set size of this process (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_mib():
    """This process's peak RSS since it started (or since ``reset_peak_rss``), MiB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss():
    """Reset the peak-RSS mark (VmHWM) to the current RSS; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak RSS increase over a block (``.delta`` bytes), sampled every 5 ms."""

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


def machine_busy_seconds():
    """CPU seconds the whole machine spent busy since boot (None without /proc/stat)."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf(
        "SC_CLK_TCK")


def load_average():
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def environment():
    """What the numbers were measured on, and the command that produced them."""
    import nonn

    return {"command": " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:]),
            "python": platform.python_version(), "machine": platform.machine(),
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "load_average_1min": load_average()[0], "nonn": nonn.__version__,
            "numpy": np.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def recall(found, truth):
    """Mean share of each row's true neighbors that ``found`` holds."""
    found, truth = np.asarray(found), np.asarray(truth)
    return float(np.mean([len(np.intersect1d(f, t)) / len(t) for f, t in zip(found, truth)]))


def exact_neighbors(X, Q, k, self_rows=None):
    """Ids of the ``k`` exact nearest rows of ``X`` to each row of ``Q``; with
    ``self_rows`` (``Q = X[self_rows]``) each row's own id is left out."""
    from nonn.neighbors import make_backend

    ids = make_backend("brute").fit(X).kneighbors(Q, k + (self_rows is not None),
                                                   return_distance=False)
    return ids if self_rows is None else np.array([[j for j in r if j != i][:k]
                                                   for r, i in zip(ids, self_rows)])


def searched_data(det, Q):
    """The training rows a fitted ``KNNN`` searches and ``Q`` as it searches them.
    This and the next two: the only reads of an estimator's private state."""
    return det._fit_X, det._to_grid(det._preprocess(Q))


def fitted_search(det):
    """The search backend object a fitted detector queries (e.g. its FAISS index)."""
    return det._search


def state_bytes(det):
    """``{array name: bytes}`` of the fitted arrays a model stores (its file's payload)."""
    return {name: getattr(det, name).nbytes for name in type(det)._state_arrays_for(
        det.get_params()) if isinstance(getattr(det, name, None), np.ndarray)}


def against_floors(make, X, Q, labels, repeats=1, backend_params=None, build_in_graph=False):
    """Time ``make().fit(X)``, ``anomaly_score(Q)`` and, on the same backend and
    rows, the bare K'-NN graph (with the index build if ``build_in_graph``) and
    k-NN query. Returns ``(det, row, (Xp, Qp, query ids))``."""
    from sklearn.metrics import roc_auc_score

    from nonn.neighbors import make_backend

    with PeakRSS() as mem:
        t_fit, det = best_of(lambda: make().fit(X), repeats)
    t_score, scores = best_of(lambda: det.anomaly_score(Q), repeats)
    n, Kp, k = len(X), det.n_neighbors_of_neighbors_, det.n_neighbors_
    Xp, Qp = searched_data(det, Q)
    floor = make_backend(det.backend_, n_samples=n, n_features=X.shape[1],
                         **(backend_params or {}))
    t_build, _ = best_of(lambda: floor.fit(Xp))
    floor.kneighbors(Xp[:100], k, return_distance=False)  # warm-up
    t_graph, _ = best_of(lambda: floor.kneighbors(None, min(Kp, n - 1),
                                                  return_distance=False), repeats)
    t_graph += t_build if build_in_graph else 0.0
    t_query, found = best_of(lambda: floor.kneighbors(Qp, k, return_distance=False), repeats)
    return det, {"fit_s": t_fit, "graph_s": t_graph, "score_s": t_score, "query_s": t_query,
                 "fit/graph": t_fit / t_graph, "score/query": t_score / t_query,
                 "fit_peak_rss_mib": mem.delta / 2**20, "K'": Kp, "k": k,
                 "auroc": float(roc_auc_score(labels, scores))}, (Xp, Qp, found)


def markdown_table(header, rows):
    """A Markdown table; cells are written with ``str``."""
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
