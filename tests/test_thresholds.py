import numpy as np
import pytest

from nonn import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN
from nonn._base import AUTO_CONTAMINATION

ESTIMATORS = [KNNN, KNN, GlobalEigenKNN, LocalEigenKNN]


def data(seed=0, n=400, d=6):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d))


@pytest.mark.parametrize("cls", ESTIMATORS)
@pytest.mark.parametrize("contamination", [0.05, 0.1, 0.25])
def test_contamination_share_of_training_flagged(cls, contamination):
    X = data()
    labels = cls(contamination=contamination).fit_predict(X)
    assert np.mean(labels == -1) == pytest.approx(contamination, abs=1.5 / len(X))


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_auto_contamination_is_documented_default(cls):
    det = cls().fit(data())
    assert det.contamination_ == AUTO_CONTAMINATION == 0.01
    assert np.mean(det.train_scores_ < det.offset_) == pytest.approx(0.01, abs=1 / 400)


def test_leave_one_out_training_scores():
    """A training point does not count itself: its LOO score equals the
    score it would get from a model fitted without it... for plain k-NN
    (whose state does not depend on the other points)."""
    X = data(1, n=60)
    det = KNN(n_neighbors=3).fit(X)
    for i in [0, 17, 59]:
        rest = np.delete(X, i, axis=0)
        alone = KNN(n_neighbors=3).fit(rest).anomaly_score(X[i:i + 1])[0]
        assert -det.train_scores_[i] == pytest.approx(alone)
    # and it is not the in-sample score, where the point is its own neighbour
    assert np.all(-det.train_scores_ > det.anomaly_score(X))


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_decision_predict_consistent(cls):
    X = data(2)
    det = cls(contamination=0.1).fit(X)
    Q = data(3, n=200)
    dec = det.decision_function(Q)
    np.testing.assert_allclose(dec, det.score_samples(Q) - det.offset_)
    np.testing.assert_array_equal(det.predict(Q), np.where(dec < 0, -1, 1))
    np.testing.assert_array_equal(det.score_samples(Q), -det.anomaly_score(Q))


@pytest.mark.parametrize("rate", [0.02, 0.1])
def test_calibrate_on_held_out_normals(rate):
    rng = np.random.default_rng(4)
    X = rng.normal(size=(1000, 5))
    det = KNNN().fit(X[:500])
    eigvecs = det.eigenvectors_.copy()
    det.calibrate(X[500:], false_alarm_rate=rate)
    assert np.mean(det.predict(X[500:]) == -1) == pytest.approx(rate, abs=1 / 500)
    assert det.contamination_ == rate
    np.testing.assert_array_equal(det.eigenvectors_, eigvecs)  # no refit
    fresh = rng.normal(size=(4000, 5))
    assert np.mean(det.predict(fresh) == -1) == pytest.approx(rate, abs=0.03)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "x"])
def test_calibrate_rejects_bad_rate(bad):
    det = KNN().fit(data())
    with pytest.raises(ValueError, match="false_alarm_rate"):
        det.calibrate(data(5), false_alarm_rate=bad)
