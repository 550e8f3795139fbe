"""nonn.distributed: DistributedKNNN on a Dask LocalCluster of 2 workers.

Every comparison is against a single-machine ``KNNN`` built from the same
``get_params()`` (minus ``client``), never against hard-coded values, so a
change of KNNN's defaults or maths is followed here automatically.
"""

import os
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import nonn  # noqa: E402
from nonn import KNNN  # noqa: E402
from nonn.distributed import DistributedKNNN  # noqa: E402

#: KNNN's aggregate values to check
AGGREGATES = ["sum", "min"]


def agg_params(aggregate):
    return {"aggregate": aggregate}


@pytest.fixture(scope="module")
def client():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                           dashboard_address=None)
        cl = distributed.Client(cluster)
    yield cl
    cl.close()
    cluster.close()


def data(seed=0, n=300, d=12, n_q=40, dtype=np.float64):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) + 2 * np.eye(d)
    X = rng.normal(size=(n, d)) @ A
    Q = np.vstack([rng.normal(size=(n_q, d)) @ A, 4 + 3 * rng.normal(size=(5, d))])
    return X.astype(dtype), Q.astype(dtype)


def reference(det, X):
    return KNNN(**det.knnn_params()).fit(X)


def gather(det, a):
    """A fitted dask array computed on the estimator's own client (its
    persisted blocks live there; the default client may be another one)."""
    return det.client_.compute(a, sync=True) if isinstance(a, da.Array) else np.asarray(a)


def assert_same_model(det, ref, X, Q, rtol):
    np.testing.assert_array_equal(det.feature_order_, ref.feature_order_)
    np.testing.assert_array_equal(det.set_sizes_, ref.set_sizes_)
    np.testing.assert_allclose(det.eig_floor_, ref.eig_floor_, rtol=rtol)
    assert det.n_neighbors_ == ref.n_neighbors_
    assert det.n_neighbors_of_neighbors_ == ref.n_neighbors_of_neighbors_
    # the same neighborhoods (order inside a neighborhood is immaterial)
    nb = gather(det, det.neighborhoods_)
    np.testing.assert_array_equal(nb[:, 0], np.arange(len(X)))
    np.testing.assert_array_equal(np.sort(nb, axis=1), np.sort(ref.neighborhoods_, axis=1))
    np.testing.assert_allclose(gather(det, det.eigenvalues_), ref.eigenvalues_, rtol=rtol,
                               atol=rtol * np.abs(ref.eigenvalues_).max())
    # the threshold's held-out calibration scores
    train = gather(det, det.train_scores_)
    assert train.shape == ref.train_scores_.shape and train.dtype == ref.train_scores_.dtype
    np.testing.assert_allclose(train, ref.train_scores_, rtol=rtol)
    np.testing.assert_array_equal(det.calibration_rows_, ref.calibration_rows_)
    np.testing.assert_allclose(det.calibration_scores_, ref.calibration_scores_, rtol=rtol)
    np.testing.assert_allclose(det.offset_, ref.offset_, rtol=rtol)
    np.testing.assert_allclose(det.anomaly_score(Q), ref.anomaly_score(Q), rtol=rtol)


# ------------------------------------------------------------ exactness
@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("chunks", [None, 300, 100, 71])
def test_equals_knnn_brute(client, chunks, aggregate):
    X, Q = data(0)
    det = DistributedKNNN(client=client, backend="brute", n_neighbors_of_neighbors=15,
                          **agg_params(aggregate))
    det.fit(X if chunks is None else da.from_array(X, chunks=(chunks, -1)))
    if chunks is not None:
        assert det.n_partitions_ == -(-len(X) // chunks)
    assert_same_model(det, reference(det, X), X, Q, rtol=1e-9)


@pytest.mark.parametrize("metric,reorder,d,L", [("cosine", "greedy", 13, 5),
                                                ("euclidean", "none", 7, 3)])
def test_equals_knnn_options(client, metric, reorder, d, L):
    X, Q = data(1, n=200, d=d)
    det = DistributedKNNN(client=client, backend="brute", metric=metric, reorder=reorder,
                          set_size=L, n_neighbors=4, n_neighbors_of_neighbors=12)
    det.fit(da.from_array(X, chunks=(64, -1)))
    assert_same_model(det, reference(det, X), X, Q, rtol=1e-9)


def test_equals_knnn_float32(client):
    X, Q = data(2, dtype=np.float32)
    det = DistributedKNNN(client=client, backend="brute").fit(da.from_array(X, chunks=(90, -1)))
    assert det.dtype_ == np.float32
    assert det.anomaly_score(Q).dtype == np.float32
    assert_same_model(det, reference(det, X), X, Q, rtol=2e-4)


def test_equals_knnn_faiss_flat(client):
    pytest.importorskip("faiss")
    X, Q = data(3, dtype=np.float32)
    det = DistributedKNNN(client=client, backend="faiss",
                          backend_params={"index": "Flat"}).fit(da.from_array(X, chunks=(120, -1)))
    ref = KNNN(**{**det.knnn_params(), "backend": "brute", "backend_params": None}).fit(X)
    assert_same_model(det, ref, X, Q, rtol=2e-4)


def test_defaults_follow_knnn(client):
    """No parameter given: whatever KNNN's defaults are, the results agree."""
    X, Q = data(4, n=120)
    det = DistributedKNNN(client=client).fit(da.from_array(X, chunks=(50, -1)))
    assert_same_model(det, KNNN().fit(X), X, Q, rtol=1e-7)


def test_small_partitions_and_caps(client):
    """Partitions smaller than K' (neighbors come from several shards) and
    counts capped to the data, with KNNN's warnings."""
    X, Q = data(5, n=30, d=6)
    det = DistributedKNNN(client=client, backend="brute", n_neighbors_of_neighbors=40,
                          set_size=10)
    with pytest.warns(nonn._base.CappedParameterWarning):
        det.fit(da.from_array(X, chunks=(7, -1)))
    with pytest.warns(nonn._base.CappedParameterWarning):
        ref = reference(det, X)
    assert det.n_neighbors_of_neighbors_ == ref.n_neighbors_of_neighbors_ == 30
    assert_same_model(det, ref, X, Q, rtol=1e-9)


# ------------------------------------------------------------------ API
def test_params_mirror_knnn():
    names = set(KNNN().get_params())
    det = DistributedKNNN()
    assert set(det.get_params()) == names | {"client"}
    assert set(det.knnn_params()) == names
    assert {k: v for k, v in det.knnn_params().items()} == KNNN().get_params()
    with pytest.raises(TypeError):
        DistributedKNNN(not_a_parameter=1)
    from sklearn.base import clone

    c = clone(DistributedKNNN(n_neighbors=5, client="tcp://nowhere:1"))
    assert c.n_neighbors == 5 and c.client == "tcp://nowhere:1"


def test_return_types(client):
    X, Q = data(6, n=150)
    det = DistributedKNNN(client=client, backend="brute").fit(da.from_array(X, chunks=(50, -1)))
    # the calibration rows' held-out scores: at most CALIBRATION_ROWS values,
    # kept on the client (p-values and thresholds read them)
    for name in ("train_scores_", "calibration_rows_", "calibration_scores_"):
        assert isinstance(getattr(det, name), np.ndarray), name
    Qd = da.from_array(Q, chunks=(20, -1))
    ref = reference(det, X)
    for method in ("anomaly_score", "score_samples", "decision_function", "predict"):
        lazy = getattr(det, method)(Qd)
        eager = getattr(det, method)(Q)
        assert isinstance(lazy, da.Array), method
        assert isinstance(eager, np.ndarray), method
        assert lazy.shape == (len(Q),)
        with det.client_.as_current():
            np.testing.assert_allclose(lazy.compute(), eager, rtol=1e-12)
        np.testing.assert_allclose(eager, getattr(ref, method)(Q), rtol=1e-9)
    np.testing.assert_array_equal(det.predict(Q), ref.predict(Q))
    # numpy fit: numpy training scores
    det2 = DistributedKNNN(client=client, backend="brute").fit(X)
    assert isinstance(det2.train_scores_, np.ndarray)
    np.testing.assert_array_equal(det2.fit_predict(X), ref.fit_predict(X))
    np.testing.assert_allclose(det2.train_scores_, ref.train_scores_, rtol=1e-9)


def test_calibrate(client):
    X, Q = data(16, n=150)
    det = DistributedKNNN(client=client, backend="brute").fit(da.from_array(X, chunks=(50, -1)))
    ref = reference(det, X)
    det.calibrate(da.from_array(Q, chunks=(20, -1)), 0.1)
    ref.calibrate(Q, 0.1)
    np.testing.assert_allclose(det.offset_, ref.offset_, rtol=1e-9)
    assert det.threshold_source_ == ref.threshold_source_


def test_input_errors(client):
    X, Q = data(7, n=80)
    Xn = X.copy()
    Xn[33, 2] = np.nan
    det = DistributedKNNN(client=client, backend="brute")
    with pytest.raises(ValueError, match="NaN"):
        det.fit(da.from_array(Xn, chunks=(40, -1)))
    assert not hasattr(det, "offset_")
    det.fit(da.from_array(X, chunks=(40, -1)))
    with pytest.raises(ValueError, match="features"):
        det.anomaly_score(da.from_array(Q[:, :5], chunks=(20, -1)))
    with pytest.raises(ValueError, match="n_neighbors"):
        DistributedKNNN(client=client, n_neighbors=0).fit(X)
    with pytest.raises(TypeError, match="client"):
        DistributedKNNN(client=3).fit(X)


def test_address_and_save_load(client, tmp_path):
    X, Q = data(8, n=120)
    det = DistributedKNNN(client=client.scheduler.address, backend="brute")
    det.fit(da.from_array(X, chunks=(40, -1)))
    assert det.client_ is not client
    path = det.save(tmp_path / "m.nonn")
    loaded = nonn.load(path)
    assert type(loaded) is KNNN
    np.testing.assert_allclose(loaded.anomaly_score(Q), det.anomaly_score(Q), rtol=1e-9)
    assert loaded.offset_ == det.offset_
    det.close()
    assert client.status == "running"  # a client passed in is never closed
    with pytest.raises(RuntimeError, match="closed"):
        det.anomaly_score(Q)


def test_write_scores_parquet(client, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    X, Q = data(9, n=120)
    det = DistributedKNNN(client=client, backend="brute").fit(X)
    n = det.write_scores(da.from_array(Q, chunks=(16, -1)), tmp_path / "scores")
    assert n == len(Q)
    files = sorted(os.listdir(tmp_path / "scores"))
    assert files == [f"part-{b:05d}.parquet" for b in range(3)]
    table = pq.read_table(tmp_path / "scores").to_pandas().sort_values("index")
    np.testing.assert_array_equal(table["index"], np.arange(len(Q)))
    np.testing.assert_allclose(table["anomaly_score"], det.anomaly_score(Q), rtol=1e-12)
    np.testing.assert_array_equal(table["label"], det.predict(Q))


# ------------------------------------------------------------ score output
SCORE_ARRAYS = {"anomaly_score", "score_samples", "label"}


def _fitted(client, dtype=np.float64):
    X, Q = data(9, n=120, dtype=dtype)
    # a small floor: the queries' anomalies stand out (the tabular "auto"
    # floor, 1.0, scores these correlated Gaussians close to plain k-NN)
    return DistributedKNNN(client=client, backend="brute", eig_floor=1e-3).fit(X), Q


def _read_zarr(path):
    zarr = pytest.importorskip("zarr")
    g = zarr.open_group(str(path), mode="r")
    return g, {name: g[name][:] for name in g.array_keys()}


def _read_output(path):
    """The score table at ``path`` (Zarr store or folder of Parquet parts)."""
    if str(path).rstrip("/").endswith(".zarr"):
        return _read_zarr(path)[1]
    pq = pytest.importorskip("pyarrow.parquet")
    t = pq.read_table(str(path)).to_pandas().sort_values("index")
    return {c: t[c].to_numpy() for c in t.columns if c != "index"}


def _settle(client):
    """Wait until no task runs on the workers (a failed write's other blocks)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not any(client.run(lambda dask_worker: len(dask_worker.state.executing)).values()):
            return
        time.sleep(0.05)


@pytest.mark.parametrize("chunks,dtype,suffix", [((16, -1), np.float64, ""),
                                                 (((10, 20, 15), -1), np.float32, "/")])
def test_write_scores_zarr(client, tmp_path, chunks, dtype, suffix):
    """Three arrays equal to the in-memory results, one zarr chunk per
    (regular) query block, the threshold in the attributes."""
    pytest.importorskip("zarr")
    det, Q = _fitted(client, dtype)
    Qd = da.from_array(Q, chunks=chunks)
    path = tmp_path / "x.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no irregular-chunk warning from dask or zarr
        n = det.write_scores(Qd, str(path) + suffix)
    assert n == len(Q)
    g, got = _read_zarr(path)
    assert set(got) == SCORE_ARRAYS and set(g.group_keys()) == set()
    step = max(Qd.chunks[0])  # the largest query block, 16 or 20 rows
    for name, dt in (("anomaly_score", dtype), ("score_samples", dtype), ("label", np.int64)):
        assert g[name].shape == (len(Q),) and g[name].chunks == (step,), name
        assert g[name].dtype == dt, name
    rtol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(got["anomaly_score"], det.anomaly_score(Q), rtol=rtol)
    np.testing.assert_allclose(got["score_samples"], det.score_samples(Q), rtol=rtol)
    np.testing.assert_array_equal(got["label"], det.predict(Q))
    assert (got["label"] == -1).any() and (got["label"] == 1).any()
    assert g.attrs["offset"] == pytest.approx(det.offset_, rel=1e-12)
    assert os.listdir(tmp_path) == ["x.zarr"]  # no temporary left beside it


def test_write_scores_zarr_numpy_and_empty_queries(client, tmp_path):
    pytest.importorskip("zarr")
    det, Q = _fitted(client)
    assert det.write_scores(Q, tmp_path / "np.zarr") == len(Q)
    np.testing.assert_allclose(_read_output(tmp_path / "np.zarr")["anomaly_score"],
                               det.anomaly_score(Q), rtol=1e-12)
    assert det.write_scores(da.from_array(Q[:0], chunks=(8, -1)), tmp_path / "e.zarr") == 0
    got = _read_output(tmp_path / "e.zarr")
    assert set(got) == SCORE_ARRAYS and all(v.shape == (0,) for v in got.values())


def test_write_scores_zarr_needs_zarr(client, tmp_path, monkeypatch):
    det, Q = _fitted(client)
    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(ImportError, match="pip install zarr"):
        det.write_scores(Q, tmp_path / "x.zarr")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["x.zarr", "parts"])
def test_write_scores_replaces_previous_output(client, tmp_path, name):
    """A previous score output at the path is replaced as a whole: no stale
    rows, arrays or part files of the longer first write survive."""
    pytest.importorskip("zarr" if name.endswith(".zarr") else "pyarrow")
    det, Q = _fitted(client)
    path = tmp_path / name
    assert det.write_scores(da.from_array(Q, chunks=(16, -1)), path) == 45
    assert det.write_scores(da.from_array(Q[:20], chunks=(10, -1)), path) == 20
    got = _read_output(path)
    assert set(got) == SCORE_ARRAYS
    np.testing.assert_allclose(got["anomaly_score"], det.anomaly_score(Q[:20]), rtol=1e-12)
    if name.endswith(".zarr"):
        assert _read_zarr(path)[0]["label"].chunks == (10,)
    else:  # the third part of the first write is gone
        assert sorted(os.listdir(path)) == [f"part-{b:05d}.parquet" for b in range(2)]
    assert os.listdir(tmp_path) == [name]
    # an empty folder (as `nonn score -o` accepts) is a new output too
    os.makedirs(tmp_path / "empty.zarr")
    os.makedirs(tmp_path / "empty")
    for p in ("empty.zarr", "empty"):
        if p.endswith(".zarr") == name.endswith(".zarr"):
            assert det.write_scores(Q[:5], tmp_path / p) == 5


@pytest.mark.parametrize("name", ["x.zarr", "parts"])
def test_write_scores_refuses_to_replace_other_data(client, tmp_path, name):
    """A path holding anything but a previous score output is refused before
    any work, and left untouched."""
    zarr = pytest.importorskip("zarr") if name.endswith(".zarr") else None
    det, Q = _fitted(client)
    path = tmp_path / name
    os.makedirs(path)
    if zarr is not None:  # a Zarr store of other arrays (say, the embeddings)
        g = zarr.open_group(str(path), mode="w")
        g.create_array("embeddings", shape=(3,), dtype="f8")[:] = [1.0, 2.0, 3.0]
    open(path / "notes.txt", "w").write("keep me")
    before = sorted(os.listdir(path))
    with pytest.raises(FileExistsError, match="not a previous score output"):
        det.write_scores(Q, path)
    assert sorted(os.listdir(path)) == before
    assert open(path / "notes.txt").read() == "keep me"
    a_file = "file.zarr" if zarr is not None else "file"
    open(tmp_path / a_file, "w").write("a file")
    with pytest.raises(FileExistsError, match="a file"):
        det.write_scores(Q, tmp_path / a_file)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        det.write_scores(Q, tmp_path / "missing" / name)
    with pytest.raises(ValueError, match="not a URL"):
        det.write_scores(Q, "s3://bucket/" + name)
    assert sorted(os.listdir(tmp_path)) == sorted([name, a_file])


def _failing(kind, Q, monkeypatch, zarr_out):
    """Queries (8-row blocks) whose last block fails: "nan", it holds a NaN
    (scoring fails); "write", its writer raises after writing its rows (a
    disk filling up), so the failure comes with rows already written."""
    Qd = da.from_array(Q, chunks=(8, -1))
    if kind == "nan":
        Qn = Q.copy()
        Qn[-1, 0] = np.nan
        return da.from_array(Qn, chunks=(8, -1)), ValueError, "NaN"
    from nonn.distributed import _tasks

    name = "write_zarr_block" if zarr_out else "write_parquet_part"
    real = getattr(_tasks, name)
    last = len(Q) - Qd.chunks[0][-1]

    def write(where, start, anomaly, offset):
        n = real(where, start, anomaly, offset)
        if start == last:
            raise OSError("No space left on device (simulated)")
        return n

    monkeypatch.setattr(_tasks, name, write)  # the workers are threads of this process
    return Qd, OSError, "No space left"


@pytest.mark.parametrize("kind", ["nan", "write"])
@pytest.mark.parametrize("name", ["x.zarr", "parts"])
def test_write_scores_failure_leaves_nothing(client, tmp_path, monkeypatch, name, kind):
    """A block failing mid-write leaves no output at the path (nothing that
    looks complete), no temporary beside it, and a previous output intact."""
    zarr_out = name.endswith(".zarr")
    pytest.importorskip("zarr" if zarr_out else "pyarrow")
    det, Q = _fitted(client)
    path = tmp_path / name
    Qbad, error, match = _failing(kind, Q, monkeypatch, zarr_out)
    with pytest.raises(error, match=match):
        det.write_scores(Qbad, path)
    _settle(client)
    assert os.listdir(tmp_path) == []
    # over a previous output: the previous output stays, whole
    monkeypatch.undo()
    det.write_scores(da.from_array(Q[:20], chunks=(10, -1)), path)
    before = _read_output(path)
    Qbad, error, match = _failing(kind, Q, monkeypatch, zarr_out)
    with pytest.raises(error, match=match):
        det.write_scores(Qbad, path)
    _settle(client)
    assert os.listdir(tmp_path) == [name]
    after = _read_output(path)
    assert set(after) == SCORE_ARRAYS and len(after["label"]) == 20
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])

def test_partition_tasks_keep_their_placement(client, tmp_path):
    """The scheduler receives the worker of every per-partition task (fit:
    index, halo, eigen-state, held-out Eq. 2; scoring: Eq. 2 on the worker
    holding the neighbor's eigen-state). Without it, Dask places them by
    its own estimates and may move a partition's eigen-state (D·(L+1)
    values a row) to the queries instead of the queries to it."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class Placement(SchedulerPlugin):
        name = "nonn-test-placement"

        def __init__(self):
            self.workers = {}

        def update_graph(self, scheduler, *, annotations=None, **kwargs):
            self.workers.update((annotations or {}).get("workers", {}))

    X, Q = data(17, n=150)
    det = DistributedKNNN(client=client, backend="brute", set_size=5)
    scheduler = client.cluster.scheduler  # in-process: the plugin is this object
    workers = set(scheduler.workers)
    calls = (("fit", lambda: det.fit(da.from_array(X, chunks=(75, -1))),
              ("ShardIndex", "gather_halo", "block_eigen", "held_out_pair_scores")),
             ("anomaly_score", lambda: det.anomaly_score(Q), ("pair_scores",)),
             ("write_scores", lambda: det.write_scores(da.from_array(Q, chunks=(20, -1)),
                                                       tmp_path / "s"), ("pair_scores",)))

    def dual_fit():  # 12 features in one set, neighborhoods of 10: the dual form
        det.set_params(set_size="all", n_neighbors_of_neighbors=10)
        det.fit(da.from_array(X, chunks=(75, -1)))

    calls += (("dual fit", dual_fit, ("gather_halo", "block_eigen", "held_out_pair_scores")),
              ("dual anomaly_score", lambda: det.anomaly_score(Q), ("pair_scores",)))
    for name, call, kinds in calls:
        seen = Placement()
        scheduler.add_plugin(seen)
        try:
            call()
        finally:
            scheduler.remove_plugin(name=seen.name)
        for kind in kinds:
            placed = [w for k, w in seen.workers.items() if str(k).startswith(kind)]
            assert len(placed) >= 2, (name, kind)  # one per partition at least
            assert all(len(w) == 1 and set(w) <= workers for w in placed), (name, kind)
    assert sorted(det._shards["where"]) == sorted(workers)  # one partition per worker

def test_embedded_local_cluster():
    X, Q = data(10, n=100, d=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with DistributedKNNN(backend="brute") as det:
            det.fit(X)
            client = det.client_
            assert client.status == "running"
            np.testing.assert_allclose(det.anomaly_score(Q),
                                       reference(det, X).anomaly_score(Q), rtol=1e-9)
    assert client.status == "closed"


def test_core_imports_without_dask():
    code = (
        "import sys\n"
        "for m in ('dask', 'distributed'): sys.modules[m] = None\n"
        "import nonn\n"
        "nonn.KNNN().fit(__import__('numpy').random.default_rng(0).normal(size=(50, 4)))\n"
        "try:\n"
        "    import nonn.distributed\n"
        "except ImportError as e:\n"
        "    print('HINT', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert 'pip install "nonn[distributed]"' in out.stdout


# -------------------------------------------------------- worker failure
@pytest.fixture(scope="module")
def proc_client():
    """Worker processes (os._exit kills one, not the test), restarted by
    their nannies; one retry per task."""
    import dask

    with dask.config.set({"distributed.scheduler.allowed-failures": 1}), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=50)
        cl = distributed.Client(cluster)
    yield cl
    cl.close()
    cluster.close()


def _killer(block, marker, always):
    """Kills the worker running it: once (a marker file remembers), or always."""
    if block.size and (always or not os.path.exists(marker)):
        open(marker, "w").close()
        os._exit(1)
    return block


def test_worker_killed_mid_fit_is_retried(proc_client, tmp_path):
    proc_client.wait_for_workers(2, timeout=300)
    X, Q = data(11, n=200)
    Xd = da.from_array(X, chunks=(50, -1)).map_blocks(
        _killer, str(tmp_path / "killed"), False, meta=np.empty((0, 0), X.dtype))
    det = DistributedKNNN(client=proc_client, backend="brute").fit(Xd)
    assert os.path.exists(tmp_path / "killed")  # a worker did die
    assert_same_model(det, reference(det, X), X, Q, rtol=1e-9)


def test_worker_always_dying_is_a_clear_error(proc_client, tmp_path):
    proc_client.wait_for_workers(2, timeout=300)
    X, _ = data(12, n=100)
    Xd = da.from_array(X, chunks=(50, -1)).map_blocks(
        _killer, str(tmp_path / "killed"), True, meta=np.empty((0, 0), X.dtype))
    det = DistributedKNNN(client=proc_client, backend="brute")
    with pytest.raises(distributed.KilledWorker):
        det.fit(Xd)
    assert not hasattr(det, "offset_")  # nothing half-fitted
    with pytest.raises(Exception, match="not fitted"):
        det.anomaly_score(X)


def test_worker_killed_at_a_random_time(proc_client):
    """A worker process killed from outside while the fit runs: the result is
    the full, correct model or an exception, never a partial one."""
    proc_client.wait_for_workers(2, timeout=300)
    X, Q = data(13, n=1500, d=16)
    det = DistributedKNNN(client=proc_client, backend="brute", n_neighbors_of_neighbors=20)
    victim = sorted(proc_client.scheduler_info()["workers"])[0]

    def kill():
        time.sleep(0.5)
        try:
            proc_client.run(os._exit, 1, workers=[victim])
        except Exception:
            pass

    t = threading.Thread(target=kill)
    t.start()
    try:
        det.fit(da.from_array(X, chunks=(250, -1)))
    except (distributed.KilledWorker, RuntimeError, distributed.client.FutureCancelledError,
            OSError) as exc:
        assert not hasattr(det, "offset_"), exc
    else:
        assert_same_model(det, reference(det, X), X, Q, rtol=1e-9)
    finally:
        t.join()
    proc_client.wait_for_workers(2, timeout=300)


# ------------------------------------------------- KNNN options as they come
def test_memory_lean_same_scores_and_lean_model_file(client, tmp_path):
    X, Q = data(14, n=150)
    det = DistributedKNNN(client=client, backend="brute", memory="lean")
    det.fit(da.from_array(X, chunks=(60, -1)))
    ref = reference(det, X)
    np.testing.assert_allclose(det.anomaly_score(Q), ref.anomaly_score(Q), rtol=1e-9)
    np.testing.assert_allclose(det.offset_, ref.offset_, rtol=1e-9)
    loaded = nonn.load(det.save(tmp_path / "lean.nonn"))
    assert loaded.memory == "lean"
    np.testing.assert_allclose(loaded.anomaly_score(Q), ref.anomaly_score(Q), rtol=1e-9)


def test_auto_parameters_pick_what_knnn_picks(client):
    X, Q = data(15, n=120, d=6)
    det = DistributedKNNN(client=client, backend="brute", n_neighbors="auto",
                          eig_floor="auto", random_state=0)
    det.fit(da.from_array(X, chunks=(50, -1)))
    ref = reference(det, X)
    assert det.auto_params_ == ref.auto_params_
    assert_same_model(det, ref, X, Q, rtol=1e-9)


# ------------------------------------------------- KNNN's current operator
def embeddings(seed, n, d, n_q=30, dtype=np.float64):
    """Correlated rows with norms that vary (unit rows then change them)."""
    X, Q = data(seed, n=n, d=d, n_q=n_q, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    return (X * rng.uniform(0.5, 2.0, (n, 1))).astype(dtype), Q


@pytest.mark.parametrize("aggregate", AGGREGATES)
@pytest.mark.parametrize("rows", [300, 150, 100, 75, 60])  # 1 to 5 partitions
def test_dual_form_all_features_equals_knnn(client, rows, aggregate):
    """set_size="all" (one set of D = 12 > K' = 8 features: the dual form),
    with the neighborhoods' rows read from each partition's halo."""
    X, Q = data(21)
    det = DistributedKNNN(client=client, backend="brute", set_size="all",
                          n_neighbors_of_neighbors=8, aggregate=aggregate)
    det.fit(da.from_array(X, chunks=(rows, -1)))
    ref = reference(det, X)
    assert det.n_partitions_ == -(-len(X) // rows)
    assert ref.eigenvalues_.shape == (len(X), 1, 8)  # the dual form's K' eigenvalues
    assert det.set_size_ == ref.set_size_ == 12
    assert_same_model(det, ref, X, Q, rtol=1e-9)


@pytest.mark.parametrize("set_size,rows", [(5, 90), ("all", 75)])
def test_neighborhood_floor_equals_knnn(client, set_size, rows):
    """eig_floor_ref="neighborhood": each neighbor's floor from its own
    eigenvalues, on the partition that holds them (primal and dual)."""
    X, Q = data(24)
    det = DistributedKNNN(client=client, backend="brute", set_size=set_size,
                          n_neighbors_of_neighbors=8, eig_floor=0.3, eig_floor_ref="neighborhood")
    det.fit(da.from_array(X, chunks=(rows, -1)))
    ref = reference(det, X)
    assert ref.get_params()["eig_floor_ref"] == "neighborhood"
    assert_same_model(det, ref, X, Q, rtol=1e-9)
    data_ref = KNNN(**{**ref.get_params(), "eig_floor_ref": "data"}).fit(X)
    assert not np.allclose(data_ref.anomaly_score(Q), ref.anomaly_score(Q), rtol=1e-3)


@pytest.mark.parametrize("spreads", [(0.05, 1.0), (1.0,)])
def test_auto_floor_equals_knnn(client, spreads):
    """eig_floor_ref="auto" decided from the partitions' eigenvalue sums as
    the local fit decides it from the neighborhoods' rows."""
    rng = np.random.default_rng(25)
    d = 70
    centres = rng.normal(size=(len(spreads), d))
    X = np.vstack([10 * c / np.linalg.norm(c) + s * rng.normal(size=(130, d))
                   @ rng.normal(size=(d, d)) / np.sqrt(d) for c, s in zip(centres, spreads)])
    Q = X[::9] + 0.05 * rng.normal(size=X[::9].shape)
    det = DistributedKNNN(client=client, backend="brute", n_neighbors_of_neighbors=12)
    det.fit(da.from_array(X, chunks=(100, -1)))
    ref = reference(det, X)
    assert det.eig_floor_ref_ == ref.eig_floor_ref_ == (
        "neighborhood" if len(spreads) > 1 else "data")
    np.testing.assert_allclose(det.eig_floor_spread_, ref.eig_floor_spread_, rtol=1e-6)
    assert_same_model(det, ref, X, Q, rtol=1e-9)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-9), (np.float32, 2e-4)])
def test_dual_form_shorter_last_set_equals_knnn(client, dtype, rtol):
    """L = 9 > K' = 6 on D = 20 features: sets of 9, 9 and 2 (the last one
    primal-sized but decomposed in the dual form like the others)."""
    X, Q = data(22, n=240, d=20, dtype=dtype)
    det = DistributedKNNN(client=client, backend="brute", set_size=9,
                          n_neighbors_of_neighbors=6, n_neighbors=4)
    det.fit(da.from_array(X, chunks=(70, -1)))
    ref = reference(det, X)
    np.testing.assert_array_equal(ref.set_sizes_, [9, 9, 2])
    assert ref.eigenvalues_.shape == (240, 3, 6)
    assert_same_model(det, ref, X, Q, rtol=rtol)


@pytest.mark.parametrize("d", [70, 12])
def test_auto_transforms_equal_knnn(client, d):
    """normalize="auto", whiten="auto", eig_floor="auto": with D >= 64 unit
    rows, a partly whitened space (the Ledoit-Wolf covariance from the
    partitions' sums) and the embedding floor; with fewer features the
    data as they are (the identity whitening stored) and the tabular floor."""
    X, Q = embeddings(23, n=260, d=d)
    det = DistributedKNNN(client=client, backend="brute", normalize="auto", whiten="auto",
                          eig_floor="auto", set_size=30, n_neighbors_of_neighbors=12)
    det.fit(da.from_array(X, chunks=(90, -1)))
    ref = reference(det, X)
    assert (det.normalize_, det.whiten_) == (ref.normalize_, ref.whiten_)
    assert (ref.normalize_ == "l2") == (d >= 64) and (ref.whiten_ > 0) == (d >= 64)
    assert det.eig_floor_rel_ == ref.eig_floor_rel_
    np.testing.assert_allclose(det.whiten_mean_, ref.whiten_mean_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(det.whiten_matrix_, ref.whiten_matrix_, rtol=1e-9, atol=1e-12)
    assert_same_model(det, ref, X, Q, rtol=1e-9)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-9), (np.float32, 2e-4)])
def test_full_whitening_and_unit_rows_equal_knnn(client, dtype, rtol):
    X, Q = embeddings(24, n=200, d=16, dtype=dtype)
    det = DistributedKNNN(client=client, backend="brute", normalize="l2", whiten=1.0,
                          n_neighbors_of_neighbors=15)
    det.fit(da.from_array(X, chunks=(64, -1)))
    ref = reference(det, X)
    np.testing.assert_allclose(det.whiten_matrix_, ref.whiten_matrix_, rtol=rtol,
                               atol=rtol * np.abs(ref.whiten_matrix_).max())
    assert_same_model(det, ref, X, Q, rtol=rtol)


@pytest.mark.parametrize("set_size", [5, "all"])
def test_held_out_calibration_subset_equals_knnn(client, monkeypatch, set_size):
    """More training rows than CALIBRATION_ROWS: the same seeded subset of
    calibration rows, each scored out of sample as KNNN scores it (its
    neighbors' neighborhoods without it)."""
    monkeypatch.setattr(nonn._base, "CALIBRATION_ROWS", 40)
    X, Q = data(25, n=200)
    det = DistributedKNNN(client=client, backend="brute", set_size=set_size,
                          n_neighbors_of_neighbors=10, n_neighbors=4)
    det.fit(da.from_array(X, chunks=(45, -1)))
    ref = reference(det, X)
    assert len(ref.calibration_rows_) == 40 and len(det.train_scores_) == 40
    assert_same_model(det, ref, X, Q, rtol=1e-9)
    # all rows again with fit_predict
    np.testing.assert_array_equal(det.fit_predict(X), ref.fit_predict(X))
    np.testing.assert_array_equal(det.calibration_rows_, np.arange(len(X)))
    np.testing.assert_allclose(det.train_scores_, ref.train_scores_, rtol=1e-9)


@pytest.mark.parametrize("set_size", [5, "all"])
def test_pvalue_fdr_and_calibrate_equal_knnn(client, set_size):
    X, Q = data(27, n=180, n_q=60)
    det = DistributedKNNN(client=client, backend="brute", set_size=set_size,
                          n_neighbors_of_neighbors=10, eig_floor=1e-3)
    det.fit(da.from_array(X, chunks=(60, -1)))
    ref = reference(det, X)
    Qd = da.from_array(Q, chunks=(25, -1))
    for q in (Q, Qd):
        p = det.pvalue(q)
        assert isinstance(p, np.ndarray)
        np.testing.assert_allclose(p, ref.pvalue(Q), rtol=1e-12)
        np.testing.assert_array_equal(det.predict_fdr(q, 0.1), ref.predict_fdr(Q, 0.1))
    assert (det.predict_fdr(Q, 0.1) == -1).any()
    held_out = Q[:60]
    det.calibrate(da.from_array(held_out, chunks=(25, -1)), 0.05)
    ref.calibrate(held_out, 0.05)
    np.testing.assert_allclose(det.calibration_scores_, ref.calibration_scores_, rtol=1e-9)
    np.testing.assert_allclose(det.offset_, ref.offset_, rtol=1e-9)
    assert det.threshold_source_ == ref.threshold_source_
    np.testing.assert_allclose(det.pvalue(Q), ref.pvalue(Q), rtol=1e-12)
    # the model's own training rows are refused, a few are warned about
    with pytest.raises(ValueError, match="training rows of this model"):
        det.calibrate(da.from_array(X[:40], chunks=(15, -1)))
    with pytest.warns(UserWarning, match="3 of the 43 calibration rows are training rows"):
        det.calibrate(np.vstack([Q[:40], X[:3]]))
    with pytest.raises(ValueError, match="false_alarm_rate"):
        det.calibrate(Q, 0)


@pytest.mark.parametrize("memory", ["precomputed", "lean"])
def test_dual_model_round_trips(client, tmp_path, memory):
    """to_knnn, save / load and from_knnn of a dual-form model (lean: the
    eigen-state and the halos computed on the cluster) score as KNNN."""
    X, Q = embeddings(28, n=200, d=70)
    params = dict(backend="brute", set_size="all", n_neighbors_of_neighbors=12, memory=memory,
                  normalize="auto", whiten="auto")
    det = DistributedKNNN(client=client, **params).fit(da.from_array(X, chunks=(70, -1)))
    ref = KNNN(**params).fit(X)
    expect = ref.anomaly_score(Q)
    local = det.to_knnn()
    assert type(local) is KNNN and hasattr(local, "eigenvectors_") == (memory != "lean")
    np.testing.assert_allclose(local.anomaly_score(Q), expect, rtol=1e-9)
    loaded = nonn.load(det.save(tmp_path / "dual.nonn"))
    np.testing.assert_allclose(loaded.anomaly_score(Q), expect, rtol=1e-9)
    np.testing.assert_allclose(loaded.pvalue(Q), ref.pvalue(Q), rtol=1e-12)
    for n_partitions in (1, 3):
        spread = DistributedKNNN.from_knnn(loaded, client=client, n_partitions=n_partitions)
        assert spread.n_partitions_ == n_partitions
        np.testing.assert_allclose(spread.anomaly_score(Q), expect, rtol=1e-9)
        np.testing.assert_allclose(spread.pvalue(Q), ref.pvalue(Q), rtol=1e-12)
        again = spread.to_knnn()
        np.testing.assert_allclose(again.anomaly_score(Q), expect, rtol=1e-9)
        np.testing.assert_array_equal(again.calibration_rows_, ref.calibration_rows_)


@pytest.mark.parametrize("scale", ["standard", "minmax"])
def test_column_scaling_equals_knnn(client, tmp_path, scale):
    """scale="standard" / "minmax" from the partitions' scikit-learn scalers,
    merged; columns of very different units, one constant."""
    X, Q = data(29, n=210, d=8)
    units = np.array([1e-3, 1.0, 50.0, 1e4, 2.0, 1.0, 7.0, 1e-6])
    X, Q = X * units, Q * units
    X[:, 5], Q[:5, 5] = 3.0, 4.0
    det = DistributedKNNN(client=client, backend="brute", scale=scale,
                          n_neighbors_of_neighbors=12)
    det.fit(da.from_array(X, chunks=(50, -1)))
    ref = reference(det, X)
    np.testing.assert_allclose(det.scale_center_, ref.scale_center_, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(det.scale_factor_, ref.scale_factor_, rtol=1e-12)
    assert det.scale_factor_[5] == ref.scale_factor_[5] == 1.0
    assert_same_model(det, ref, X, Q, rtol=1e-9)
    loaded = nonn.load(det.save(tmp_path / "scaled.nonn"))
    np.testing.assert_allclose(loaded.anomaly_score(Q), ref.anomaly_score(Q), rtol=1e-9)


def test_robust_scale_is_refused_by_fit_but_spread_by_from_knnn(client):
    X, Q = data(30, n=120)
    det = DistributedKNNN(client=client, scale="robust")
    with pytest.raises(ValueError, match="scale='robust'"):
        det.fit(X)
    assert not hasattr(det, "offset_")
    ref = KNNN(backend="brute", scale="robust", n_neighbors_of_neighbors=10).fit(X)
    spread = DistributedKNNN.from_knnn(ref, client=client, n_partitions=2)
    np.testing.assert_allclose(spread.anomaly_score(Q), ref.anomaly_score(Q), rtol=1e-9)
    np.testing.assert_allclose(spread.to_knnn().scale_center_, ref.scale_center_)


def test_fit_runs_each_partition_task_once(client):
    """The fit searches each (partition, shard) pair once and decomposes
    each partition's neighborhoods once: intermediate results the held-out
    scores need are kept, not recomputed (a second sharded search)."""
    X, _ = data(31, n=150)
    det = DistributedKNNN(client=client, backend="brute", n_neighbors_of_neighbors=10)
    with distributed.get_task_stream(client) as ts:
        det.fit(da.from_array(X, chunks=(50, -1)))
    names = [str(t["key"]) for t in ts.data]
    assert sum(n.startswith("shard_search") for n in names) == 9
    assert sum(n.startswith("block_eigen") for n in names) == 3
    assert sum(n.startswith("held_out_pair_scores") for n in names) == 9
