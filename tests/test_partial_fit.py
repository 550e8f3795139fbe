"""partial_fit: new normal samples without a refit, equal to a fit on all
rows with the first fit's global statistics; `nonn update`.

References: ``frozen_fit`` (a fit from scratch on all rows with the frozen
statistics, itself checked against ``fit``), a plain ``fit`` on all rows
where nothing frozen differs (the graph and eigen-states), and the naive
oracle of tests/oracles.py with the frozen floors (the held-out scores).
"""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from oracles import naive_floor, naive_knnn_scores, naive_sets

from nonn import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN, load
from nonn._base import CappedParameterWarning
from nonn._update import frozen_fit

TOL = 1e-9


def data(seed=0, n=150, n_new=40, d=10, n_q=20):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) + 2 * np.eye(d)
    X = rng.normal(size=(n, d)) @ A
    X_new = rng.normal(size=(n_new, d)) @ A
    Q = rng.normal(size=(n_q, d)) @ A * 1.3
    return X, X_new, Q


def add_in_batches(det, X_new, batches):
    start = 0
    for size in batches:
        det.partial_fit(X_new[start:start + size])
        start += size
    assert start == len(X_new)
    return det


KNNN_STATE_INT = ("neighborhoods_", "calibration_rows_", "feature_order_", "set_sizes_")
KNNN_STATE_REAL = ("eigenvalues_", "eigenvectors_", "train_scores_", "calibration_scores_",
                   "eig_floor_", "_fit_X")


def assert_same_state(a, b, ints=KNNN_STATE_INT, reals=KNNN_STATE_REAL, Q=None):
    for name in ints:
        if hasattr(b, name):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in reals:
        if hasattr(b, name):
            x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
            assert x.shape == y.shape, name
            np.testing.assert_allclose(x, y, rtol=0, atol=TOL * max(np.abs(y).max(), 1.0),
                                       err_msg=name)
        else:
            assert not hasattr(a, name), name
    np.testing.assert_allclose(a.offset_, b.offset_, rtol=TOL)
    assert a.threshold_source_ == b.threshold_source_
    assert a.n_samples_seen_ == b.n_samples_seen_ == len(b._fit_X)
    if Q is not None:
        np.testing.assert_allclose(a.anomaly_score(Q), b.anomaly_score(Q), rtol=TOL)


# ---------------------------------------------------------------- KNNN
PARAMS = [
    dict(n_neighbors=3, n_neighbors_of_neighbors=15, set_size=4),
    dict(n_neighbors=3, n_neighbors_of_neighbors=12, set_size=3, aggregate="sum",
         memory="lean"),
    dict(n_neighbors=4, n_neighbors_of_neighbors=8, set_size="all"),  # dual form
    dict(n_neighbors=3, n_neighbors_of_neighbors=10, set_size=4, scale="standard",
         normalize="l2", whiten=0.6),
    dict(n_neighbors=12, n_neighbors_of_neighbors=6, set_size=5),  # k > K'
    dict(n_neighbors=3, n_neighbors_of_neighbors=10, set_size="all", eig_floor=0.2,
         eig_floor_ref="neighborhood"),
]


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("batches", [[1] * 12 + [28], [40], [7, 13, 20]])
def test_knnn_equals_a_fit_on_all_rows_with_frozen_statistics(params, batches):
    """One row at a time, one batch, several batches: neighborhoods,
    eigen-states, calibration rows, held-out scores, threshold and query
    scores equal the frozen fit on all rows (float64, 1e-9)."""
    X, X_new, Q = data(1)
    det = add_in_batches(KNNN(**params).fit(X), X_new, batches)
    ref = frozen_fit(KNNN(**params).fit(X), np.vstack([X, X_new]))
    assert_same_state(det, ref, Q=Q)
    np.testing.assert_array_equal(det._graph_tail, ref._graph_tail)


@pytest.mark.parametrize("params", PARAMS[:4])
def test_frozen_fit_on_the_fitted_rows_is_fit(params):
    """The reference itself: with the statistics fit learns from the same
    rows, frozen_fit reproduces fit exactly."""
    X, _, Q = data(2)
    det = KNNN(**params).fit(X)
    assert_same_state(frozen_fit(det, X), det, Q=Q)


def test_graph_and_eigen_state_equal_a_plain_fit_on_all_rows():
    """Where the frozen statistics cannot differ from the union's (no
    re-ordering, no transforms), the neighborhoods and eigen-states are
    those of KNNN.fit on all rows (only the floors, variances of the data,
    differ)."""
    X, X_new, _ = data(3)
    params = dict(n_neighbors=3, n_neighbors_of_neighbors=15, set_size=4, reorder="none")
    det = add_in_batches(KNNN(**params).fit(X), X_new, [1, 1, 38])
    fresh = KNNN(**params).fit(np.vstack([X, X_new]))
    np.testing.assert_array_equal(det.neighborhoods_, fresh.neighborhoods_)
    np.testing.assert_allclose(det.eigenvalues_, fresh.eigenvalues_, rtol=0, atol=1e-12)
    np.testing.assert_allclose(det.eigenvectors_, fresh.eigenvectors_, rtol=0, atol=1e-12)


def test_held_out_scores_match_the_naive_oracle_with_frozen_floors():
    """Each calibration row scored by a naive model fitted on all other rows
    with the first fit's feature order and floors."""
    X, X_new, Q = data(4, n=50, n_new=12, d=6, n_q=8)
    k, Kp, L, rel = 3, 10, 3, 1e-2
    det = KNNN(n_neighbors=k, n_neighbors_of_neighbors=Kp, set_size=L, eig_floor=rel,
               aggregate="sum").fit(X)
    order = det.feature_order_
    floors = naive_floor(X[:, order], naive_sets(X.shape[1], L), rel)
    add_in_batches(det, X_new, [1, 5, 6])
    U = np.vstack([X, X_new])
    loo = [naive_knnn_scores(np.delete(U, p, axis=0), U[p:p + 1], k, Kp, L, order, rel,
                             aggregate="sum", floors=floors)[0] for p in range(len(U))]
    np.testing.assert_allclose(-det.train_scores_, loo, rtol=1e-6)
    np.testing.assert_allclose(det.anomaly_score(Q), naive_knnn_scores(
        U, Q, k, Kp, L, order, rel, aggregate="sum", floors=floors), rtol=1e-6)


def test_calibration_subset_beyond_the_cap(monkeypatch):
    """Above CALIBRATION_ROWS a fit scores a seeded subset that depends on
    the row count: after an update it is the union's subset."""
    from nonn import _base

    monkeypatch.setattr(_base, "CALIBRATION_ROWS", 60)
    X, X_new, Q = data(5)
    params = dict(n_neighbors=3, n_neighbors_of_neighbors=12, set_size=4)
    det = add_in_batches(KNNN(**params).fit(X), X_new, [3, 37])
    assert det.calibration_rows_.shape == (60,)
    assert_same_state(det, frozen_fit(KNNN(**params).fit(X), np.vstack([X, X_new])), Q=Q)


def test_only_changed_calibration_rows_are_rescored(monkeypatch):
    """A calibration row is rescored only if its list or one of its k
    neighbors' lists changed; the others keep their scores (and those are
    what a fresh computation gives)."""
    from nonn import _knnn

    X, X_new, _ = data(6, n=300, n_new=3)
    det = KNNN(n_neighbors=3, n_neighbors_of_neighbors=10, set_size=4).fit(X)
    calls = []
    original = _knnn.KNNN._held_out_scores

    def spy(self, rows, others):
        calls.append(None if rows is None else len(rows))
        return original(self, rows, others)

    monkeypatch.setattr(_knnn.KNNN, "_held_out_scores", spy)
    det.partial_fit(X_new[:1])
    assert det._last_update["calibration_rescored"] == calls[0]
    assert 1 <= calls[0] < 100  # far fewer than the 301 calibration rows


@pytest.mark.parametrize("params", [dict(n_neighbors=3, n_neighbors_of_neighbors=15, set_size=4),
                                    dict(n_neighbors=12, n_neighbors_of_neighbors=6, set_size=5)])
def test_a_model_read_from_a_file_updates_alike(params, tmp_path):
    """A saved model keeps the search's neighbors beyond its neighborhoods:
    loaded, it updates as the fitted model does (the same calibration rows
    reused), and its state after several batches (saved and loaded between
    them) is the frozen fit's."""
    X, X_new, Q = data(7)
    fitted = KNNN(**params).fit(X)
    fitted.save(tmp_path / "m.nonn")
    det = load(tmp_path / "m.nonn")
    np.testing.assert_array_equal(det._graph_tail, fitted._graph_tail)
    fitted.partial_fit(X_new[:1])
    det.partial_fit(X_new[:1])
    assert det._last_update["tail_known"]
    assert det._last_update["calibration_rescored"] == \
        fitted._last_update["calibration_rescored"]
    det.save(tmp_path / "m1.nonn")
    det = add_in_batches(load(tmp_path / "m1.nonn"), X_new[1:], [5, 34])
    assert_same_state(det, frozen_fit(KNNN(**params).fit(X), np.vstack([X, X_new])), Q=Q)


def test_a_model_file_without_the_graph_tail_updates_alike(tmp_path):
    """A file without the neighbors beyond the neighborhoods (saved before
    the file carried them, or a model gathered from a cluster) still loads;
    its first update searches the lists it needs and gives the same model."""
    X, X_new, Q = data(7)
    params = dict(n_neighbors=3, n_neighbors_of_neighbors=15, set_size=4)
    fitted = KNNN(**params).fit(X)
    del fitted._graph_tail
    fitted.save(tmp_path / "m.nonn")
    det = load(tmp_path / "m.nonn")
    assert not hasattr(det, "_graph_tail")
    det.partial_fit(X_new[:1])
    assert not det._last_update["tail_known"]
    add_in_batches(det, X_new[1:], [39])
    assert_same_state(det, frozen_fit(KNNN(**params).fit(X), np.vstack([X, X_new])), Q=Q)


def test_a_hostile_graph_tail_is_refused(tmp_path):
    """The stored tail is checked like every array: ids in range, no row its
    own neighbor; other detectors have no such member."""
    import zipfile

    from nonn import ModelFileError

    X, _, _ = data(7)
    det = KNNN(n_neighbors=3, n_neighbors_of_neighbors=15, set_size=4).fit(X)
    for bad, fragment in ((len(X), "outside"), (-1, "outside"), ("self", "own neighbors")):
        tail = det._graph_tail.copy()
        if bad == "self":
            tail[7, 0] = 7
        else:
            tail[7, 0] = bad
        crafted = KNNN(n_neighbors=3, n_neighbors_of_neighbors=15, set_size=4).fit(X)
        crafted._graph_tail = tail
        with pytest.raises(ValueError, match=fragment):
            crafted.save(tmp_path / "bad.nonn")
    # a member only KNNN may have, smuggled into a KNN file
    KNN(n_neighbors=3).fit(X).save(tmp_path / "knn.nonn")
    det.save(tmp_path / "m.nonn")
    with zipfile.ZipFile(tmp_path / "m.nonn") as z:
        tail_member = [n for n in z.namelist() if "graph_tail" in n]
        data_tail = z.read(tail_member[0])
    with zipfile.ZipFile(tmp_path / "knn.nonn", "a") as z:
        z.writestr(tail_member[0], data_tail)
    with pytest.raises(ModelFileError, match="graph_tail"):
        load(tmp_path / "knn.nonn")


def test_counts_capped_by_a_small_first_fit_grow():
    X, X_new, Q = data(8, n=12, n_new=30)
    params = dict(n_neighbors=3, n_neighbors_of_neighbors=20, set_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedParameterWarning)
        det = KNNN(**params).fit(X)
        assert det.n_neighbors_of_neighbors_ == 12
        det.partial_fit(X_new)
        ref = frozen_fit(KNNN(**params).fit(X), np.vstack([X, X_new]))
    assert det.n_neighbors_of_neighbors_ == 20 and "refit" in det._last_update
    assert_same_state(det, ref, Q=Q)


def test_auto_choices_stay_frozen():
    X, X_new, Q = data(9, n=120)
    det = KNNN(n_neighbors="auto", set_size="auto", random_state=0).fit(X)
    chosen = dict(det.auto_params_)
    det.partial_fit(X_new)
    assert det.auto_params_ == chosen
    ref = frozen_fit(KNNN(n_neighbors="auto", set_size="auto", random_state=0).fit(X),
                     np.vstack([X, X_new]))
    assert_same_state(det, ref, Q=Q)


def test_calibrate_threshold_is_replaced_by_the_fit_rule():
    X, X_new, _ = data(10)
    det = KNNN(n_neighbors=3, n_neighbors_of_neighbors=12).fit(X)
    det.calibrate(X_new[:20], false_alarm_rate=0.2)
    assert det.threshold_source_.startswith("calibrated")
    det.partial_fit(X_new[20:])
    assert det.threshold_source_.startswith("training rows scored out of sample")
    assert det.contamination_ == 0.01


def test_float32_updates():
    X, X_new, Q = data(11)
    X, X_new, Q = X.astype(np.float32), X_new.astype(np.float32), Q.astype(np.float32)
    params = dict(n_neighbors=3, n_neighbors_of_neighbors=15, set_size=4)
    det = add_in_batches(KNNN(**params).fit(X), X_new, [1, 39])
    ref = frozen_fit(KNNN(**params).fit(X), np.vstack([X, X_new]))
    assert det._fit_X.dtype == np.float32 and det.eigenvectors_.dtype == np.float32
    np.testing.assert_array_equal(det.neighborhoods_, ref.neighborhoods_)
    np.testing.assert_allclose(det.anomaly_score(Q), ref.anomaly_score(Q), rtol=1e-5)


def test_refusals_leave_the_model_untouched(monkeypatch):
    pd = pytest.importorskip("pandas")
    from sklearn.exceptions import NotFittedError

    from nonn import _knnn

    X, X_new, Q = data(12)
    # scikit-learn's convention: the first partial_fit is a fit
    first = KNNN(n_neighbors=3, n_neighbors_of_neighbors=12).partial_fit(X)
    np.testing.assert_array_equal(first.anomaly_score(Q), KNNN(
        n_neighbors=3, n_neighbors_of_neighbors=12).fit(X).anomaly_score(Q))
    for cls in (KNN, GlobalEigenKNN, LocalEigenKNN):
        assert cls().partial_fit(X).n_samples_seen_ == len(X)
    with pytest.raises(NotFittedError):
        KNNN().explain(Q)
    names = [f"c{j}" for j in range(X.shape[1])]
    det = KNNN(n_neighbors=3, n_neighbors_of_neighbors=12).fit(pd.DataFrame(X, columns=names))
    before = det.anomaly_score(pd.DataFrame(Q, columns=names))
    with pytest.raises(ValueError, match="features"):
        det.partial_fit(X_new[:, :4])
    with pytest.raises(ValueError, match="feature names"):
        det.partial_fit(pd.DataFrame(X_new, columns=[f"z{j}" for j in range(X.shape[1])]))
    with pytest.raises(ValueError):
        det.partial_fit(np.full((2, X.shape[1]), np.nan))

    def boom(self, rows, others):
        raise MemoryError("simulated")

    monkeypatch.setattr(_knnn.KNNN, "_held_out_scores", boom)
    with pytest.raises(MemoryError):
        det.partial_fit(pd.DataFrame(X_new, columns=names))
    assert det.n_samples_seen_ == len(X)
    np.testing.assert_array_equal(det.anomaly_score(pd.DataFrame(Q, columns=names)), before)


# ------------------------------------------------------------- baselines
@pytest.mark.parametrize("cls,params", [
    (KNN, dict(n_neighbors=3)),
    (KNN, dict(n_neighbors=4, aggregate="max", metric="cosine")),
    (KNN, dict(n_neighbors=3, whiten=0.5, scale="robust")),
    (LocalEigenKNN, dict(n_neighbors=4, set_size=4)),
    (GlobalEigenKNN, dict(n_neighbors=3)),
])
@pytest.mark.parametrize("batches", [[1] * 5 + [35], [40]])
def test_baselines_equal_the_frozen_fit(cls, params, batches):
    X, X_new, Q = data(13)
    det = add_in_batches(cls(**params).fit(X), X_new, batches)
    ref = frozen_fit(cls(**params).fit(X), np.vstack([X, X_new]))
    assert_same_state(det, ref, ints=("calibration_rows_",),
                      reals=("train_scores_", "calibration_scores_", "_fit_X"), Q=Q)


def test_knn_without_transforms_equals_fit_and_reads_from_a_file(tmp_path):
    X, X_new, Q = data(14)
    KNN(n_neighbors=3).fit(X).save(tmp_path / "knn.nonn")
    det = add_in_batches(load(tmp_path / "knn.nonn"), X_new, [2, 38])
    fresh = KNN(n_neighbors=3).fit(np.vstack([X, X_new]))
    assert_same_state(det, fresh, ints=("calibration_rows_",),
                      reals=("train_scores_", "calibration_scores_", "_fit_X"), Q=Q)


# ------------------------------------------------------- approximate index
def test_faiss_hnsw_index_is_extended_and_no_neighborhood_gets_worse():
    pytest.importorskip("faiss")
    X, X_new, Q = data(15, n=400, n_new=60)
    det = KNNN(n_neighbors=3, n_neighbors_of_neighbors=10, set_size=4, backend="faiss",
               backend_params={"index": "HNSW16"}).fit(X)
    index = det._search.index_
    old = det.neighborhoods_.copy()
    det.partial_fit(X_new)
    assert det._search.index_ is index and index.ntotal == len(X) + len(X_new)
    U = np.vstack([X, X_new])
    Ug = det._fit_X
    for p in range(len(X)):
        # a stored neighborhood merged exactly with the new rows
        cand = np.concatenate([old[p, 1:], np.arange(len(X), len(U))])
        d2 = ((Ug[cand] - Ug[p]) ** 2).sum(axis=1)
        want = cand[np.argsort(d2, kind="stable")[:9]]
        np.testing.assert_array_equal(np.sort(det.neighborhoods_[p, 1:]), np.sort(want))
    assert np.isfinite(det.anomaly_score(Q)).all()


# ------------------------------------------------------- n_samples_seen_
def test_n_samples_seen_is_saved_and_checked(tmp_path):
    from hostile import rewrite

    from nonn import ModelFileError

    X, X_new, _ = data(16)
    det = KNNN(n_neighbors=3, n_neighbors_of_neighbors=12).fit(X)
    assert det.n_samples_seen_ == len(X)
    det.partial_fit(X_new)
    assert det.n_samples_seen_ == len(X) + len(X_new)
    det.save(tmp_path / "m.nonn")
    from nonn.persistence import read_meta

    assert read_meta(tmp_path / "m.nonn")["fitted"]["n_samples_seen_"] == 190
    assert load(tmp_path / "m.nonn").n_samples_seen_ == 190

    # a file written before the count existed: the rows it holds
    def drop(meta):
        del meta["fitted"]["n_samples_seen_"]

    rewrite(tmp_path / "m.nonn", tmp_path / "old.nonn", meta=drop)
    assert load(tmp_path / "old.nonn").n_samples_seen_ == 190

    def lie(meta):
        meta["fitted"]["n_samples_seen_"] = 5

    rewrite(tmp_path / "m.nonn", tmp_path / "bad.nonn", meta=lie)
    with pytest.raises(ModelFileError, match="n_samples_seen_"):
        load(tmp_path / "bad.nonn")


# ------------------------------------------------------------------- CLI
def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "nonn", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_update_end_to_end(tmp_path):
    X, X_new, Q = data(17)
    header = ",".join(f"f{j}" for j in range(X.shape[1]))
    for name, A in (("train.csv", X), ("new.csv", X_new)):
        np.savetxt(tmp_path / name, A, delimiter=",", header=header, comments="", fmt="%.17g")
    np.save(tmp_path / "q.npy", Q)
    r = run("fit", "train.csv", "-o", "m.nonn", "--n-neighbors", 3,
            "--n-neighbors-of-neighbors", 12, "--set-size", 4, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run("update", "m.nonn", "new.csv", "-o", "m2.nonn", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "150 -> 190 samples seen" in r.stdout
    assert "existing neighborhoods changed" in r.stdout and "offset_:" in r.stdout
    import pandas as pd

    want = load(tmp_path / "m.nonn")
    want.partial_fit(pd.DataFrame(X_new, columns=header.split(",")))
    got = load(tmp_path / "m2.nonn")
    assert got.n_samples_seen_ == 190
    assert_same_state(got, want, Q=pd.DataFrame(Q, columns=header.split(",")))
    r = run("info", "m2.nonn", cwd=tmp_path)
    assert "n_samples_seen_ = 190" in r.stdout
    # in place (atomic rename over the model), then scored by the CLI
    r = run("update", "m.nonn", "new.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "m.nonn").n_samples_seen_ == 190
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    r = run("score", "m.nonn", "q.npy", "-o", "s.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("kind,fragment", [
    ("width", "has 7 columns; the model was fitted on 10"),
    ("names", "does not have the columns the model was fitted on"),
    ("image", "not a readable"),
])
def test_cli_update_refusals_are_one_line(tmp_path, kind, fragment):
    X, X_new, _ = data(18)
    header = ",".join(f"f{j}" for j in range(X.shape[1]))
    np.savetxt(tmp_path / "train.csv", X, delimiter=",", header=header, comments="")
    r = run("fit", "train.csv", "-o", "m.nonn", "--n-neighbors-of-neighbors", 12, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    before = (tmp_path / "m.nonn").read_bytes()
    if kind == "width":
        np.save(tmp_path / "new.npy", X_new[:, :7])
        args = ("m.nonn", "new.npy")
    elif kind == "names":
        other = ",".join(f"g{j}" for j in range(X.shape[1]))
        np.savetxt(tmp_path / "new.csv", X_new, delimiter=",", header=other, comments="")
        args = ("m.nonn", "new.csv")
    else:
        (tmp_path / "junk.nonn").write_bytes(b"PK\x03\x04junk")
        np.save(tmp_path / "new.npy", X_new)
        args = ("junk.nonn", "new.npy")
    r = run("update", *args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nonn: error:"), r.stderr
    assert fragment in lines[0]
    assert (tmp_path / "m.nonn").read_bytes() == before


@pytest.mark.parametrize("dedupe", [True, False])
def test_faiss_add_keeps_duplicate_groups(dedupe):
    """FaissBackend.add: new rows are searchable under their new ids; a new
    row duplicating an indexed one joins its group (indexed once)."""
    pytest.importorskip("faiss")
    from nonn.neighbors.faiss import FaissBackend

    rng = np.random.default_rng(19)
    X = rng.normal(size=(300, 8)).astype(np.float32)
    X[10] = X[20] = X[3]
    new = np.vstack([rng.normal(size=(20, 8)), X[[3, 5]], X[[5]]]).astype(np.float32)
    approx = FaissBackend(index="HNSW16", dedupe=dedupe).fit(X)
    approx.add(new)
    assert approx.index_.ntotal == (298 + 20 if dedupe else 323)
    exact = FaissBackend(index="Flat").fit(np.vstack([X, new]))
    Q = rng.normal(size=(50, 8)).astype(np.float32)
    a, b = approx.kneighbors(Q, 5, return_distance=False), exact.kneighbors(Q, 5,
                                                                             return_distance=False)
    assert np.mean([len(set(x) & set(y)) for x, y in zip(a, b)]) / 5 >= 0.95
    own = approx.kneighbors(None, 4, return_distance=False)
    assert set(own[3][:3]) == {10, 20, 320}  # the copies of row 3, at distance 0
    assert set(own[320][:3]) == {3, 10, 20}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
@pytest.mark.parametrize("shift", [0.0, 1000.0])
def test_search_marks_every_row_a_query_enters(dtype, scale, shift):
    """The exact search's marks (``kneighbors_entering``) include every
    training row nearer to some query than its radius, against all pairwise
    distances in float64, with radii exactly at pairwise distances, far
    from the origin and at scales the search runs in a power-of-two working
    scale; the ids are ``kneighbors``'."""
    from nonn.neighbors.brute import BruteForceBackend

    rng = np.random.default_rng(21)
    Xo = ((rng.normal(size=(700, 40)) + shift) * scale).astype(dtype)
    Xn = ((rng.normal(size=(90, 40)) + shift) * scale).astype(dtype)
    if not np.isfinite(Xo).all() or not np.isfinite(Xn).all():
        pytest.skip("outside the dtype's range")
    D = ((Xo[:, None].astype(float) - Xn[None].astype(float)) ** 2).sum(-1)
    r2 = np.sort(D, axis=1)[:, 3].copy()
    r2[::7] = -np.inf  # left out
    search = BruteForceBackend(working_memory=0.05).fit(Xo)
    ids, marked = search.kneighbors_entering(Xn, 5, r2)
    np.testing.assert_array_equal(ids, search.kneighbors(Xn, 5, return_distance=False))
    want = (D < r2[:, None]).any(axis=1)
    assert want.sum() > 50
    assert not (want & ~marked).any()
    assert not marked[::7].any()
    assert marked.sum() <= want.sum() + 0.05 * len(Xo)  # a few more, to be checked exactly
    with pytest.raises(ValueError, match="Euclidean"):
        BruteForceBackend(metric="cosine").fit(Xo).kneighbors_entering(Xn, 5, r2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shift", [0.0, 1000.0])
def test_closer_pairs_is_exact(dtype, shift):
    """The candidate pass never drops a pair: every (old, new) pair nearer
    than the old row's radius, against all pairwise distances, with each
    radius exactly one of them (ties at the boundary: not nearer), also far
    from the origin."""
    from nonn._update import _exact_sq, closer_pairs

    rng = np.random.default_rng(20)
    Xo = (rng.normal(size=(700, 40)) + shift).astype(dtype)
    Xn = (rng.normal(size=(90, 40)) + shift).astype(dtype)
    p_all, b_all = np.repeat(np.arange(700), 90), np.tile(np.arange(90), 700)
    D = _exact_sq(Xo, p_all, Xn, b_all).reshape(700, 90)
    np.testing.assert_allclose(D, ((Xo[:, None].astype(float) - Xn[None]) ** 2).sum(-1),
                               rtol=1e-12)
    r2 = np.sort(D, axis=1)[:, 3].copy()
    p, b, d2 = closer_pairs(Xo, r2, Xn, working_memory=0.05)
    assert set(zip(p.tolist(), b.tolist())) == set(map(tuple, np.argwhere(D < r2[:, None])))
    np.testing.assert_array_equal(d2, D[p, b])
