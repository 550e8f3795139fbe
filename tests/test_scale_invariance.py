"""Every finite scale scores alike.

The property: multiplying the training data and the queries by 10**c
changes no detector's ranking (Spearman >= 0.9999 against the unscaled
data), for c from -30 to 30 in float32 and from -300 to 300 in float64,
and what carries units (KNN's Euclidean distances) scales by 10**c. The
exponents are drawn per seed from the whole range, the ends always
included. Multiplying by a power of two is exact, so there the scores are
compared bit for bit. What cannot be represented is a ValueError saying
so, never NaN, zeros or a silently degenerate operator.
"""

import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr

from nonn import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN, load
from nonn import _data_scale
from nonn._base import CappedParameterWarning
from nonn._eq2 import neighborhood_eigen
from oracles import reference_neighborhood_eigen

#: c ranges over [-C, C] for each dtype
RANGE = {np.float32: 30, np.float64: 300}
#: relative agreement of KNN's distances with 10**c times the unscaled ones
#: (the scaled inputs are rounded once, by the multiplication itself)
KNN_RTOL = {np.float32: 1e-5, np.float64: 1e-12}

ESTIMATORS = {
    "KNNN": lambda: KNNN(),
    "KNNN-lean": lambda: KNNN(memory="lean"),
    "KNNN-auto": lambda: KNNN(n_neighbors="auto", eig_floor="auto", random_state=0),
    "KNNN-cosine": lambda: KNNN(metric="cosine"),
    "KNN": lambda: KNN(),
    "KNN-cosine": lambda: KNN(metric="cosine"),
    "GlobalEigenKNN": lambda: GlobalEigenKNN(),
    "LocalEigenKNN": lambda: LocalEigenKNN(),
}
#: whose scores carry the data's units
WITH_UNITS = {"KNN"}


def data(seed, n=150, d=10, n_q=40):
    """Correlated normal training rows; queries: held-out normals and outliers."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) + 2 * np.eye(d)
    X = rng.normal(size=(n, d)) @ A
    Q = np.vstack([rng.normal(size=(n_q - 10, d)) @ A, 3 + 2 * rng.normal(size=(10, d)) @ A])
    return X, Q


def exponents(dtype, seed, n_random=2):
    """The ends of the range and ``n_random`` exponents drawn from it."""
    C = RANGE[dtype]
    drawn = np.random.default_rng([seed, C]).integers(-C, C + 1, size=n_random)
    return sorted({-C, C, *drawn.tolist()})


def times_ten_to(A, c, dtype):
    """``A`` in ``dtype``, times 10**c (computed in float64, rounded once)."""
    base = A.astype(dtype).astype(np.float64)
    out = (base * 10.0**c).astype(dtype)
    assert np.isfinite(out).all() and (out != 0).sum() == (base != 0).sum()
    return out


def fit_score(make, X, Q):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CappedParameterWarning)
        det = make().fit(X)
    return det, det.anomaly_score(Q)


# -------------------------------------------------------------- the property
#: (estimator, seed): three seeds each; one for the slower "auto" selection
CASES = [(name, seed) for name in ESTIMATORS for seed in (0, 1, 2)
         if name != "KNNN-auto" or seed == 0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,seed", CASES)
def test_every_finite_scale_scores_alike(name, seed, dtype):
    make = ESTIMATORS[name]
    X, Q = data(seed)
    ref_det, ref = fit_score(make, X.astype(dtype), Q.astype(dtype))
    for c in exponents(dtype, seed):
        det, s = fit_score(make, times_ten_to(X, c, dtype), times_ten_to(Q, c, dtype))
        assert s.dtype == dtype and np.isfinite(s).all()
        assert spearmanr(ref, s)[0] >= 0.9999, (name, c)
        assert spearmanr(ref_det.train_scores_, det.train_scores_)[0] >= 0.9999, (name, c)
        if name in WITH_UNITS:  # in the user's units
            np.testing.assert_allclose(s, ref * 10.0**c, rtol=KNN_RTOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_power_of_two_scales_are_bit_exact(name, dtype):
    """X * 2**k is the same data in other units, exactly: the same scores
    bit for bit (KNN's distances times 2**k, exactly), the ends of the
    dtype's range included."""
    make = ESTIMATORS[name]
    X, Q = data(5)
    X, Q = X.astype(dtype), Q.astype(dtype)
    ref_det, ref = fit_score(make, X, Q)
    assert ref_det.data_scale_exponent_ == 0  # ordinary data: used as given
    big = {np.float32: 120, np.float64: 1010}[dtype]
    for k in (-big, -40, 17, big):
        det, s = fit_score(make, np.ldexp(X, k), np.ldexp(Q, k))
        expected = np.ldexp(ref, k) if name in WITH_UNITS else ref
        np.testing.assert_array_equal(s, expected)
        np.testing.assert_array_equal(det.offset_, np.ldexp(ref_det.offset_, k)
                                      if name in WITH_UNITS else ref_det.offset_)


def test_ordinary_data_are_used_as_given():
    """No copy, no change: data of ordinary scale keep exponent 0 and are
    what the search sees."""
    X, _ = data(0)
    for X_ in (X, 1e4 * X, 1e-4 * X):
        det = KNN().fit(X_)
        assert det.data_scale_exponent_ == 0
        assert det._fit_X is det._search._X  # the backend indexes the validated data itself


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_working_scale_rms_in_unit_band(dtype):
    X, _ = data(3)
    for c in (-RANGE[dtype], -20, 20, RANGE[dtype]):
        Xs = times_ten_to(X, c, dtype)
        k = _data_scale.fit_exponent(Xs)
        rms = np.sqrt(np.mean(np.ldexp(Xs.astype(np.float64), k) ** 2))
        assert 1 <= rms < 2


def test_exponent_of_extreme_and_degenerate_data():
    big = np.finfo(np.float64).max
    X = np.array([[big, -big], [big / 3, 0.0]])
    k = _data_scale.fit_exponent(X)
    assert np.isfinite(np.ldexp(X, k)).all() and k < 0
    tiny = np.array([[5e-324, 0.0], [0.0, -5e-324]])  # subnormal float64
    k = _data_scale.fit_exponent(tiny)
    assert 1 <= np.sqrt(np.mean(np.ldexp(tiny, k) ** 2)) < 2
    assert _data_scale.fit_exponent(np.zeros((4, 3))) == 0


# ------------------------------------------------------------- clear errors
def test_knn_distances_beyond_float32_are_an_error():
    # finite float32 data whose nearest-neighbor distances exceed float32's
    # largest value
    X = np.array([[3e38, 0, 0, 0], [-3e38, 0, 0, 0], [0, 3e38, 0, 0]], dtype=np.float32)
    for backend in ("brute", "sklearn"):
        with pytest.raises(ValueError, match="pass float64 data"):
            KNN(n_neighbors=1, backend=backend).fit(X)
        # the same data in float64 are fine, in the data's units
        det = KNN(n_neighbors=1, backend=backend).fit(X.astype(np.float64))
        np.testing.assert_allclose(-det.train_scores_, [np.sqrt(2) * 3e38, np.sqrt(2) * 3e38,
                                                        np.sqrt(2) * 3e38], rtol=1e-6)


def test_query_beyond_the_working_scale_is_an_error():
    X, _ = data(0)
    det = KNNN().fit(times_ten_to(X, -30, np.float32))
    assert det.data_scale_exponent_ > 90
    with pytest.raises(ValueError, match="cannot be represented in float32"):
        det.anomaly_score(np.full((1, X.shape[1]), 1e30, dtype=np.float32))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("cls", [KNNN, GlobalEigenKNN, LocalEigenKNN])
def test_scores_that_overflow_are_an_error(cls):
    X, _ = data(0)
    # a small floor: with KNNN's tabular floor (1.0) these queries score just
    # below float32's largest value, which is no overflow
    params = {"eig_floor": 1e-3} if "eig_floor" in cls().get_params() else {}
    det = cls(**params).fit(X.astype(np.float32))
    with pytest.raises(ValueError, match="overflowed float32"):
        det.anomaly_score(np.full((2, X.shape[1]), 3e38, dtype=np.float32))


@pytest.mark.parametrize("bad", ["3", 2.5, 10**6, True, None])
def test_corrupted_exponent_is_an_error(bad):
    X, Q = data(0)
    det = KNNN().fit(X)
    det.data_scale_exponent_ = bad
    with pytest.raises(ValueError, match="data_scale_exponent_"):
        det.anomaly_score(Q)


def test_model_without_exponent_scores_unscaled():
    """A model saved before the working scale existed was fitted unscaled."""
    X, Q = data(0)
    det = KNNN().fit(X)
    ref = det.anomaly_score(Q)
    del det.data_scale_exponent_
    np.testing.assert_array_equal(det.anomaly_score(Q), ref)


# -------------------------------------------------------------- persistence
@pytest.mark.parametrize("cls", [KNNN, KNN, GlobalEigenKNN, LocalEigenKNN])
def test_save_load_keeps_the_working_scale(cls, tmp_path):
    X, Q = data(1)
    X, Q = times_ten_to(X, -25, np.float32), times_ten_to(Q, -25, np.float32)
    det = cls().fit(X)
    assert det.data_scale_exponent_ != 0
    path = tmp_path / "m.nonn"
    det.save(path)
    back = load(path)
    assert back.data_scale_exponent_ == det.data_scale_exponent_
    np.testing.assert_array_equal(back.anomaly_score(Q), det.anomaly_score(Q))


# ------------------------------------------------- the kernel on its own
@pytest.mark.parametrize("dtype,cs", [(np.float32, (-15, -12, 10, 15)),
                                      (np.float64, (-150, -100, 100, 150))])
def test_eigen_kernel_is_safe_far_from_unit_scale(dtype, cs):
    """Defence in depth: the compiled Jacobi kernel scales each covariance
    block itself, so data far from unit scale that reach it unscaled still
    get the eigen-state of the unit-scale data (times 10**(2c)), not that of
    a solver that stopped at once."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 12)) @ (rng.normal(size=(12, 12)) + 2 * np.eye(12))
    groups = np.stack([rng.choice(200, 20, replace=False) for _ in range(40)])
    sizes = np.array([5, 5, 2])
    w_ref, v_ref = reference_neighborhood_eigen(X, groups, sizes, 5)
    tol = {np.float32: 1e-4, np.float64: 1e-10}[dtype]
    for c in cs:
        w, v = neighborhood_eigen((X * 10.0**c).astype(dtype), groups, sizes, 5)
        np.testing.assert_allclose(w.astype(np.float64) / 10.0 ** (2 * c), w_ref,
                                   rtol=tol, atol=tol * w_ref.max())
        # the leading eigenvector of every set (column size - 1), up to sign
        lead = sizes - 1
        top = v[:, np.arange(3), :, lead].astype(np.float64)
        cos = np.abs(np.einsum("spa,spa->sp", top, v_ref[:, np.arange(3), :, lead]))
        assert cos.min() > 1 - tol


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_brute_backend_alone_at_any_scale(dtype, metric):
    """The search backend used directly: the same neighbors at every scale,
    true distances in the data's units (cosine distances have none)."""
    from nonn.neighbors import make_backend

    X, Q = data(6, n=400)
    ref = make_backend("brute", metric=metric).fit(X.astype(dtype))
    d0, i0 = ref.kneighbors(Q.astype(dtype), 5)
    g0 = ref.kneighbors(None, 5, return_distance=False)
    for c in exponents(dtype, 6):
        search = make_backend("brute", metric=metric).fit(times_ten_to(X, c, dtype))
        d, i = search.kneighbors(times_ten_to(Q, c, dtype), 5)
        np.testing.assert_array_equal(i, i0)
        np.testing.assert_array_equal(search.kneighbors(None, 5, return_distance=False), g0)
        unit = 10.0**c if metric == "euclidean" else 1.0
        np.testing.assert_allclose(d / unit, d0, rtol=KNN_RTOL[dtype])


# ----------------------------------------------------------- distributed
@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                           dashboard_address=None)
        cl = distributed.Client(cluster)
    yield cl
    cl.close()
    cluster.close()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_distributed_every_finite_scale_scores_alike(client, dtype):
    from nonn.distributed import DistributedKNNN

    X, Q = data(4)
    ref = KNNN().fit(X.astype(dtype)).anomaly_score(Q.astype(dtype))
    for c in exponents(dtype, 4, n_random=1):
        Xs, Qs = times_ten_to(X, c, dtype), times_ten_to(Q, c, dtype)
        det = DistributedKNNN(client=client).fit(Xs)
        local = KNNN().fit(Xs)
        assert det.data_scale_exponent_ == local.data_scale_exponent_
        s = det.anomaly_score(Qs)
        assert spearmanr(ref, s)[0] >= 0.9999, c
        # distributed = local at every scale
        rtol = 1e-4 if dtype == np.float32 else 1e-9
        np.testing.assert_allclose(s, local.anomaly_score(Qs), rtol=rtol)
        np.testing.assert_allclose(det.offset_, local.offset_, rtol=rtol)
        # the gathered single-machine model keeps the working scale
        np.testing.assert_allclose(det.to_knnn().anomaly_score(Qs), s, rtol=rtol / 100)
