"""Ties among equidistant neighbors: the documented rule.

The "brute" backend (and so ``KNNN``'s neighborhoods with it) ranks
candidates by (ranking value, id): among exact duplicates, and among rows
at equal distance whose distances the arithmetic computes exactly (binary
features), the lowest training ids win, whatever the blocks and threads.
The oracle is a naive float64 sort by (distance, id).
"""

import numpy as np
import pytest

from nonn import KNNN
from nonn.neighbors import make_backend


def oracle_ids(X, Q, k, self_query):
    """The k nearest ids by (exact float64 distance, id), each training row
    excluded from its own list when ``self_query``."""
    X64 = X.astype(np.float64)
    ids = np.arange(X.shape[0])
    out = []
    for i, q in enumerate(Q.astype(np.float64)):
        d = ((X64 - q) ** 2).sum(axis=1)
        if self_query:
            d[i] = np.inf
        out.append(np.lexsort((ids, d))[:k])
    return np.array(out)


def duplicated_rows(dtype, seed=0, distinct=300, copies=7, d=9):
    """``distinct`` normal rows, each ``copies`` times, in shuffled order."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(distinct, d))
    X = base[rng.permutation(np.repeat(np.arange(distinct), copies))].astype(dtype)
    return X, base[:60].astype(dtype)


def binary_rows(dtype, seed=0, n=2100, d=14):
    """Random binary rows: few distinct distances, many exact ties."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 2, size=(n, d)).astype(dtype)
    return X, rng.integers(0, 2, size=(60, d)).astype(dtype)


@pytest.mark.parametrize("make", [duplicated_rows, binary_rows])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("return_distance", [False, True])
@pytest.mark.parametrize("working_memory", [None, 0.05])  # 0.05 MiB: many small blocks
def test_brute_ties_go_to_the_lowest_ids(make, dtype, return_distance, working_memory):
    X, Q = make(dtype)
    search = make_backend("brute", working_memory=working_memory).fit(X)
    for query, self_query in ((None, True), (Q, False)):
        expected = _oracle(make, dtype, self_query)
        for k in (5, 12):  # 12 reaches past the 6 other copies of a duplicated row
            got = search.kneighbors(query, k, return_distance=return_distance)
            ids = got[1] if return_distance else got
            np.testing.assert_array_equal(ids, expected[:, :k])


_ORACLES = {}


def _oracle(make, dtype, self_query, k=12):
    key = (make.__name__, dtype, self_query)
    if key not in _ORACLES:
        X, Q = make(dtype)
        _ORACLES[key] = oracle_ids(X, X if self_query else Q, k, self_query)
    return _ORACLES[key]


@pytest.mark.parametrize("memory", ["precomputed", "lean"])
def test_knnn_neighborhoods_take_the_lowest_ids(memory):
    """KNNN's neighborhoods (brute): the point, then its K' - 1 nearest
    others by (distance, id); a query's neighbors likewise."""
    X, Q = duplicated_rows(np.float64, copies=4)
    det = KNNN(n_neighbors=3, n_neighbors_of_neighbors=6, backend="brute", memory=memory).fit(X)
    np.testing.assert_array_equal(det.neighborhoods_[:, 0], np.arange(len(X)))
    np.testing.assert_array_equal(det.neighborhoods_[:, 1:], oracle_ids(X, X, 5, True))
    Qg = det._to_grid(det._preprocess(Q))
    np.testing.assert_array_equal(det._query_neighbors(Qg), oracle_ids(X, Q, 3, False))


def test_faiss_flat_ties_go_to_the_lowest_ids():
    """FAISS's exact "Flat" index as nonn drives it follows the same rule
    (FAISS's k-selection keeps the first of equal values)."""
    pytest.importorskip("faiss")
    for make in (duplicated_rows, binary_rows):
        X, Q = make(np.float32)
        search = make_backend("faiss", index="Flat").fit(X)
        for query, self_query in ((None, True), (Q, False)):
            ids = search.kneighbors(query, 12, return_distance=False)
            np.testing.assert_array_equal(ids, oracle_ids(X, X if self_query else Q, 12,
                                                          self_query))


def test_copies_a_last_bit_apart_become_the_lowest_ids():
    """What a BLAS that rounds one product differently at two tile positions
    hands the heaps: copies of a row a last bit apart, and not its lowest
    ids. The lists must come out as the (value, id) rule on exact values."""
    from nonn.neighbors import _kernels
    from nonn.neighbors._base import _duplicate_groups

    X = np.array([[0.0], [1.0], [1.0], [2.0], [1.0], [1.0]], dtype=np.float32)
    g = _duplicate_groups(X)
    one = np.float32(1.0)
    up = np.nextafter(one, np.float32(2))
    # query 0 (a new point): copies 4 and 5 of row 1 kept, 5 a last bit below 4
    heap_v = np.array([[up, one, 2.0]], dtype=np.float32)
    heap_i = np.array([[4, 5, 3]], dtype=np.int64)
    _kernels.canonical_duplicates(heap_v, heap_i, g["inv"], g["ptr"], g["members"], 0, False)
    np.testing.assert_array_equal(heap_i, [[1, 2, 3]])
    np.testing.assert_array_equal(heap_v, [[one, one, 2.0]])
    # self query of row 2 (start 2): its own id is never handed out
    heap_v = np.array([[0.0, np.nextafter(np.float32(0), one)]], dtype=np.float32)
    heap_i = np.array([[5, 4]], dtype=np.int64)
    _kernels.canonical_duplicates(heap_v, heap_i, g["inv"], g["ptr"], g["members"], 2, True)
    np.testing.assert_array_equal(heap_i, [[1, 4]])
    assert heap_v[0, 0] == heap_v[0, 1] == 0


def test_a_negative_zero_is_a_copy():
    from nonn.neighbors._base import _duplicate_groups

    X = np.array([[0.0, 1.0], [-0.0, 1.0], [1.0, 0.0]])
    g = _duplicate_groups(X)
    assert g["inv"][0] == g["inv"][1] != g["inv"][2]
    assert np.signbit(X[1, 0])  # the caller's data untouched
