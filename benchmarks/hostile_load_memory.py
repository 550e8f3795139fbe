#!/usr/bin/env python
"""Peak memory of ``nonn.load`` and ``nonn info`` on hostile model files (the
bombs of ``tests/hostile.py``; list: benchmarks/README.md), each call in a
fresh subprocess. A measurement; ``tests/test_hostile_files.py`` asserts.
Run it with the ``nonn`` to measure first on ``PYTHONPATH``::

    PYTHONPATH=src python benchmarks/hostile_load_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

CHILD = r"""
import json, resource, sys, tracemalloc, io, contextlib
import numpy as np
import nonn
from nonn.cli import main
from nonn import persistence
import nonn.vision.systems  # imported by `nonn info` when a file is not a core model
persistence._registry()  # every module a load imports, before measuring
what, path = sys.argv[1], sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
err = io.StringIO()
try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        if what == "load":
            nonn.load(path)
            outcome = "loaded"
        else:
            outcome = f"exit {main(['info', path])}"
except BaseException as exc:
    outcome = type(exc).__name__
peak = tracemalloc.get_traced_memory()[1]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "traced": peak, "rss": (after - before) * 1024,
                  "stderr": err.getvalue().strip().splitlines()[-1:] }))
"""


def build(folder):
    import numpy as np

    import hostile as H
    from nonn import KNNN

    X = np.random.default_rng(0).normal(size=(500, 8))
    model = os.path.join(folder, "m.nonn")
    KNNN().fit(X).save(model)
    out = {}
    out["meta-deflate"] = H.deflate_bomb(model, os.path.join(folder, "meta.nonn"),
                                         "__meta__.npy", (1 << 30,), "u1")
    out["fit_X-deflate"] = H.deflate_bomb(model, os.path.join(folder, "fitx.nonn"),
                                          "fit_X.npy", (1 << 24, 8), "<f8", announce=True)
    out["fit_X-header"] = H.header_bomb(model, os.path.join(folder, "hdr.nonn"), "fit_X.npy",
                                        (10**12,))
    out["alias"] = H.alias_bomb(model, os.path.join(folder, "alias.nonn"),
                                "eigenvectors_.npy", 40)
    entries = [H.stored(n, b) for n, b in H.members(model).items()]
    entries += [H.stored(f"x{i}.npy", b"") for i in range(20_000)]
    out["members"] = H.write_zip(os.path.join(folder, "members.nonn"), entries)
    out["nested-json"] = H.rewrite(model, os.path.join(folder, "nested.nonn"),
                                   raw={H.META: H.raw_meta_bytes(H.nested_json(100_000))})
    return out


def main():
    with tempfile.TemporaryDirectory() as folder:
        bombs = build(folder)
        print(f"nonn from {os.path.dirname(__import__('nonn').__file__)}")
        print(f"{'file':<15} {'size':>9}  {'call':<5} {'traced peak':>12} {'RSS growth':>11}"
              f"  {'x size':>7}  outcome")
        for name, path in bombs.items():
            size = os.path.getsize(path)
            for what in ("load", "info"):
                res = subprocess.run([sys.executable, "-c", CHILD, what, path],
                                     capture_output=True, text=True, env=dict(os.environ))
                try:
                    r = json.loads(res.stdout.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    r = {"outcome": f"crashed (rc {res.returncode})", "traced": 0, "rss": 0,
                         "stderr": res.stderr.strip().splitlines()[-1:]}
                peak = max(r["traced"], r["rss"])
                print(f"{name:<15} {size / 2**20:>7.2f}MB  {what:<5} "
                      f"{r['traced'] / 2**20:>10.1f}MB {r['rss'] / 2**20:>9.1f}MB "
                      f" {peak / size:>6.2f}x  {r['outcome']}: {' '.join(r['stderr'])[:110]}")


if __name__ == "__main__":
    main()
