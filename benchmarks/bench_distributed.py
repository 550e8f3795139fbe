#!/usr/bin/env python
"""nonn.distributed on this machine: 1 vs 2 Dask workers against KNNN
(protocol: benchmarks/README.md).

Usage::

    nice -n 19 python benchmarks/bench_distributed.py --sizes 20000,50000,100000 \
        --single 1 --time-budget 1200
    nice -n 19 python benchmarks/bench_distributed.py --sizes 10000,20000 --approx
    nice -n 19 python benchmarks/bench_distributed.py --sizes 20000 --single 1 \
        --params '{"set_size": "all"}'
    nice -n 19 python benchmarks/bench_distributed.py --stages 20000
    python benchmarks/bench_distributed.py --quick --single 1 --out /tmp/dist   # smoke
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import best_of, embedding_like, environment, load_average, machine_busy_seconds, \
    markdown_table, peak_rss_mib, recall, reset_peak_rss, write_results  # noqa: E402


def own_cpu():
    return sum(os.times()[:2])


class Contention:
    """Other processes' CPU share from creation to ``stop(own CPU s)``."""

    def __init__(self):
        self.busy0, self.t0, self.load0 = machine_busy_seconds(), time.perf_counter(), \
            load_average()

    def stop(self, own):
        wall, busy = time.perf_counter() - self.t0, machine_busy_seconds()
        others = None if busy is None else max(busy - self.busy0 - own, 0.0)
        return {"wall_s": wall, "own_cpu_s": own, "others_cpu_s": others,
                "others_share": None if others is None else others / (wall * os.cpu_count()),
                "load_before": self.load0[0], "load_after": load_average()[0]}


def _worker_state(dask_worker=None):
    """(pid, CPU s, peak RSS bytes, bytes sent) of a worker or nanny process."""
    return (os.getpid(), time.process_time(), peak_rss_mib() * 2**20,
            int(getattr(dask_worker, "transfer_outgoing_bytes_total", 0)))


def probe(client):
    """{worker: (pid, CPU s, peak RSS, sent)} and the CPU s of the nannies but this process."""
    nannies = {p: c for p, c, *_ in client.run(_worker_state, nanny=True).values()
               if p != os.getpid()}
    return client.run(_worker_state), sum(nannies.values())


def run_distributed(X, Q, folder, workers, params):
    import dask
    import distributed

    from nonn.distributed import DistributedKNNN, read_shards

    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for i, block in enumerate(np.array_split(X, workers)):
        np.save(os.path.join(folder, f"shard-{i:03d}.npy"), block)
    with warnings.catch_warnings(), \
            dask.config.set({"distributed.scheduler.work-stealing": False}):
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                           processes=True, dashboard_address=None,
                                           silence_logs=50, memory_limit=0)
        client = distributed.Client(cluster)
    try:
        DistributedKNNN(client=client, **params).fit(X[: max(2000, 40 * workers)])  # compile
        client.run(reset_peak_rss)
        (w0, n0), mine0, busy = probe(client), own_cpu(), Contention()
        fit_s, det = best_of(lambda: DistributedKNNN(client=client, **params).fit(
            read_shards(folder)))
        w1, _ = probe(client)
        client.run(reset_peak_rss)
        score_s, scores = best_of(lambda: det.anomaly_score(Q))
        w2, n2 = probe(client)
        contention = busy.stop(own_cpu() - mine0 + n2 - n0 + sum(
            w2[w][1] - w0[w][1] for w in w0))
        groups = client.compute(det.neighborhoods_, sync=True)
        halos = [None if h is None else client.compute(dask.delayed(
            lambda h: (int(h.rows.shape[0]), int(h.__sizeof__())))(h), sync=True)
            for h in det._shards["halos"]]
        per_worker = [{"fit_cpu_s": w1[w][1] - w0[w][1], "score_cpu_s": w2[w][1] - w1[w][1],
                       "fit_peak_rss_mib": w1[w][2] / 2**20,
                       "score_peak_rss_mib": w2[w][2] / 2**20,
                       "fit_sent_mib": (w1[w][3] - w0[w][3]) / 2**20,
                       "score_sent_mib": (w2[w][3] - w1[w][3]) / 2**20} for w in sorted(w0)]
        n, d = X.shape
        state = (n * d + det.eigenvalues_.size + det.eigenvectors_.size) * X.dtype.itemsize \
            + groups.size * 8
        label = f"DistributedKNNN {workers} worker(s)" + (
            f" faiss {params['backend_params']}" if "backend_params" in params else "")
        return {"label": label, "workers": workers, "partitions": det.n_partitions_,
                "fit_s": fit_s, "score_s": score_s, "contention": contention,
                "state_mib_total": state / 2**20, "per_worker": per_worker,
                "halo_rows_per_partition": [h and h[0] for h in halos],
                "halo_mib_per_partition": [h and h[1] / 2**20 for h in halos],
                "backend_params": params.get("backend_params"), "groups": groups}, scores
    finally:
        client.close()
        cluster.close()


def timed(fn, *a):
    """``(result, wall s, CPU s of this process)`` of ``fn(*a)``."""
    c0, t0 = time.process_time(), time.perf_counter()
    r = fn(*a)
    return r, time.perf_counter() - t0, time.process_time() - c0


def run_single(X, Q, params, threads):
    from nonn import KNNN

    p = dict(params, n_jobs=threads)
    KNNN(**p).fit(X[:2000])  # compile
    mine0, busy = own_cpu(), Contention()
    det, fit_s, fit_cpu = timed(KNNN(**p).fit, X)
    s, score_s, score_cpu = timed(det.anomaly_score, Q)
    return {"label": f"KNNN n_jobs={threads}", "threads": threads, "fit_s": fit_s,
            "score_s": score_s, "fit_cpu_s": fit_cpu, "score_cpu_s": score_cpu,
            "contention": busy.stop(own_cpu() - mine0)}, s, det.neighborhoods_


def subtle_anomalies(Q, share, rho, seed):
    """The last ``share`` of ``Q``: normal rows with ``rho`` of their features swapped."""
    rng = np.random.default_rng(seed)
    n_anom = int(round(share * len(Q)))
    normal = Q[: len(Q) - n_anom]
    A = normal[rng.integers(len(normal), size=n_anom)].copy()
    donors = normal[rng.integers(len(normal), size=n_anom)]
    mask = rng.random(A.shape) < rho
    A[mask] = donors[mask]
    return np.vstack([normal, A]), np.r_[np.zeros(len(normal)), np.ones(n_anom)]


def stages(n_shard, d, kp, k, L=5):
    """CPU and wall seconds of each worker task on one core and one shard."""
    import numba
    from threadpoolctl import threadpool_limits

    from nonn.distributed import _tasks

    numba.set_num_threads(1)
    X, Q, _ = embedding_like(2 * n_shard, 2000, d, seed=1)
    A, B = np.ascontiguousarray(X[:n_shard]), np.ascontiguousarray(X[n_shard:])
    sizes = np.array([L] * (d // L) + ([d % L] if d % L else []), dtype=np.int64)
    out = {"n_shard": n_shard, "d": d, "K'": kp, "k": k, "threads": 1}

    def step(name, fn, *a):
        r, wall, cpu = timed(fn, *a)
        out[name] = {"cpu_s": cpu, "wall_s": wall}
        return r

    with threadpool_limits(1):
        idx = step("brute_build", _tasks.ShardIndex, A, 0, "brute", "euclidean", {}, 1)
        step("brute_search_other_shard", idx.kneighbors, B, kp - 1)
        _, others = step("brute_search_own_shard", idx.kneighbors, None, kp - 1)
        nlist = int(np.sqrt(n_shard))
        for name, bp in (("hnsw32", {"index": "HNSW32"}),
                         ("ivf", {"index": f"IVF{nlist},Flat", "nprobe": max(nlist // 8, 1)})):
            h = step(f"{name}_build", _tasks.ShardIndex, A, 0, "faiss", "euclidean", bp, 1)
            step(f"{name}_search_other_shard", h.kneighbors, B, kp - 1)
        halo = _tasks.gather_halo(_tasks.partition_neighborhoods(others, 0, kp),
                                  (0, np.arange(n_shard), A))
        w, v = step("eigen", _tasks.block_eigen, halo, kp, sizes, L, 1, None)
        qidx = idx.kneighbors(np.ascontiguousarray(Q), k)[1]
        req = _tasks.pair_requests(np.ascontiguousarray(Q), qidx, 0, n_shard)
        floor = 1e-3 * A.var(axis=0).mean() * np.ones(len(sizes))
        step("pair_scores", _tasks.pair_scores, A, w, v, None, req, sizes, L, floor, 1, None)
    out.update(pairs=int(qidx.size), queries=len(Q))
    return out


def cpu_cells(x):
    pw = x.get("per_worker")
    if not pw:
        return [f"{x['fit_cpu_s']:.1f}", f"{x['score_cpu_s']:.2f}", "—"]
    return [" / ".join(f"{w[key]:{fmt}}" for w in pw) for key, fmt in (
        ("fit_cpu_s", ".1f"), ("score_cpu_s", ".2f"), ("fit_peak_rss_mib", ".0f"))]


def markdown(r):
    share = lambda x: "—" if x["contention"]["others_share"] is None else \
        f"{x['contention']['others_share']:.0%}"  # noqa: E731
    head = [f"# nonn.distributed: D={r['d']}, {r['queries']} queries", "",
            f"- command: `{r['environment']['command']}`; {r['environment']['cpus']} CPUs, "
            f"started {r['environment']['time']}"
            + (f", {r['total_s'] / 60:.1f} min" if "total_s" in r else ""),
            f"- KNNN parameters: {r['knnn_params']}",
            "- LocalCluster of worker processes, 1 thread each, one partition per worker, "
            "work stealing off; one untimed warm-up fit per cluster (kernel compilation)",
            "- queries: 90 % held-out normal rows, 10 % normal rows with 5 % of their features "
            "taken from other rows"]
    head += [f"- **skipped N = {s['n']}**: {s['reason']}" for s in r["skipped"]]
    summary = []
    for x in r["runs"]:
        one = next((o for o in r["runs"] if o["n"] == x["n"] and o.get("workers") == 1
                    and o.get("backend_params") is None), None)
        up = ["—", "—"]
        if x.get("workers") == 2 and one is not None and not x.get("backend_params"):
            up = [f"{one[f'{ph}_s'] / x[f'{ph}_s']:.2f}× / "
                  f"{one['per_worker'][0][f'{ph}_cpu_s'] / worst:.2f}×"
                  for ph in ("fit", "score")
                  for worst in [max(w[f"{ph}_cpu_s"] for w in x["per_worker"])]]
        rec, diff = x.get("graph_recall_vs_exact"), x.get("max_rel_diff_vs_knnn")
        sent = " / ".join(f"{w['fit_sent_mib']:.1f}+{w['score_sent_mib']:.1f}"
                          for w in x.get("per_worker", [])) or "—"
        summary.append([x["n"], x["label"], f"{x['fit_s']:.2f}", f"{x['score_s']:.2f}",
                        *cpu_cells(x), f"{x['auroc']:.4f}",
                        "—" if diff is None else f"{diff:.1e}",
                        "—" if rec is None else f"{rec:.4f}", sent, share(x), *up])
    table = markdown_table(
        ["N", "run", "fit wall s", "score wall s", "fit CPU s per worker",
         "score CPU s per worker", "fit peak RSS MiB per worker", "AUROC",
         "max rel diff vs KNNN", "graph recall", "sent MiB per worker (fit + score)",
         "other processes' CPU share", "speed-up 2 vs 1, fit: wall / CPU",
         "speed-up 2 vs 1, score: wall / CPU"], summary)
    notes = ["- speed-up CPU: the 1-worker CPU s over the busier worker's (the wall-time "
             "speed-up on an otherwise idle machine); KNNN rows: the whole process.",
             "- peak RSS: the worker's VmHWM, reset before the phase (Python, numpy, numba "
             "and Dask included); sent: worker-to-worker bytes only."]
    return "\n".join(head + ["", table, ""] + notes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,20000,40000")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--single", default="1,2", help="thread counts of the KNNN reference runs "
                    "(the first one's scores are the reference)")
    ap.add_argument("--time-budget", type=float, metavar="SECONDS")
    ap.add_argument("--approx", action="store_true", help="also FAISS HNSW/IVF per partition")
    ap.add_argument("--quick", action="store_true", help="smoke size (N=3000, D=64)")
    ap.add_argument("--stages", type=int, metavar="N_SHARD")
    ap.add_argument("--params", default="{}", metavar="JSON",
                    help="KNNN parameters besides backend='brute'")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed"))
    args = ap.parse_args(argv)
    sizes = [3000] if args.quick else [int(s) for s in args.sizes.split(",")]
    d = 64 if args.quick else args.d
    single = [int(t) for t in args.single.split(",") if t]
    from nonn import KNNN

    extra = json.loads(args.params)
    params = {"backend": "brute", **extra}
    if args.stages:
        kp, k = KNNN().n_neighbors_of_neighbors, KNNN().n_neighbors
        stages(2000, d, kp, k)  # compile
        res = json.dumps(dict(stages(args.stages, d, kp, k), load=load_average()), indent=1)
        os.makedirs(args.out, exist_ok=True)
        Path(args.out, f"stages_N{args.stages}_D{d}.json").write_text(res)
        print(res)
        return 0
    report = {"environment": environment(), "knnn_params": KNNN(**params).get_params(),
              "d": d, "queries": args.queries, "runs": [], "skipped": []}
    stem = ("bench_distributed_quick" if args.quick else
            f"bench_distributed_D{d}_N{'-'.join(map(str, sizes))}")
    stem += "".join(f"_{k}-{v}" for k, v in sorted(extra.items()))

    def record(res, n, s, y, ref):
        rel = np.abs(s - ref[0]) / np.abs(ref[0]) if ref else None
        approx = bool(res.get("backend_params"))
        res.update(n=n, auroc=float(roc_auc_score(y, s)),
                   max_rel_diff_vs_knnn=None if rel is None or approx else float(rel.max()),
                   spearman_vs_exact=float(spearmanr(s, ref[0]).statistic) if approx else None,
                   graph_recall_vs_exact=None if not ref else recall(res.pop("groups")[:, 1:],
                                                                     ref[1][:, 1:]))
        report["runs"].append(res)
        print(json.dumps(res, default=str), flush=True)
        write_results(args.out, stem, report, markdown(report))  # an interrupted run keeps it

    t_start, prev = time.perf_counter(), None
    tmp = tempfile.mkdtemp(prefix="nonn-bench-dist-")
    try:
        for n in sizes:
            elapsed = time.perf_counter() - t_start
            if args.time_budget and prev is not None:
                estimate = (prev[2] - prev[1]) + prev[1] * (n / prev[0]) ** 2
                if elapsed + estimate > args.time_budget:
                    report["skipped"].append({"n": n, "reason": f"{elapsed:.0f} s spent + "
                                              f"{estimate:.0f} s estimated > --time-budget"})
                    continue
            t_n, first = time.perf_counter(), len(report["runs"])
            X, Q, _ = embedding_like(n, args.queries, d, seed=0)
            Q, y = subtle_anomalies(Q, share=0.1, rho=0.05, seed=1)
            ref = None
            for threads in single:
                res, s, g = run_single(X, Q, params, threads)
                record(res, n, s, y, None)
                ref = ref or (s, g)
            runs = [(w, params) for w in (1, 2)]
            if args.approx:
                nlist = max(int(np.sqrt(n // 2)), 8)
                runs += [(2, {"backend": "faiss", "backend_params": bp}) for bp in (
                    {"index": "HNSW32"}, {"index": f"IVF{nlist},Flat",
                                          "nprobe": max(nlist // 8, 1)})]
            for workers, p in runs:
                res, s = run_distributed(X, Q, os.path.join(tmp, f"N{n}"), workers, p)
                record(res, n, s, y, ref)
            work = sum(r["fit_s"] + r["score_s"] for r in report["runs"][first:])
            prev = (n, work, time.perf_counter() - t_n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        report["total_s"] = time.perf_counter() - t_start
        write_results(args.out, stem, report, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
