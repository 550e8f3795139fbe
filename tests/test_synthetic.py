"""Tests of the 2-D synthetic benchmark (nonn.synthetic)."""

import csv
import subprocess
import sys

import numpy as np
import pytest

from nonn.synthetic import (
    DATASETS,
    MARGIN,
    METHODS,
    PAPER_TABLE5,
    make_detectors,
    make_synthetic,
    run_demo,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", DATASETS)
def test_make_synthetic_shapes_and_labels(name):
    X_train, X_test, y_test = make_synthetic(name, 120, 80, seed=3)
    assert X_train.shape == (120, 2)
    assert X_test.shape == (200, 2)
    assert y_test.shape == (200,)
    assert y_test.dtype.kind == "i"
    # normal test points first, then the anomalies
    assert y_test[:120].sum() == 0 and np.all(y_test[120:] == 1)
    assert np.all(np.isfinite(X_train)) and np.all(np.isfinite(X_test))
    # the normal test half is not the training half
    assert not np.any(np.all(np.isclose(X_test[:120, None], X_train[None]), axis=-1))
    # anomalies lie in the normal points' box enlarged by MARGIN per side
    normal = np.vstack([X_train, X_test[:120]])
    lo, hi = normal.min(axis=0), normal.max(axis=0)
    pad = MARGIN * (hi - lo)
    anomalies = X_test[120:]
    assert np.all(anomalies >= lo - pad) and np.all(anomalies <= hi + pad)
    # ... and spread over it, not only around the curve
    assert np.all(anomalies.min(axis=0) < lo) and np.all(anomalies.max(axis=0) > hi)


@pytest.mark.parametrize("name", DATASETS)
def test_make_synthetic_reproducible_by_seed(name):
    a = make_synthetic(name, 50, 30, seed=7)
    b = make_synthetic(name, 50, 30, seed=7)
    c = make_synthetic(name, 50, 30, seed=8)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], c[1])


def test_make_synthetic_no_anomalies():
    X_train, X_test, y_test = make_synthetic("moons", 10, 0, seed=0)
    assert X_test.shape == (10, 2) and y_test.sum() == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "spiral", "n_train": 10}, "'name' parameter of make_synthetic"),
        ({"name": "moons", "n_train": 0}, "'n_train' parameter"),
        ({"name": "moons", "n_train": 10, "n_anomalies": -1}, "'n_anomalies' parameter"),
        ({"name": "moons", "n_train": 10.0}, "Got 10.0 instead"),
    ],
)
def test_make_synthetic_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic(**kwargs)


def test_detectors_are_the_paper_defaults_and_do_not_warn():
    dets = make_detectors()
    assert tuple(dets) == METHODS
    for det in dets.values():
        assert det.n_neighbors == 3
    assert dets["k-NNN"].n_neighbors_of_neighbors == 25
    X_train, X_test, _ = make_synthetic("circles", 100, 20, seed=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for det in dets.values():
            assert det.fit(X_train).anomaly_score(X_test).shape == (120,)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out_dir=out, verbose=False, quick=True)


def test_run_demo_writes_files(quick_demo):
    out, res = quick_demo
    assert (out / "table5.csv").is_file() and (out / "table5.md").is_file()
    assert res["files"]["csv"] == str(out / "table5.csv")
    assert res["files"]["md"] == str(out / "table5.md")
    with open(out / "table5.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # quick: 3 datasets x 2 sizes x 2 seeds x 4 methods
    assert len(rows) == 3 * 2 * 2 * 4 == res["n_runs"] * 4
    assert set(rows[0]) == {"dataset", "size", "seed", "method", "auroc"}
    assert {r["dataset"] for r in rows} == set(DATASETS)
    assert {r["method"] for r in rows} == set(METHODS)
    assert {int(r["size"]) for r in rows} == {100, 300}
    assert {int(r["seed"]) for r in rows} == {0, 1}
    md = (out / "table5.md").read_text(encoding="utf-8")
    assert md == res["markdown"]
    for value in ("0.8214", "0.9816", "Per training size"):
        assert value in md


def test_run_demo_auroc_values(quick_demo):
    out, res = quick_demo
    with open(out / "table5.csv", newline="") as fh:
        aurocs = [float(r["auroc"]) for r in csv.DictReader(fh)]
    assert all(0.0 <= a <= 1.0 for a in aurocs)
    for d in DATASETS:
        for m in METHODS:
            s = res["summary"][d][m]
            assert 0.0 <= s["mean"] <= 1.0 and s["std"] >= 0.0
            for size in (100, 300):
                assert 0.0 <= res["per_size"][d][size][m] <= 1.0
    assert res["summary"]["moons"]["k-NN"]["mean"] > 0.5
    assert res["paper"] == PAPER_TABLE5


def test_run_demo_summary_matches_csv(quick_demo):
    out, res = quick_demo
    with open(out / "table5.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["dataset"] == "circles"
                and r["method"] == "k-NNN"]
    mean = np.mean([float(r["auroc"]) for r in rows])
    assert res["summary"]["circles"]["k-NNN"]["mean"] == pytest.approx(mean, abs=1e-6)


def test_run_demo_reproducible(tmp_path):
    kw = dict(seeds=1, sizes=(60,), n_anomalies=50, verbose=False)
    a = run_demo(out_dir=tmp_path / "a", **kw)
    b = run_demo(out_dir=tmp_path / "b", **kw)
    assert a["summary"] == b["summary"]
    assert (tmp_path / "a" / "table5.csv").read_text() == \
        (tmp_path / "b" / "table5.csv").read_text()


def test_run_demo_figure_is_png(quick_demo):
    pytest.importorskip("matplotlib")
    out, res = quick_demo
    png = out / "figure8.png"
    assert res["files"]["png"] == str(png)
    assert png.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300


def test_run_demo_without_matplotlib(tmp_path, monkeypatch, capsys):
    # None in sys.modules makes "import matplotlib" raise ImportError
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = run_demo(out_dir=tmp_path, seeds=1, sizes=(40,), n_anomalies=30, verbose=False)
    assert res["files"]["png"] is None
    assert not (tmp_path / "figure8.png").exists()
    assert (tmp_path / "table5.csv").is_file()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_run_demo_verbose_prints_table(tmp_path, capsys):
    run_demo(out_dir=tmp_path, seeds=1, sizes=(40,), n_anomalies=30, verbose=True)
    printed = capsys.readouterr().out
    assert "| Moons | measured |" in printed and "| | paper | 0.8214" in printed


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seeds": 0}, "'seeds' parameter of run_demo"),
        ({"sizes": (3,)}, "'sizes' parameter of run_demo"),
        ({"sizes": ()}, "at least one training size"),
        ({"n_anomalies": 0}, "'n_anomalies' parameter of run_demo"),
    ],
)
def test_run_demo_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_demo(out_dir=tmp_path, verbose=False, **kwargs)


def test_import_does_not_load_matplotlib():
    code = "import sys, nonn.synthetic; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
