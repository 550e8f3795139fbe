"""The fit's named steps, shared by KNNN and DistributedKNNN: statistics
summed over row partitions give what the whole matrix gives."""

import warnings

import numpy as np
import pytest
from sklearn.covariance import ledoit_wolf

from nonn._base import CappedParameterWarning, conformal_pvalues, threshold
from nonn._knnn import held_out_groups, neighborhoods, resolve_counts, search_width
from nonn._layout import (centred_gram, column_variance, grid_from_statistics, grid_statistics,
                          squared_deviations, variance_from_sums)
from nonn._preprocess import (
    fit_whitening,
    ledoit_wolf_from_moments,
    whitening_matrix,
    whitening_moments,
)


def correlated(seed, n, d, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 5).astype(dtype)


@pytest.mark.parametrize("n,d", [(60, 5), (40, 90), (500, 1), (3, 8)])
def test_ledoit_wolf_from_partition_sums_equals_sklearn(n, d):
    X = correlated(0, n, d)
    mean = X.mean(axis=0)
    gram, norm4 = 0.0, 0.0
    for part in np.array_split(X, 3):
        g, r = whitening_moments(part, mean, block=7)
        gram, norm4 = gram + g, norm4 + r
    C, shrinkage = ledoit_wolf_from_moments(n, gram, norm4)
    C_ref, s_ref = ledoit_wolf(X - mean, assume_centered=True)
    assert shrinkage == pytest.approx(s_ref, rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(C, C_ref, rtol=1e-12, atol=1e-12 * np.abs(C_ref).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fit_whitening_is_sklearns_ledoit_wolf(dtype):
    """fit_whitening (block sums, no float64 copy of X) equals the whitening
    matrix of scikit-learn's ledoit_wolf on the rows it keeps, and leaving
    rows out equals deleting them."""
    X = correlated(1, 9000, 6, dtype)  # more rows than one block
    rows = np.random.default_rng(0).choice(len(X), 3000, replace=False)
    for exclude, kept in ((None, X), (rows, np.delete(X, rows, axis=0))):
        mean, W = fit_whitening(X, 0.7, exclude=exclude)
        X64 = kept.astype(np.float64)
        C, _ = ledoit_wolf(X64 - X64.mean(0), assume_centered=True)
        mean2, W2 = whitening_matrix(X64.mean(0), C, 0.7, X.dtype)
        assert W.dtype == W2.dtype == dtype
        tol = 1e-10 if dtype == np.float64 else 1e-6
        np.testing.assert_allclose(mean, mean2, rtol=tol)
        np.testing.assert_allclose(W, W2, rtol=tol, atol=tol * np.abs(W2).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("set_size,reorder", [(3, "greedy"), (4, "none"), (9, "greedy")])
def test_layout_from_partition_sums(dtype, set_size, reorder):
    """Feature order, set sizes and floors from row blocks' sums equal the
    whole matrix's (the order exactly, floors to rounding)."""
    X = correlated(2, 150, 9, dtype)
    whole = grid_from_statistics(*grid_statistics(X, set_size, reorder), set_size, reorder,
                                 0.1, dtype)
    mean = X.mean(axis=0, dtype=np.float64)
    blocks = np.array_split(X, 4)
    gram = sum(centred_gram(b, mean) for b in blocks)
    sq = sum(squared_deviations(b, mean) for b in blocks)
    parts = grid_from_statistics(gram, variance_from_sums(sq, len(X), mean, dtype), set_size,
                                 reorder, 0.1, dtype)
    np.testing.assert_array_equal(parts[0], whole[0])
    np.testing.assert_array_equal(parts[1], whole[1])
    np.testing.assert_allclose(parts[2], whole[2], rtol=1e-6 if dtype == np.float32 else 1e-12)
    assert parts[2].dtype == dtype
    # one set holding every feature keeps the given order
    if set_size >= X.shape[1]:
        np.testing.assert_array_equal(whole[0], np.arange(9))
    # floors: the relative floor times each set's mean variance
    var = column_variance(X)[whole[0]]
    sizes = whole[1]
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    expect = [0.1 * var[s:s + r].mean() for s, r in zip(starts, sizes)]
    np.testing.assert_allclose(whole[2], expect, rtol=1e-5)


def test_resolve_counts_caps_with_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_counts(100, 8, dict(n_neighbors=3, n_neighbors_of_neighbors=20,
                                           set_size="all")) == (3, 20, 8)
    with pytest.warns(CappedParameterWarning) as rec:
        got = resolve_counts(10, 4, dict(n_neighbors=12, n_neighbors_of_neighbors=50,
                                         set_size=6))
    assert got == (9, 10, 4)
    assert [str(w.message).split("=")[0] for w in rec] == [
        "n_neighbors", "n_neighbors_of_neighbors", "set_size"]


def test_neighborhoods_and_held_out_groups():
    others = np.array([[1, 2, 3], [0, 2, 3], [1, 0, 3]])
    np.testing.assert_array_equal(neighborhoods(others, 3, first_id=10),
                                  [[10, 1, 2], [11, 0, 2], [12, 1, 0]])
    assert search_width(100, 3, 50) == 50 and search_width(100, 60, 50) == 60
    assert search_width(20, 3, 50) == 19
    # neighbor 5 without row 7: 7 leaves, the next nearest (4) comes in
    groups = held_out_groups(np.array([7, 9]), np.array([5, 5]),
                             np.array([[2, 7, 3, 4], [2, 7, 3, 4]]), 4)
    np.testing.assert_array_equal(groups, [[5, 2, 3, 4], [5, 2, 7, 3]])


def test_threshold_and_conformal_pvalues():
    s = np.array([-3.0, -1.0, -2.0, -5.0, -4.0])  # score_samples
    # conformal: the k-th lowest, k = floor(rate * (n + 1)), at least 1
    assert threshold(s, 0.25) == -5.0  # k = floor(1.5) = 1
    assert threshold(s, 0.34) == -4.0  # k = floor(2.04) = 2
    assert threshold(s, 0.5) == -3.0   # k = 3
    assert threshold(s, 0.01) == -5.0  # fewer scores than the rate needs: the lowest
    # predict at a rate flags what pvalue <= rate flags
    rng = np.random.default_rng(0)
    cal, new = rng.normal(size=199), rng.normal(size=5000)
    for rate in (0.01, 0.05, 0.2):
        flagged = new - threshold(cal, rate) < 0
        np.testing.assert_array_equal(flagged, conformal_pvalues(-new, cal) <= rate)
    # anomaly scores 1..5: a query scoring 4 has 2 calibration scores >= it
    np.testing.assert_allclose(conformal_pvalues([4.0, 0.0, 9.0], s), [3 / 6, 1.0, 1 / 6])
