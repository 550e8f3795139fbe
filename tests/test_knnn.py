import warnings

import numpy as np
import pytest
from oracles import (
    naive_global_scores,
    naive_held_out_scores,
    naive_greedy_order,
    naive_knnn_scores,
    naive_local_scores,
)

from nonn import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN
from nonn._base import CappedParameterWarning
from nonn._layout import greedy_order, abs_correlation, set_sizes


def well_conditioned(seed, n=60, d=12, n_q=8):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) + 2 * np.eye(d)
    X = rng.normal(size=(n, d)) @ A
    Q = rng.normal(size=(n_q, d)) @ A * 1.3
    return X, Q


# ------------------------------------------------------------- exactness
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reorder", ["none", "greedy"])
@pytest.mark.parametrize("d,L", [(12, 5), (10, 5), (7, 3)])
@pytest.mark.parametrize("aggregate", ["sum", "min"])
def test_knnn_matches_naive_eq2(seed, reorder, d, L, aggregate):
    X, Q = well_conditioned(seed, d=d)
    k, Kp, rel = 3, 15, 1e-3
    order = naive_greedy_order(X, L) if reorder == "greedy" else np.arange(d)
    expected = naive_knnn_scores(X, Q, k, Kp, L, order, rel, aggregate=aggregate)
    # training rows scored out of sample: each by a model fitted without it
    loo = naive_held_out_scores(X, k, Kp, L, order, rel, aggregate=aggregate)
    for memory in ("precomputed", "lean"):
        det = KNNN(n_neighbors=k, n_neighbors_of_neighbors=Kp, set_size=L, reorder=reorder,
                   eig_floor=rel, aggregate=aggregate, memory=memory).fit(X)
        np.testing.assert_array_equal(det.feature_order_, order)
        np.testing.assert_allclose(det.anomaly_score(Q), expected, rtol=1e-6)
        np.testing.assert_allclose(-det.train_scores_, loo, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("d,L,Kp", [(12, 12, 8), (12, "all", 8), (12, 9, 6), (10, 4, 3),
                                    (16, 7, 5)])
@pytest.mark.parametrize("aggregate", ["sum", "min"])
def test_large_sets_dual_form_match_naive_eq2(seed, d, L, Kp, aggregate):
    """Sets with more features than a neighborhood has points (L > K') are
    decomposed through the K' x K' Gram matrix; the scores are Eq. 2 of the
    naive oracle (an L x L covariance per set), every L, with the shorter
    last set, LOO scores and both memory modes."""
    X, Q = well_conditioned(seed, d=d)
    k, rel = 3, 1e-2
    L_num = d if L == "all" else L
    # one set holds every feature: no reordering (it cannot change a score)
    order = naive_greedy_order(X, L_num) if L_num < d else np.arange(d)
    expected = naive_knnn_scores(X, Q, k, Kp, L_num, order, rel, aggregate=aggregate)
    loo = naive_held_out_scores(X, k, Kp, L_num, order, rel, aggregate=aggregate)
    for memory in ("precomputed", "lean"):
        det = KNNN(n_neighbors=k, n_neighbors_of_neighbors=Kp, set_size=L, eig_floor=rel,
                   aggregate=aggregate, memory=memory).fit(X)
        assert det.set_size_ == L_num
        np.testing.assert_array_equal(det.feature_order_, order)
        if memory == "precomputed":
            assert det.eigenvectors_.shape[-2:] == (Kp, Kp)  # the dual state: K' x K'
        np.testing.assert_allclose(det.anomaly_score(Q), expected, rtol=1e-6)
        np.testing.assert_allclose(-det.train_scores_, loo, rtol=1e-6)


def test_dual_form_equals_primal_form_where_both_apply():
    """Where both forms apply (L <= K'), the dual kernel run on the same
    neighborhoods gives the primal scores."""
    from nonn import _eq2

    X, Q = well_conditioned(5, d=6, n=40)
    det = KNNN(n_neighbors=2, n_neighbors_of_neighbors=6, set_size=6, reorder="none",
               eig_floor=1e-2).fit(X)
    assert det.eigenvectors_.shape[-1] == 6  # primal
    groups = det.neighborhoods_
    from nonn import _eq2_kernels

    w = np.empty((len(X), 1, 6))
    v = np.empty((len(X), 1, 6, 6))
    _eq2_kernels.dual_eigen(det._fit_X, groups, det.set_sizes_, 6, w, v)
    idx = np.arange(len(X))[:, None]
    Qg = det._to_grid(Q[:1].repeat(len(X), 0))
    for local in (np.zeros(1), np.full(1, 0.3)):  # the data's floor; each neighborhood's
        primal = _eq2.score_terms(Qg, idx, det._fit_X, det.eigenvectors_, det.eigenvalues_,
                                  det.set_sizes_, 6, det.eig_floor_, local=local)
        dual = np.empty_like(primal)
        _eq2_kernels.dual_score(Qg, idx, np.arange(len(X)), det._fit_X, groups, v, w,
                                det.set_sizes_, 6, det.eig_floor_.astype(np.float64), local,
                                dual)
        np.testing.assert_allclose(dual, primal, rtol=1e-8)


@pytest.mark.parametrize("n", [1, 2, 3, 9, 24, 25, 48, 49, 60])
@pytest.mark.parametrize("kind", ["random", "rank-deficient", "repeated", "zero", "tiny",
                                  "huge", "diagonal"])
def test_small_symmetric_eigensolver_matches_lapack(n, kind):
    """The kernels' eigensolver (tridiagonal QL up to SYMEIG_MAX, LAPACK
    above): eigenvalues ascending and equal to LAPACK's, eigenvectors
    orthonormal and reconstructing the matrix, at every scale."""
    from nonn._eq2_kernels import SYMEIG_MAX, eigh_rows

    assert 25 <= SYMEIG_MAX < 49
    rng = np.random.default_rng(n)
    B = rng.normal(size=(n, max(n // 2, 1) if kind == "rank-deficient" else n + 3))
    A = B @ B.T
    if kind == "repeated":
        Q = np.linalg.qr(rng.normal(size=(n, n)))[0]
        A = (Q * np.repeat([1.0, 2.0, 5.0], -(-n // 3))[:n]) @ Q.T
    elif kind == "zero":
        A = np.zeros((n, n))
    elif kind == "diagonal":
        A = np.diag(rng.permutation(n).astype(float))
    A = A * {"tiny": 1e-200, "huge": 1e200}.get(kind, 1.0)
    for M in (A,) if kind in ("tiny", "huge") else (A, A.astype(np.float32)):
        w, Vt = eigh_rows(M)
        scale = max(np.abs(A).max(), 1e-300)
        tol = 1e-13 if M.dtype == np.float64 else 1e-6
        assert np.all(np.diff(w) >= 0)
        np.testing.assert_allclose(w / scale, np.linalg.eigvalsh(M.astype(float)) / scale,
                                   rtol=0, atol=tol)
        np.testing.assert_allclose(Vt @ Vt.T, np.eye(n), rtol=0, atol=1e-13)
        np.testing.assert_allclose((Vt.T * w) @ Vt / scale, M.astype(float) / scale, rtol=0,
                                   atol=tol * 10)


def test_large_sets_float32_and_lean_bit_for_bit():
    rng = np.random.default_rng(11)
    X = rng.normal(size=(300, 40)).astype(np.float32)
    Q = rng.normal(size=(50, 40)).astype(np.float32) * 1.5
    full = KNNN(set_size="all", n_neighbors_of_neighbors=20, eig_floor=1e-3).fit(X)
    lean = KNNN(set_size="all", n_neighbors_of_neighbors=20, eig_floor=1e-3, memory="lean",
                working_memory=0.05).fit(X)
    s = full.anomaly_score(Q)
    assert s.dtype == np.float32 and np.isfinite(s).all()
    np.testing.assert_array_equal(lean.train_scores_, full.train_scores_)
    np.testing.assert_array_equal(lean.anomaly_score(Q), s)
    expected = naive_knnn_scores(X.astype(np.float64), Q.astype(np.float64), 3, 20, 40,
                                 np.arange(40), 1e-3, aggregate="min")
    np.testing.assert_allclose(s, expected, rtol=2e-3)


def test_lean_memory_same_scores_less_state():
    """memory="lean" keeps no eigen-state and gives the precomputed scores,
    whatever the chunking (a tiny working_memory forces many chunks)."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(600, 16)).astype(np.float32)
    Q = rng.normal(size=(120, 16)).astype(np.float32) * 1.5
    full = KNNN().fit(X)
    lean = KNNN(memory="lean", working_memory=0.05).fit(X)
    assert not hasattr(lean, "eigenvectors_") and not hasattr(lean, "eigenvalues_")
    np.testing.assert_array_equal(lean.train_scores_, full.train_scores_)
    np.testing.assert_array_equal(lean.anomaly_score(Q), full.anomaly_score(Q))
    assert lean.offset_ == full.offset_


def test_min_aggregate_is_never_more_than_sum_over_k():
    X, Q = well_conditioned(9, d=8)
    s_min = KNNN(n_neighbors=4, aggregate="min").fit(X).anomaly_score(Q)
    s_sum = KNNN(n_neighbors=4, aggregate="sum").fit(X).anomaly_score(Q)
    # min_i a_i <= sum_i a_i / k <= sum_i a_i (all terms are non-negative)
    assert np.all(s_min <= s_sum / 4 + 1e-12)
    assert KNNN(n_neighbors=1, aggregate="min").fit(X).anomaly_score(Q) == pytest.approx(
        KNNN(n_neighbors=1, aggregate="sum").fit(X).anomaly_score(Q))


def test_knnn_float32_close_to_oracle():
    X, Q = well_conditioned(3, d=10)
    det = KNNN(n_neighbors_of_neighbors=20, set_size=5, eig_floor=1e-3,
               reorder="none").fit(X.astype(np.float32))
    expected = naive_knnn_scores(X, Q, 3, 20, 5, np.arange(10), 1e-3, aggregate="min")
    np.testing.assert_allclose(det.anomaly_score(Q.astype(np.float32)), expected, rtol=1e-3)


def test_eq1_is_eq2_with_one_set():
    """With L = D and no reordering Eq. 2 is Eq. 1 (one eigenbasis of the whole vector)."""
    X, Q = well_conditioned(4, d=6)
    det = KNNN(set_size=6, reorder="none", n_neighbors_of_neighbors=20, eig_floor=1e-3).fit(X)
    assert det.set_sizes_.tolist() == [6]
    np.testing.assert_allclose(
        det.anomaly_score(Q),
        naive_knnn_scores(X, Q, 3, 20, 6, np.arange(6), 1e-3, aggregate="min"), rtol=1e-6
    )


@pytest.mark.parametrize("seed", [0, 5])
def test_global_and_local_match_naive(seed):
    X, Q = well_conditioned(seed, d=8)
    g = GlobalEigenKNN(n_neighbors=3, eig_floor=1e-3).fit(X)
    np.testing.assert_allclose(g.anomaly_score(Q), naive_global_scores(X, Q, 3, 1e-3), rtol=1e-6)
    loc = LocalEigenKNN(n_neighbors=4, set_size=3, reorder="greedy").fit(X)
    order = naive_greedy_order(X, 3)
    np.testing.assert_allclose(loc.anomaly_score(Q),
                               naive_local_scores(X, Q, 4, 3, order, 1e-3), rtol=1e-6)


def test_global_threshold_scores_are_cross_fitted():
    """GlobalEigenKNN's training scores are out of sample: each fold of rows
    scored by the naive Eq. 3 model of the other rows. With fewer rows than
    features a held-out threshold then flags about the share asked for."""
    from nonn._baselines import _FOLDS

    X, Q = well_conditioned(5, n=40, d=8)
    g = GlobalEigenKNN(n_neighbors=3, eig_floor=1e-3).fit(X)
    folds = np.array_split(np.random.default_rng(0).permutation(40), _FOLDS)
    expected = np.empty(40)
    for fold in folds:
        rest = np.setdiff1d(np.arange(40), fold)
        expected[fold] = naive_global_scores(X[rest], X[fold], 3, 1e-3)
    np.testing.assert_allclose(-g.train_scores_, expected, rtol=1e-6)
    rng = np.random.default_rng(0)
    W = rng.normal(size=(20, 60))
    normals = rng.normal(size=(400, 20)) @ W  # 60 features, rank 20, 100 training rows
    det = GlobalEigenKNN(contamination=0.05).fit(normals[:100])
    assert np.mean(det.predict(normals[100:]) == -1) < 0.15


def test_knn_aggregates_hand_computed():
    X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [4.0, 0.0]])
    q = np.array([[0.0, 0.0]])
    # distances from q: 0, 1, 2, 4 -> k=3 nearest: 0, 1, 2
    assert KNN(n_neighbors=3).fit(X).anomaly_score(q)[0] == pytest.approx(1.0)
    assert KNN(n_neighbors=3, aggregate="max").fit(X).anomaly_score(q)[0] == pytest.approx(2.0)
    assert KNN(n_neighbors=3, aggregate="kth").fit(X).anomaly_score(q)[0] == pytest.approx(2.0)
    # leave-one-out: point 0's three others are at 1, 2, 4
    assert -KNN(n_neighbors=3).fit(X).train_scores_[0] == pytest.approx(7 / 3)


def test_hand_computed_knnn_2d():
    """Neighborhood on a line: the across-line direction has a floored
    eigenvalue, the along-line direction the line's variance."""
    X = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    det = KNNN(n_neighbors=1, n_neighbors_of_neighbors=4, set_size=2, reorder="none",
               eig_floor=0.5).fit(X)
    # all neighborhoods = the 4 points: var along x = 1.25, across = 0
    # floor for the only set = 0.5 * mean feature variance = 0.5 * (1.25 + 0) / 2
    floor = 0.5 * 1.25 / 2
    q = np.array([[1.0, 0.5], [1.5, 0.0]])
    expected = [0.5 / np.sqrt(floor), 0.5 / np.sqrt(1.25)]
    np.testing.assert_allclose(det.anomaly_score(q), expected, rtol=1e-12)


# ------------------------------------------------------------- reordering
def test_greedy_pairs_correlated_features_figure6():
    """Paper Figure 6: features (0, 2) and (1, 3) are correlated pairs; the
    greedy reorder must put each pair in one set."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 100))
    X = np.column_stack([a, b, a + 0.1 * rng.normal(size=100), b + 0.1 * rng.normal(size=100)])
    order = greedy_order(abs_correlation(X), 2)
    assert order[:2].tolist() == [0, 2]  # the first feature stays, its partner joins it
    assert {frozenset(order[:2].tolist()), frozenset(order[2:].tolist())} == {
        frozenset({0, 2}), frozenset({1, 3})}
    assert naive_greedy_order(X, 2).tolist() == order.tolist()


def test_greedy_reorder_detects_relation_anomaly():
    """The red point of Figure 6 breaks the relation between correlated
    features; only the reordered partition sees it."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 400))
    X = np.column_stack([a, b, a + 0.05 * rng.normal(size=400), b + 0.05 * rng.normal(size=400)])
    normal = X[:50] + 0.01
    anomaly = np.array([[1.0, 1.0, -1.0, -1.0]])  # each marginal is ordinary
    Q = np.vstack([normal, anomaly])
    ratios = {}
    for reorder in ["none", "greedy"]:
        s = KNNN(set_size=2, reorder=reorder, eig_floor=1e-3).fit(X[50:]).anomaly_score(Q)
        ratios[reorder] = s[-1] / np.median(s[:-1])
    assert ratios["greedy"] > 2 * ratios["none"]
    assert ratios["greedy"] > 5


def test_greedy_handles_constant_columns():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(50, 6))
    X[:, 2] = 3.0
    C = abs_correlation(X)
    assert np.isfinite(C).all()
    order = greedy_order(C, 3)
    assert sorted(order.tolist()) == list(range(6))


# ---------------------------------------------------------- neighborhoods
def test_point_in_own_neighborhood_with_duplicates():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(20, 5))
    X = np.repeat(base, 4, axis=0)  # every row 4 times
    for backend in ["brute", "sklearn"]:
        det = KNNN(n_neighbors_of_neighbors=6, backend=backend).fit(X)
        assert (det.neighborhoods_[:, 0] == np.arange(len(X))).all()
        assert all(len(set(r)) == len(r) for r in det.neighborhoods_.tolist())
        assert np.isfinite(det.train_scores_).all()


def test_partial_last_set_kept():
    X, Q = well_conditioned(0, d=7)
    det = KNNN(set_size=5, n_neighbors_of_neighbors=20, reorder="none").fit(X)
    assert det.set_sizes_.tolist() == [5, 2]
    assert set_sizes(7, 5).tolist() == [5, 2]
    q = Q[:1].copy()
    base = det.anomaly_score(q)[0]
    q[0, 6] += 50 * X[:, 6].std()  # change only a feature of the short last set
    assert det.anomaly_score(q)[0] > 2 * base


def test_counts_capped_with_warning_params_untouched():
    X = np.random.default_rng(0).normal(size=(10, 3))
    det = KNNN(n_neighbors=30, n_neighbors_of_neighbors=25, set_size=8)
    with pytest.warns(CappedParameterWarning):
        det.fit(X)
    assert det.n_neighbors_ == 9 and det.n_neighbors_of_neighbors_ == 10 and det.set_size_ == 3
    assert det.get_params()["n_neighbors"] == 30
    assert det.get_params()["n_neighbors_of_neighbors"] == 25
    assert det.get_params()["set_size"] == 8
    assert det.anomaly_score(X).shape == (10,)


# --------------------------------------------------------- robust numerics
def _degenerate_sets():
    rng = np.random.default_rng(0)
    dup = np.repeat(rng.normal(size=(15, 6)), 3, axis=0)
    const = rng.normal(size=(60, 6))
    const[:, [1, 4]] = 7.0
    lowrank = rng.normal(size=(80, 2)) @ rng.normal(size=(2, 10))
    return {"duplicates": dup, "constant": const, "lowrank": lowrank}


@pytest.mark.parametrize("name", ["duplicates", "constant", "lowrank"])
@pytest.mark.parametrize("cls", [KNNN, GlobalEigenKNN, LocalEigenKNN])
def test_degenerate_data_gives_finite_scores(name, cls):
    X = _degenerate_sets()[name]
    Q = np.vstack([X[:5], X[:5] + 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedParameterWarning)
        det = cls().fit(X)
    assert np.isfinite(det.train_scores_).all()
    s = det.anomaly_score(Q)
    assert np.isfinite(s).all()
    assert s[5:].min() > s[:5].max()


def test_kprime_not_more_than_L_finite():
    X = np.random.default_rng(0).normal(size=(50, 10))
    det = KNNN(n_neighbors_of_neighbors=3, set_size=5).fit(X)
    assert np.isfinite(det.anomaly_score(X + 0.1)).all()


@pytest.mark.parametrize("cls", [KNNN, KNN, GlobalEigenKNN, LocalEigenKNN])
@pytest.mark.parametrize("c", [1e-4, 0.37, 1e5])
def test_uniform_scaling_keeps_ranking(cls, c):
    X, Q = well_conditioned(7, d=10)
    Q = np.vstack([Q, X[:5] + 0.01])
    a = cls().fit(X).anomaly_score(Q)
    b = cls().fit(c * X).anomaly_score(c * Q)
    np.testing.assert_array_equal(np.argsort(a), np.argsort(b))


@pytest.mark.parametrize("cls", [KNNN, KNN, GlobalEigenKNN, LocalEigenKNN])
def test_translation_changes_nothing(cls):
    X, Q = well_conditioned(8, d=10)
    shift = np.linspace(-50, 80, 10)
    a = cls().fit(X).anomaly_score(Q)
    b = cls().fit(X + shift).anomaly_score(Q + shift)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_row_permutation_invariance():
    X, Q = well_conditioned(9, d=10)
    perm = np.random.default_rng(0).permutation(len(X))
    np.testing.assert_allclose(KNNN().fit(X).anomaly_score(Q),
                               KNNN().fit(X[perm]).anomaly_score(Q), rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls", [KNNN, KNN, GlobalEigenKNN, LocalEigenKNN])
def test_dtype_preserved_end_to_end(dtype, cls):
    X, Q = well_conditioned(10, d=10)
    det = cls().fit(X.astype(dtype))
    assert det._fit_X.dtype == dtype
    for name in ["eigenvectors_", "eigenvalues_", "components_"]:
        if hasattr(det, name):
            assert getattr(det, name).dtype == dtype
    for method in ["anomaly_score", "score_samples", "decision_function"]:
        assert getattr(det, method)(Q.astype(dtype)).dtype == dtype
    # queries in another dtype are scored in the model's dtype
    assert det.anomaly_score(Q.astype(np.float64)).dtype == dtype
    assert det.train_scores_.dtype == dtype


def test_chunking_does_not_change_scores():
    X, Q = well_conditioned(11, n=200, d=12, n_q=50)
    a = KNNN().fit(X).anomaly_score(Q)
    b = KNNN(working_memory=0.01).fit(X).anomaly_score(Q)
    np.testing.assert_allclose(a, b, rtol=1e-10)


def test_backends_agree():
    X, Q = well_conditioned(12, n=150, d=12, n_q=30)
    a = KNNN(backend="brute").fit(X)
    b = KNNN(backend="sklearn").fit(X)
    assert a.backend_ == "brute" and b.backend_ == "sklearn"
    np.testing.assert_allclose(a.anomaly_score(Q), b.anomaly_score(Q), rtol=1e-8)


# ------------------------------------------------------- compiled kernels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kernels_match_numpy_reference(dtype):
    from nonn import _eq2
    from nonn._layout import permute
    from oracles import reference_neighborhood_eigen, reference_score_terms

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(300, 13)) @ rng.normal(size=(13, 13))).astype(dtype)
    sizes = np.array([5, 5, 3])
    Xg = permute(X, np.arange(13))
    groups = np.concatenate([np.arange(300)[:, None], rng.integers(0, 300, (300, 9))], axis=1)
    w1, v1 = _eq2.neighborhood_eigen(Xg, groups, sizes, 5)
    w2, v2 = reference_neighborhood_eigen(Xg, groups, sizes, 5)
    tol = 1e-4 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(w1, w2, rtol=tol, atol=tol * np.abs(w2).max())
    # eigenvectors agree up to sign
    dots = np.abs(np.einsum("psaj,psaj->psj", v1, v2))
    valid = np.arange(5)[None, None, :] < sizes[None, :, None]
    np.testing.assert_allclose(dots[np.broadcast_to(valid, dots.shape)], 1, atol=10 * tol)
    floor = np.full(3, 1e-3, dtype=dtype) * np.abs(w2).mean()
    idx = rng.integers(0, 300, (50, 3))
    Qg = Xg[:50] + dtype(0.3)
    s1 = _eq2.score_terms(Qg, idx, Xg, v1, w1, sizes, 5, floor).sum(axis=1)
    s2 = reference_score_terms(Qg, idx, Xg, v2, w2, sizes, floor).sum(axis=1)
    np.testing.assert_allclose(s1, s2, rtol=10 * tol)


# ----------------------------------------------- label-free "auto" selection
def test_auto_selection_refits_the_pick_and_is_reproducible():
    rng = np.random.default_rng(11)
    X = np.vstack([rng.normal(size=(150, 6)), rng.normal(size=(150, 6)) * 0.3 + 4])
    det = KNNN(n_neighbors="auto", n_neighbors_of_neighbors="auto", set_size="auto",
               eig_floor="auto", random_state=0).fit(X)
    from nonn._knnn import AUTO_GRID

    pick = det.auto_params_
    assert set(pick) == set(AUTO_GRID)
    for name, value in pick.items():  # set sizes above D are capped at D (6)
        assert value in AUTO_GRID[name] or (name == "set_size" and value == 6)
    # every candidate was tried, best first, and the pick is within the tie of the best
    assert len(det.auto_table_) == np.prod([len(v) for v in AUTO_GRID.values()])
    aucs = [a for _, a in det.auto_table_]
    assert aucs == sorted(aucs, reverse=True)
    assert dict(det.auto_table_[0][0]) is not None
    best = aucs[0]
    capped = {tuple(sorted({**c, "set_size": min(c["set_size"], 6)}.items())): a
              for c, a in reversed(det.auto_table_)}  # the best of a capped group wins
    picked_auc = capped[tuple(sorted(pick.items()))]
    assert picked_auc >= best - 1e-3
    # the fitted model is exactly KNNN with the picked values (set_size capped at D)
    explicit = KNNN(**{**pick, "set_size": min(pick["set_size"], 6)}, eig_floor="auto").fit(X)
    Q = rng.normal(size=(40, 6)) * 2
    np.testing.assert_array_equal(det.anomaly_score(Q), explicit.anomaly_score(Q))
    again = KNNN(n_neighbors="auto", n_neighbors_of_neighbors="auto", set_size="auto",
                 eig_floor="auto", random_state=0).fit(X)
    assert again.auto_params_ == pick


def test_auto_only_varies_the_auto_parameters():
    X, _ = well_conditioned(2, d=8)
    det = KNNN(n_neighbors_of_neighbors="auto", n_neighbors=2, set_size=4, eig_floor=1e-3,
               random_state=1).fit(X)
    assert set(det.auto_params_) == {"n_neighbors_of_neighbors"}
    assert det.n_neighbors_ == 2 and det.set_size_ == 4 and det.eig_floor_rel_ == 1e-3
    assert len(det.auto_table_) == 3


def test_auto_with_few_rows_keeps_the_defaults():
    X = np.random.default_rng(0).normal(size=(30, 4))
    # set_size=5 > 4 features: that cap warns, as for any fit
    with pytest.warns(CappedParameterWarning, match="set_size=5"):
        det = KNNN(n_neighbors_of_neighbors="auto", n_neighbors="auto", set_size=5).fit(X)
    # the defaults (first of the grid), capped silently to the 30 rows
    assert det.auto_params_ == {"n_neighbors": 3, "n_neighbors_of_neighbors": 30}
    assert det.auto_table_ == []


def test_threshold_rows_beyond_the_calibration_cap(monkeypatch):
    """Above CALIBRATION_ROWS training rows, a seeded subset is scored out of
    sample for the threshold; fit_predict scores every row."""
    from nonn import _base

    monkeypatch.setattr(_base, "CALIBRATION_ROWS", 50)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(120, 6))
    det = KNNN(n_neighbors_of_neighbors=10).fit(X)
    assert det.calibration_rows_.shape == (50,) and det.train_scores_.shape == (50,)
    again = KNNN(n_neighbors_of_neighbors=10).fit(X)
    np.testing.assert_array_equal(again.calibration_rows_, det.calibration_rows_)
    labels = KNNN(n_neighbors_of_neighbors=10, contamination=0.1).fit_predict(X)
    # every row scored; the conformal threshold, k = floor(0.1 * 121) = 12: 11 below
    assert labels.shape == (120,) and (labels == -1).sum() == 11
    # the subset's scores are those of the all-rows fit on the same rows
    full = KNNN(n_neighbors_of_neighbors=10, contamination=0.1)
    full.fit_predict(X)
    np.testing.assert_array_equal(full.train_scores_[det.calibration_rows_], det.train_scores_)
