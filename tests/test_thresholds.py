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
    # the conformal threshold is the k-th lowest score, k = floor(rate (n + 1)):
    # k - 1 rows lie below it (fewer where scores tie at it)
    share = np.mean(labels == -1)
    assert contamination - 2.5 / len(X) <= share <= contamination


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_auto_contamination_is_documented_default(cls):
    det = cls().fit(data())
    assert det.contamination_ == AUTO_CONTAMINATION == 0.01
    # the conformal k-th lowest of the 400, k = floor(0.01 * 401) = 4: 3 below it
    assert np.sum(det.train_scores_ < det.offset_) == 3


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
    # and it is not the in-sample score, where the point is its own neighbor
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
    # k = floor(rate * 501) of the 500 calibration scores: k - 1 lie below it
    assert np.sum(det.predict(X[500:]) == -1) == int(np.floor(rate * 501 + 1e-9)) - 1
    assert det.contamination_ == rate
    np.testing.assert_array_equal(det.eigenvectors_, eigvecs)  # no refit
    fresh = rng.normal(size=(4000, 5))
    assert np.mean(det.predict(fresh) == -1) == pytest.approx(rate, abs=0.03)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "x"])
def test_calibrate_rejects_bad_rate(bad):
    det = KNN().fit(data())
    with pytest.raises(ValueError, match="false_alarm_rate"):
        det.calibrate(data(5), false_alarm_rate=bad)


def _embedding_like(rng, n, d=300, rank=150):
    """Rows near a low-rank subspace with varying norms (more features than
    a small training set can pin down: a whitening estimated from the rows
    it scores overfits them)."""
    basis = rng.normal(size=(rank, d))
    return (rng.normal(size=(n, rank)) @ basis + 0.5 * rng.normal(size=(n, d))) * \
        rng.uniform(0.5, 2, size=(n, 1))


def test_whitening_is_estimated_without_the_calibration_rows():
    from nonn._preprocess import fit_whitening, l2_rows

    rng = np.random.default_rng(0)
    X = _embedding_like(rng, 300)
    det = KNNN().fit(X)  # 300 features: unit rows and whitening 0.5
    assert det.whiten_ == 0.5
    rows = det.calibration_rows_
    assert len(rows) == 150 and len(np.unique(rows)) == 150
    mean, W = fit_whitening(np.delete(l2_rows(X), rows, axis=0), 0.5)
    np.testing.assert_allclose(det.whiten_mean_, mean, rtol=1e-10)
    np.testing.assert_allclose(det.whiten_matrix_, W, rtol=1e-8, atol=1e-12)
    # fit_predict scores every row; its whitening then sees all of them
    KNNN(contamination=0.1).fit_predict(X)


@pytest.mark.parametrize("n", [300, 4500])  # half the rows; 2,000 of them
def test_whitened_fit_is_the_same_for_its_rows_in_any_order(n):
    """The calibration rows (and with them the whitening, every score and
    the threshold) are picked by the rows' values: shuffled training rows
    give the same model. (Picked by position, the whitening came from
    other rows and scores moved by up to 8 % of their range.)"""
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64))).astype(np.float32)
    X[5] = X[9]  # tied rows: either copy may be picked, the model is the same
    Q = rng.normal(size=(30, 64)).astype(np.float32)
    p = rng.permutation(n)
    a, b = KNNN(backend="brute").fit(X), KNNN(backend="brute").fit(X[p])
    assert a.whiten_ == 0.5 and len(a.calibration_rows_) == min(2000, n // 2)
    np.testing.assert_array_equal(np.sort(X[a.calibration_rows_], axis=0),
                                  np.sort(X[p][b.calibration_rows_], axis=0))
    np.testing.assert_array_equal(a.whiten_matrix_, b.whiten_matrix_)
    np.testing.assert_allclose(a.score_samples(Q), b.score_samples(Q), rtol=1e-5)
    np.testing.assert_allclose(np.sort(a.calibration_scores_), np.sort(b.calibration_scores_),
                               rtol=1e-5)
    assert a.offset_ == pytest.approx(b.offset_, rel=1e-5)


def test_row_keys_follow_the_values_not_the_positions():
    from nonn._base import calibration_rows, row_keys

    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, 7)) @ rng.normal(size=(7, 7)) + 5.0
    keys = row_keys(X)
    assert keys.min() >= 0 and keys.max() < 1 and len(np.unique(keys)) == 2000
    p = rng.permutation(2000)
    np.testing.assert_array_equal(row_keys(X[p]), keys[p])
    # the rows of smallest keys: about a uniform half, in every region of the data
    rows = calibration_rows(2000, keys=keys)
    np.testing.assert_array_equal(rows, np.sort(np.argsort(keys)[:1000]))
    for col in range(7):
        low = X[:, col] < np.median(X[:, col])
        assert 0.44 < np.mean(np.isin(np.flatnonzero(low), rows)) < 0.56
    # values changed by rounding (float32) move a few rows, not a new draw
    moved = np.setdiff1d(rows, calibration_rows(2000, keys=row_keys(X.astype(np.float32))))
    assert len(moved) <= 10


@pytest.mark.parametrize("rate", [0.05, 0.1])
def test_whitened_threshold_holds_on_new_normal_data(rate):
    """With more features than rows can pin down, the threshold still
    flags about the share asked of new normal data (a whitening estimated
    with the calibration rows in it flagged 92 % for 5 % asked here)."""
    flagged, total = 0, 0
    for seed in range(4):
        X = _embedding_like(np.random.default_rng(seed), 600)  # one basis: one distribution
        train, new = X[:200], X[200:]
        det = KNNN(contamination=rate).fit(train)
        flagged += int((det.predict(new) == -1).sum())
        total += len(new)
    assert 0.5 * rate <= flagged / total <= 2 * rate, flagged / total
