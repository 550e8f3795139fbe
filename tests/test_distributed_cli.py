"""`nonn fit/score --cluster` and shard-folder inputs."""

import importlib.util
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

import nonn  # noqa: E402
from nonn import KNNN  # noqa: E402
from nonn._io import read_shards, shard_info  # noqa: E402
from nonn.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def address():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                           dashboard_address=None)
        # an outside client keeps the in-process scheduler alive between commands
        client = distributed.Client(cluster)
    yield cluster.scheduler_address
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(230, 7)).astype(np.float32)
    Q = np.vstack([rng.normal(size=(30, 7)), 6 + rng.normal(size=(4, 7))]).astype(np.float32)
    return X, Q


def shard_folder(folder, A, sizes, kinds):
    """Write ``A`` as shards of ``sizes`` rows, alternating file kinds."""
    os.makedirs(folder)
    start = 0
    for i, size in enumerate(sizes):
        part = A[start:start + size]
        start += size
        kind = kinds[i % len(kinds)]
        name = os.path.join(folder, f"shard-{i:03d}.{kind}")
        if kind == "npy":
            np.save(name, part)
        elif kind == "parquet":  # one list column of embeddings
            pq.write_table(pa.table({"emb": list(part)}), name)
        else:  # numeric columns
            pq.write_table(pa.table({f"f{j}": part[:, j] for j in range(A.shape[1])}),
                           name.replace(".cols", ".parquet"))
    assert start == len(A)
    open(os.path.join(folder, "README.txt"), "w").write("ignored")
    return folder


def test_shard_folder_io(tmp_path, data):
    X, _ = data
    folder = shard_folder(tmp_path / "X", X, [50, 0, 100, 80], ["parquet", "npy", "cols"])
    np.testing.assert_array_equal(read_shards(folder), X)
    infos = [shard_info(os.path.join(folder, f)) for f in sorted(os.listdir(folder))
             if not f.endswith(".txt")]
    assert [i[0] for i in infos] == [50, 0, 100, 80]
    assert {i[1] for i in infos} == {7}
    with pytest.raises(ValueError, match="no .npy or .parquet shards"):
        os.makedirs(tmp_path / "empty")
        read_shards(tmp_path / "empty")


def test_fit_and_score_on_cluster(tmp_path, data, address, capsys):
    X, Q = data
    train = shard_folder(tmp_path / "train", X, [60, 90, 80], ["npy", "parquet", "cols"])
    queries = shard_folder(tmp_path / "queries", Q, [20, 14], ["npy", "parquet"])
    model = tmp_path / "m.nonn"
    assert main(["fit", str(train), "-o", str(model), "--cluster", address,
                 "--n-neighbors-of-neighbors", "20", "--backend", "brute"]) == 0
    out = capsys.readouterr().out
    assert "fitted DistributedKNNN on 230 samples x 7 features (float32) on 3 partitions" in out
    det = nonn.load(model)
    ref = KNNN(n_neighbors_of_neighbors=20, backend="brute").fit(X)
    np.testing.assert_allclose(det.anomaly_score(Q), ref.anomaly_score(Q), rtol=2e-4)
    np.testing.assert_allclose(det.offset_, ref.offset_, rtol=2e-4)

    # scores gathered into one file
    assert main(["score", str(model), str(queries), "-o", str(tmp_path / "s.csv"),
                 "--cluster", address]) == 0
    table = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(table[:, 0], np.arange(len(Q)))
    np.testing.assert_allclose(table[:, 1], det.anomaly_score(Q), rtol=1e-5)
    np.testing.assert_array_equal(table[:, 3], det.predict(Q))
    # scores written by the workers into a folder of parts
    assert main(["score", str(model), str(queries), "-o", str(tmp_path / "scores"),
                 "--cluster", address]) == 0
    parts = pq.read_table(tmp_path / "scores").to_pandas().sort_values("index")
    np.testing.assert_allclose(parts["anomaly_score"], table[:, 1], rtol=1e-6)
    np.testing.assert_array_equal(parts["label"], table[:, 3])
    # ... or into a Zarr store
    if importlib.util.find_spec("zarr") is not None:
        import zarr

        assert main(["score", str(model), str(queries), "-o", str(tmp_path / "s.zarr"),
                     "--cluster", address]) == 0
        assert f"{int((table[:, 3] == -1).sum())} flagged" in capsys.readouterr().out
        g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
        np.testing.assert_allclose(g["anomaly_score"][:], table[:, 1], rtol=1e-6)
        np.testing.assert_array_equal(g["label"][:], table[:, 3])
    # a shard folder works without a cluster too
    assert main(["score", str(model), str(queries), "-o", str(tmp_path / "t.csv")]) == 0
    np.testing.assert_allclose(np.loadtxt(tmp_path / "t.csv", delimiter=",", skiprows=1)[:, 1],
                               table[:, 1], rtol=1e-5)


def test_cluster_errors(tmp_path, data, address, capsys):
    X, _ = data
    np.save(tmp_path / "X.npy", X)
    assert main(["fit", str(tmp_path / "X.npy"), "-o", str(tmp_path / "m.nonn"),
                 "--detector", "knn", "--cluster", address]) == 2
    assert "--cluster fits --detector knnn only" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert main(["fit", str(tmp_path / "empty"), "-o", str(tmp_path / "m.nonn"),
                 "--cluster", address]) == 2
    assert "no .npy or .parquet shards" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "X.npy"), "-o", str(tmp_path / "m.nonn"),
                 "--scale", "robust", "--cluster", address]) == 2
    err = capsys.readouterr().err
    assert "--cluster does not support --scale robust" in err and len(err.splitlines()) == 1


def test_scaled_models_on_cluster(tmp_path, data, address):
    """--scale standard fits on the cluster; a model fitted with --scale
    robust on this machine scores on the cluster."""
    X, Q = data
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "Q.npy", Q)
    for scale, cluster in (("standard", ["--cluster", address]), ("robust", [])):
        model = tmp_path / f"{scale}.nonn"
        assert main(["fit", str(tmp_path / "X.npy"), "-o", str(model), "--scale", scale,
                     "--backend", "brute", *cluster]) == 0
        ref = KNNN(backend="brute", scale=scale).fit(X)
        assert main(["score", str(model), str(tmp_path / "Q.npy"), "-o",
                     str(tmp_path / f"{scale}.csv"), "--cluster", address]) == 0
        got = np.loadtxt(tmp_path / f"{scale}.csv", delimiter=",", skiprows=1)[:, 1]
        np.testing.assert_allclose(got, ref.anomaly_score(Q), rtol=2e-4)


def test_python_m_nonn_cluster_local(tmp_path, data):
    """The embedded LocalCluster, through the command line."""
    X, Q = data
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "Q.npy", Q)
    env = dict(os.environ, DASK_DISTRIBUTED__WORKER__DAEMON="False")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "nonn", *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600, env=env)

    r = run("fit", "X.npy", "-o", "m.nonn", "--cluster", "local", "--backend", "brute")
    assert r.returncode == 0, r.stderr
    r = run("score", "m.nonn", "Q.npy", "-o", "s.parquet", "--cluster", "local")
    assert r.returncode == 0, r.stderr
    got = pq.read_table(tmp_path / "s.parquet").column("anomaly_score").to_numpy()
    ref = KNNN(backend="brute").fit(X)
    np.testing.assert_allclose(got, ref.anomaly_score(Q), rtol=2e-4)
