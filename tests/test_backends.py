"""Every search backend against one contract and an independent oracle.

The contract (``nonn.neighbors._base``): ``(distances, indices)`` sorted
ascending, true distances (not squared), int64 ids, no -1 padding, and for
the training set (``X=None``) each point excluded by index, so exact
duplicates are neighbors at distance 0 but a point never is its own;
``return_distance=False`` returns the same ids alone.
"""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from nonn import KNNN
from nonn.neighbors import BACKENDS, NeighborsBackend, make_backend, resolve_backend

# id -> (backend name, backend_params, library needed, exact)
SPECS = {
    "brute": ("brute", {}, None, True),
    "sklearn": ("sklearn", {}, None, True),
    "faiss-flat": ("faiss", {"index": "Flat"}, "faiss", True),
    "faiss-hnsw": ("faiss", {"index": "HNSW32"}, "faiss", False),
    "faiss-hnsw-refine": ("faiss", {"index": "HNSW8", "efSearch": 16, "refine": 2,
                                    "refine_fanout": 4}, "faiss", False),
    "faiss-ivf": ("faiss", {"index": "IVF8,Flat"}, "faiss", False),
    "faiss-ivfpq": ("faiss", {"index": "IVF8,PQ4x4"}, "faiss", False),
    "torch-cpu": ("torch", {"device": "cpu"}, "torch", True),
    "torch-cuda": ("torch", {"device": "cuda"}, "torch", True),
}
# Product quantisation ranks by compressed codes: exact duplicates share a
# code with other nearby points, so it need not return them first.
LOSSY = {"faiss-ivfpq"}
APPROXIMATE = {
    "faiss-hnsw": ("faiss", {"index": "HNSW32"}),
    "faiss-ivf": ("faiss", {"index": "IVF64,Flat"}),
    "faiss-ivf-nprobe": ("faiss", {"index": "IVF64,Flat", "nprobe": 8}),
    "faiss-hnsw-ef": ("faiss", {"index": "HNSW16", "efSearch": 128}),
}


def available(spec_id):
    """(name, params, exact) of a backend, skipping when its library is missing."""
    name, params, lib, exact = SPECS[spec_id]
    if lib is not None:
        mod = pytest.importorskip(lib)
        if spec_id == "torch-cuda" and not mod.cuda.is_available():
            pytest.skip("CUDA is not available to torch")
    return name, dict(params), exact


# ---------------------------------------------------------------- oracle
def oracle_sq(Q, X, metric):
    """Full matrix of squared Euclidean distances (of unit rows for cosine), float64."""
    Q, X = Q.astype(np.float64), X.astype(np.float64)
    if metric == "cosine":
        Q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
    return ((Q[:, None, :] - X[None, :, :]) ** 2).sum(axis=2)


def to_metric(sq, metric):
    return sq / 2 if metric == "cosine" else np.sqrt(sq)


def data_with_duplicates(dtype, seed=0, n=400, d=8):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) + 3 * rng.normal(size=(4, d))[rng.integers(0, 4, n)]
    X[1] = X[0]  # a pair and a triple of exact duplicates
    X[7] = X[8] = X[9]
    return X.astype(dtype)


def tol(dtype):
    return {"rtol": 2e-5, "atol": 2e-5} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-10}


def check_shape_and_order(dist, ind, nq, k, n_train, dtype):
    assert dist.shape == ind.shape == (nq, k)
    assert ind.dtype == np.int64
    assert dist.dtype == dtype
    assert (ind >= 0).all() and (ind < n_train).all()  # never -1 padding
    assert np.isfinite(dist).all()
    assert (np.diff(dist, axis=1) >= 0).all()  # sorted ascending
    for row in ind:  # no id twice in a row
        assert len(np.unique(row)) == k


def check_ids_only(b, query, k, ind, sq, spec_id, dtype):
    """``return_distance=False`` returns just the int64 ids: the neighbors
    of the call with distances, ordered by the backend's own ranking, i.e.
    by the true distances up to the rounding of that ranking. Lossy
    compressed codes rank by their own distances; where such an index
    misses a training point's own id, the farthest of its k + 1 candidates
    is dropped instead, which may be another one once the distances are
    recomputed, so one id per row may differ there."""
    ids = b.kneighbors(query, k, return_distance=False)
    assert isinstance(ids, np.ndarray)
    assert ids.dtype == np.int64 and ids.shape == ind.shape
    assert (ids >= 0).all() and all(len(np.unique(row)) == k for row in ids)
    if spec_id in LOSSY:
        shared = [len(np.intersect1d(a, c)) for a, c in zip(ids, ind)]
        assert min(shared) >= k - 1
    else:
        np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(ind, axis=1))
        got = np.take_along_axis(sq, ids, 1)
        slack = (1e-5 if dtype == np.float32 else 1e-12) * sq.max()
        assert (np.diff(got, axis=1) >= -slack).all()
    return ids


# ------------------------------------------------------------- contract
@pytest.mark.parametrize("spec_id", list(SPECS))
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_contract(spec_id, metric, dtype):
    name, params, exact = available(spec_id)
    X = data_with_duplicates(dtype)
    n = X.shape[0]
    b = make_backend(name, metric=metric, **params).fit(X)
    assert b.name == name and b.exact == exact
    sq_train = oracle_sq(X, X, metric)

    # the training set: each point excluded by index, duplicates kept
    k = 10
    dist, ind = b.kneighbors(None, k)
    check_shape_and_order(dist, ind, n, k, n, dtype)
    assert not (ind == np.arange(n)[:, None]).any()
    check_ids_only(b, None, k, ind, sq_train, spec_id, dtype)
    # the distances are the true distances to the returned ids
    np.testing.assert_allclose(dist, to_metric(np.take_along_axis(sq_train, ind, 1), metric),
                               **tol(dtype))
    for p, twins in {0: [1], 1: [0], 7: [8, 9], 8: [7, 9], 9: [7, 8]}.items():
        if spec_id in LOSSY:
            break
        assert set(ind[p, : len(twins)]) == set(twins)
        np.testing.assert_array_equal(dist[p, : len(twins)], 0)
    if exact:
        off = sq_train + np.diag(np.full(n, np.inf))
        expected = to_metric(np.sort(off, axis=1)[:, :k], metric)
        np.testing.assert_allclose(dist, expected, **tol(dtype))

    # new queries
    rng = np.random.default_rng(1)
    Q = (X[rng.integers(0, n, 30)] + rng.normal(scale=0.3, size=(30, X.shape[1]))).astype(dtype)
    dist, ind = b.kneighbors(Q, k)
    check_shape_and_order(dist, ind, len(Q), k, n, dtype)
    sq_q = oracle_sq(Q, X, metric)
    check_ids_only(b, Q, k, ind, sq_q, spec_id, dtype)
    np.testing.assert_allclose(dist, to_metric(np.take_along_axis(sq_q, ind, 1), metric),
                               **tol(dtype))
    if exact:
        expected = to_metric(np.sort(sq_q, axis=1)[:, :k], metric)
        np.testing.assert_allclose(dist, expected, **tol(dtype))

    # query refinement is part of the protocol: a search not asked to refine
    # (every exact one) returns the ids as they are
    assert isinstance(b, NeighborsBackend)
    if exact or not params.get("refine"):
        graph = b.kneighbors(None, 5, return_distance=False)
        np.testing.assert_array_equal(b.refine_neighbors(Q, ind, graph), ind)


@pytest.mark.parametrize("spec_id", list(SPECS))
def test_contract_edges(spec_id):
    """All other points / all points (an approximate index may pad with -1
    here: the backend must fill those rows exactly), and more duplicates
    than neighbors asked for (the own id may then be missing from k + 1)."""
    name, params, _ = available(spec_id)
    X = data_with_duplicates(np.float32, n=320)
    n = len(X)
    b = make_backend(name, **params).fit(X)
    dist, ind = b.kneighbors(None, n - 1)
    check_shape_and_order(dist, ind, n, n - 1, n, np.float32)
    np.testing.assert_array_equal(np.sort(ind, axis=1),
                                  [np.delete(np.arange(n), p) for p in range(n)])
    ids = b.kneighbors(None, n - 1, return_distance=False)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(ind, axis=1))
    dist, ind = b.kneighbors(X[:5] + 0.5, n)
    check_shape_and_order(dist, ind, 5, n, n, np.float32)

    # 40 copies of one row, 5 neighbors: all at distance 0, never itself
    rng = np.random.default_rng(2)
    Xd = np.vstack([np.repeat(X[:1], 40, axis=0), X[1:]]).astype(np.float32)
    Xd = Xd[rng.permutation(len(Xd))]
    copies = np.flatnonzero((Xd == X[0]).all(axis=1))
    b = make_backend(name, **params).fit(Xd)
    dist, ind = b.kneighbors(None, 5)
    assert not (ind == np.arange(len(Xd))[:, None]).any()
    if spec_id not in LOSSY:
        np.testing.assert_array_equal(dist[copies], 0)
        assert np.isin(ind[copies], copies).all()


@pytest.mark.parametrize("spec_id", list(SPECS))
def test_n_neighbors_out_of_range(spec_id):
    name, params, _ = available(spec_id)
    X = data_with_duplicates(np.float64, n=320)
    b = make_backend(name, **params).fit(X)
    with pytest.raises(ValueError, match="n_neighbors must be in"):
        b.kneighbors(None, len(X))
    with pytest.raises(ValueError, match="n_neighbors must be in"):
        b.kneighbors(X[:3], 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("working_memory", [None, 0.02, 0.002])
def test_brute_blocks_match_oracle(dtype, working_memory):
    """The brute backend's blocked search (the training set: blocks of the
    symmetric product merged into rows and columns, in round-robin rounds;
    queries: blocks of rows against blocks of the training set) gives the
    oracle's neighbors whatever the block sizes (a small budget makes
    many, and an odd count of, uneven blocks), ties going to the lowest id."""
    X = data_with_duplicates(dtype, n=300)
    n = len(X)
    b = make_backend("brute", working_memory=working_memory).fit(X)
    off = oracle_sq(X, X, "euclidean") + np.diag(np.full(n, np.inf))
    for k in (1, 7, n - 1):
        dist, ind = b.kneighbors(None, k)
        np.testing.assert_allclose(dist, np.sqrt(np.sort(off, axis=1)[:, :k]), **tol(dtype))
        np.testing.assert_allclose(dist, np.sqrt(np.take_along_axis(off, ind, 1)), **tol(dtype))
        ids = b.kneighbors(None, k, return_distance=False)
        np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(ind, axis=1))
    # exact duplicates tie at 0: the lowest ids come first
    np.testing.assert_array_equal(b.kneighbors(None, 2, return_distance=False)[7], [8, 9])
    rng = np.random.default_rng(3)
    Q = (X[rng.integers(0, n, 41)] + rng.normal(scale=0.2, size=(41, X.shape[1]))).astype(dtype)
    sq = oracle_sq(Q, X, "euclidean")
    for k in (1, 9, n):
        dist, ind = b.kneighbors(Q, k)
        np.testing.assert_allclose(dist, np.sqrt(np.sort(sq, axis=1)[:, :k]), **tol(dtype))
        np.testing.assert_allclose(dist, np.sqrt(np.take_along_axis(sq, ind, 1)), **tol(dtype))


# --------------------------------------------------------------- recall
def clustered(seed=0, n=4000, n_q=500, d=32, n_clusters=20):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4, size=(n_clusters, d))
    X = centres[rng.integers(0, n_clusters, n)] + rng.normal(size=(n, d))
    Q = centres[rng.integers(0, n_clusters, n_q)] + rng.normal(size=(n_q, d))
    return X.astype(np.float32), Q.astype(np.float32)


def recall(found, truth):
    return np.mean([len(np.intersect1d(f, t)) for f, t in zip(found, truth)]) / truth.shape[1]


@pytest.mark.parametrize("approx_id", list(APPROXIMATE))
def test_recall_of_approximate_backends(approx_id):
    pytest.importorskip("faiss")
    name, params = APPROXIMATE[approx_id]
    X, Q = clustered()
    exact = make_backend("brute").fit(X)
    b = make_backend(name, **params).fit(X)
    assert not b.exact
    assert recall(b.kneighbors(Q, 10)[1], exact.kneighbors(Q, 10)[1]) >= 0.9
    assert recall(b.kneighbors(None, 10)[1], exact.kneighbors(None, 10)[1]) >= 0.9


# ------------------------------------------------------- through KNNN
def separated(dtype, seed=4, n=300, d=8, n_q=60):
    """Centred training data (float32 rounding of the |a|^2 - 2ab + |b|^2
    expansion stays near machine epsilon relative to the distances) whose
    neighbor distances at the k and K' cuts are far apart relative to that
    rounding, so every exact backend must pick the same neighbors. The seed
    was chosen for that; the test checks it against a float64 oracle."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    Q = np.vstack([rng.normal(size=(n_q - 10, d)), rng.uniform(-4, 4, size=(10, d))])
    y = np.r_[np.zeros(n_q - 10), np.ones(10)]
    return X.astype(dtype), Q.astype(dtype), y


def min_relative_gap(sq, ks):
    s = np.sort(sq, axis=1)
    return min(((s[:, k] - s[:, k - 1]) / s[:, k]).min() for k in ks)


@pytest.mark.parametrize("spec_id", list(SPECS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_knnn_scores_match_brute(spec_id, dtype):
    name, params, exact = available(spec_id)
    X, Q, y = separated(dtype)
    k, Kp = 3, 25
    # precondition of an exact comparison: no near-tie at either cut
    off = oracle_sq(X, X, "euclidean") + np.diag(np.full(len(X), np.inf))
    assert min_relative_gap(off, [k, Kp - 1]) > 5e-5
    assert min_relative_gap(oracle_sq(Q, X, "euclidean"), [k]) > 5e-5

    # set_size=4 divides D=8: KNNN searches on its zero-padded feature grid,
    # and product quantisation needs a dimension its sub-quantisers divide
    ref = KNNN(n_neighbors=k, n_neighbors_of_neighbors=Kp, set_size=4, backend="brute").fit(X)
    det = KNNN(n_neighbors=k, n_neighbors_of_neighbors=Kp, set_size=4, backend=name,
               backend_params=params).fit(X)
    assert det.backend_ == name
    s_ref, s = ref.anomaly_score(Q), det.anomaly_score(Q)
    assert s.dtype == dtype
    if exact:
        rtol = 1e-5 if dtype == np.float32 else 1e-9
        np.testing.assert_array_equal(det.neighborhoods_, ref.neighborhoods_)
        np.testing.assert_allclose(s, s_ref, rtol=rtol)
        np.testing.assert_allclose(det.train_scores_, ref.train_scores_, rtol=rtol)
    else:
        assert abs(roc_auc_score(y, s) - roc_auc_score(y, s_ref)) <= 0.02


# ----------------------------------------------------------------- auto
def test_auto_is_exact_and_follows_shape(monkeypatch):
    import nonn.neighbors as nb

    monkeypatch.setattr(nb, "_cuda_available", lambda: False)
    monkeypatch.setattr(nb, "_installed", lambda m: m in ("faiss", "torch"))
    assert resolve_backend("auto", 100_000, 3) == "sklearn"
    assert resolve_backend("auto", 1000, 512) == "brute"
    # exact FAISS flat is never auto's pick: brute measured faster at every size
    assert resolve_backend("auto", 5000, 16) == "brute"
    assert resolve_backend("auto", 100_000, 512) == "brute"
    monkeypatch.setattr(nb, "_cuda_available", lambda: True)
    assert resolve_backend("auto", 100_000, 512) == "torch"
    assert resolve_backend("auto", 5000, 16) == "brute"  # too small for the GPU
    monkeypatch.setattr(nb, "_installed", lambda m: False)
    assert resolve_backend("auto", 100_000, 512) == "brute"
    for shape in [(100, 2), (1000, 64), (10_000, 64)]:
        picked = resolve_backend("auto", *shape)
        assert BACKENDS[picked]().exact


def test_auto_recorded_on_the_estimator():
    pytest.importorskip("faiss")
    from nonn import neighbors as nb

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5)).astype(np.float32)
    assert KNNN(n_neighbors_of_neighbors=10).fit(X).backend_ == "brute"
    X = rng.normal(size=(5000, 4)).astype(np.float32)
    expected = resolve_backend("auto", *X.shape)
    assert KNNN(n_neighbors_of_neighbors=10, set_size=2).fit(X).backend_ == expected


def test_unknown_backend_and_parameters():
    with pytest.raises(ValueError, match="Unknown backend 'annoy'"):
        make_backend("annoy")
    with pytest.raises(TypeError, match="does not accept the parameter"):
        make_backend("auto", n_samples=100, n_features=8, index="HNSW32")


# ---------------------------------------------------------------- faiss
def test_faiss_parameters_and_threads():
    faiss = pytest.importorskip("faiss")
    X, Q = clustered(n=2000)
    before = faiss.omp_get_max_threads()
    b = make_backend("faiss", index="IVF32,Flat", nprobe=5, n_jobs=1).fit(X)
    assert b.nprobe_ == 5 and faiss.extract_index_ivf(b.index_).nprobe == 5
    b.kneighbors(Q, 5)
    assert faiss.omp_get_max_threads() == before
    assert make_backend("faiss", index="IVF32,Flat").fit(X).nprobe_ == 2  # nlist // 16
    b = make_backend("faiss", index="HNSW16", efSearch=77, efConstruction=50).fit(X)
    b.kneighbors(Q, 5)
    assert b.index_.hnsw.efSearch == 77 and b.index_.hnsw.efConstruction == 50


def test_faiss_raw_distances_option():
    pytest.importorskip("faiss")
    X, Q = clustered(n=1000)
    for metric in ["euclidean", "cosine"]:
        exact = make_backend("faiss", metric=metric).fit(X).kneighbors(Q, 5)
        raw = make_backend("faiss", metric=metric, recompute_distances=False).fit(X)
        d, i = raw.kneighbors(Q, 5)
        np.testing.assert_allclose(d, exact[0], rtol=1e-3, atol=1e-4)
        assert (np.diff(d, axis=1) >= 0).all()


def test_faiss_errors():
    pytest.importorskip("faiss")
    X = np.random.default_rng(0).normal(size=(100, 8))
    with pytest.raises(ValueError, match="could not build the index 'Bogus7'"):
        make_backend("faiss", index="Bogus7").fit(X)
    with pytest.raises(ValueError, match="needs at least as many points as lists"):
        make_backend("faiss", index="IVF256,Flat").fit(X)
    with pytest.raises(ValueError, match="index-factory string"):
        make_backend("faiss", index="")


def test_missing_library_hint(monkeypatch):
    import sys

    X = np.random.default_rng(0).normal(size=(50, 4))
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r'pip install "nonn\[faiss\]"'):
        make_backend("faiss").fit(X)
    with pytest.raises(ImportError, match="pip install torch"):
        make_backend("torch").fit(X)


# ---------------------------------------------------------------- torch
def test_torch_device_and_batches():
    torch = pytest.importorskip("torch")
    X, Q = clustered(n=1500)
    with pytest.raises(ValueError, match="'device' parameter"):
        make_backend("torch", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch.cuda.is_available"):
            make_backend("torch", device="cuda").fit(X)
    b = make_backend("torch", device="auto").fit(X)
    assert b.device_ == ("cuda" if torch.cuda.is_available() else "cpu")
    ref = make_backend("brute").fit(X)
    threads = torch.get_num_threads()
    small = make_backend("torch", device="cpu", batch_size=7, n_jobs=1).fit(X)
    for query in (None, Q):
        d, i = small.kneighbors(query, 8)
        np.testing.assert_allclose(d, ref.kneighbors(query, 8)[0], rtol=1e-5)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("spec_id", list(SPECS))
def test_every_backend_takes_the_common_parameters(spec_id):
    """metric, working_memory, verbose and n_jobs are accepted by every
    backend (so an estimator can always pass them), and n_jobs / a tiny
    working_memory change nothing in the answer."""
    name, params, exact = available(spec_id)
    X = data_with_duplicates(np.float32, n=320)
    ref = make_backend(name, **params).fit(X).kneighbors(None, 6)
    b = make_backend(name, metric="euclidean", working_memory=0.01, verbose=False, n_jobs=1,
                     **params).fit(X)
    for got, want in zip(b.kneighbors(None, 6), ref):
        if exact:
            np.testing.assert_array_equal(got, want)
        else:  # a multi-threaded HNSW build need not give the same graph
            assert got.shape == want.shape
    ids = b.kneighbors(None, 6, return_distance=False)
    if exact:
        np.testing.assert_array_equal(
            ids, make_backend(name, **params).fit(X).kneighbors(None, 6, return_distance=False))


# ------------------------------------------------- graph refinement
def naive_refine_round(X, ind, fanout, reverse):
    """One "neighbors of neighbors" round written as plain loops: the
    candidates of row i are its neighbors, the neighbors of its first
    ``fanout`` ones and the first ``reverse`` rows (by their rank, then id)
    that list i; the k nearest distinct ones other than i, by (distance, id)."""
    n, k = ind.shape
    listed_by = [[] for _ in range(n)]
    for r in range(n):
        for rank, j in enumerate(ind[r]):
            listed_by[j].append((rank, r))
    out_sq, out_ids = np.empty((n, k)), np.empty((n, k), dtype=np.int64)
    for i in range(n):
        cand = set(ind[i].tolist())
        for r in ind[i][:fanout]:
            cand.update(ind[r].tolist())
        cand.update(r for _, r in sorted(listed_by[i])[:reverse])
        cand.discard(i)
        pairs = sorted((float(((X[j].astype(np.float64) - X[i]) ** 2).sum()), j) for j in cand)
        out_sq[i] = [p[0] for p in pairs[:k]]
        out_ids[i] = [p[1] for p in pairs[:k]]
    return out_sq, out_ids


@pytest.mark.parametrize("fanout,reverse,rounds", [(3, 0, 1), (2, 5, 1), (4, 3, 2)])
def test_refine_graph_matches_loop_oracle(fanout, reverse, rounds):
    from nonn.neighbors._base import refine_graph

    rng = np.random.default_rng(5)
    X = rng.normal(size=(150, 6)).astype(np.float32)
    k = 7
    # a poor start: random distinct neighbors, never the row itself
    ind = np.array([rng.choice(np.delete(np.arange(150), i), k, replace=False)
                    for i in range(150)])
    exp_ids = ind
    for _ in range(rounds):
        exp_sq, exp_ids = naive_refine_round(X, exp_ids, fanout, reverse)
    sq, ids = refine_graph(X, ind, rounds, fanout, reverse, working_memory=0.001)
    np.testing.assert_array_equal(ids, exp_ids)
    np.testing.assert_allclose(sq, exp_sq, rtol=1e-12)
    assert ids.dtype == np.int64 and sq.dtype == np.float64


def test_refine_lifts_recall_of_a_poor_index():
    pytest.importorskip("faiss")
    X, _ = clustered()
    truth = make_backend("brute").fit(X).kneighbors(None, 15)[1]
    params = {"index": "HNSW4", "efSearch": 4, "efConstruction": 8}
    poor = make_backend("faiss", **params).fit(X).kneighbors(None, 15)[1]
    b = make_backend("faiss", refine=3, **params).fit(X)
    dist, ind = b.kneighbors(None, 15)
    before, after = recall(poor, truth), recall(ind, truth)
    assert after >= before + 0.3 and after >= 0.9, (before, after)  # measured 0.41 -> 0.90
    # refined ids come with their true distances, sorted
    sq = oracle_sq(X, X, "euclidean")
    np.testing.assert_allclose(dist, np.sqrt(np.take_along_axis(sq, ind, 1)), rtol=2e-5)
    assert (np.diff(dist, axis=1) >= 0).all() and not (ind == np.arange(len(X))[:, None]).any()


def test_refine_leaves_exact_search_and_queries_alone():
    pytest.importorskip("faiss")
    X, Q = clustered(n=1000)
    flat = make_backend("faiss").fit(X)
    flat_r = make_backend("faiss", refine=3).fit(X)
    np.testing.assert_array_equal(flat_r.kneighbors(None, 5)[1], flat.kneighbors(None, 5)[1])
    hnsw = make_backend("faiss", index="HNSW8").fit(X)
    hnsw_r = make_backend("faiss", index="HNSW8", refine=1).fit(X)
    np.testing.assert_array_equal(hnsw_r.kneighbors(Q, 5)[1], hnsw.kneighbors(Q, 5)[1])


def test_refine_parameters_are_checked():
    pytest.importorskip("faiss")
    for bad in ({"refine": -1}, {"refine": 1.5}, {"refine_fanout": 0},
                {"refine_reverse": -2}, {"refine": True}):
        with pytest.raises(ValueError, match="parameter of the faiss backend must be an int"):
            make_backend("faiss", index="HNSW8", **bad)


def test_knnn_refines_query_neighbors_against_its_graph(tmp_path):
    """With ``refine``, KNNN's query neighbors are the exact k nearest among
    the index's finds and their stored neighborhoods (a plain-loop oracle),
    which lifts query recall; the result survives save / load."""
    pytest.importorskip("faiss")
    import nonn

    X, Q = clustered(n=3000, n_q=300)
    params = {"index": "HNSW4", "efSearch": 4, "efConstruction": 8}
    det = KNNN(n_neighbors=5, n_neighbors_of_neighbors=12, set_size=4, backend="faiss",
               backend_params=dict(params, refine=2)).fit(X)
    Qg = det._to_grid(Q)
    found = det._search.kneighbors(Qg, 5, return_distance=False)
    got = det._query_neighbors(Qg)
    Xg = det._fit_X.astype(np.float64)
    for q, f, g in zip(Qg.astype(np.float64), found, got):
        cand = np.unique(np.r_[f, det.neighborhoods_[f].ravel()])
        d = ((Xg[cand] - q) ** 2).sum(1)
        np.testing.assert_array_equal(g, cand[np.lexsort((cand, d))][:5])
    truth = make_backend("brute").fit(Xg).kneighbors(Qg.astype(np.float64), 5)[1]
    # measured 0.43 -> 0.67 (a deliberately poor index, K' = 12)
    assert recall(got, truth) >= recall(found, truth) + 0.15
    path = tmp_path / "m.nonn"
    det.save(path)
    np.testing.assert_array_equal(nonn.load(path).anomaly_score(Q), det.anomaly_score(Q))


def test_faiss_refines_query_neighbors_by_its_own_metric():
    """``refine_neighbors`` of an approximate index: each query's exact k
    nearest, by the backend's metric (cosine here: on unit rows), among the
    found rows and their graph neighbors (a plain-loop oracle)."""
    pytest.importorskip("faiss")
    from nonn.neighbors._base import unit_rows

    X, Q = clustered(n=2000, n_q=100)
    b = make_backend("faiss", metric="cosine", index="HNSW4", efSearch=4, efConstruction=8,
                     refine=1).fit(X)
    graph = b.kneighbors(None, 8, return_distance=False)
    found = b.kneighbors(Q, 5, return_distance=False)
    got = b.refine_neighbors(Q, found, graph)
    U, V = b._X.astype(np.float64), unit_rows(Q).astype(np.float64)
    for v, f, g in zip(V, found, got):
        cand = np.unique(np.r_[f, graph[f].ravel()])
        d = ((U[cand] - v) ** 2).sum(1)
        np.testing.assert_array_equal(g, cand[np.lexsort((cand, d))][:5])
    assert (got != found).any()


def test_dedupe_expands_exact_duplicates_like_exact_search():
    """Approximate indexes hold each distinct row once; a found row stands
    for all its copies (ascending id, as exact search breaks the ties at 0),
    a training row's own copies come first. Compared with exact search on
    data where one row repeats 300 times (as in ADBench donors)."""
    pytest.importorskip("faiss")
    from nonn.neighbors.faiss import _duplicate_groups

    rng = np.random.default_rng(6)
    base = rng.normal(size=(1500, 8)).astype(np.float32)
    X = np.vstack([base, np.repeat(base[:1], 300, 0), base[5:25]])[rng.permutation(1820)]
    g = _duplicate_groups(X)
    assert len(g["first"]) == 1500 and g["ptr"][-1] == 1820
    for grp in (g["inv"][0], g["inv"][1]):
        rows = g["members"][g["ptr"][grp]:g["ptr"][grp + 1]]
        assert (np.diff(rows) > 0).all() and (X[rows] == X[rows[0]]).all()
        assert g["first"][grp] == rows[0]
    assert _duplicate_groups(base) is None

    exact = make_backend("brute").fit(X)
    b = make_backend("faiss", index="HNSW16").fit(X)
    assert b._groups is not None and b.index_.ntotal == 1500
    big = np.flatnonzero((X == base[0]).all(1))
    d_e, i_e = exact.kneighbors(None, 10)
    d_a, i_a = b.kneighbors(None, 10)
    check_shape_and_order(d_a, i_a, len(X), 10, len(X), np.float32)
    assert not (i_a == np.arange(len(X))[:, None]).any()
    # the big group's rows: their 10 lowest-id other copies, exactly as brute
    np.testing.assert_array_equal(i_a[big], i_e[big])
    assert recall(i_a, i_e) >= 0.99
    np.testing.assert_array_equal(b.kneighbors(None, 10, return_distance=False)[big], i_e[big])
    Q = np.vstack([base[:1], base[7:9] + 0.01]).astype(np.float32)
    np.testing.assert_array_equal(b.kneighbors(Q, 10)[1], exact.kneighbors(Q, 10)[1])
    # off: the index holds every row
    assert make_backend("faiss", index="HNSW16", dedupe=False).fit(X).index_.ntotal == 1820
    with pytest.raises(ValueError, match="'dedupe' parameter"):
        make_backend("faiss", index="HNSW16", dedupe="yes")
