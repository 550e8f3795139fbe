"""The ``nonn`` command line, through ``python -m nonn`` and ``main()``."""

import os
import subprocess
import sys

import numpy as np
import pytest

import nonn
from nonn._io import read_table
from nonn.cli import main


def run(*args, cwd):
    """``python -m nonn ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "nonn", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(150, 6)).astype(np.float32)
    Q = np.vstack([rng.normal(size=(20, 6)), 6 + rng.normal(size=(4, 6))]).astype(np.float32)
    return X, Q


def write(path, A):
    """Write matrix ``A`` to ``path`` in the format its extension names."""
    ext = os.path.splitext(str(path))[1]
    if ext == ".npy":
        np.save(path, A)
    elif ext == ".npz":
        np.savez(path, X=A, y=np.zeros(len(A)))
    elif ext == ".csv":
        header = ",".join(f"f{j}" for j in range(A.shape[1]))
        np.savetxt(path, A, delimiter=",", fmt="%.9g", header=header, comments="")
    elif ext == ".parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({f"f{j}": A[:, j] for j in range(A.shape[1])}), path)
    return path


def read_scores_csv(path):
    lines = open(path).read().splitlines()
    assert lines[0] == "index,anomaly_score,score_samples,label,p_value"
    return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)


def assert_one_error_line(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nonn: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def no_leftovers(folder):
    return [p for p in os.listdir(folder) if p.startswith(".nonn-")] == []


# -------------------------------------------------------------- end to end
def check_scores_csv(path, model_path, queries):
    """The CSV holds exactly the library's scores and labels for ``queries``."""
    model = nonn.load(model_path)
    Qr, names = read_table(queries)
    if getattr(model, "feature_names_in_", None) is not None:
        # a model fitted on named columns takes them by name (scikit-learn)
        import pandas as pd

        assert names == list(model.feature_names_in_)
        Qr = pd.DataFrame(Qr, columns=names)
    table = read_scores_csv(path)
    np.testing.assert_array_equal(table[:, 0], np.arange(len(Qr)))
    # exact, not approximately equal
    assert np.array_equal(table[:, 1], model.anomaly_score(Qr).astype(np.float64))
    assert np.array_equal(table[:, 2], model.score_samples(Qr).astype(np.float64))
    np.testing.assert_array_equal(table[:, 3], model.predict(Qr))
    assert set(table[-4:, 3]) == {-1}
    assert np.array_equal(table[:, 4], model.pvalue(Qr))
    return model


def test_fit_then_score_through_python_m(tmp_path, data):
    X, Q = data
    write(tmp_path / "train.npy", X)
    write(tmp_path / "queries.npy", Q)
    fit = run("fit", "train.npy", "-o", "model.nonn", "--n-neighbors", 2, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr
    assert "KNNN" in fit.stdout and "150 samples x 6 features" in fit.stdout
    score = run("score", "model.nonn", "queries.npy", "-o", "scores.csv", cwd=tmp_path)
    assert score.returncode == 0, score.stderr
    assert "flagged as anomalies (label -1)" in score.stdout
    model = check_scores_csv(tmp_path / "scores.csv", tmp_path / "model.nonn",
                             tmp_path / "queries.npy")
    assert model.n_neighbors == 2


@pytest.mark.parametrize("ext", [".npy", ".npz", ".csv", ".parquet"])
def test_fit_then_score_every_input_format(tmp_path, data, ext, capsys):
    X, Q = data
    train = write(tmp_path / f"train{ext}", X)
    queries = write(tmp_path / f"queries{ext}", Q)
    model, scores = tmp_path / "model.nonn", tmp_path / "scores.csv"
    assert main(["fit", str(train), "-o", str(model)]) == 0
    assert "150 samples x 6 features" in capsys.readouterr().out
    assert main(["score", str(model), str(queries), "-o", str(scores)]) == 0
    check_scores_csv(scores, model, queries)


@pytest.mark.parametrize("detector, cls", [("knnn", nonn.KNNN), ("knn", nonn.KNN),
                                           ("global", nonn.GlobalEigenKNN),
                                           ("local", nonn.LocalEigenKNN)])
def test_every_detector_through_main(tmp_path, data, detector, cls, capsys):
    X, Q = data
    write(tmp_path / "X.npy", X)
    write(tmp_path / "Q.npy", Q)
    model, out = tmp_path / "m.nonn", tmp_path / "s.npz"
    assert main(["fit", str(tmp_path / "X.npy"), "-o", str(model), "--detector", detector,
                 "--contamination", "0.05", "--set-size", "3", "--eig-floor", "0.01",
                 "--eig-floor-ref", "neighborhood"]) == 0
    fitted = nonn.load(model)
    assert type(fitted) is cls
    assert fitted.contamination_ == 0.05
    # options the detector lacks are not passed, and a note says so
    err = capsys.readouterr().err
    params = fitted.get_params()
    for flag, name in (("--set-size", "set_size"), ("--eig-floor", "eig_floor"),
                       ("--eig-floor-ref", "eig_floor_ref")):
        if name in params:
            assert params[name] == {"set_size": 3, "eig_floor": 0.01,
                                    "eig_floor_ref": "neighborhood"}[name]
        else:
            assert f"{flag} does not apply to --detector {detector}" in err
    # the saved model is quiet when a library user loads it
    assert params["verbose"] is False

    assert main(["score", str(model), str(tmp_path / "Q.npy"), "-o", str(out)]) == 0
    with np.load(out) as z:
        assert np.array_equal(z["anomaly_score"], fitted.anomaly_score(Q))
        assert np.array_equal(z["score_samples"], fitted.score_samples(Q))
        assert np.array_equal(z["label"], fitted.predict(Q))


@pytest.mark.parametrize("ext", [".npy", ".parquet"])
def test_score_output_formats(tmp_path, data, ext):
    if ext == ".parquet":
        pytest.importorskip("pyarrow")
    X, Q = data
    write(tmp_path / "X.npy", X)
    write(tmp_path / "Q.npy", Q)
    assert main(["fit", str(tmp_path / "X.npy"), "-o", str(tmp_path / "m.nonn")]) == 0
    out = tmp_path / f"s{ext}"
    assert main(["score", str(tmp_path / "m.nonn"), str(tmp_path / "Q.npy"), "-o",
                 str(out)]) == 0
    expected = nonn.load(tmp_path / "m.nonn").anomaly_score(Q)
    if ext == ".npy":
        got = np.load(out)["anomaly_score"]
    else:
        import pyarrow.parquet as pq

        got = pq.read_table(out).column("anomaly_score").to_numpy()
    assert np.array_equal(got, expected)


def test_fit_npz_key(tmp_path, data, capsys):
    X, _ = data
    np.savez(tmp_path / "emb.npz", train=X, other=X[:10])
    assert main(["fit", str(tmp_path / "emb.npz"), "-o", str(tmp_path / "m.nonn"),
                 "--key", "train"]) == 0
    assert nonn.load(tmp_path / "m.nonn").n_features_in_ == 6
    assert main(["fit", str(tmp_path / "emb.npz"), "-o", str(tmp_path / "m2.nonn")]) == 2
    assert_one_error_line(capsys.readouterr().err, "--key")
    assert not (tmp_path / "m2.nonn").exists()


def test_fit_backend_params(tmp_path, data, capsys):
    pytest.importorskip("faiss")
    X, Q = data
    np.save(tmp_path / "X.npy", X)
    assert main(["fit", str(tmp_path / "X.npy"), "-o", str(tmp_path / "m.nonn"),
                 "--backend", "faiss", "--backend-param", "index=HNSW8",
                 "--backend-param", "efSearch=32", "--backend-param", "refine=1",
                 "--backend-param", "recompute_distances=false"]) == 0
    det = nonn.load(tmp_path / "m.nonn")
    assert det.backend_params == {"index": "HNSW8", "efSearch": 32, "refine": 1,
                                  "recompute_distances": False}
    assert det._search.refine == 1 and det._search.efSearch_ == 32
    ref = nonn.KNNN(backend="faiss", backend_params=det.backend_params).fit(X)
    np.testing.assert_array_equal(det.neighborhoods_, ref.neighborhoods_)
    assert main(["fit", str(tmp_path / "X.npy"), "-o", str(tmp_path / "m2.nonn"),
                 "--backend-param", "refine"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "m2.nonn").exists()


# -------------------------------------------------------------------- info
def test_info(tmp_path, data, capsys):
    X, _ = data
    write(tmp_path / "X.npy", X)
    assert main(["fit", str(tmp_path / "X.npy"), "-o", str(tmp_path / "m.nonn"),
                 "--detector", "local"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m.nonn"), "--verify"]) == 0
    out = capsys.readouterr().out
    for fragment in ("LocalEigenKNN", "format:", "nonn version: " + nonn.__version__,
                     "offset_", "fit_X", "(150, ", "float32", "memory:", "verified"):
        assert fragment in out, fragment


def test_info_through_python_m(tmp_path, data):
    X, _ = data
    nonn.KNN().fit(X).save(tmp_path / "m.nonn")
    res = run("info", "m.nonn", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "estimator:    KNN" in res.stdout


# -------------------------------------------------------------------- help
@pytest.mark.parametrize("command", [[], ["fit"], ["score"], ["info"], ["demo"]])
def test_help_exits_zero(command, capsys):
    assert main([*command, "--help"]) == 0
    assert "usage: nonn" in capsys.readouterr().out


def test_help_and_version_through_python_m(tmp_path):
    res = run("fit", "--help", cwd=tmp_path)
    assert res.returncode == 0
    assert "--n-neighbors-of-neighbors" in res.stdout


def test_demo_help_and_version(capsys):
    assert main(["demo", "--help"]) == 0
    assert "--quick" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert nonn.__version__ in capsys.readouterr().out


# ------------------------------------------------------------------ errors
def test_usage_errors_exit_two(capsys):
    assert main([]) == 2
    assert main(["fit", "x.npy"]) == 2  # no -o
    assert main(["fit", "x.npy", "-o", "m", "--contamination", "lots"]) == 2
    assert main(["demo", "--sizes", "100,abc"]) == 2
    assert "expected 'auto' or a float" in capsys.readouterr().err


def test_errors_through_python_m_are_one_line(tmp_path):
    res = run("fit", "missing.npy", "-o", "m.nonn", cwd=tmp_path)
    assert res.returncode == 2
    assert_one_error_line(res.stderr, "missing.npy", "does not exist")
    assert not (tmp_path / "m.nonn").exists()


def test_not_a_model_file(tmp_path, data, capsys):
    (tmp_path / "m.nonn").write_bytes(b"PK\x03\x04garbage")
    write(tmp_path / "Q.npy", data[1])
    assert main(["score", str(tmp_path / "m.nonn"), str(tmp_path / "Q.npy"), "-o",
                 str(tmp_path / "s.csv")]) == 2
    assert_one_error_line(capsys.readouterr().err, "not a readable nonn model file")
    assert main(["info", str(tmp_path / "m.nonn")]) == 2
    assert_one_error_line(capsys.readouterr().err, "not a readable nonn model file")
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("argv, fragments", [
    (["fit", "{d}/X.txt", "-o", "{d}/m.nonn"], ["unknown extension '.txt'", ".parquet"]),
    # phrased in flags, not in the library's Python spelling
    (["fit", "{d}/X.npy", "-o", "{d}/m.nonn", "--contamination", "0.7"],
     ["--contamination must be", "(0, 0.5]; got 0.7", "For example: --contamination 0.01."]),
    (["fit", "{d}/X.npy", "-o", "{d}/m.nonn", "--n-neighbors", "0"],
     ["--n-neighbors must be an int in the range [1, inf)", "got 0"]),
    (["fit", "{d}/X.npy", "-o", "{d}/m.nonn", "--backend", "nosuch"], ["nosuch"]),
    (["fit", "{d}/nan.npy", "-o", "{d}/m.nonn"], ["NaN"]),
    (["fit", "{d}/X.npy", "-o", "{d}/no/such/dir/m.nonn"], ["does not exist"]),
    (["fit", "{d}/X.npy", "-o", "{d}/m.nonn", "--key", "X"], ["Drop the key"]),
])
def test_fit_errors_leave_no_model(tmp_path, data, capsys, argv, fragments):
    write(tmp_path / "X.npy", data[0])
    (tmp_path / "X.txt").write_text("1 2\n")
    bad = data[0].copy()
    bad[3, 2] = np.nan
    write(tmp_path / "nan.npy", bad)
    assert main([a.format(d=tmp_path) for a in argv]) == 2
    assert_one_error_line(capsys.readouterr().err, *fragments)
    assert not (tmp_path / "m.nonn").exists()
    assert no_leftovers(tmp_path)


@pytest.mark.parametrize("queries, output, fragments", [
    ("Q5.npy", "s.csv", ["5 features", "expecting 6"]),
    ("Q.npy", "s.txt", ["unknown extension '.txt'", ".csv"]),
    ("missing.npy", "s.csv", ["does not exist"]),
    ("Q.npy", "no/dir/s.csv", ["does not exist"]),
    ("Q.csv", "s.csv", ["non-numeric column(s) 6 (counting from 1)", "'oops' in data row 2"]),
])
def test_score_errors_leave_no_scores(tmp_path, data, capsys, queries, output, fragments):
    X, Q = data
    nonn.KNNN().fit(X).save(tmp_path / "m.nonn")
    write(tmp_path / "Q.npy", Q)
    write(tmp_path / "Q5.npy", Q[:, :5])
    (tmp_path / "Q.csv").write_text("1,2,3,4,5,6\n1,2,3,4,5,oops\n")
    before = set(os.listdir(tmp_path))
    assert main(["score", str(tmp_path / "m.nonn"), str(tmp_path / queries), "-o",
                 str(tmp_path / output)]) == 2
    assert_one_error_line(capsys.readouterr().err, *fragments)
    assert set(os.listdir(tmp_path)) == before


def test_score_with_a_corrupted_model_array(tmp_path, data, capsys):
    import zipfile

    X, Q = data
    nonn.KNNN().fit(X).save(tmp_path / "m.nonn")
    with zipfile.ZipFile(tmp_path / "m.nonn") as z:
        members = {name: z.read(name) for name in z.namelist()}
    members["eigenvalues_.npy"] = members["eigenvalues_.npy"][:-8]
    with zipfile.ZipFile(tmp_path / "m.nonn", "w") as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    write(tmp_path / "Q.npy", Q)
    assert main(["info", str(tmp_path / "m.nonn")]) == 0  # metadata alone is fine
    assert main(["info", str(tmp_path / "m.nonn"), "--verify"]) == 2
    assert_one_error_line(capsys.readouterr().err, "eigenvalues_")
    assert main(["score", str(tmp_path / "m.nonn"), str(tmp_path / "Q.npy"), "-o",
                 str(tmp_path / "s.csv")]) == 2
    assert not (tmp_path / "s.csv").exists()


def test_capped_parameter_is_a_one_line_warning(tmp_path, data, capsys):
    write(tmp_path / "X.npy", data[0])
    assert main(["fit", str(tmp_path / "X.npy"), "-o", str(tmp_path / "m.nonn"),
                 "--set-size", "50"]) == 0
    err = capsys.readouterr().err
    assert "nonn: warning: --set-size 50 is more than the number of features (6)" in err
    assert nonn.load(tmp_path / "m.nonn").set_size_ == 6


def test_help_defaults_are_the_estimators():
    from nonn.cli._common import FIT_OPTIONS

    defaults = nonn.KNNN().get_params()
    for flag, name, kwargs in FIT_OPTIONS:
        default = "none" if defaults[name] is None and name == "scale" else defaults[name]
        assert f"default: {default})" in kwargs["help"], flag


def test_bench_help_and_tiny_run(tmp_path):
    from nonn.cli import main

    assert main(["bench", "--help"]) == 0
    pytest.importorskip("pandas")
    try:
        from nonn.datasets import data_home

        data_home()
    except FileNotFoundError:
        pytest.skip("real data folder absent")
    rc = main(["bench", "--suite", "mvtec", "--seeds", "1", "--datasets", "bottle",
               "--detectors", "KNN-mean-euclidean,KNNN", "--out", str(tmp_path)])
    assert rc == 0
    text = (tmp_path / "mvtec" / "summary.md").read_text()
    assert "KNNN" in text and "KNN-mean-euclidean" in text
