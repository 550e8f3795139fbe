#!/usr/bin/env python
"""Scaling benchmark of nonn.distributed: 1 vs 2 Dask workers on this machine.

For each training size N (D = 512 embedding-like float32 data, the
generator of ``bench_core.py``), the training set is written as ``.npy``
shards (one per partition) and read by the workers; then:

* ``DistributedKNNN.fit`` and ``anomaly_score`` (Q queries) on a fresh
  ``LocalCluster`` of 1 and of 2 worker *processes* with one thread each
  (so "per worker" means per core), one partition per worker;
* per worker: peak RSS of the fit and of the scoring (the kernel's VmHWM,
  reset between phases), the state it holds, and the bytes it sent to other
  workers (Dask's transfer counters);
* single-machine ``KNNN`` with the same parameters and 1 or 2 threads, as
  the reference (scores compared: max relative difference);
* with ``--approx``: FAISS approximate indexes per partition (HNSW, IVF):
  recall of the training neighbourhoods against the exact ones, and AUROC of
  the scores against the exact scores' AUROC (the last 10 % of the queries
  are anomalies from unseen clusters).

Other jobs on this 2-core machine slow the runs down, so each run records
how busy the rest of the machine was: the 1-minute load before and after,
and the CPU share of *other* processes while it ran (the machine's busy time
from ``/proc/stat`` minus that of this process and of the cluster's worker
and nanny processes, over wall time x CPUs), with the other processes that
used the most CPU. The whole benchmark gets the same figures.

A summary table puts 1 and 2 workers side by side per N: wall and CPU
seconds, peak RSS per worker, and the speed-up of 2 workers over 1 (wall,
and "CPU": the 1-worker CPU over the busier worker's CPU, the speed-up on
an otherwise idle machine). ``--time-budget`` skips an N whose estimated
time (the previous N's, its work scaled by N^2, the exact graph's cost)
would end the benchmark past the budget; the skip is recorded.

Usage::

    nice -n 19 python benchmarks/bench_distributed.py --sizes 10000,20000,40000 --approx
    nice -n 19 python benchmarks/bench_distributed.py --sizes 20000,50000,100000 \
        --single 1 --time-budget 1200
    nice -n 19 python benchmarks/bench_distributed.py --quick
    nice -n 19 python benchmarks/bench_distributed.py --sizes 20000 --single 1 \
        --params '{"set_size": "all"}'      # the dual form (L > K')

Results: ``benchmarks/results/distributed/bench_distributed_D{D}_N{sizes}.{json,md}``
and ``stages_N{N_SHARD}_D{D}.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import _system_busy_seconds, embedding_like  # noqa: E402
# run on the workers by client.run: imported there too (bench_scale and
# bench_core import only the standard library and numpy at module level)
from bench_scale import _reset_hwm  # noqa: E402


def load():
    return os.getloadavg()


# ------------------------------------------------------------ contention
def _proc_cpu():
    """{pid: (name, CPU seconds so far)} of every process (/proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except OSError:  # ended meanwhile
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        out[int(pid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


class Contention:
    """How busy the rest of the machine was between ``start()`` and
    ``stop(own_cpu, own_pids)``: CPU seconds of the whole machine
    (/proc/stat) minus ``own_cpu`` (this benchmark's processes), as a share
    of the capacity (wall x CPUs), and the other processes that used the
    most (processes that started and ended in between count in the share,
    not in the list)."""

    def start(self):
        self.busy0, self.procs0 = _system_busy_seconds(), _proc_cpu()
        self.t0 = time.perf_counter()
        return self

    def stop(self, own_cpu, own_pids=()):
        wall = time.perf_counter() - self.t0
        busy = _system_busy_seconds()
        procs = _proc_cpu()
        cpus = os.cpu_count() or 1
        others = None if busy is None else max(busy - self.busy0 - own_cpu, 0.0)
        skip = set(own_pids) | {os.getpid()}
        top = sorted(((procs[p][1] - self.procs0[p][1], procs[p][0], p)
                      for p in procs.keys() & self.procs0.keys() if p not in skip),
                     reverse=True)[:5]
        return {"wall_s": wall, "own_cpu_s": own_cpu,
                "others_cpu_s": others,
                "others_share": None if others is None else others / (wall * cpus),
                "top_others": [{"pid": p, "name": n, "cpu_s": round(c, 2)}
                               for c, n, p in top if c >= 0.05]}


def own_cpu():
    t = os.times()
    return t.user + t.system


# ------------------------------------------------------ per-worker probes
def _status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


def _sent(dask_worker):
    return int(dask_worker.transfer_outgoing_bytes_total)


def _cpu():
    return time.process_time()


def _pid_cpu():
    return os.getpid(), time.process_time()


def cluster_cpu(client):
    """(CPU seconds so far of the worker processes and of nanny processes
    other than this one, their pids). A LocalCluster's nannies run in this
    process, whose CPU is counted apart."""
    procs = dict(client.run(_pid_cpu).values())
    procs.update(client.run(_pid_cpu, nanny=True).values())
    procs.pop(os.getpid(), None)
    return sum(procs.values()), list(procs)


def probe(client):
    """{worker: (peak RSS bytes, RSS bytes, bytes sent so far, CPU seconds so far)}."""
    st = client.run(_status)
    sent = client.run(_sent)
    cpu = client.run(_cpu)
    return {w: (st[w]["VmHWM"], st[w]["VmRSS"], sent[w], cpu[w]) for w in st}


# ------------------------------------------------------------------ runs
def write_shards(X, folder, parts):
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for i, block in enumerate(np.array_split(X, parts)):
        np.save(os.path.join(folder, f"shard-{i:03d}.npy"), block)
    return folder


#: lifetime CPU seconds of each cluster's worker and nanny processes
CLUSTERS_CPU = []


def run_distributed(X, Q, folder, workers, params, label, stealing=False):
    import distributed

    from nonn.distributed import DistributedKNNN, read_shards

    write_shards(X, folder, workers)
    import dask

    with warnings.catch_warnings(), \
            dask.config.set({"distributed.scheduler.work-stealing": stealing}):
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                           processes=True, dashboard_address=None,
                                           silence_logs=50, memory_limit=0)
        client = distributed.Client(cluster)
    try:
        # warm-up: numba compiles nonn's kernels once per worker process
        DistributedKNNN(client=client, **params).fit(X[: max(2000, 40 * workers)])
        client.run(_reset_hwm)
        base = probe(client)
        cpu0, _ = cluster_cpu(client)
        mine0 = own_cpu()
        busy = Contention().start()
        load0 = load()
        det = DistributedKNNN(client=client, **params)
        Xd = read_shards(folder)
        t0 = time.perf_counter()
        det.fit(Xd)
        fit_s = time.perf_counter() - t0
        after_fit = probe(client)
        client.run(_reset_hwm)
        mid = probe(client)
        t0 = time.perf_counter()
        scores = det.anomaly_score(Q)
        score_s = time.perf_counter() - t0
        after_score = probe(client)
        cpu1, pids = cluster_cpu(client)
        contention = busy.stop(own_cpu() - mine0 + cpu1 - cpu0, pids)
        load1 = load()
        groups = client.compute(det.neighborhoods_, sync=True)
        per_worker = []
        for w in sorted(base):
            per_worker.append({
                "fit_peak_rss_mib": after_fit[w][0] / 2**20,
                "rss_after_fit_mib": after_fit[w][1] / 2**20,
                "rss_before_fit_mib": base[w][1] / 2**20,
                "fit_sent_mib": (after_fit[w][2] - base[w][2]) / 2**20,
                "score_peak_rss_mib": after_score[w][0] / 2**20,
                "score_sent_mib": (after_score[w][2] - mid[w][2]) / 2**20,
                "fit_cpu_s": after_fit[w][3] - base[w][3],
                "score_cpu_s": after_score[w][3] - mid[w][3],
            })
        n, d = X.shape
        # grid rows, eigen-state (primal: S x L x (L + 1); dual: S x K' x (K' + 1)), ids
        state = (n * d + det.eigenvalues_.size + det.eigenvectors_.size) * X.dtype.itemsize \
            + groups.size * 8
        # the dual form's halos: rows gathered per partition (None in the primal form)
        halos = [client.compute(dask.delayed(_halo_size)(h), sync=True) if h is not None
                 else None for h in det._shards["halos"]]
        return {
            "label": label, "workers": workers, "partitions": det.n_partitions_,
            "fit_s": fit_s, "score_s": score_s, "load_before": load0, "load_after": load1,
            "contention": contention,
            "state_mib_total": state / 2**20, "per_worker": per_worker,
            "halo_rows_per_partition": [h and h[0] for h in halos],
            "halo_mib_per_partition": [h and h[1] / 2**20 for h in halos],
            "backend_params": params.get("backend_params"), "work_stealing": stealing,
        }, scores, groups
    finally:
        try:  # the cluster's lifetime CPU (warm-up included), for the whole-run share
            CLUSTERS_CPU.append(cluster_cpu(client)[0])
        except Exception:
            pass
        client.close()
        cluster.close()


def _halo_size(halo):
    """(rows, bytes) of a partition's halo."""
    return int(halo.rows.shape[0]), int(halo.__sizeof__())


def run_single(X, Q, params, threads):
    from nonn import KNNN

    p = dict(params, n_jobs=threads)
    KNNN(**p).fit(X[:2000])  # warm-up (kernels compiled in this process)
    load0 = load()
    mine0 = own_cpu()
    busy = Contention().start()
    t0, c0 = time.perf_counter(), time.process_time()
    det = KNNN(**p).fit(X)
    fit_s, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    s = det.anomaly_score(Q)
    score_s, score_cpu = time.perf_counter() - t0, time.process_time() - c0
    contention = busy.stop(own_cpu() - mine0)
    return {"label": f"KNNN n_jobs={threads}", "threads": threads, "fit_s": fit_s,
            "score_s": score_s, "fit_cpu_s": fit_cpu, "score_cpu_s": score_cpu,
            "load_before": load0, "load_after": load(),
            "contention": contention}, s, det.neighborhoods_


def subtle_anomalies(Q, share, rho, seed):
    """Replace the last ``share`` of the queries (the generator's easy
    anomalies from unseen clusters) by held-out normal rows with a fraction
    ``rho`` of their features taken from other normal rows: anomalies close
    to the normal data, so that AUROC tells backends apart."""
    rng = np.random.default_rng(seed)
    n_anom = int(round(share * len(Q)))
    normal = Q[: len(Q) - n_anom]
    A = normal[rng.integers(len(normal), size=n_anom)].copy()
    donors = normal[rng.integers(len(normal), size=n_anom)]
    mask = rng.random(A.shape) < rho
    A[mask] = donors[mask]
    return np.vstack([normal, A]), np.r_[np.zeros(len(normal)), np.ones(n_anom)]


def auroc(scores, y):
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores))


def recall(approx, exact):
    """Mean share of each exact neighbourhood (point itself excluded) found."""
    hits = [len(np.intersect1d(a[1:], e[1:], assume_unique=True)) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / (exact.shape[1] - 1))


def stages(n_shard, d, kp, k, threads=1):
    """Per-worker (one core) rates of each stage, measured in this process
    with the task functions the workers run, on one shard of ``n_shard``
    rows: CPU seconds (robust to other jobs on the machine) and wall."""
    import numba

    from nonn.distributed import _tasks
    from nonn._layout import permute, set_sizes

    numba.set_num_threads(threads)
    from threadpoolctl import threadpool_limits

    X, Q = embedding_like(2 * n_shard, 2000, d, seed=1)
    A, B = X[:n_shard], X[n_shard:]
    L = 5
    sizes = set_sizes(d, L)
    order = np.arange(d)
    out = {"n_shard": n_shard, "d": d, "K'": kp, "k": k, "threads": threads}

    def timed(name, fn, *a):
        c0, t0 = time.process_time(), time.perf_counter()
        r = fn(*a)
        out[name] = {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0}
        return r

    with threadpool_limits(threads):
        Ag, Bg = permute(A, order), permute(B, order)
        idx = timed("brute_build", _tasks.ShardIndex, Ag, 0, "brute", "euclidean", {}, threads)
        timed("brute_search_other_shard", idx.kneighbors, Bg, kp - 1)
        _, others = timed("brute_search_own_shard", idx.kneighbors, None, kp - 1)
        for name, bp in (("hnsw32", {"index": "HNSW32"}),
                         ("ivf", {"index": f"IVF{int(np.sqrt(n_shard))},Flat",
                                  "nprobe": max(int(np.sqrt(n_shard)) // 8, 1)})):
            try:
                h = timed(f"{name}_build", _tasks.ShardIndex, Ag, 0, "faiss", "euclidean", bp,
                          threads)
                timed(f"{name}_search_other_shard", h.kneighbors, Bg, kp - 1)
            except ImportError:
                pass
        groups = _tasks.partition_neighborhoods(others, 0, kp)
        halo = _tasks.gather_halo(groups, (0, np.arange(n_shard), Ag))
        w, v = timed("eigen", _tasks.block_eigen, halo, kp, sizes, L, threads, None)
        qidx = idx.kneighbors(permute(Q, order), k)[1]
        req = _tasks.pair_requests(permute(Q, order), qidx, 0, n_shard)
        floor = 1e-3 * Ag.var(axis=0).mean() * np.ones(len(sizes))
        timed("pair_scores", _tasks.pair_scores, Ag, w, v, None, req, sizes, L, floor, threads,
              None)
        out["pairs"] = int(qidx.size)
        out["queries"] = int(len(Q))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,20000,40000")
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--single", default="1,2",
                    help="thread counts of the single-machine KNNN reference runs "
                         "(comma separated; the first one's scores are the reference)")
    ap.add_argument("--time-budget", type=float, metavar="SECONDS",
                    help="skip an N whose estimated time would end the run past this")
    ap.add_argument("--approx", action="store_true", help="also FAISS HNSW/IVF per partition")
    ap.add_argument("--quick", action="store_true", help="smoke size (N=3000, D=64)")
    ap.add_argument("--stages", type=int, metavar="N_SHARD",
                    help="only the per-worker stage rates on one shard of N_SHARD rows")
    ap.add_argument("--params", default="{}", metavar="JSON",
                    help="KNNN parameters besides backend='brute', e.g. '{\"set_size\": \"all\"}'")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed"))
    args = ap.parse_args(argv)
    sizes = [3000] if args.quick else [int(s) for s in args.sizes.split(",")]
    d = 64 if args.quick else args.d
    single = [int(t) for t in args.single.split(",") if t]
    if not single:
        raise SystemExit("--single needs at least one thread count (the reference scores).")

    import nonn
    from nonn import KNNN

    extra = json.loads(args.params)
    params = {"backend": "brute", **extra}
    if args.stages:
        kp = KNNN().get_params()["n_neighbors_of_neighbors"]
        k = KNNN().get_params()["n_neighbors"]
        stages(2000, d, kp, k)  # warm-up: numba compiles the kernels
        res = stages(args.stages, d, kp, k)
        res["load"] = load()
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"stages_N{args.stages}_D{d}.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res, indent=1))
        return 0
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "nonn": nonn.__version__},
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "knnn_params": {**KNNN(**params).get_params()},
        "d": d, "queries": args.queries, "time_budget_s": args.time_budget,
        "runs": [], "skipped": [],
    }
    os.makedirs(args.out, exist_ok=True)
    stem = ("bench_distributed_quick" if args.quick else
            "bench_distributed_D{}_N{}".format(d, "-".join(str(n) for n in sizes)))
    stem += "".join(f"_{k}-{v}" for k, v in sorted(extra.items()))

    def save():
        # after every run: an interrupted benchmark keeps what it measured
        with open(os.path.join(args.out, stem + ".json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        with open(os.path.join(args.out, stem + ".md"), "w") as f:
            f.write(markdown(report))

    def record(res):
        report["runs"].append(res)
        print(json.dumps(res), flush=True)
        save()

    t_start, mine0 = time.perf_counter(), own_cpu()
    whole = Contention().start()
    prev = None  # (n, seconds of work, seconds in all) of the last N measured
    tmp = tempfile.mkdtemp(prefix="nonn-bench-dist-")
    try:
        for n in sizes:
            elapsed = time.perf_counter() - t_start
            if args.time_budget and prev is not None:
                pn, work, total = prev
                # the work (fit + score) grows as N^2 (exact graph); the rest
                # (cluster start, warm-up, data) is taken as it was
                estimate = (total - work) + work * (n / pn) ** 2
                if elapsed + estimate > args.time_budget:
                    report["skipped"].append({
                        "n": n, "estimated_s": round(estimate), "elapsed_s": round(elapsed),
                        "reason": f"{elapsed:.0f} s spent + {estimate:.0f} s estimated > "
                                  f"--time-budget {args.time_budget:.0f} s"})
                    print(f"skipping N={n}: {report['skipped'][-1]['reason']}", flush=True)
                    save()
                    continue
            t_n, first = time.perf_counter(), len(report["runs"])
            X, Q = embedding_like(n, args.queries, d, seed=0)
            Q, y = subtle_anomalies(Q, share=0.1, rho=0.05, seed=1)
            exact_auc = ref_scores = ref_groups = None
            for threads in single:
                res, s, g = run_single(X, Q, params, threads)
                res.update(n=n, auroc=auroc(s, y))
                if ref_scores is None:
                    ref_scores, ref_groups, exact_auc = s, g, res["auroc"]
                record(res)
            for workers in (1, 2):
                res, s, g = run_distributed(X, Q, os.path.join(tmp, f"N{n}"), workers, params,
                                            f"DistributedKNNN {workers} worker(s)")
                rel = np.abs(s - ref_scores) / np.abs(ref_scores)
                res.update(n=n, auroc=auroc(s, y), max_rel_diff_vs_knnn=float(rel.max()),
                           share_rel_diff_over_1e5=float(np.mean(rel > 1e-5)),
                           graph_recall_vs_exact=recall(g, ref_groups))
                record(res)
            if args.approx:
                per_part = n // 2
                nlist = max(int(np.sqrt(per_part)), 8)
                for bp in ({"index": "HNSW32"},
                           {"index": f"IVF{nlist},Flat", "nprobe": max(nlist // 8, 1)}):
                    p = {"backend": "faiss", "backend_params": bp}
                    res, s, g = run_distributed(X, Q, os.path.join(tmp, f"N{n}"), 2, p,
                                                f"DistributedKNNN 2 workers faiss {bp}")
                    res.update(n=n, auroc=auroc(s, y), auroc_exact=exact_auc,
                               max_rel_diff_vs_knnn=None,
                               graph_recall_vs_exact=recall(g, ref_groups),
                               spearman_vs_exact=_spearman(s, ref_scores))
                    record(res)
            del X, Q
            work = sum(r["fit_s"] + r["score_s"] for r in report["runs"][first:])
            prev = (n, work, time.perf_counter() - t_n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        report["total_s"] = time.perf_counter() - t_start
        # this process (client, scheduler, reference KNNN) + every cluster's
        # workers and nannies over their lifetime
        report["contention"] = whole.stop(own_cpu() - mine0 + sum(CLUSTERS_CPU))
        report["load_end"] = load()
        save()
    print(markdown(report))
    return 0


def _spearman(a, b):
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _share(x):
    c = x.get("contention") or {}
    v = c.get("others_share")
    return "—" if v is None else f"{v:.0%}"


def summary(r):
    """1 vs 2 workers side by side per N, with the speed-ups of 2 over 1."""
    lines = ["## 1 vs 2 workers (exact brute backend)", "",
             "| N | run | fit wall s | score wall s | fit CPU s per worker | score CPU s per "
             "worker | fit peak RSS MiB per worker | score peak RSS MiB per worker | other "
             "processes' CPU share | speed-up 2 vs 1: fit wall / fit CPU | speed-up 2 vs 1: "
             "score wall / score CPU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    exact = [x for x in r["runs"] if "threads" in x or
             (x.get("backend_params") is None and "workers" in x)]
    for n in sorted({x["n"] for x in exact}):
        one = next((x for x in exact if x["n"] == n and x.get("workers") == 1), None)
        for x in (x for x in exact if x["n"] == n):
            pw = x.get("per_worker")
            if pw:
                fcpu = [w["fit_cpu_s"] for w in pw]
                scpu = [w["score_cpu_s"] for w in pw]
                cells = [" / ".join(f"{v:.1f}" for v in fcpu),
                         " / ".join(f"{v:.2f}" for v in scpu),
                         " / ".join(f"{w['fit_peak_rss_mib']:.0f}" for w in pw),
                         " / ".join(f"{w['score_peak_rss_mib']:.0f}" for w in pw)]
            else:
                cells = [f"{x['fit_cpu_s']:.1f}", f"{x['score_cpu_s']:.2f}", "—", "—"]
            fit_up = score_up = "—"
            if pw and x["workers"] == 2 and one is not None:
                o = one["per_worker"][0]
                fit_up = (f"{one['fit_s'] / x['fit_s']:.2f}× / "
                          f"{o['fit_cpu_s'] / max(fcpu):.2f}×")
                score_up = (f"{one['score_s'] / x['score_s']:.2f}× / "
                            f"{o['score_cpu_s'] / max(scpu):.2f}×")
            lines.append(f"| {n} | {x['label']} | {x['fit_s']:.1f} | {x['score_s']:.2f} | "
                         + " | ".join(cells) + f" | {_share(x)} | {fit_up} | {score_up} |")
    lines += ["",
              "- speed-up, wall: 1-worker wall time / 2-worker wall time (shrinks when other "
              "processes hold a core); CPU: 1-worker CPU s / the busier worker's CPU s, the "
              "wall-time speed-up on an otherwise idle machine with one core per worker.",
              "- KNNN rows: the whole process (its CPU s are all threads'), for reference."]
    return lines


def machine_load(r):
    lines = ["## How busy the machine was", ""]
    c = r.get("contention")
    if c:
        share, cpus = c.get("others_share"), r["machine"]["cpus"]
        if share is None:
            others = "(no /proc/stat here)"
        else:
            others = (f"{c['others_cpu_s']:.0f} CPU s = {share:.0%} of the machine's "
                      f"capacity ({share * cpus:.2f} cores on average)")
        lines.append(f"- whole run: {c['wall_s']:.0f} s wall on {cpus} CPUs; this benchmark's "
                     f"processes used {c['own_cpu_s']:.0f} CPU s, other processes {others}.")
        if c.get("top_others"):
            lines.append("- other processes using the most CPU over the run: " + ", ".join(
                f"{t['name']} (pid {t['pid']}) {t['cpu_s']:.0f} s" for t in c["top_others"]))
    lines.append("- per run: the 'other processes' CPU share' column above and in the full "
                 "table (machine busy time from /proc/stat minus this benchmark's processes, "
                 "over wall x CPUs, during the timed fit and score).")
    if "load_end" in r:
        lines.append(f"- 1-minute load at the end: {r['load_end'][0]:.2f}")
    return lines


def markdown(r):
    lines = [f"# nonn.distributed scaling: D={r['d']}, {r['queries']} queries", "",
             f"- command: `{r.get('command', '')}`",
             f"- machine: {r['machine']}", f"- started {r['started']}, finished "
             f"{r.get('finished')}"
             + (f" ({r['total_s'] / 60:.1f} min)" if "total_s" in r else ""),
             f"- KNNN parameters: {r['knnn_params']}",
             "- Dask: LocalCluster of worker processes, 1 thread each, one partition per "
             "worker; training data read by the workers from .npy shards; one warm-up fit "
             "per cluster (numba compiles the kernels in each worker) is not timed; Dask "
             "work stealing off (as in the embedded cluster)",
             "- queries: 90 % held-out normal rows, 10 % normal rows with 5 % of their "
             "features taken from other rows (subtle anomalies)"]
    for sk in r.get("skipped", []):
        lines.append(f"- **skipped N = {sk['n']}**: {sk['reason']}")
    lines.append("")
    lines += summary(r)
    lines.append("")
    lines += machine_load(r)
    lines += ["", "## All runs", "",
              "| N | run | fit s | score s | fit CPU s (per worker) | score CPU s (per worker) "
              "| AUROC | max rel diff vs KNNN (share > 1e-5) | graph recall | "
              "per-worker fit peak RSS MiB | per-worker sent MiB (fit + score) | load 1-min "
              "before→after | other processes' CPU share |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        pw = x.get("per_worker", [])
        peak = " / ".join(f"{w['fit_peak_rss_mib']:.0f}" for w in pw) or "—"
        sent = " / ".join(f"{w['fit_sent_mib']:.1f}+{w['score_sent_mib']:.1f}"
                          for w in pw) or "—"
        diff = x.get("max_rel_diff_vs_knnn")
        rec = x.get("graph_recall_vs_exact")
        fcpu = " / ".join(f"{w['fit_cpu_s']:.1f}" for w in pw) or f"{x['fit_cpu_s']:.1f}"
        scpu = " / ".join(f"{w['score_cpu_s']:.2f}" for w in pw) or f"{x['score_cpu_s']:.2f}"
        if diff is not None:
            diff = f"{diff:.1e} ({x['share_rel_diff_over_1e5']:.2%})"
        lines.append(
            f"| {x['n']} | {x['label']} | {x['fit_s']:.2f} | {x['score_s']:.2f} | {fcpu} | "
            f"{scpu} | {x['auroc']:.4f} | {'—' if diff is None else diff} | "
            f"{'—' if rec is None else f'{rec:.4f}'} | {peak} | {sent} | "
            f"{x['load_before'][0]:.2f}→{x['load_after'][0]:.2f} | {_share(x)} |")
    lines.append("")
    lines.append("- peak RSS: the worker process's VmHWM, reset before the phase (includes "
                 "Python, numpy, numba and Dask, about 150-250 MiB idle).")
    lines.append("- sent: bytes this worker sent to other workers (Dask transfer counters); "
                 "client-to-worker traffic (queries, results) is not included.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
