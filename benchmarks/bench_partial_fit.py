"""partial_fit against a full refit: KNNN on N rows plus M new normal rows
(protocol: benchmarks/README.md). Reads the update's own statistics
(``_last_update``) and, with ``--check``, ``nonn._update.frozen_fit``.

    nice -n 10 python benchmarks/bench_partial_fit.py --n 100000 --d 512 --adds 1000 \\
        --out benchmarks/results/partial_fit
    python benchmarks/bench_partial_fit.py --defaults --out benchmarks/results/partial_fit_default
    python benchmarks/bench_partial_fit.py --n 3000 --d 32 --adds 100 --loaded --check \\
        --out /tmp/pf                                                    # smoke
"""

import argparse
import copy
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import best_of, embedding_like, environment, load_average, markdown_table, \
    write_results  # noqa: E402

from nonn import KNNN, load  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--adds", default="1000", help="comma-separated M values")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--kp", type=int, default=50)
    ap.add_argument("--set-size", type=int, default=5)
    ap.add_argument("--eig-floor", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--defaults", action="store_true", help="KNNN's defaults (ignores "
                    "--k/--kp/--set-size/--eig-floor), exact search")
    ap.add_argument("--loaded", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="partial_fit runs (best kept)")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/partial_fit")
    args = ap.parse_args(argv)
    adds = [int(a) for a in args.adds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    params = dict(n_neighbors=args.k, n_neighbors_of_neighbors=args.kp,
                  set_size=args.set_size, eig_floor=args.eig_floor, backend="brute")
    if args.defaults:
        params = dict(backend="brute")
    rows, env = [], environment()
    header = {"machine": f"{env['cpus']} CPUs, {env['platform']}", "python": env["python"],
              "numpy": env["numpy"], "params": params, "n": args.n, "d": args.d,
              "seed": args.seed, "started": env["time"], "load_avg_start": load_average()}
    print(json.dumps(header), flush=True)
    X_data = embedding_like(args.n + max(adds), 0, args.d, seed=args.seed)[0]
    X = X_data[: args.n]
    t_fit, fitted = best_of(lambda: KNNN(**params).fit(X))
    print(f"fit on {args.n} rows {t_fit:.1f} s", flush=True)
    path = os.path.join(args.out, ".bench_model.nonn")
    if args.loaded:
        fitted.save(path)
    # the first update in a process loads its compiled kernels (timed apart)
    header["first_update_1_row_s"] = best_of(
        lambda: copy.deepcopy(fitted).partial_fit(X_data[args.n: args.n + 1]))[0]
    for M in adds:
        X_all, X_new = X_data[: args.n + M], X_data[args.n: args.n + M]
        la0 = load_average()
        runs = []  # each on a fresh copy of the fitted model: best and all are reported
        for _ in range(args.repeats):
            det = copy.deepcopy(fitted)
            runs.append(best_of(lambda: det.partial_fit(X_new))[0])
        t_update = min(runs)
        stats = dict(det._last_update)
        print(f"  partial_fit {t_update:.2f} s (runs {runs}) {stats}", flush=True)
        t_loaded, stats_loaded = None, None
        if args.loaded:
            model = load(path)
            t_loaded, _ = best_of(lambda: model.partial_fit(X_new))
            stats_loaded = dict(model._last_update)
            print(f"  partial_fit of the loaded model {t_loaded:.2f} s {stats_loaded}",
                  flush=True)
            del model
        t_refit, ref = best_of(lambda: KNNN(**params).fit(X_all))
        la1 = load_average()
        print(f"  refit on {args.n + M} rows {t_refit:.1f} s; ratio {t_refit / t_update:.1f}x",
              flush=True)
        check = None
        if args.check:
            from nonn._update import frozen_fit

            del ref
            frozen = frozen_fit(KNNN(**params).fit(X), X_all)
            Q = embedding_like(args.n, 2000, args.d, seed=args.seed + 1)[1]
            dn, fn, fs = det.neighborhoods_, frozen.neighborhoods_, frozen.anomaly_score(Q)
            check = {"neighborhoods_equal": bool(np.array_equal(dn, fn)),
                     "rows_with_other_neighborhood_order": int((dn != fn).any(1).sum()),
                     "rows_with_other_neighborhood_members": int(
                         (np.sort(dn, 1) != np.sort(fn, 1)).any(1).sum()),
                     "max_abs_offset_diff": float(abs(det.offset_ - frozen.offset_)),
                     "max_rel_score_diff": float(np.max(np.abs(det.anomaly_score(Q) - fs)
                                                        / np.abs(fs)))}
            print(f"  check against frozen_fit: {check}", flush=True)
            del frozen
        rows.append({"M": M, "fit_s": t_fit, "partial_fit_s": t_update, "partial_fit_runs": runs,
                     "refit_s": t_refit,
                     "ratio": t_refit / t_update, "stats": stats,
                     "partial_fit_loaded_s": t_loaded, "stats_loaded": stats_loaded,
                     "ratio_loaded": None if t_loaded is None else t_refit / t_loaded,
                     "load_avg_before": la0, "load_avg_after": la1, "check": check})
        del det
    if args.loaded:
        os.remove(path)
    table = []
    for r in rows:
        st = r["stats"].get("stage_seconds", {})
        runs = ", ".join(f"{x:.2f}" for x in r["partial_fit_runs"])
        table.append([r["M"], f"{r['partial_fit_s']:.2f} ({runs})", f"{r['refit_s']:.1f}",
                      f"{r['ratio']:.1f}", *(("", "") if r["partial_fit_loaded_s"] is None else
                                             (f"{r['partial_fit_loaded_s']:.2f}",
                                              f"{r['ratio_loaded']:.1f}")),
                      r["stats"].get("neighborhoods_changed"),
                      r["stats"].get("calibration_rescored"),
                      ", ".join(f"{st.get(k, float('nan')):.2f}"
                                for k in ("search", "lists", "eigen", "calibration")),
                      f"{r['load_avg_before'][0]:.1f} / {r['load_avg_after'][0]:.1f}"])
    md = "\n".join([
        f"# partial_fit vs refit: KNNN, N = {args.n:,}, D = {args.d}", "",
        f"- `{env['command']}`; {header['machine']}; python {header['python']}, numpy "
        f"{header['numpy']}; started {header['started']}",
        f"- params: {params}; data: _common.embedding_like (float32), seed {args.seed}; new "
        "rows from the same distribution",
        "- the machine is shared: the 1-minute load average before/after each timing is "
        "listed (2 CPUs; above 2 other processes slow every time)",
        f"- timed after a first 1-row update in the process (loads the compiled kernels; "
        f"with the model's deep copy: {header['first_update_1_row_s']:.2f} s)", "",
        markdown_table(["M", "partial_fit s, best (runs)", "refit s (one run)",
                        "refit / partial_fit", "loaded model's partial_fit s", "ratio (loaded)",
                        "neighborhoods changed", "calibration rows rescored",
                        "stages s (search, lists, eigen, calibration)",
                        "load avg before / after"], table)]
        + [f"\nM = {r['M']}: against frozen_fit: {r['check']}" for r in rows if r["check"]])
    path = write_results(args.out, f"partial_fit_N{args.n}_D{args.d}_M{'-'.join(map(str, adds))}",
                         {**header, "rows": rows}, md)
    print(f"wrote {path} and .json")


if __name__ == "__main__":
    main()
