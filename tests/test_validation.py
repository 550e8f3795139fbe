import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from nonn import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN

ESTIMATORS = [KNNN, KNN, GlobalEigenKNN, LocalEigenKNN]
X = np.random.default_rng(0).normal(size=(50, 6))


@pytest.mark.parametrize("cls", ESTIMATORS)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_rejected_in_fit_and_score(cls, value):
    Xb = X.copy()
    Xb[3, 2] = value
    with pytest.raises(ValueError, match="(NaN|infinity).*Remove or impute"):
        cls().fit(Xb)
    det = cls().fit(X)
    with pytest.raises(ValueError, match="(NaN|infinity).*Remove or impute"):
        det.anomaly_score(Xb)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_wrong_number_of_features(cls):
    det = cls().fit(X)
    with pytest.raises(ValueError,
                       match="X has 5 features, but .* is expecting 6 features.*same columns"):
        det.predict(X[:, :5])


@pytest.mark.parametrize("cls", ESTIMATORS)
@pytest.mark.parametrize("bad", [np.empty((0, 6)), X[:1]])
def test_empty_or_single_row_training(cls, bad):
    with pytest.raises(ValueError, match="minimum of 2 is required.*at least 2 training rows"):
        cls().fit(bad)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_one_dimensional_input(cls):
    with pytest.raises(ValueError, match="(?s)Expected 2D array.*reshape"):
        cls().fit(X[:, 0])


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_non_numeric_input(cls):
    Xs = X.astype(object)
    Xs[0, 0] = "abc"
    with pytest.raises((ValueError, TypeError), match="numeric"):
        cls().fit(Xs)


@pytest.mark.parametrize(
    "cls,param,value,pattern",
    [
        (KNNN, "n_neighbors", 0,
         r"The 'n_neighbors' parameter of KNNN must be an int in the range \[1, inf\) or a str "
         r"among \{'auto'\}. Got 0 instead. For example: KNNN\(n_neighbors=3\)"),
        (KNNN, "aggregate", "mean",
         r"'aggregate' parameter of KNNN must be a str among \{'min', 'sum'\}. Got 'mean' "
         r"instead. For example: KNNN\(aggregate='min'\)"),
        (KNNN, "memory", "disk",
         r"'memory' parameter of KNNN must be a str among \{'precomputed', 'lean'\}"),
        (KNNN, "set_size", "big",
         r"'set_size' parameter of KNNN must be an int in the range \[1, inf\) or a str among "
         r"\{'auto', 'all'\}"),
        (KNNN, "n_neighbors_of_neighbors", 2.5,
         "'n_neighbors_of_neighbors' parameter of KNNN must be an int"),
        (KNNN, "set_size", -1, "'set_size' parameter"),
        (KNNN, "reorder", "random",
         r"'reorder' parameter of KNNN must be a str among \{'greedy', 'none'\}. Got 'random'"),
        (KNNN, "backend", "gpu-magic", "'backend' parameter"),
        (KNNN, "metric", "manhattan", "'metric' parameter"),
        (KNNN, "contamination", 0.7,
         r"'contamination' parameter of KNNN must be a str among \{'auto'\} or a float in the "
         r"range \(0, 0.5\]"),
        (KNNN, "eig_floor", -1.0, "'eig_floor' parameter"),
        (KNN, "aggregate", "median", "'aggregate' parameter of KNN"),
        (KNN, "n_neighbors", True, "'n_neighbors' parameter of KNN"),
        (GlobalEigenKNN, "working_memory", 0, "'working_memory' parameter"),
        (LocalEigenKNN, "n_jobs", 0, "'n_jobs' parameter"),
    ],
)
def test_bad_parameters(cls, param, value, pattern):
    det = cls(**{param: value})
    with pytest.raises(ValueError, match=pattern):
        det.fit(X)
    assert getattr(det, param) is value  # never rewritten


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_unfitted(cls):
    for method in ["anomaly_score", "score_samples", "decision_function", "predict"]:
        with pytest.raises(NotFittedError):
            getattr(cls(), method)(X)


def test_integer_input_becomes_float64():
    Xi = (X * 10).astype(np.int64)
    det = KNNN().fit(Xi)
    assert det.anomaly_score(Xi).dtype == np.float64


def test_bad_input_does_not_change_fitted_state():
    det = KNNN().fit(X)
    before = det.anomaly_score(X[:5])
    with pytest.raises(ValueError):
        det.fit(np.full((10, 6), np.nan))
    np.testing.assert_array_equal(det.anomaly_score(X[:5]), before)
