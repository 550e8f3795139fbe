"""``fit_predict`` labels the training rows themselves: it warns that nonn's
detectors model clean normal data, with what to do instead."""

import warnings

import numpy as np
import pytest

from nonn import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN

DETECTORS = [KNNN, KNN, GlobalEigenKNN, LocalEigenKNN]


def _data():
    rng = np.random.default_rng(0)
    return np.vstack([rng.normal(size=(120, 6)), 6 + rng.normal(size=(6, 6))])


@pytest.mark.parametrize("cls", DETECTORS)
def test_fit_predict_warns_once_per_call_with_the_advice(cls):
    X = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = cls().fit_predict(X)
    ours = [w for w in caught if "clean normal data" in str(w.message)]
    assert len(ours) == 1
    w = ours[0]
    assert issubclass(w.category, UserWarning)
    text = str(w.message)
    assert text.startswith(f"{cls.__name__}.fit_predict labels the training rows themselves")
    for advice in ("fit on rows known to be normal", "calibrate on other normal rows",
                   "clean the data first", "isolation forest", "Contaminated training data"):
        assert advice in text
    # it points at the caller's line, not at nonn's internals
    assert w.filename == __file__
    # and it is only a warning: the labels are still fit_predict's
    assert labels.shape == (len(X),) and set(labels) <= {-1, 1}


@pytest.mark.parametrize("cls", DETECTORS)
def test_fit_and_scores_do_not_warn(cls):
    X = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det = cls().fit(X)
        det.predict(X)
        det.pvalue(X)

