"""``nonn demo``: Table 5, then one-class digits (scikit-learn's bundled 8x8
digits, no download)."""

import csv
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from nonn import KNN, KNNN
from nonn.digits import RATE, SEED, TEST_SIZE, run_digits


def _split():
    X, y = load_digits(return_X_y=True)
    tr, te = train_test_split(np.arange(len(y)), test_size=TEST_SIZE, stratify=y,
                              random_state=SEED)
    return X[tr], y[tr], X[te], y[te]


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_demo_quick_runs_both_parts_through_python_m(tmp_path):
    pytest.importorskip("matplotlib")
    r = subprocess.run([sys.executable, "-m", "nonn", "demo", "--quick", "--out", "out"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    for name in ("table5.csv", "table5.md", "figure8.png", "digits.csv", "digits.md",
                 "digits.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _rows(out / "digits.csv")
    assert [(int(r["digit"]), r["method"]) for r in rows] == [
        (d, m) for d in (0, 1, 2) for m in ("k-NNN", "k-NN")]
    assert "One-class digits" in r.stdout and "Summary:" in r.stdout
    # the printed summary is the table's
    auc = {m: np.mean([float(x["auroc"]) for x in rows if x["method"] == m])
           for m in ("k-NNN", "k-NN")}
    assert f"mean AUROC k-NNN {auc['k-NNN']:.4f}, k-NN {auc['k-NN']:.4f}" in r.stdout
    lead = "k-NNN" if auc["k-NNN"] > auc["k-NN"] else "k-NN"
    assert f"({lead} ahead)" in r.stdout


def test_digits_numbers_match_an_independent_run(tmp_path):
    """Every number of the table recomputed here from the public API: the
    default detectors on the same split, AUROC from scikit-learn, and the
    flagged held-out normals counted from predict."""
    result = run_digits(tmp_path, digits=(3, 8), verbose=False)
    X_tr, y_tr, X_te, y_te = _split()
    by = {(r["digit"], r["method"]): r for r in result["rows"]}
    flagged_total = {"k-NNN": 0, "k-NN": 0}
    normals_total = 0
    for d in (3, 8):
        normal = y_te == d
        normals_total += int(normal.sum())
        for method, det in (("k-NNN", KNNN(contamination=RATE)),
                            ("k-NN", KNN(contamination=RATE))):
            det.fit(X_tr[y_tr == d])
            auc = roc_auc_score(~normal, det.anomaly_score(X_te))
            flagged = int((det.predict(X_te[normal]) == -1).sum())
            assert by[(d, method)]["auroc"] == pytest.approx(auc, abs=1e-12)
            assert by[(d, method)]["flagged"] == flagged
            assert by[(d, method)]["normals"] == int(normal.sum())
            flagged_total[method] += flagged
    for method in ("k-NNN", "k-NN"):
        assert result["false_alarm"][method] == pytest.approx(
            flagged_total[method] / normals_total)
    # the written table holds the same numbers
    rows = _rows(tmp_path / "digits.csv")
    assert len(rows) == 4
    for r in rows:
        assert float(r["auroc"]) == pytest.approx(by[(int(r["digit"]), r["method"])]["auroc"],
                                                  abs=1e-6)


def test_digits_summary_names_the_winner_whichever_it_is(tmp_path):
    result = run_digits(tmp_path, digits=(1,), verbose=False)
    m = result["mean_auroc"]
    lead, other = ("k-NNN", "k-NN") if m["k-NNN"] >= m["k-NN"] else ("k-NN", "k-NNN")
    assert (f"{lead} has the higher mean AUROC ({m[lead]:.4f} against {m[other]:.4f})"
            in result["markdown"])


def test_digits_refuses_unknown_digits(tmp_path):
    with pytest.raises(ValueError, match="digits must be among 0..9"):
        run_digits(tmp_path, digits=(10,), verbose=False)
