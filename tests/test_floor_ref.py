"""The eigenvalue floor relative to each neighbor's own neighborhood
(``eig_floor_ref="neighborhood"``) against the naive loop version of Eq. 2;
the label-free ``"auto"`` choice between it and the data's floor; lean
memory, model files, partial_fit and invariances with both."""

import json

import numpy as np
import pytest

from nonn import KNNN, load
from nonn._base import AUTO_FLOOR_SPREAD, LOCAL_FLOOR_MIN
from nonn._update import frozen_fit

from oracles import naive_greedy_order, naive_knnn_scores


def clusters(seed, d=12, n=160, n_q=14):
    """Two clusters of different spread: a floor relative to the data is
    large for the tight one and small for the wide one."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d))
    X = np.vstack([rng.normal(size=(n // 2, d)) @ A * 0.05,
                   5 + rng.normal(size=(n - n // 2, d)) @ A])
    Q = np.vstack([X[:n_q // 2] + 0.1 * rng.normal(size=(n_q // 2, d)),
                   X[-n_q // 2:] + rng.normal(size=(n_q - n_q // 2, d))])
    return X, Q


@pytest.mark.parametrize("L,Kp", [(5, 15), (12, 15), ("all", 8)])  # primal; one set; dual
@pytest.mark.parametrize("aggregate", ["sum", "min"])
def test_scores_match_naive_eq2(L, Kp, aggregate):
    X, Q = clusters(0)
    d = X.shape[1]
    L_num = d if L == "all" else L
    order = naive_greedy_order(X, L_num) if L_num < d else list(range(d))
    det = KNNN(n_neighbors=3, n_neighbors_of_neighbors=Kp, set_size=L, eig_floor=0.2,
               eig_floor_ref="neighborhood", aggregate=aggregate, normalize=None, whiten=0.0,
               backend="brute").fit(X)
    want = naive_knnn_scores(X, Q, 3, Kp, L_num, order, LOCAL_FLOOR_MIN, aggregate=aggregate,
                             local=0.2)
    np.testing.assert_allclose(det.anomaly_score(Q), want, rtol=1e-9)
    # the data-relative floor gives other scores on this data
    data = KNNN(**{**det.get_params(), "eig_floor_ref": "data"}).fit(X)
    assert not np.allclose(data.anomaly_score(Q), want, rtol=1e-3)


def populations(seed, d=70, spreads=(0.05, 1.0), n=150):
    """Embedding-like rows: populations around centres of norm 10, each
    with its own spread (or one population)."""
    rng = np.random.default_rng(seed)
    parts = []
    for s in spreads:
        centre = rng.normal(size=d)
        parts.append(10 * centre / np.linalg.norm(centre)
                     + s * rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d))
    return np.vstack(parts), rng


def naive_spread(X, Kp=25):
    """The oracle of "auto": std of log(trace of each neighborhood's
    covariance) after the default's unit rows and whitening (all rows)."""
    from sklearn.covariance import LedoitWolf

    Xu = X / np.linalg.norm(X, axis=1, keepdims=True)
    lw = LedoitWolf().fit(Xu)
    C = lw.covariance_
    iso = np.trace(C) / C.shape[0]
    e, V = np.linalg.eigh(0.5 * C + 0.5 * iso * np.eye(C.shape[0]))
    Xw = (Xu - lw.location_) @ V @ np.diag(np.sqrt(iso / e)) @ V.T
    d2 = ((Xw[:, None, :] - Xw[None, :, :]) ** 2).sum(-1)
    traces = [np.trace(np.cov(Xw[np.argsort(d2[i], kind="stable")[:Kp]].T, bias=True))
              for i in range(len(Xw))]
    return np.std(np.log(traces))


def test_auto_picks_the_neighborhood_floor_for_populations_of_different_spread():
    X, rng = populations(1)
    det = KNNN(contamination=0.1).fit(X)
    assert det.eig_floor_ref == "auto"
    assert det.eig_floor_spread_ > AUTO_FLOOR_SPREAD and det.eig_floor_ref_ == "neighborhood"
    Q = X[::7] + 0.05 * rng.normal(size=X[::7].shape)
    s = det.anomaly_score(Q)
    np.testing.assert_array_equal(
        s, KNNN(contamination=0.1, eig_floor_ref="neighborhood").fit(X).anomaly_score(Q))
    # lean memory reads the spread from the rows, not the eigenvalues: the same pick
    lean = KNNN(contamination=0.1, memory="lean").fit(X)
    assert lean.eig_floor_ref_ == "neighborhood"
    np.testing.assert_allclose(lean.eig_floor_spread_, det.eig_floor_spread_, rtol=1e-9)
    np.testing.assert_array_equal(lean.anomaly_score(Q), s)


def test_auto_keeps_the_data_floor_for_one_population_and_for_tables():
    X, rng = populations(2, spreads=(1.0,))
    det = KNNN().fit(X)
    assert det.eig_floor_spread_ < AUTO_FLOOR_SPREAD and det.eig_floor_ref_ == "data"
    assert det._floor_local() is None
    Q = X[:10] + rng.normal(size=(10, X.shape[1]))
    np.testing.assert_array_equal(det.anomaly_score(Q),
                                  KNNN(eig_floor_ref="data").fit(X).anomaly_score(Q))
    # below 64 features the data's floor, whatever the spread
    T, _ = populations(3, d=12)
    tab = KNNN().fit(T)
    assert tab.eig_floor_spread_ > AUTO_FLOOR_SPREAD and tab.eig_floor_ref_ == "data"
    assert KNNN.paper().eig_floor_ref == "data" and KNNN.paper().fit(X).eig_floor_spread_ is None


def test_the_spread_matches_a_naive_computation():
    for seed, spreads in ((4, (0.05, 1.0)), (5, (1.0,))):
        X, _ = populations(seed, spreads=spreads)
        det = KNNN()
        det._calibrate_all = True  # the whitening from every row, as the oracle's
        det.fit(X)
        np.testing.assert_allclose(det.eig_floor_spread_, naive_spread(X), rtol=1e-6)


def test_auto_is_frozen_by_partial_fit_and_kept_in_files(tmp_path):
    X, rng = populations(6)
    det = KNNN(contamination=0.1).fit(X[:250])
    assert det.eig_floor_ref_ == "neighborhood"
    new = X[250:] + 0.01 * rng.normal(size=X[250:].shape)
    ref = frozen_fit(det, np.vstack([X[:250], new]))
    det.partial_fit(new)
    assert det.eig_floor_ref_ == ref.eig_floor_ref_ == "neighborhood"
    Q = X[::9]
    np.testing.assert_allclose(det.anomaly_score(Q), ref.anomaly_score(Q), rtol=1e-9)
    det.save(tmp_path / "m.nonn")
    back = load(tmp_path / "m.nonn")
    assert (back.eig_floor_ref_, back.eig_floor_spread_) == (det.eig_floor_ref_,
                                                            det.eig_floor_spread_)
    np.testing.assert_array_equal(back.anomaly_score(Q), det.anomaly_score(Q))


def test_bad_value_is_refused():
    with pytest.raises(ValueError, match="eig_floor_ref"):
        KNNN(eig_floor_ref="local").fit(np.random.default_rng(0).normal(size=(50, 4)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lean_equals_precomputed_and_files_round_trip(dtype, tmp_path):
    X, Q = clusters(2)
    X, Q = X.astype(dtype), Q.astype(dtype)
    params = dict(set_size="all", n_neighbors_of_neighbors=10, eig_floor=0.1,
                  eig_floor_ref="neighborhood")
    full = KNNN(**params).fit(X)
    lean = KNNN(memory="lean", **params).fit(X)
    np.testing.assert_array_equal(lean.train_scores_, full.train_scores_)
    np.testing.assert_array_equal(lean.anomaly_score(Q), full.anomaly_score(Q))
    full.save(tmp_path / "m.nonn")
    back = load(tmp_path / "m.nonn")
    assert back.eig_floor_ref == "neighborhood"
    np.testing.assert_array_equal(back.anomaly_score(Q), full.anomaly_score(Q))


def test_a_file_written_before_the_parameter_keeps_its_floor(tmp_path):
    """A model file without ``eig_floor_ref`` and ``eig_floor_ref_``
    (written before they existed) loads with the data-relative floor it was
    fitted with."""
    X, _ = populations(7)
    Q = X[::11]
    det = KNNN(eig_floor_ref="data").fit(X)
    det.save(tmp_path / "new.nonn")
    with np.load(tmp_path / "new.nonn", allow_pickle=False) as npz:
        payload = {k: npz[k] for k in npz.files}
    meta = json.loads(bytes(payload["__meta__"]).decode())
    del meta["params"]["eig_floor_ref"]
    del meta["fitted"]["eig_floor_ref_"], meta["fitted"]["eig_floor_spread_"]
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(tmp_path / "old.nonn", "wb") as fh:
        np.savez(fh, **payload)
    old = load(tmp_path / "old.nonn")
    assert old.eig_floor_ref_ == "data" and old.eig_floor_spread_ is None
    np.testing.assert_array_equal(old.anomaly_score(Q), det.anomaly_score(Q))


def test_scores_do_not_depend_on_the_data_scale():
    X, Q = clusters(4)
    params = dict(set_size="all", n_neighbors_of_neighbors=10, eig_floor=0.3,
                  eig_floor_ref="neighborhood", normalize=None, whiten=0.0)
    a = KNNN(**params).fit(X).anomaly_score(Q)
    b = KNNN(**params).fit(X * 37.0 + 5.0).anomaly_score(Q * 37.0 + 5.0)
    np.testing.assert_allclose(a, b, rtol=1e-7)


def test_copies_get_the_minimum_floor_not_zero():
    """A neighborhood of copies has no variance: its floor is the data's
    LOCAL_FLOOR_MIN, so scores stay finite and an exact copy scores 0."""
    rng = np.random.default_rng(5)
    X = np.vstack([np.repeat(rng.normal(size=(1, 6)), 30, axis=0), rng.normal(size=(80, 6))])
    det = KNNN(n_neighbors_of_neighbors=10, set_size="all", eig_floor=0.1,
               eig_floor_ref="neighborhood").fit(X)
    s = det.anomaly_score(np.vstack([X[:1], X[:1] + 1e-3]))
    assert np.isfinite(s).all() and s[0] == 0 and s[1] > 0
