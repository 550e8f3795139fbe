#!/usr/bin/env python
"""GPU check of nonn's torch backend on CUDA (issue 4, item 5). Run it through
``benchmarks/gpu_check.sh``, which sets up the environment and enforces the
time limit; this script alone is fine where nonn and a CUDA torch are importable.

1. Environment: torch, CUDA, the device, the matmul precision settings.
2. Correctness on a small set (N=5,000, D=128, float32, embedding-like):
   ``KNNN(backend="torch", backend_params={"device": "cuda"})`` scores equal
   ``KNNN(backend="brute")`` scores to rtol 1e-4 (queries and leave-one-out
   training scores), and the torch-CUDA k-NN graph (K'=25) holds the same ids
   as the brute (and, if installed, FAISS flat) graph on >= 99.9 % of entries.
3. Timing at N=1,000,000, D=512, float32 (generated on the GPU with the
   recipe of ``bench_core.embedding_like``: relu(Z A + b + 0.1 noise), Z around
   8 centres in 32-d; queries 90 % normal, 10 % from unseen centres), in this
   order so the target comes first: ``KNNN.fit`` on the torch CUDA backend
   (split into its GPU search and the CPU rest), ``KNNN.anomaly_score`` of
   10,000 queries, recall of the fitted graph against float64 exact search on
   1,000 sampled rows, AUROC; then the floors: the bare torch-CUDA k-NN graph
   (K'=25) and the bare k-NN query (k=3), and the ratios. A stage whose
   estimate does not fit before ``--deadline`` is skipped (said in the output).

Prints a table; writes ``gpu_check.json`` (after every stage) to ``--out``
(default: $OUT if set, else ./gpu_results). Exit status: 0 = correct (or no
CUDA device: skipped), 1 = a correctness check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
T_START = time.time()


def say(text=""):
    print(f"[{time.time() - T_START:6.1f} s] {text}", flush=True)


class Results:
    def __init__(self, out):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.data = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "checks": {}, "timings": {},
                     "notes": []}

    def save(self):
        self.data["elapsed_s"] = time.time() - T_START
        path = self.out / "gpu_check.json"
        path.write_text(json.dumps(self.data, indent=2, default=str))
        return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-small", type=int, default=5000)
    p.add_argument("--d-small", type=int, default=128)
    p.add_argument("--n", type=int, default=1_000_000, help="training points of the timing")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--kprime", type=int, default=25)
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--min-graph-agreement", type=float, default=0.999)
    p.add_argument("--deadline", type=float, default=None,
                   help="epoch seconds by which everything must be done (gpu_check.sh sets "
                        "it); heavy stages whose estimate does not fit are skipped")
    p.add_argument("--no-timing", action="store_true", help="correctness only")
    p.add_argument("--device", default="cuda",
                   help="torch device under test (cuda); 'cpu' dry-runs the script's logic "
                        "on a machine without a GPU (use small --n there)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_results")
    return p.parse_args(argv)


def remaining(args):
    return math.inf if args.deadline is None else args.deadline - time.time()


# ---------------------------------------------------------------------------
# 1. environment
# ---------------------------------------------------------------------------


def environment(torch):
    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "numpy": np.__version__, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    with contextlib.suppress(Exception):
        import nonn

        env["nonn"] = nonn.__version__
        env["nonn_file"] = nonn.__file__
    with contextlib.suppress(Exception):
        import numba

        env["numba"] = numba.__version__
        env["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    with contextlib.suppress(Exception):
        import faiss

        env["faiss"] = faiss.__version__
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update({
            "device_count": torch.cuda.device_count(), "device": p.name,
            "capability": f"{p.major}.{p.minor}", "device_memory_gib": p.total_memory / 2**30,
            "cudnn": torch.backends.cudnn.version(),
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        })
    with contextlib.suppress(Exception), open("/proc/meminfo") as f:
        env["host_memory_gib"] = int(f.readline().split()[1]) / 2**20
    return env


# ---------------------------------------------------------------------------
# 2. correctness
# ---------------------------------------------------------------------------


def row_overlap(a, b):
    """Share of graph entries (ids) of ``a`` found in the same row of ``b``."""
    a, b = np.sort(a, 1), np.sort(b, 1)
    hits = sum(np.intersect1d(x, y, assume_unique=True).size for x, y in zip(a, b))
    return hits / a.size


def correctness(args, res):
    from bench_core import embedding_like
    from nonn import KNNN
    from nonn.neighbors import make_backend

    N, D, Kp, k = args.n_small, args.d_small, args.kprime, args.k
    X, Q = embedding_like(N, 500, D, seed=0)
    say(f"correctness set: X {X.shape} {X.dtype}, Q {Q.shape}")
    ok = True
    c = res.data["checks"]

    # graphs
    t0 = time.perf_counter()
    dev = args.device
    dt, it = make_backend("torch", device=dev).fit(X).kneighbors(None, Kp - 1)
    t_gpu_graph = time.perf_counter() - t0
    t0 = time.perf_counter()
    db, ib = make_backend("brute").fit(X).kneighbors(None, Kp - 1)
    t_cpu_graph = time.perf_counter() - t0
    refs = {"brute": (db, ib)}
    with contextlib.suppress(ImportError):
        import faiss  # noqa: F401

        refs["faiss"] = make_backend("faiss").fit(X).kneighbors(None, Kp - 1)
    for name, (dr, ir) in refs.items():
        ov = row_overlap(it, ir)
        same_pos = float(np.mean(it == ir))
        drel = float(np.max(np.abs(dt - dr) / np.maximum(np.abs(dr), 1e-12)))
        passed = ov >= args.min_graph_agreement
        ok &= passed
        c[f"graph_torch_cuda_vs_{name}"] = {"id_agreement": ov, "same_position": same_pos,
                                            "max_rel_distance_diff": drel,
                                            "goal": f">= {args.min_graph_agreement}",
                                            "pass": passed}
        say(f"k-NN graph K'={Kp}: torch-{dev} vs {name}: {ov:.5%} of ids agree "
            f"({same_pos:.4%} at the same position), max rel. distance diff {drel:.1e} "
            f"-> {'PASS' if passed else 'FAIL'}")
    # query ids too
    qt = make_backend("torch", device=dev).fit(X).kneighbors(Q, k)[1]
    qb = make_backend("brute").fit(X).kneighbors(Q, k)[1]
    c["query_torch_cuda_vs_brute_id_agreement"] = row_overlap(qt, qb)

    # KNNN scores (the first fits also compile nonn's numba kernels)
    t0 = time.perf_counter()
    det_c = KNNN(backend="brute").fit(X)
    t_cpu_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    det_g = KNNN(backend="torch", backend_params={"device": dev}).fit(X)
    t_gpu_fit = time.perf_counter() - t0
    say(f"first fits (incl. numba compilation): brute {t_cpu_fit:.1f} s, torch-{dev} "
        f"{t_gpu_fit:.1f} s; backend_ = {det_g.backend_!r}, device "
        f"{getattr(det_g._search, 'device_', '?')!r}")
    # a second brute fit, warm, to measure the CPU part of fit per neighbourhood
    t0 = time.perf_counter()
    KNNN(backend="brute").fit(X)
    t_cpu_fit_warm = time.perf_counter() - t0
    n_sets = len(det_c.set_sizes_)
    cpu_per_set = max(t_cpu_fit_warm - t_cpu_graph, 0.0) / (N * n_sets)
    res.data["calibration"] = {"cpu_part_of_fit_s_per_point_and_set": cpu_per_set,
                               "gpu_graph_small_s": t_gpu_graph, "cpu_graph_small_s": t_cpu_graph}

    s_c, s_g = det_c.anomaly_score(Q), det_g.anomaly_score(Q)
    nb_agree = row_overlap(det_c.neighborhoods_, det_g.neighborhoods_)
    # training points whose neighbourhood (as a set) differs between the fits
    diff_nb = np.any(np.sort(det_c.neighborhoods_, 1) != np.sort(det_g.neighborhoods_, 1), 1)
    for what, a_, b_ in (("query scores", s_g, s_c),
                         ("leave-one-out training scores", det_g.train_scores_,
                          det_c.train_scores_)):
        a_, b_ = np.asarray(a_, np.float64), np.asarray(b_, np.float64)
        close = np.isclose(a_, b_, rtol=args.rtol, atol=0)
        rel = np.abs(a_ - b_) / np.maximum(np.abs(b_), 1e-30)
        entry = {"n": int(a_.size), "share_within_rtol": float(close.mean()),
                 "max_rel_diff": float(rel.max()), "rtol": args.rtol}
        passed = bool(close.all())
        if not passed:
            # a mismatch is explained when float32 near-ties gave a different
            # neighbour: the query's own neighbours, or the neighbourhood of
            # one of them, differ between the two fits
            if what == "query scores":
                ng = det_g._search.kneighbors(det_g._to_grid(Q), det_g.n_neighbors_)[1]
                nc = det_c._search.kneighbors(det_c._to_grid(Q), det_c.n_neighbors_)[1]
            else:
                ng = det_g.neighborhoods_[:, 1:det_g.n_neighbors_ + 1]
                nc = det_c.neighborhoods_[:, 1:det_c.n_neighbors_ + 1]
            explained = np.any(np.sort(ng, 1) != np.sort(nc, 1), axis=1) | diff_nb[nc].any(axis=1) | diff_nb[ng].any(
                axis=1)
            if what != "query scores":
                explained |= diff_nb
            unexplained = int(np.sum(~close & ~explained))
            entry["mismatches"] = int(np.sum(~close))
            entry["unexplained_by_neighbour_ties"] = unexplained
            passed = unexplained == 0 and nb_agree >= args.min_graph_agreement
            if passed:
                entry["note"] = ("every mismatch has a different neighbour (float32 near-ties), "
                                 f"graphs agree on {nb_agree:.3%}")
            elif unexplained:
                entry["note"] = (f"{unexplained} mismatches with identical neighbours: the "
                                 "scoring differs")
            else:
                entry["note"] = ("every mismatch has a different neighbour, but the graphs "
                                 f"agree on only {nb_agree:.3%}")
        entry["pass"] = passed
        ok &= passed
        c[f"knnn_{what.replace(' ', '_').replace('-', '_')}"] = entry
        say(f"KNNN {what}: torch-{dev} vs brute: {entry['share_within_rtol']:.4%} within "
            f"rtol {args.rtol:g}, max rel. diff {entry['max_rel_diff']:.1e}"
            + (f" ({entry.get('note')})" if "note" in entry else "")
            + f" -> {'PASS' if passed else 'FAIL'}")
    c["knnn_neighborhoods_equal_share"] = nb_agree
    res.data["correct"] = bool(ok)
    res.save()
    return ok


# ---------------------------------------------------------------------------
# 3. timing at 1M
# ---------------------------------------------------------------------------


def generate_on_gpu(torch, n, nq, d, seed=0, latent=32, n_clusters=8, anomaly_share=0.1,
                    dev="cuda"):
    """``bench_core.embedding_like``'s recipe, drawn with torch on the GPU
    (NumPy needs about a minute for 1M x 512; this takes well under a second)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    A = torch.randn(latent, d, generator=g, device=dev) / math.sqrt(latent)
    b = 0.2 + 0.3 * torch.randn(d, generator=g, device=dev)
    centres = 1.5 * torch.randn(n_clusters, latent, generator=g, device=dev)
    novel = 1.5 * torch.randn(max(n_clusters // 2, 1), latent, generator=g, device=dev)

    def draw(m, cents):
        out = torch.empty(m, d, device=dev)
        step = 1 << 18
        for s in range(0, m, step):
            r = min(step, m - s)
            lab = torch.randint(len(cents), (r,), generator=g, device=dev)
            Z = cents[lab] + torch.randn(r, latent, generator=g, device=dev)
            F = Z @ A + b + 0.1 * torch.randn(r, d, generator=g, device=dev)
            out[s:s + r] = torch.clamp_min_(F, 0.0)
        return out

    X = draw(n, centres)
    n_anom = int(round(anomaly_share * nq))
    Q = torch.cat([draw(nq - n_anom, centres), draw(n_anom, novel)])
    Xh, Qh = X.cpu().numpy(), Q.cpu().numpy()
    Xh, Qh = Xh.copy() if dev == "cpu" else Xh, Qh.copy() if dev == "cpu" else Qh
    del X, Q
    if dev != "cpu":
        torch.cuda.empty_cache()
    return Xh, Qh, n_anom


class Timed:
    def __init__(self, torch):
        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.gpu_peak_gib = float("nan")

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        if self.cuda:
            self.gpu_peak_gib = self.torch.cuda.max_memory_allocated() / 2**30
        return False


def exact_sample_ids(torch, X, rows, k, dev="cuda"):
    """Exact (float64, on the GPU) ids of the k nearest other training rows of
    ``X[rows]``."""
    Xt = torch.from_numpy(X).to(dev, dtype=torch.float64)
    sq = (Xt * Xt).sum(1)
    out = []
    for s in range(0, len(rows), 250):
        r = torch.from_numpy(rows[s:s + 250]).to(dev)
        q = Xt[r]
        dist = sq[None, :] - 2 * q @ Xt.T + (q * q).sum(1)[:, None]
        dist[torch.arange(len(r), device=dev), r] = math.inf
        out.append(torch.topk(dist, k, dim=1, largest=False).indices.cpu().numpy())
        del dist
    del Xt, sq
    if dev != "cpu":
        torch.cuda.empty_cache()
    return np.concatenate(out)


def timing(args, res, torch):
    from sklearn.metrics import roc_auc_score

    from nonn import KNNN
    from nonn.neighbors import make_backend
    from nonn.neighbors.torch import TorchBackend

    N, D, NQ, Kp, k = args.n, args.d, args.queries, args.kprime, args.k
    T = res.data["timings"]
    with Timed(torch) as t:
        X, Q, n_anom = generate_on_gpu(torch, N, NQ, D, dev=args.device)
    T["generate_data_s"] = t.seconds
    say(f"data: X {X.shape} {X.dtype} ({X.nbytes / 2**30:.2f} GiB), Q {Q.shape}, generated on "
        f"the GPU in {t.seconds:.1f} s; {np.mean(X == 0):.0%} zeros")
    labels = np.r_[np.zeros(NQ - n_anom), np.ones(n_anom)]

    # estimate the graph from a probe (queries through the same GEMM + topk path)
    dev = args.device
    b = make_backend("torch", device=dev).fit(X)
    # the floors are called the way KNNN calls the search: ids only where the
    # backend takes return_distance (KNNN needs no distances)
    import inspect

    kw = ({"return_distance": False}
          if "return_distance" in inspect.signature(b.kneighbors).parameters else {})
    T["floor_call"] = "return_distance=False" if kw else "with distances"
    probe = min(N, 16384)
    b.kneighbors(X[:1024], Kp, **kw)  # warm this shape's kernels
    with Timed(torch) as t:
        b.kneighbors(X[:probe], Kp, **kw)
    graph_est = t.seconds * N / probe
    n_sets = math.ceil(D / 5)
    # CPU part of fit: ~0.45 us per 5x5 covariance + eigh on one core, x3 for
    # the gathers and the leave-one-out scores (the small-set figure is
    # reported too; it also carries fixed per-call costs, so it overestimates)
    cpu_est = 3 * 0.45e-6 * N * n_sets / (os.cpu_count() or 1)
    cal = res.data.get("calibration", {}).get("cpu_part_of_fit_s_per_point_and_set")
    fit_est = graph_est + cpu_est
    T["estimates_s"] = {"graph": graph_est, "fit": fit_est, "fit_cpu_part": cpu_est,
                        "fit_cpu_part_from_small_set": None if cal is None else cal * N * n_sets}
    say(f"estimates: bare graph {graph_est:.0f} s (probe of {probe:,} rows: {t.seconds:.2f} s), "
        f"KNNN.fit {fit_est:.0f} s (CPU part {cpu_est:.0f} s"
        + ("" if cal is None else f"; {cal * N * n_sets:.0f} s by the small set's fit") + "); "
        f"time left {remaining(args):.0f} s")
    del b
    res.save()

    # ---- KNNN.fit first (the target), its GPU search timed apart -------------
    det = None
    if fit_est + 10 > remaining(args):
        res.data["notes"].append("KNNN.fit skipped: its estimate does not fit the deadline")
        say(f"SKIP KNNN.fit: estimated {fit_est:.0f} s, {remaining(args):.0f} s left")
    else:
        acc = {"fit": 0.0, "kneighbors": 0.0, "calls": 0}
        orig_fit, orig_kn = TorchBackend.fit, TorchBackend.kneighbors

        def w_fit(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return orig_fit(self, *a, **kw)
            finally:
                acc["fit"] += time.perf_counter() - t0

        def w_kn(self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return orig_kn(self, *a, **kw)
            finally:
                acc["kneighbors"] += time.perf_counter() - t0
                acc["calls"] += 1

        say(f"KNNN(backend='torch', backend_params={{'device': {dev!r}}}).fit ...")
        TorchBackend.fit, TorchBackend.kneighbors = w_fit, w_kn
        try:
            with Timed(torch) as t:
                det = KNNN(n_neighbors=k, n_neighbors_of_neighbors=Kp,
                           backend="torch", backend_params={"device": dev}).fit(X)
        finally:
            TorchBackend.fit, TorchBackend.kneighbors = orig_fit, orig_kn
        gpu_part = acc["fit"] + acc["kneighbors"]
        T["knnn_fit"] = {"seconds": t.seconds, "gpu_peak_gib": t.gpu_peak_gib,
                         "backend_fit_and_search_s": gpu_part, "rest_s": t.seconds - gpu_part,
                         "goal_s": 60, "pass": t.seconds < 60}
        say(f"  {t.seconds:.2f} s: backend upload + search {gpu_part:.2f} s, CPU rest "
            f"(reorder, covariances, eigh, leave-one-out scores) {t.seconds - gpu_part:.2f} s")
        state = sum(getattr(det, a).nbytes for a in ("_fit_X", "eigenvalues_", "eigenvectors_",
                                                     "neighborhoods_") if hasattr(det, a))
        T["knnn_state_gib"] = state / 2**30
        graph_est = gpu_part  # the same search, measured
        res.save()

        with Timed(torch) as t:
            scores = det.anomaly_score(Q)
        T["knnn_score"] = {"seconds": t.seconds, "queries": NQ}
        T["auroc"] = float(roc_auc_score(labels, np.asarray(scores, np.float64)))
        say(f"KNNN.anomaly_score, {NQ:,} queries: {t.seconds:.3f} s; AUROC {T['auroc']:.4f}")
        res.save()

        if remaining(args) > 20:
            rng = np.random.default_rng(0)
            rows = np.sort(rng.choice(N, min(N, 1000), replace=False))
            truth = exact_sample_ids(torch, X, rows, Kp - 1, dev=dev)
            # the grid permutes columns only: distances, hence ids, are unchanged
            T["graph_recall_vs_float64_exact_1000_rows"] = row_overlap(
                det.neighborhoods_[rows, 1:], truth)
            say(f"fitted graph vs float64 exact search on 1,000 rows: "
                f"{T['graph_recall_vs_float64_exact_1000_rows']:.4%} of ids agree")
            res.save()
        del det

    # ---- the floors: bare graph and bare query --------------------------------
    if graph_est + 15 > remaining(args):
        res.data["notes"].append("bare graph skipped: its estimate does not fit the deadline")
        say(f"SKIP bare graph floor: estimated {graph_est:.0f} s, {remaining(args):.0f} s left")
        return
    say(f"bare torch-{dev} k-NN graph, K'={Kp} (fit + kneighbors(None, {Kp - 1}"
        f"{', return_distance=False' if kw else ''})) ...")
    holder = {}
    with Timed(torch) as t:
        holder["b"] = make_backend("torch", device=dev).fit(X)
        holder["b"].kneighbors(None, Kp - 1, **kw)
    T["graph_floor"] = {"seconds": t.seconds, "gpu_peak_gib": t.gpu_peak_gib}
    say(f"  {t.seconds:.2f} s (GPU peak {t.gpu_peak_gib:.1f} GiB)")
    with Timed(torch) as t:
        holder["b"].kneighbors(Q, k, **kw)
    T["query_floor"] = {"seconds": t.seconds}
    say(f"bare k-NN query, k={k}, {NQ:,} queries: {t.seconds:.3f} s")
    del holder
    if "knnn_fit" in T:
        T["fit_over_graph"] = T["knnn_fit"]["seconds"] / T["graph_floor"]["seconds"]
    if "knnn_score" in T:
        T["score_over_query"] = T["knnn_score"]["seconds"] / T["query_floor"]["seconds"]
    res.save()


def table(res):
    T, c = res.data["timings"], res.data["checks"]
    nq = res.data["config"]["queries"]
    lines = ["", "| check / timing | value |", "|---|---|"]
    for name, v in c.items():
        if isinstance(v, dict):
            val = v.get("id_agreement", v.get("share_within_rtol"))
            lines.append(f"| {name} | {val:.5f} ({'PASS' if v.get('pass') else 'FAIL'}) |")
        else:
            lines.append(f"| {name} | {v:.5f} |")
    fmt = {"generate_data_s": "data generation (GPU) s"}
    for key in ("generate_data_s",):
        if key in T:
            lines.append(f"| {fmt[key]} | {T[key]:.2f} |")
    if "graph_floor" in T:
        lines.append(f"| bare k-NN graph K'={res.data['config']['kprime']}, "
                     f"N={res.data['config']['n']:,} s | "
                     f"{T['graph_floor']['seconds']:.2f} |")
    if "knnn_fit" in T:
        f = T["knnn_fit"]
        lines.append(f"| KNNN.fit s (goal < 60) | {f['seconds']:.2f} "
                     f"({'PASS' if f['pass'] else 'MISS'}; search {f['backend_fit_and_search_s']:.1f}, "
                     f"CPU rest {f['rest_s']:.1f}) |")
    if "fit_over_graph" in T:
        lines.append(f"| KNNN.fit / bare graph | {T['fit_over_graph']:.2f} |")
    if "query_floor" in T:
        lines.append(f"| bare k-NN query, k=3, {nq:,} queries s | "
                     f"{T['query_floor']['seconds']:.3f} |")
    if "knnn_score" in T:
        lines.append(f"| KNNN.anomaly_score, {nq:,} queries s | "
                     f"{T['knnn_score']['seconds']:.3f} |")
    if "score_over_query" in T:
        lines.append(f"| score / query | {T['score_over_query']:.2f} |")
    for key in ("auroc", "graph_recall_vs_float64_exact_1000_rows", "knnn_state_gib"):
        if key in T:
            lines.append(f"| {key} | {T[key]:.4f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    res = Results(args.out)
    res.data["config"] = vars(args)
    try:
        import torch
    except ImportError:
        say("SKIPPED: torch is not installed (no CUDA check possible)")
        res.data["skipped"] = "torch not installed"
        res.save()
        return 0
    env = environment(torch)
    res.data["environment"] = env
    for key, v in env.items():
        say(f"{key}: {v}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        say("SKIPPED: no CUDA device (torch.cuda.is_available() is False); nothing to check")
        res.data["skipped"] = "no CUDA device"
        res.save()
        return 0
    torch.zeros(1, device=args.device)  # CUDA context start-up outside the timings
    if not args.device.startswith("cuda"):
        say(f"DRY RUN on device {args.device!r}: checks the script, says nothing about CUDA")
    try:
        ok = correctness(args, res)
        if not args.no_timing:
            try:
                timing(args, res, torch)
            except Exception as exc:  # noqa: BLE001 - the correctness verdict still counts
                traceback.print_exc()
                res.data["timing_error"] = repr(exc)
    except KeyboardInterrupt:  # gpu_check.sh's time limit
        res.data["interrupted"] = "time limit"
        print(table(res), flush=True)
        say(f"INTERRUPTED by the time limit; partial results in {res.save()}")
        return 124
    print(table(res), flush=True)
    path = res.save()
    say(f"correctness: {'PASS' if ok else 'FAIL'}; results in {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
