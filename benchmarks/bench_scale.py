#!/usr/bin/env python
"""Scale benchmark: nonn's KNNN against the bare k-NN search of each backend, from
10 thousand to a million points.

For every training size N and every search backend, in one run, on the same
embedding-like float32 data (``bench_core.embedding_like``; queries are ~90 %
held-out normal points and ~10 % anomalies from unseen centres):

* floor, graph: ``make_backend(...).fit(X).kneighbors(None, K' - 1)`` (the
  k-NN graph KNNN.fit needs), and floor, query: ``.kneighbors(Q, k)`` on that
  same fitted backend (the search ``anomaly_score`` needs); both called the way
  KNNN calls them: ``return_distance=False`` (ids only) where the backend takes
  it, since KNNN needs no distances (``--floor-with-distances`` times the
  calls with distances instead);
* nonn: ``KNNN(backend=..., backend_params=...).fit(X)`` and
  ``.anomaly_score(Q)``;
* peers: PyOD ``KNN`` (fit + decision_function) and the authors' ``knnn``
  0.1.0 (fit + predict), where they finish within ``--max-seconds``.

Recorded: wall time, peak RSS, the bytes of the training data and of the
fitted model (numpy arrays and FAISS indexes the estimator holds), the ratios
fit / graph, score / query and peak / (data + model); for approximate backends
recall@K' of the graph and recall@k of the query against exact search on a
sample of rows (FAISS flat search of those rows); the AUROC of every detector
on the queries, and for approximate backends its difference to the exact
backend at the same N.

A measurement whose time, estimated from the smaller sizes by the observed
scaling (never below the search's asymptotic exponent: N^2 for an exact
graph, N for an exact query), would exceed ``--max-seconds``, or whose memory
would exceed what the machine has free, is skipped and the output says so,
with the estimate.

This is a benchmark, not a test: it reports targets, it never fails on them.

Usage (from the repository root, project venv active)::

    python benchmarks/bench_scale.py --sizes 2000,5000 --dim 64 --queries 500   # smoke, ~1 min
    python benchmarks/bench_scale.py                       # 10k, 100k, 1M at D=512: hours
    python benchmarks/bench_scale.py --sizes 100000 --backends "faiss:HNSW32@efSearch=128"

Backend specs (``--backends``, comma separated)::

    NAME[:MAIN][@KEY=VALUE]...

NAME is a nonn backend (brute, sklearn, faiss, torch); MAIN is its main option
(faiss: the index-factory string, torch: the device, sklearn: the algorithm);
each ``@KEY=VALUE`` is one more ``backend_params`` entry. A comma inside a
FAISS factory string is kept when the text after it does not start a new spec
(``faiss:IVF4096,Flat`` is one spec); ``;`` always separates specs. Examples:
``faiss:HNSW32@efSearch=128``, ``faiss:IVF4096,Flat@nprobe=32``, ``torch:cuda``.

Results: ``--out`` (default ``benchmarks/results/scale``) gets
``scale_D{D}_Q{Q}_N{sizes}.md``, ``.json`` (rewritten after every measurement,
so an interrupted run keeps what it measured) and ``.png`` (log-log time
against N).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import inspect
import json
import math
import os
import platform
import re
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_core  # noqa: E402  (the shared data generator lives there)
from bench_core import embedding_like  # noqa: E402

MiB = 2**20
GiB = 2**30
BACKEND_NAMES = ("auto", "brute", "sklearn", "faiss", "torch")
#: the option a spec's "NAME:MAIN" part sets
MAIN_OPTION = {"faiss": "index", "torch": "device", "sklearn": "algorithm"}


# ---------------------------------------------------------------------------
# backend specs
# ---------------------------------------------------------------------------


def _value(text):
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(text)
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_spec(text):
    head, *opts = text.split("@")
    name, _, main = head.partition(":")
    name = name.strip()
    if name not in BACKEND_NAMES:
        raise SystemExit(f"--backends: unknown backend {name!r} in {text!r}; "
                         f"expected one of {BACKEND_NAMES}")
    params = {}
    if main:
        if name not in MAIN_OPTION:
            raise SystemExit(f"--backends: {name!r} takes no ':' option (got {text!r})")
        params[MAIN_OPTION[name]] = main.strip()
    for opt in opts:
        key, eq, val = opt.partition("=")
        if not eq:
            raise SystemExit(f"--backends: expected @KEY=VALUE, got {opt!r} in {text!r}")
        params[key.strip()] = _value(val.strip())
    return {"label": text, "name": name, "params": params}


def split_specs(text):
    specs = []
    for chunk in text.split(";"):
        for tok in chunk.split(","):
            tok = tok.strip()
            if not tok:
                continue
            head = re.split(r"[:@]", tok, maxsplit=1)[0].strip()
            if head in BACKEND_NAMES or not specs:
                specs.append(tok)
            else:  # a comma inside a FAISS factory string: "IVF4096,Flat"
                specs[-1] += "," + tok
    return [parse_spec(s) for s in specs]


def spec_kind(spec, backend_obj):
    """(exact, prior exponent of the graph time in N, of the query time in N).

    Exact search and IVF with a fixed number of lists scan a fixed share of the
    data per query (graph ~ N^2, query ~ N); HNSW grows about as N log N / log N.
    """
    exact = bool(getattr(backend_obj, "exact", True))
    index = str(spec["params"].get("index", "")).upper()
    if exact:
        return True, 2.0, 1.0
    if "HNSW" in index:
        return False, 1.15, 0.3
    if "IVF" in index:
        # index training (k-means on at most train_size rows) dominates up to
        # a few 100k points, the N^2 / nlist * nprobe scan beyond
        return False, 1.5, 1.0
    return False, 2.0, 1.0


def ivf_lists(spec):
    m = re.search(r"IVF(\d+)", str(spec["params"].get("index", "")), re.I)
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------


def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes():
    v = _status_kib("VmRSS")
    if v is None:  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return v


def mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def trim():
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_hwm():
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_busy_seconds = bench_core._system_busy_seconds


class Meter:
    """Wall time, peak RSS (kernel high-water mark after a reset, plus a thread
    sampling VmRSS every 10 ms where the reset is not allowed), this process's
    CPU time and the CPU share other processes took meanwhile."""

    def __enter__(self):
        trim()
        self.hwm_ok = _reset_hwm()
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        self._busy = _busy_seconds()
        t = os.times()
        self._own = t.user + t.system
        self.t0 = time.perf_counter()
        return self

    def _poll(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._t.join()
        t = os.times()
        self.cpu = t.user + t.system - self._own
        self.peak = max(self.peak, rss_bytes())
        if self.hwm_ok:
            self.peak = max(self.peak, _status_kib("VmHWM") or 0)
        busy = _busy_seconds()
        cap = self.seconds * (os.cpu_count() or 1)
        self.others = (max(busy - self._busy - self.cpu, 0.0) / cap
                       if busy is not None and self._busy is not None and cap > 0.05
                       else float("nan"))
        return False

    def record(self):
        return {"seconds": self.seconds, "cpu_seconds": self.cpu,
                "rss_before_mib": self.base / MiB, "peak_rss_mib": self.peak / MiB,
                "peak_delta_mib": (self.peak - self.base) / MiB,
                "others_cpu_share": self.others}


def measure(fn, repeats=1):
    """Best of ``repeats`` calls; returns (record, result of the last call)."""
    recs, out = [], None
    for _ in range(max(int(repeats), 1)):
        out = None
        with Meter() as m:
            out = fn()
        recs.append(m.record())
    best = dict(min(recs, key=lambda r: r["seconds"]))
    best["runs"] = [r["seconds"] for r in recs]
    best["peak_rss_mib"] = max(r["peak_rss_mib"] for r in recs)
    best["peak_delta_mib"] = max(r["peak_delta_mib"] for r in recs)
    best["others_cpu_share"] = max(r["others_cpu_share"] for r in recs)
    return best, out


# ---------------------------------------------------------------------------
# sizes of what an estimator stores
# ---------------------------------------------------------------------------


def faiss_index_bytes(index):
    import faiss

    idx = faiss.downcast_index(index)
    if hasattr(idx, "hnsw"):
        h = idx.hnsw
        return (h.neighbors.size() * 4 + h.offsets.size() * 8 + h.levels.size() * 4
                + faiss_index_bytes(idx.storage))
    ivf = faiss.try_extract_index_ivf(idx)
    if ivf is not None:
        n = sum(ivf.invlists.list_size(i) for i in range(ivf.nlist))
        return n * (ivf.code_size + 8) + faiss_index_bytes(ivf.quantizer)
    return int(idx.ntotal) * int(getattr(idx, "code_size", 4 * idx.d))


def stored_bytes(obj):
    """Host bytes of the arrays an estimator holds (numpy arrays, CPU torch
    tensors, FAISS indexes; shared memory counted once), found through its
    attributes, those of the objects it owns (backend, scikit-learn
    estimators) and lists/dicts of them; CUDA tensors are counted apart."""
    seen_mem, seen_obj = set(), set()
    out = {"host": 0, "device": 0}

    def visit(o, depth):
        if depth > 5 or id(o) in seen_obj:
            return
        seen_obj.add(id(o))
        if isinstance(o, np.ndarray):
            base = o
            while isinstance(base.base, np.ndarray):
                base = base.base
            key = base.__array_interface__["data"][0]
            if key not in seen_mem:
                seen_mem.add(key)
                out["host"] += base.nbytes if base.base is None else o.nbytes
            return
        mod = type(o).__module__ or ""
        if mod.startswith("torch") and hasattr(o, "data_ptr"):
            key = o.data_ptr()
            if key not in seen_mem:
                seen_mem.add(key)
                n = o.untyped_storage().nbytes()
                out["device" if o.is_cuda else "host"] += n
            return
        if mod.startswith("faiss") and hasattr(o, "ntotal"):
            with contextlib.suppress(Exception):
                out["host"] += faiss_index_bytes(o)
            return
        if isinstance(o, (list, tuple)):
            for v in o:
                visit(v, depth + 1)
            return
        if isinstance(o, dict):
            for v in o.values():
                visit(v, depth + 1)
            return
        if mod.split(".")[0] in ("nonn", "sklearn", "pyod", "knnn") and hasattr(o, "__dict__"):
            for v in vars(o).values():
                visit(v, depth + 1)

    visit(obj, 0)
    return out


# ---------------------------------------------------------------------------
# time and memory estimates from the smaller sizes
# ---------------------------------------------------------------------------


class Scaling:
    """Per series (backend x stage), the measured (N, seconds, peak delta)."""

    def add(self, key, n, seconds, peak_delta_bytes, linear_bytes=0):
        """``linear_bytes``: the part of the peak that grows with N (what the
        call leaves stored: model, index, graph); the rest (chunked working
        memory) is taken as constant."""
        self.hist.setdefault(key, []).append((n, seconds, peak_delta_bytes, linear_bytes))

    def __init__(self, slack=0.5):
        self.hist = {}
        self.slack = slack

    def estimate(self, key, n, prior):
        """(seconds, peak delta bytes, how) at size ``n``, or None without history.

        Exponent: the one observed between the last two sizes, clipped to
        [prior, prior + slack] (small sizes are dominated by fixed costs, so the
        observed one is often below the asymptotic ``prior``; cache effects can
        push it above); memory: the stored part linear, the rest constant.
        """
        h = [r for r in self.hist.get(key, []) if r[0] < n]
        if not h:
            return None
        n1, t1, m1, lin = h[-1]
        e = prior
        if len(h) >= 2 and t1 >= 0.5:
            n0, t0 = h[-2][:2]
            if t0 > 0 and n1 > n0:
                e = min(max(math.log(t1 / t0) / math.log(n1 / n0), prior), prior + self.slack)
        r = n / n1
        mem = lin * r + max(m1 - lin, 0)
        return t1 * r**e, mem, f"{t1:.3g} s at N={n1:,} x (N ratio {r:.3g})^{e:.2f}"


# ---------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------


def auroc(labels, scores):
    from sklearn.metrics import roc_auc_score

    s = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        return float("nan")
    return float(roc_auc_score(labels, s))


def exact_ids(xq, xb, k, exclude=None):
    """Exact k nearest neighbours (ids) of ``xq`` in ``xb`` by a FAISS flat
    search of those rows (numpy blocks without FAISS); ``exclude`` = the rows'
    own ids in ``xb``, dropped by index."""
    kk = k + (exclude is not None)
    try:
        import faiss

        _, ind = faiss.knn(np.ascontiguousarray(xq, dtype=np.float32),
                           np.ascontiguousarray(xb, dtype=np.float32), kk)
    except ImportError:
        best_d = np.full((len(xq), kk), np.inf, dtype=np.float32)
        ind = np.zeros((len(xq), kk), dtype=np.int64)
        qn = (xq * xq).sum(1)[:, None]
        for s in range(0, len(xb), 65536):
            b = xb[s:s + 65536]
            d = qn - 2 * xq @ b.T + (b * b).sum(1)[None, :]
            dd = np.concatenate([best_d, d], 1)
            ii = np.concatenate([ind, np.arange(s, s + len(b))[None, :].repeat(len(xq), 0)], 1)
            sel = np.argpartition(dd, kk - 1, axis=1)[:, :kk]
            best_d, ind = np.take_along_axis(dd, sel, 1), np.take_along_axis(ii, sel, 1)
    if exclude is None:
        return ind[:, :k]
    out = np.empty((len(xq), k), dtype=np.int64)
    for i, (row, own) in enumerate(zip(ind, exclude)):
        row = row[row != own]
        out[i] = row[:k]
    return out


def recall(found, truth):
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth)]))


def environment():
    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "numpy": np.__version__,
           "mem_total_gib": None, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with contextlib.suppress(Exception):
        env.update(bench_core.environment())
    with contextlib.suppress(Exception), open("/proc/meminfo") as f:
        env["mem_total_gib"] = int(f.readline().split()[1]) / 2**20
    for mod in ("torch", "pyod", "matplotlib"):
        with contextlib.suppress(Exception):
            env[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        import numba

        env["numba"] = numba.__version__
        env["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    return env


class Bench:
    def __init__(self, args):
        self.a = args
        self.scaling = Scaling(args.exponent_slack)
        self.rows = []      # one per (N, backend)
        self.peers = []     # one per (N, peer)
        self.skips = []     # (N, what, estimate, reason)
        self.data_info = {}
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        sizes = "-".join(_short(n) for n in args.sizes)
        self.stem = f"scale_D{args.dim}_Q{args.queries}_N{sizes}"
        self.env = environment()
        self.t_start = time.perf_counter()

    # -------------------------------------------------------------- helpers
    def say(self, text):
        el = time.perf_counter() - self.t_start
        print(f"[{el:7.0f} s] {text}", flush=True)

    def gate(self, n, key, what, prior, extra_floor_s=None):
        """None to run, or the reason to skip (with the estimate)."""
        est = self.scaling.estimate(key, n, prior)
        secs = mem = None
        how = ""
        if est is not None:
            secs, mem, how = est
        if extra_floor_s is not None:
            secs = max(secs or 0.0, extra_floor_s)
            how = how or f"at least the {extra_floor_s:.3g} s just measured for its floor"
        avail = mem_available()
        forced = any(p and p in what for p in self.a.no_skip)
        if secs is not None and secs > self.a.max_seconds and not forced:
            reason = (f"estimated {secs:,.3g} s > --max-seconds {self.a.max_seconds:,.3g} "
                      f"({how})")
        elif mem is not None and avail is not None and mem > self.a.max_memory_fraction * avail:
            reason = (f"estimated +{mem / GiB:.1f} GiB > {self.a.max_memory_fraction:.0%} of "
                      f"the {avail / GiB:.1f} GiB available (stored part linear in N, working "
                      f"memory constant, from N={self.scaling.hist[key][-1][0]:,})")
        else:
            if secs is not None:
                self.say(f"  {what}: estimated {secs:,.1f} s ({how})"
                         + (" [--no-skip]" if forced and secs > self.a.max_seconds else ""))
            return None
        self.skip(n, what, secs, reason)
        return reason

    def skip(self, n, what, secs, reason):
        self.skips.append({"N": n, "what": what, "estimate_s": secs, "reason": reason})
        self.say(f"  SKIP {what} at N={n:,}: {reason}")

    def run(self, n, key, what, fn, linear=None):
        """Measure ``fn``; ``linear(out)`` = the bytes of what it leaves stored."""
        self.say(f"  {what} ...")
        rec, out = measure(fn, self.a.repeats)
        lin = 0
        if linear is not None:
            with contextlib.suppress(Exception):
                lin = int(linear(out))
        self.scaling.add(key, n, rec["seconds"], rec["peak_delta_mib"] * MiB, lin)
        busy = rec["others_cpu_share"]
        self.say(f"  {what}: {rec['seconds']:.3f} s, peak RSS {rec['peak_rss_mib']:.0f} MiB "
                 f"(+{rec['peak_delta_mib']:.0f})"
                 + (f", other processes used {busy:.0%} of the CPUs" if busy == busy
                    and busy > 0.1 else ""))
        return rec, out

    # ---------------------------------------------------------------- main
    def main(self):
        a = self.a
        self.say(f"nonn scale benchmark: N in {a.sizes}, D={a.dim}, {a.queries} queries, "
                 f"K'={a.kprime}, k={a.k}, L={a.set_size}; backends "
                 f"{[s['label'] for s in a.specs]}; peers {a.peers}; --max-seconds "
                 f"{a.max_seconds:,.0f}; {os.cpu_count()} CPUs")
        self.warm_up()
        try:
            for n in a.sizes:
                self.one_size(n)
                self.save(plot=True)
        except KeyboardInterrupt:
            self.say("interrupted: saving what was measured")
        self.save(plot=True)
        self.say(f"saved {self.out / self.stem}.md / .json / .png")

    def warm_up(self):
        """Imports, thread pools and numba compilation outside the timed runs."""
        from nonn import KNNN
        from nonn.neighbors import make_backend

        a = np.ones((512, 512), dtype=np.float32)
        for _ in range(3):
            a @ a
        Xw, Qw = embedding_like(600, 40, min(self.a.dim, 64), seed=self.a.seed + 1)
        t0 = time.perf_counter()
        KNNN(n_neighbors=self.a.k, n_neighbors_of_neighbors=self.a.kprime,
             set_size=self.a.set_size, backend="brute",
             **self.a.knnn_params).fit(Xw).anomaly_score(Qw)
        for spec in self.a.specs:
            params = dict(spec["params"])
            if ivf_lists(spec):
                params["index"] = re.sub(r"IVF\d+", "IVF4", params["index"], flags=re.I)
            with contextlib.suppress(Exception), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                b = make_backend(spec["name"], metric="euclidean", **params).fit(Xw)
                b.kneighbors(Qw, 3)
                KNNN(n_neighbors=self.a.k, n_neighbors_of_neighbors=self.a.kprime,
                     set_size=self.a.set_size, backend=spec["name"],
                     backend_params=params or None,
                     **self.a.knnn_params).fit(Xw).anomaly_score(Qw)
        for peer in self.a.peers:
            with contextlib.suppress(Exception):
                __import__({"pyod": "pyod.models.knn", "knnn": "knnn"}[peer])
        self.say(f"warm-up (imports, numba compilation): {time.perf_counter() - t0:.1f} s")

    def one_size(self, n):
        a = self.a
        self.say(f"=== N = {n:,} ===")
        t0 = time.perf_counter()
        X, Q = embedding_like(n, a.queries, a.dim, seed=a.seed)
        n_anom = int(round(0.1 * a.queries))  # embedding_like's default anomaly share
        labels = np.r_[np.zeros(a.queries - n_anom), np.ones(n_anom)]
        self.data_info[n] = {"generate_s": time.perf_counter() - t0,
                             "X_mib": X.nbytes / MiB, "Q_mib": Q.nbytes / MiB,
                             "anomalies": n_anom}
        self.say(f"data: X {X.shape} float32 ({X.nbytes / MiB:,.0f} MiB), Q {Q.shape} "
                 f"({n_anom} anomalies), generated in {time.perf_counter() - t0:.1f} s")
        self._exact = None
        self._scores = {}
        for spec in a.specs:
            try:
                self.one_backend(n, spec, X, Q, labels)
            except Exception as exc:  # noqa: BLE001 - report and carry on
                self.say(f"  ERROR {spec['label']} at N={n:,}: {exc!r}")
                traceback.print_exc()
                self.rows.append({"N": n, "backend": spec["label"], "error": repr(exc)})
            trim()
            self.save()
        for peer in a.peers:
            try:
                self.one_peer(n, peer, X, Q, labels)
            except Exception as exc:  # noqa: BLE001
                self.say(f"  ERROR peer {peer} at N={n:,}: {exc!r}")
                traceback.print_exc()
                self.peers.append({"N": n, "peer": peer, "error": repr(exc)})
            trim()
            self.save()
        self.fill_auroc_deltas(n)

    def exact_reference(self, X, Q):
        """Exact neighbours of a sample of training rows (K'-1 others) and of
        queries (k), computed once per N."""
        if self._exact is None:
            a = self.a
            rng = np.random.default_rng(a.seed + 7)
            n = len(X)
            rows = np.sort(rng.choice(n, min(a.exact_sample, n), replace=False))
            qrows = np.sort(rng.choice(len(Q), min(a.exact_sample, len(Q)), replace=False))
            t0 = time.perf_counter()
            g = exact_ids(X[rows], X, a.kprime - 1, exclude=rows)
            q = exact_ids(Q[qrows], X, a.k)
            self._exact = (rows, g, qrows, q)
            self.say(f"  exact reference for recall ({len(rows)} rows, {len(qrows)} queries, "
                     f"FAISS flat search): {time.perf_counter() - t0:.1f} s")
        return self._exact

    def one_backend(self, n, spec, X, Q, labels):
        from nonn import KNNN
        from nonn.neighbors import make_backend

        a = self.a
        label, name, params = spec["label"], spec["name"], spec["params"]
        D = X.shape[1]
        proto = make_backend(name, metric="euclidean", n_samples=n, n_features=D, **params)
        exact, p_graph, p_query = spec_kind(spec, proto)
        del proto
        row = {"N": n, "backend": label, "exact": exact, "params": params}
        self.rows.append(row)
        self.say(f"- backend {label} ({'exact' if exact else 'approximate'})")
        nlist = ivf_lists(spec)
        if nlist and n < nlist:
            self.skip(n, f"{label}: all", None,
                      f"the index has {nlist} inverted lists, more than the {n:,} training "
                      "points (FAISS needs at least one point per list)")
            row["skipped"] = "N < nlist"
            return

        # ---- floors: graph, then the query on the same fitted backend --------
        if self.gate(n, (label, "graph"), f"{label}: graph floor", p_graph):
            row["skipped"] = "graph floor (and so KNNN.fit) over budget"
            self.skip(n, f"{label}: KNNN.fit, query floor, score", None,
                      "KNNN.fit costs at least its graph floor, which was skipped")
            return
        holder = {}

        def ids(out):
            return out[1] if isinstance(out, tuple) else out

        def nbytes(out):
            return sum(x.nbytes for x in (out if isinstance(out, tuple) else (out,)))

        def graph():
            b = make_backend(name, metric="euclidean", n_samples=n, n_features=D, **params)
            holder["b"] = b.fit(X)
            return b.kneighbors(None, a.kprime - 1, **kw)

        probe = make_backend(name, metric="euclidean", n_samples=n, n_features=D, **params)
        kw = {} if a.floor_with_distances or "return_distance" not in inspect.signature(
            probe.kneighbors).parameters else {"return_distance": False}
        del probe
        row["floor_call"] = f"kneighbors(..., {'return_distance=False' if kw else 'with distances'})"
        call = ", return_distance=False" if kw else ""
        rec, out = self.run(
            n, (label, "graph"), f"{label}: graph floor (fit + kneighbors(None, "
            f"{a.kprime - 1}{call}))", graph,
            linear=lambda out: stored_bytes(holder["b"])["host"] + nbytes(out))
        g_ind = ids(out)
        del out
        row["graph"] = rec
        b = holder.pop("b")
        row["backend_stored_mib"] = stored_bytes(b)["host"] / MiB
        b.kneighbors(Q[:64], a.k, **kw)  # untimed: first-call costs of the query path
        rec, out = self.run(n, (label, "query"), f"{label}: query floor "
                            f"(kneighbors(Q, {a.k}{call}))", lambda: b.kneighbors(Q, a.k, **kw))
        q_ind = ids(out)
        del out
        row["query"] = rec
        del b
        if not exact:
            rows, g_true, qrows, q_true = self.exact_reference(X, Q)
            row["recall_graph_floor"] = recall(g_ind[rows], g_true)
            row["recall_query_floor"] = recall(q_ind[qrows], q_true)
            self.say(f"  recall@{a.kprime - 1} graph {row['recall_graph_floor']:.4f}, "
                     f"recall@{a.k} query {row['recall_query_floor']:.4f} "
                     f"(vs exact on {len(rows)} rows / {len(qrows)} queries)")
        del g_ind, q_ind
        trim()

        # ---- nonn ------------------------------------------------------------
        if self.gate(n, (label, "fit"), f"{label}: KNNN.fit", p_graph,
                     extra_floor_s=row["graph"]["seconds"]):
            row["skipped"] = "KNNN.fit over budget"
            return

        def make():
            return KNNN(n_neighbors=a.k, n_neighbors_of_neighbors=a.kprime,
                        set_size=a.set_size, backend=name, backend_params=params or None,
                        **a.knnn_params)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec, det = self.run(n, (label, "fit"), f"{label}: KNNN.fit", lambda: make().fit(X),
                                linear=lambda d: stored_bytes(d)["host"])
        row["fit"] = rec
        sb = stored_bytes(det)
        row["model_mib"] = sb["host"] / MiB
        row["model_device_mib"] = sb["device"] / MiB
        row["data_mib"] = X.nbytes / MiB
        # memory in use at the peak of fit: the training data it was given
        # (already resident) plus what fit added
        row["fit_peak_in_use_mib"] = X.nbytes / MiB + rec["peak_delta_mib"]
        row["peak_over_data_model"] = row["fit_peak_in_use_mib"] / (row["data_mib"]
                                                                     + row["model_mib"])
        row["fit_over_graph"] = rec["seconds"] / row["graph"]["seconds"]
        self.say(f"  fit / graph = {row['fit_over_graph']:.2f}; data + model "
                 f"{row['data_mib'] + row['model_mib']:,.0f} MiB, peak in use "
                 f"{row['fit_peak_in_use_mib']:,.0f} MiB -> ratio "
                 f"{row['peak_over_data_model']:.2f}")
        if not exact:
            nb = getattr(det, "neighborhoods_", None)
            if nb is not None:
                rows, g_true, _, _ = self.exact_reference(X, Q)
                row["recall_graph_knnn"] = recall(nb[rows, 1:], g_true)
        rec, scores = self.run(n, (label, "score"), f"{label}: KNNN.anomaly_score",
                               lambda: det.anomaly_score(Q))
        row["score"] = rec
        row["score_over_query"] = rec["seconds"] / row["query"]["seconds"]
        row["auroc"] = auroc(labels, scores)
        self._scores[label] = np.asarray(scores, dtype=np.float64)
        self.say(f"  score / query = {row['score_over_query']:.2f}; AUROC {row['auroc']:.4f}")
        # the same query on KNNN's own index (an approximate index built twice
        # is two different graphs; this separates index luck from Eq. 2)
        t0 = time.perf_counter()
        Qg = det._to_grid(Q)
        det._search.kneighbors(Qg, det.n_neighbors_, return_distance=False)
        row["own_query_s"] = time.perf_counter() - t0
        row["score_over_own_query"] = rec["seconds"] / row["own_query_s"]
        self.say(f"  KNNN's own index, grid conversion + kneighbors(Q, k): "
                 f"{row['own_query_s']:.3f} s; score / that = {row['score_over_own_query']:.2f}")
        del det, Qg

    def one_peer(self, n, peer, X, Q, labels):
        a = self.a
        rec_row = {"N": n, "peer": peer}
        self.peers.append(rec_row)
        if peer == "pyod":
            from pyod.models.knn import KNN

            label = f"PyOD KNN (n_neighbors={a.k}, largest)"

            def make():
                return KNN(n_neighbors=a.k, method="largest", n_jobs=-1)

            def score(m):
                return m.decision_function(Q)
        elif peer == "knnn":
            from knnn import KNNN as AuthorsKNNN

            label = f"knnn 0.1.0 ({a.peer_metric}, float64)"

            def make():
                return AuthorsKNNN(number_of_neighbors=a.k,
                                   number_of_neighbors_of_neighbors=a.kprime,
                                   set_size=a.set_size, distance_function=a.peer_metric)

            def score(m):
                return m.predict(Q)
        else:
            raise ValueError(f"unknown peer {peer!r}")
        rec_row["label"] = label
        self.say(f"- peer {label}")
        if self.gate(n, (peer, "fit"), f"{peer}: fit", 2.0):
            rec_row["skipped"] = "fit over budget"
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec, model = self.run(n, (peer, "fit"), f"{peer}: fit", lambda: make().fit(X),
                                  linear=lambda m: stored_bytes(m)["host"])
            rec_row["fit"] = rec
            sb = stored_bytes(model)
            rec_row["model_mib"] = sb["host"] / MiB
            rec_row["data_mib"] = X.nbytes / MiB
            rec_row["fit_peak_in_use_mib"] = X.nbytes / MiB + rec["peak_delta_mib"]
            if self.gate(n, (peer, "score"), f"{peer}: score", 1.0):
                rec_row["skipped"] = "score over budget"
                return
            rec, s = self.run(n, (peer, "score"), f"{peer}: score {len(Q):,} queries",
                              lambda: score(model))
        rec_row["score"] = rec
        rec_row["auroc"] = auroc(labels, s)
        self.say(f"  AUROC {rec_row['auroc']:.4f}")
        del model

    def fill_auroc_deltas(self, n):
        """AUROC difference and score agreement of each approximate backend
        with the first exact backend scored at the same N (the AUROC alone
        saturates on easy data; the scores say how close the detectors are)."""
        from scipy.stats import spearmanr

        ref = next((r for r in self.rows if r["N"] == n and r.get("exact")
                    and r.get("auroc") is not None), None)
        if ref is None:
            return
        s_ref = self._scores.get(ref["backend"])
        for r in self.rows:
            if r["N"] == n and r.get("auroc") is not None and not r.get("exact"):
                r["auroc_exact"] = ref["auroc"]
                r["auroc_exact_backend"] = ref["backend"]
                r["auroc_delta"] = r["auroc"] - ref["auroc"]
                s = self._scores.get(r["backend"])
                if s is not None and s_ref is not None:
                    rel = np.abs(s - s_ref) / np.maximum(np.abs(s_ref), 1e-30)
                    r["scores_vs_exact"] = {
                        "spearman": float(spearmanr(s, s_ref)[0]),
                        "share_equal_rtol_1e-4": float(np.mean(rel <= 1e-4)),
                        "median_rel_diff": float(np.median(rel)),
                        "max_rel_diff": float(rel.max()),
                    }
                    sv = r["scores_vs_exact"]
                    self.say(f"  {r['backend']} vs {ref['backend']}: ΔAUROC "
                             f"{r['auroc_delta']:+.4f}, score Spearman {sv['spearman']:.4f}, "
                             f"{sv['share_equal_rtol_1e-4']:.1%} of scores equal to rtol 1e-4")

    # --------------------------------------------------------------- output
    def save(self, plot=False):
        a = self.a
        result = {
            "config": {k: v for k, v in vars(a).items() if k != "specs"},
            "backends": a.specs,
            "environment": self.env,
            "data": {str(k): v for k, v in self.data_info.items()},
            "rows": self.rows, "peers": self.peers, "skipped": self.skips,
            "targets": self.targets(),
            "elapsed_s": time.perf_counter() - self.t_start,
        }
        (self.out / f"{self.stem}.json").write_text(json.dumps(result, indent=2, default=str))
        (self.out / f"{self.stem}.md").write_text(self.markdown(result))
        if plot and not a.no_plot:
            with contextlib.suppress(Exception):
                self.plot()

    def targets(self):
        """The issue's targets, each judged at the N it names when this run
        measured that N, else at the nearest measured N (said in "at N")."""
        out = []

        def pick(rows, want):
            rows = [r for r in rows if r is not None]
            if not rows:
                return None
            exact = [r for r in rows if r["N"] == want]
            return exact[0] if exact else min(rows, key=lambda r: abs(math.log(r["N"] / want)))

        def add(r, what, value, goal, ok, want):
            note = "" if r["N"] == want else f" (goal names N={want:,})"
            out.append({"N": r["N"], "what": what + note, "value": value, "goal": goal,
                        "pass": bool(ok)})

        for spec in self.a.specs:
            b = spec["label"]
            rows = [r for r in self.rows if r["backend"] == b and "error" not in r]
            r = pick([x for x in rows if x.get("fit_over_graph") is not None], 100000)
            if r:
                add(r, f"{b}: KNNN.fit / graph floor", r["fit_over_graph"], "<= 1.3",
                    r["fit_over_graph"] <= 1.3, 100000)
            r = pick([x for x in rows if x.get("score_over_query") is not None], 100000)
            if r:
                add(r, f"{b}: KNNN.anomaly_score / query floor", r["score_over_query"],
                    "<= 1.2", r["score_over_query"] <= 1.2, 100000)
            r = pick([x for x in rows if x.get("peak_over_data_model") is not None], 10**6)
            if r:
                add(r, f"{b}: fit peak / (data + model)", r["peak_over_data_model"], "<= 1.3",
                    r["peak_over_data_model"] <= 1.3, 10**6)
            if rows and not rows[0].get("exact"):
                r = pick([x for x in rows if x.get("fit")], 10**6)
                if r:
                    add(r, f"{b}: KNNN.fit seconds", r["fit"]["seconds"], "< 1800",
                        r["fit"]["seconds"] < 1800, 10**6)
                r = pick([x for x in rows if x.get("recall_graph_knnn", x.get(
                    "recall_graph_floor")) is not None], 10**6)
                if r:
                    v = r.get("recall_graph_knnn", r.get("recall_graph_floor"))
                    add(r, f"{b}: recall@K' of the graph", v, ">= 0.9", v >= 0.9, 10**6)
                r = pick([x for x in rows if x.get("auroc_delta") is not None], 10**6)
                if r:
                    add(r, f"{b}: AUROC - AUROC of {r['auroc_exact_backend']}",
                        r["auroc_delta"], "|.| <= 0.005", abs(r["auroc_delta"]) <= 0.005, 10**6)
        cands = []
        for p in self.peers:
            if p["peer"] != "knnn" or not p.get("fit"):
                continue
            fits = [r["fit"]["seconds"] for r in self.rows if r["N"] == p["N"] and r.get("fit")]
            if fits:
                cands.append(dict(p, speedup=p["fit"]["seconds"] / min(fits)))
        r = pick(cands, 20000)
        if r:
            add(r, "knnn 0.1.0 fit / fastest KNNN.fit", r["speedup"], ">= 10",
                r["speedup"] >= 10, 20000)
        return out

    def markdown(self, result):
        a, env = self.a, self.env
        L = []
        L.append(f"# nonn scale benchmark: D={a.dim}, {a.queries:,} queries, "
                 f"K'={a.kprime}, k={a.k}, L={a.set_size}")
        L.append("")
        L.append(f"- machine: {env.get('cpu_count')} CPUs, {env.get('mem_total_gib', 0) or 0:.0f} "
                 f"GiB, {env.get('platform')}; python {env.get('python')}, numpy "
                 f"{env.get('numpy')}, nonn {env.get('nonn')}, faiss {env.get('faiss')}, torch "
                 f"{env.get('torch')}, pyod {env.get('pyod')}, knnn {env.get('knnn')}")
        L.append(f"- started {env.get('started')}; elapsed {result['elapsed_s']:,.0f} s; "
                 f"--max-seconds {a.max_seconds:,.0f}; repeats {a.repeats}; KNNN extra "
                 f"params {a.knnn_params or '{}'}")
        L.append("- data: `bench_core.embedding_like` (float32, relu of a 32-d latent mixed "
                 "to D dims); queries ~90% held-out normals, ~10% anomalies from unseen "
                 "centres; " + ", ".join(f"N={n:,}: generated in {d['generate_s']:.1f} s"
                                         for n, d in self.data_info.items()))
        L.append("")
        L.append("## nonn against the bare search of its backend")
        L.append("")
        hdr = ["N", "backend", "graph floor s", "KNNN.fit s", "fit / graph", "query floor s",
               "score s", "score / query", "data + model MiB", "fit peak in use MiB",
               "peak / (data+model)", "recall@K' graph (floor / KNNN)", "recall@k query",
               "AUROC", "ΔAUROC vs exact", "score Spearman vs exact", "others' CPU"]
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "|".join("---" for _ in hdr) + "|")

        def s(rec):
            return f"{rec['seconds']:.3f}" if rec else "—"

        def f(x, fmt):
            return "—" if x is None or x != x else format(x, fmt)

        for r in self.rows:
            if "error" in r:
                L.append(f"| {r['N']:,} | {r['backend']} | ERROR: {r['error']} |"
                         + " |" * (len(hdr) - 3))
                continue
            g, ft, q, sc = (r.get(k) for k in ("graph", "fit", "query", "score"))
            dm = (r["data_mib"] + r["model_mib"]) if "model_mib" in r else None
            rg = (f"{f(r.get('recall_graph_floor'), '.4f')} / "
                  f"{f(r.get('recall_graph_knnn'), '.4f')}") if not r["exact"] else "exact"
            rq = f(r.get("recall_query_floor"), ".4f") if not r["exact"] else "exact"
            busy = [x["others_cpu_share"] for x in (g, ft, q, sc) if x]
            busy = [x for x in busy if x == x]
            L.append("| " + " | ".join([
                f"{r['N']:,}", r["backend"] + ("" if not r.get("skipped") else
                                               f" (skipped: {r['skipped']})"),
                s(g), s(ft), f(r.get("fit_over_graph"), ".2f"), s(q), s(sc),
                f(r.get("score_over_query"), ".2f"), f(dm, ",.0f"),
                f(r.get("fit_peak_in_use_mib"), ",.0f"), f(r.get("peak_over_data_model"), ".2f"),
                rg, rq, f(r.get("auroc"), ".4f"), f(r.get("auroc_delta"), "+.4f"),
                f((r.get("scores_vs_exact") or {}).get("spearman"), ".4f"),
                f"{max(busy):.0%}" if busy else "—"]) + " |")
        own = [r for r in self.rows if r.get("own_query_s")]
        if own:
            L.append("")
            L.append("- score against the same query on KNNN's own index (grid conversion + "
                     "`kneighbors(Q, k)`, untimed by the monitor): " + "; ".join(
                         f"N={r['N']:,} {r['backend']}: {r['own_query_s']:.3f} s, score / "
                         f"own query {r['score_over_own_query']:.2f}" for r in own))
        L.append("")
        L.append("- graph floor: `make_backend(...).fit(X).kneighbors(None, K'-1)` (the index "
                 "build is included); query floor: `kneighbors(Q, k)` on that fitted backend; "
                 + ("both with distances (--floor-with-distances); " if a.floor_with_distances
                    else "both with `return_distance=False` where the backend takes it, as "
                    "KNNN calls them (KNNN needs ids only); ") +
                 "KNNN.fit includes its own index build and graph.")
        L.append("- data + model: X's bytes plus the host bytes of every array KNNN holds "
                 "(grid copy of X, eigenvectors, eigenvalues, neighbourhoods, the backend's "
                 "index); fit peak in use: X's bytes plus the RSS increase during fit "
                 "(kernel high-water mark).")
        L.append("- recall against exact search (FAISS flat) of "
                 f"{a.exact_sample} sampled training rows / queries; ΔAUROC and the Spearman "
                 "correlation of the KNNN scores against the first exact backend at the same "
                 "N (the AUROC saturates near 1 on easy data; the scores' agreement does not).")
        L.append("- others' CPU: the largest share of the machine's CPUs other processes used "
                 "during this row's timed calls; above ~10% the times are inflated.")
        L.append("")
        if self.peers:
            L.append("## Peers")
            L.append("")
            hdr = ["N", "peer", "fit s", "score s", "data + model MiB", "fit peak in use MiB",
                   "AUROC", "note"]
            L.append("| " + " | ".join(hdr) + " |")
            L.append("|" + "|".join("---" for _ in hdr) + "|")
            for p in self.peers:
                dm = p["data_mib"] + p["model_mib"] if "model_mib" in p else None
                L.append("| " + " | ".join([
                    f"{p['N']:,}", p.get("label", p["peer"]), s(p.get("fit")), s(p.get("score")),
                    f(dm, ",.0f"), f(p.get("fit_peak_in_use_mib"), ",.0f"),
                    f(p.get("auroc"), ".4f"),
                    p.get("error") or (f"skipped: {p['skipped']}" if p.get("skipped") else "")])
                    + " |")
            L.append("")
        if self.skips:
            L.append("## Skipped")
            L.append("")
            L.append("| N | what | estimate s | why |")
            L.append("|---|---|---|---|")
            for sk in self.skips:
                L.append(f"| {sk['N']:,} | {sk['what']} | {f(sk['estimate_s'], ',.0f')} | "
                         f"{sk['reason']} |")
            L.append("")
        tg = result["targets"]
        if tg:
            L.append("## Targets of issue 4 (each at the N it names, else the nearest N run)")
            L.append("")
            L.append("| N | what | value | goal | verdict |")
            L.append("|---|---|---|---|---|")
            for t in tg:
                L.append(f"| {t['N']:,} | {t['what']} | {t['value']:.4g} | {t['goal']} | "
                         f"{'PASS' if t['pass'] else 'MISS'} |")
            L.append("")
        return "\n".join(L) + "\n"

    def plot(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(14, 8.5), sharex=True)
        cmap = plt.get_cmap("tab10")
        for i, spec in enumerate(self.a.specs):
            rows = [r for r in self.rows if r["backend"] == spec["label"]]
            for ax, (stage, floor) in zip(axes, (("fit", "graph"), ("score", "query"))):
                for key, style, lab in ((stage, "-o", f"KNNN.{stage}"),
                                        (floor, "--x", f"{floor} floor")):
                    pts = [(r["N"], r[key]["seconds"]) for r in rows if r.get(key)]
                    if pts:
                        ax.plot(*zip(*pts), style, color=cmap(i % 10),
                                label=f"{spec['label']}: {lab}")
        for p, marker in (("pyod", "s"), ("knnn", "^")):
            rows = [r for r in self.peers if r["peer"] == p]
            for ax, key in zip(axes, ("fit", "score")):
                pts = [(r["N"], r[key]["seconds"]) for r in rows if r.get(key)]
                if pts:
                    ax.plot(*zip(*pts), marker, color="k", markerfacecolor="none",
                            markersize=9, linestyle="none",
                            label=f"{rows[0].get('label', p)}: {key}")
        for ax, title in zip(axes, ("fit (training set)", f"score ({self.a.queries:,} queries)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("training points N")
            ax.set_ylabel("wall time, s")
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
        fig.suptitle(f"nonn KNNN vs bare k-NN search, D={self.a.dim}, "
                     f"{os.cpu_count()} CPUs")
        fig.tight_layout()
        fig.savefig(self.out / f"{self.stem}.png", dpi=120)
        plt.close(fig)


def _short(n):
    for unit, div in (("M", 10**6), ("k", 10**3)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__[__doc__.find("Backend specs"):],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000",
                   help="training sizes N, comma separated (10000,100000,1000000)")
    p.add_argument("--dim", type=int, default=512, help="dimension D (512)")
    p.add_argument("--queries", type=int, default=10000, help="queries (10000)")
    p.add_argument("--backends", default="brute,faiss,faiss:HNSW32,faiss:IVF4096,Flat,torch",
                   help="backend specs, see below (brute,faiss,faiss:HNSW32,"
                        "faiss:IVF4096,Flat,torch)")
    p.add_argument("--peers", default="pyod,knnn",
                   help="peers: pyod, knnn, or '' for none (pyod,knnn)")
    p.add_argument("--max-seconds", type=float, default=1800.0,
                   help="skip a measurement whose estimated time exceeds this (1800)")
    p.add_argument("--no-skip", default="",
                   help="comma-separated substrings: measurements whose name contains one "
                        "(e.g. 'faiss:HNSW32', 'knnn') are never skipped by the time estimate "
                        "(the memory estimate still applies); ';' separates when a pattern "
                        "holds a comma")
    p.add_argument("--exponent-slack", type=float, default=0.5,
                   help="the time estimate uses the observed exponent of N, clipped to "
                        "[asymptotic, asymptotic + this] (0.5)")
    p.add_argument("--max-memory-fraction", type=float, default=0.9,
                   help="skip a measurement whose estimated extra memory exceeds this share "
                        "of the available memory (0.9)")
    p.add_argument("--repeats", type=int, default=1, help="best-of repeats per timing (1)")
    from nonn import KNNN

    dflt = KNNN().get_params()
    p.add_argument("--kprime", type=int, default=dflt["n_neighbors_of_neighbors"],
                   help="K', neighbourhood size (KNNN's default: %(default)s)")
    p.add_argument("-k", "--k", type=int, default=dflt["n_neighbors"],
                   help="k, neighbours of a query (KNNN's default: %(default)s)")
    p.add_argument("--set-size", type=int, default=dflt["set_size"],
                   help="L (KNNN's default: %(default)s)")
    p.add_argument("--knnn-params", default="{}",
                   help='extra KNNN keyword arguments as JSON, e.g. \'{"n_jobs": 2}\'')
    p.add_argument("--exact-sample", type=int, default=1000,
                   help="rows / queries checked against exact search for recall (1000)")
    p.add_argument("--floor-with-distances", action="store_true",
                   help="time the floors with distances (kneighbors' default) instead of "
                        "ids only (return_distance=False, what KNNN calls)")
    p.add_argument("--peer-metric", choices=["euclidean", "cosine"], default="euclidean",
                   help="knnn's distance_function (euclidean, like nonn's search)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default="benchmarks/results/scale", help="output folder")
    a = p.parse_args(argv)
    a.sizes = sorted(int(float(s)) for s in a.sizes.split(",") if s.strip())
    a.specs = split_specs(a.backends)
    a.peers = [s.strip() for s in a.peers.split(",") if s.strip()]
    bad = set(a.peers) - {"pyod", "knnn"}
    if bad:
        p.error(f"unknown peers {sorted(bad)}; expected pyod, knnn")
    a.knnn_params = json.loads(a.knnn_params)
    sep = ";" if ";" in a.no_skip else ","
    a.no_skip = [x.strip() for x in a.no_skip.split(sep) if x.strip()]
    return a


def main(argv=None):
    Bench(parse_args(argv)).main()


if __name__ == "__main__":
    main()
