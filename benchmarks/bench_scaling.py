#!/usr/bin/env python
"""The detectors' ``scale`` option on the 43 ADBench tabular sets (or the
MVTec ResNet-18 embeddings, ``--suite mvtec``); protocol: benchmarks/README.md.

    python benchmarks/bench_scaling.py --seeds 0,1,2 --out benchmarks/results/scaling
    python benchmarks/bench_scaling.py --suite mvtec --seeds 0,1,2 \
        --out benchmarks/results/scaling/mvtec
    python benchmarks/bench_scaling.py --datasets 4_breastw --seeds 0 --out /tmp/s   # smoke
"""

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    ap.add_argument("--out", default="benchmarks/results/scaling", help="output folder")
    ap.add_argument("--datasets", help="comma-separated subset of the classical suite")
    ap.add_argument("--suite", choices=("classical", "mvtec"), default="classical")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs of --out/results.csv and run only the missing ones")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from scipy.stats import wilcoxon

    from nonn.datasets import list_adbench
    from nonn.evaluation import SCALE_OPTIONS, check_datasets, run_suite, scaling_detectors, \
        summarize, write_csv

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    names = ([d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets
             else list_adbench(args.suite))
    check_datasets(names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dets = scaling_detectors()
    start = time.time()
    df = run_suite(names, dets, seeds, scale=None, progress=not args.no_progress,
                   checkpoint=out / "results.csv", resume=args.resume)
    minutes = (time.time() - start) / 60
    summary = summarize(df)
    auroc = summary.auroc.loc[[d for d in summary.auroc.index if d not in summary.dropped]]

    rows, table = [], []
    for base in ("KNNN", "KNN"):
        cols = [f"{base} scale={'none' if o is None else o}" for o in SCALE_OPTIONS]
        sub = auroc[cols]
        ranks = sub.rank(axis=1, ascending=False, method="average")
        wins = sub.eq(sub.max(axis=1), axis=0).sum(axis=0)
        for c in cols:
            o = summary.overall.loc[c]
            rows.append(dict(detector=base, scale=c.split("=", 1)[1],
                             mean_auroc=sub[c].mean(), mean_rank=ranks[c].mean(),
                             wins=int(wins[c]), n_datasets=len(sub), fit_s=o["fit_s"],
                             score_s=o["score_s"]))
            table.append([base, rows[-1]["scale"], f"{sub[c].mean():.4f}",
                          f"{ranks[c].mean():.2f}", int(wins[c]), len(sub),
                          f"{o['fit_s']:.1f}", f"{o['score_s']:.1f}"])
    against = []
    for base in ("KNNN", "KNN"):
        ref = auroc[f"{base} scale=none"]
        for o in SCALE_OPTIONS[1:]:
            col = auroc[f"{base} scale={o}"]
            a, b, diff = col.round(3), ref.round(3), col - ref
            p = wilcoxon(col, ref).pvalue if (diff != 0).any() else float("nan")
            against.append([base, o, f"{diff.mean():+.4f}", int((a > b).sum()),
                            int((a == b).sum()), int((a < b).sum()), f"{p:.3f}"])
    lines = [
        f"### Detector `scale` option on the ADBench {args.suite} suite ({len(auroc)} "
        f"datasets, seeds {seeds})", "",
        "Novelty protocol of `nonn.evaluation` with the harness's scaling off "
        "(`run_suite(..., scale=None)`); each detector learns its scaling from its training "
        "normals; `KNNN()` and `KNN()` defaults otherwise. Mean rank: the four options of one "
        "detector ranked on each dataset (1 = best, ties averaged).", "",
        markdown_table(["detector", "scale", "mean AUROC", "mean rank", "wins", "datasets",
                        "fit s", "score s"], table), "",
        "Against no scaling, dataset by dataset (AUROC rounded to 3 decimals; p: two-sided "
        "Wilcoxon signed-rank test over the datasets):", "",
        markdown_table(["detector", "scale", "mean AUROC - none", "wins", "ties", "losses",
                        "p"], against), "", "Per dataset (mean AUROC over seeds):", "",
        markdown_table(["dataset", *auroc.columns],
                       [[ds, *(f"{v:.3f}" for v in r)] for ds, r in auroc.iterrows()]), "",
        f"Runs with an error: {int((df['error'] != '').sum())}."]
    if summary.dropped:
        lines.append(f"Datasets dropped (a run failed): {summary.dropped}.")
    lines += ["", f"Command: `{environment()['command']}` ({platform.machine()}, Python "
              f"{platform.python_version()}; this invocation {minutes:.1f} min"
              f"{', resumed from a checkpoint' if args.resume else ''})."]
    md = "\n".join(lines) + "\n"
    import pandas as pd

    pd.DataFrame(rows).to_csv(out / "summary.csv", index=False)
    write_csv(df, out / "results.csv")
    write_csv(summary, out / "auroc.csv")
    (out / "summary.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
