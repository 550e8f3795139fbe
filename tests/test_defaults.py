"""KNNN's defaults: what ``KNNN()`` computes, checked against an independent
oracle (unit rows and Ledoit-Wolf whitening written out with scikit-learn,
then the naive loop version of Eq. 2), and the paper-exact operator one call
away."""

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from nonn import KNNN
from nonn.evaluation import DETECTORS

from oracles import naive_greedy_order, naive_knnn_scores


def _embeddings(n, d, seed):
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(6, d))
    return rng.normal(size=(n, 6)) @ basis + 0.3 * rng.normal(size=(n, d)) + 2.0


def _whitened(X, Q, strength, held=()):
    """Oracle of the default's embedding transforms: unit rows, then the
    ZCA whitening of the Ledoit-Wolf covariance blended with the isotropic
    one of equal trace, learned on the training rows except ``held`` (the
    calibration rows)."""
    Xu = X / np.linalg.norm(X, axis=1, keepdims=True)
    Qu = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    lw = LedoitWolf().fit(np.delete(Xu, np.asarray(held, dtype=int), axis=0))
    C = lw.covariance_
    iso = np.trace(C) / C.shape[0]
    S = strength * C + (1 - strength) * iso * np.eye(C.shape[0])
    e, V = np.linalg.eigh(S)
    W = V @ np.diag(np.sqrt(iso / e)) @ V.T
    return (Xu - lw.location_) @ W, (Qu - lw.location_) @ W


def test_default_parameters():
    p = KNNN().get_params()
    assert p["n_neighbors"] == 3
    assert p["n_neighbors_of_neighbors"] == 25
    assert p["set_size"] == "all"
    assert p["aggregate"] == "min"
    assert (p["normalize"], p["whiten"], p["eig_floor"], p["eig_floor_ref"]) == (
        "auto", "auto", "auto", "auto")


def test_paper_operator_is_one_call_away():
    det = KNNN.paper()
    p = det.get_params()
    assert {k: p[k] for k in KNNN.PAPER_PARAMS} == KNNN.PAPER_PARAMS
    assert (p["n_neighbors_of_neighbors"], p["set_size"], p["aggregate"]) == (25, 5, "sum")
    assert (p["normalize"], p["whiten"], p["eig_floor_ref"]) == (None, 0.0, "data")
    # overridable, and the benchmark registry's "KNNN-paper" is the same operator
    assert KNNN.paper(n_neighbors=5).n_neighbors == 5
    assert DETECTORS["KNNN-paper"].make(0).get_params() == KNNN.paper().get_params()


def test_paper_operator_matches_naive_eq2():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(80, 10)) @ rng.normal(size=(10, 10))
    Q = rng.normal(size=(12, 10)) @ rng.normal(size=(10, 10))
    det = KNNN.paper(backend="brute").fit(X)
    order = naive_greedy_order(X, 5)
    want = naive_knnn_scores(X, Q, 3, 25, 5, order, 0.0, aggregate="sum",
                             floors=[10 * np.finfo(np.float64).eps * np.mean(X[:, order[s:s + 5]]
                                                                               .var(0))
                                     for s in range(0, 10, 5)])
    np.testing.assert_allclose(det.anomaly_score(Q), want, rtol=1e-6)


def test_default_on_embeddings_matches_oracle():
    X = _embeddings(150, 64, 0)
    Q = np.vstack([_embeddings(10, 64, 1), np.random.default_rng(2).normal(size=(5, 64))])
    det = KNNN(backend="brute").fit(X)
    assert det.normalize_ == "l2" and det.whiten_ == 0.5 and det.eig_floor_rel_ == 0.1
    assert det.eig_floor_ref_ == "data"  # one population: the data's floor
    # half the rows calibrate (picked by their values); the whitening is learned from the rest
    held = det.calibration_rows_
    assert len(held) == 75 and len(np.unique(held)) == 75
    np.testing.assert_array_equal(KNNN(backend="brute").fit(X).calibration_rows_, held)
    Xw, Qw = _whitened(X, Q, 0.5, held)
    want = naive_knnn_scores(Xw, Qw, 3, 25, 64, list(range(64)), 0.1, aggregate="min")
    np.testing.assert_allclose(det.anomaly_score(Q), want, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("d", [8, 21])  # the SIMD Jacobi solver, and LAPACK's (L > 8)
def test_default_on_tabular_matches_oracle(d, dtype):
    rng = np.random.default_rng(4)
    X = (rng.normal(size=(120, d)) * rng.uniform(0.5, 3, size=d)).astype(dtype)
    Q = np.vstack([rng.normal(size=(8, d)), 4 + rng.normal(size=(3, d))]).astype(dtype)
    det = KNNN(backend="brute").fit(X)
    assert det.normalize_ is None and det.whiten_ == 0.0 and det.eig_floor_rel_ == 1.0
    assert det.eig_floor_ref_ == "data"
    want = naive_knnn_scores(X.astype(np.float64), Q.astype(np.float64), 3, 25, d,
                             list(range(d)), 1.0, aggregate="min")
    rtol = 1e-6 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(det.anomaly_score(Q), want, rtol=rtol)


@pytest.mark.parametrize("d", [8, 64])
def test_default_flags_far_points(d):
    X = _embeddings(200, d, 5)
    # 10 standard deviations off in random directions (and in direction too)
    far = X.mean(0) + 10 * X.std(0) * np.random.default_rng(6).choice([-1, 1], size=(5, d))
    det = KNNN().fit(X)
    assert (det.predict(far) == -1).all()
    assert (det.predict(X[:50]) == 1).mean() > 0.9
