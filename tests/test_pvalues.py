"""Conformal p-values and false-discovery control (every detector)."""

import numpy as np
import pytest
from scipy.stats import kstest

from nonn import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN

DETECTORS = [KNNN, KNN, GlobalEigenKNN, LocalEigenKNN]


_MIX = np.random.default_rng(12345).normal(size=(5, 5)) + 2 * np.eye(5)


def _data(seed, n):
    return np.random.default_rng(seed).normal(size=(n, 5)) @ _MIX


def _new_point_pvalues(cls, n_seeds, held_out_calibration):
    """One new normal point per independent (data, model) draw: under
    exchangeability with the calibration normals its p-value is uniform."""
    p = []
    for seed in range(n_seeds):
        X = _data(seed, 221)
        det = cls(n_neighbors_of_neighbors=20) if cls is KNNN else cls()
        det.fit(X[:120])
        if held_out_calibration:
            det.calibrate(X[120:220])
        p.append(det.pvalue(X[220:])[0])
    return np.array(p)


@pytest.mark.parametrize("cls", DETECTORS)
def test_pvalues_of_new_normals_are_uniform(cls):
    # out-of-sample training scores (fit alone): each training row scored by a
    # model fitted without it. Optimistic (in-sample) calibration scores
    # would make new normals' p-values pile up near 0 and fail this.
    p = _new_point_pvalues(cls, 120, held_out_calibration=False)
    assert kstest(p, "uniform").pvalue > 1e-3
    assert 0.3 < np.mean(p <= 0.5) < 0.7


def test_pvalues_after_calibration_are_uniform():
    p = _new_point_pvalues(KNNN, 120, held_out_calibration=True)
    assert kstest(p, "uniform").pvalue > 1e-3


def test_pvalue_hand_computed():
    det = KNN(n_neighbors=1).fit(np.array([[0.0], [1.0], [3.0], [6.0]]))
    det.calibration_scores_ = -np.array([1.0, 2.0, 3.0])  # anomaly scores 1, 2, 3
    # anomaly score of 10.0 is 4: none of the 3 calibration scores >= 4
    np.testing.assert_allclose(det.pvalue(np.array([[10.0], [8.0], [0.0]])),
                               [1 / 4, 3 / 4, 4 / 4])


def test_fdr_control_in_simulation():
    """Benjamini-Hochberg on the p-values: the false-discovery proportion,
    averaged over batches, stays at or below the level asked for, and the
    far anomalies are found."""
    rng = np.random.default_rng(0)
    fdp, power = [], []
    X = _data(0, 2000)
    det = KNNN().fit(X[:1000]).calibrate(X[1000:2000])
    for b in range(40):
        normals = _data(100 + b, 300)
        anomalies = normals[:30] + rng.normal(size=(30, 5)) * 8
        labels = det.predict_fdr(np.vstack([normals, anomalies]), fdr=0.1)
        flagged = labels == -1
        false = flagged[:300].sum()
        fdp.append(false / max(flagged.sum(), 1))
        power.append(flagged[300:].mean())
    assert np.mean(fdp) <= 0.1 + 0.03
    assert np.mean(power) > 0.5


def test_predict_fdr_checks_its_level():
    det = KNN().fit(_data(0, 50))
    with pytest.raises(ValueError, match="fdr must be a float in the range"):
        det.predict_fdr(_data(1, 5), fdr=1.5)


def test_calibrate_refuses_training_rows():
    X = _data(0, 200)
    det = KNNN().fit(X)
    with pytest.raises(ValueError, match="are training rows of this model"):
        det.calibrate(X[:50])
    with pytest.warns(UserWarning, match="calibration rows are training rows"):
        det.calibrate(np.vstack([X[:5], _data(1, 50)]))
