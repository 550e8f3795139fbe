"""The eigenvalue floor relative to each neighbor's own neighborhood
(``eig_floor_ref="neighborhood"``) against the naive loop version of Eq. 2,
and what must hold with it: lean memory, model files, invariances, and the
default's data-relative floor unchanged."""

import json

import numpy as np
import pytest

from nonn import KNNN, load
from nonn._base import LOCAL_FLOOR_MIN

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


def test_the_default_is_the_data_floor():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 70))
    Q = rng.normal(size=(10, 70)) * 2
    assert KNNN().eig_floor_ref == KNNN.paper().eig_floor_ref == "data"
    det = KNNN().fit(X)
    assert det._floor_local() is None
    np.testing.assert_array_equal(det.anomaly_score(Q),
                                  KNNN(eig_floor_ref="data").fit(X).anomaly_score(Q))


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
    """A model file without ``eig_floor_ref`` (written before it existed)
    loads with the data-relative floor it was fitted with."""
    rng = np.random.default_rng(3)
    X, Q = rng.normal(size=(150, 70)), rng.normal(size=(8, 70))
    det = KNNN(eig_floor_ref="data").fit(X)
    det.save(tmp_path / "new.nonn")
    with np.load(tmp_path / "new.nonn", allow_pickle=False) as npz:
        payload = {k: npz[k] for k in npz.files}
    meta = json.loads(bytes(payload["__meta__"]).decode())
    del meta["params"]["eig_floor_ref"]
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(tmp_path / "old.nonn", "wb") as fh:
        np.savez(fh, **payload)
    old = load(tmp_path / "old.nonn")
    assert old.eig_floor_ref == "data"
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
