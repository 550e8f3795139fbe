"""The command line's input and output: signals and temporaries, outputs that
are inputs, data read as meant (headers, column names, non-numeric data),
errors phrased in flags, progress bars and notes meant for a terminal."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import nonn
from nonn import _io
from nonn.cli import in_flags, main

pd = pytest.importorskip("pandas")


def run(*args, cwd, env=None, timeout=120):
    """``python -m nonn ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "nonn", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys, monkeypatch):
    """``nonn ARGS`` through ``main()`` in this process (faster than a
    subprocess; the subprocess tests cover signals, terminals and pipes)."""
    def call(*args, cwd, env=None):
        monkeypatch.chdir(cwd)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return Result(code, out.out, out.err)
    return call


def one_error_line(result, *fragments):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nonn: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def temporaries(folder):
    return sorted(p for p in os.listdir(folder) if p.startswith(".nonn-"))


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).normal(size=(300, 6))


@pytest.fixture
def folder(tmp_path, X):
    np.save(tmp_path / "X.npy", X)
    return tmp_path


# ------------------------------------------------------- signals, temporaries
# A subprocess that runs the CLI and stops in the middle of writing the model
# (its temporary file complete on disk, not yet renamed) until it is signalled.
_STOP_MID_WRITE = textwrap.dedent("""
    import os, sys, time
    real_fsync = os.fsync

    def fsync_then_wait(fd):
        real_fsync(fd)
        print("mid-write", flush=True)
        time.sleep(120)

    os.fsync = fsync_then_wait
    from nonn.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def start_stopped_fit(folder, output="m.nonn"):
    proc = subprocess.Popen([sys.executable, "-c", _STOP_MID_WRITE, "fit", "X.npy", "-o",
                             output, "--detector", "knn"], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line == "mid-write\n", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def test_sigterm_mid_save_exits_cleanly_and_leaves_no_temporary(folder):
    proc = start_stopped_fit(folder)
    tmp = temporaries(folder)
    # the temporary is named after this host and the writer's pid, and is complete
    assert len(tmp) == 1 and f"-{proc.pid}-" in tmp[0]
    assert os.path.getsize(folder / tmp[0]) > 0
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    # (the one-line compile notice appears when the kernel cache is cold)
    lines = [line for line in err.strip().splitlines()
             if not line.startswith("nonn: compiling kernels")]
    assert lines == ["nonn: terminated (SIGTERM); no partial output was left"], err
    assert temporaries(folder) == []
    assert not (folder / "m.nonn").exists()


def test_sigterm_mid_resave_keeps_the_old_model(folder, X):
    nonn.KNN().fit(X[:50]).save(folder / "m.nonn")
    before = (folder / "m.nonn").read_bytes()
    proc = start_stopped_fit(folder)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert temporaries(folder) == []
    assert (folder / "m.nonn").read_bytes() == before


def test_sigterm_before_any_write_is_one_line_and_143(folder):
    # stopped inside the command (here: reading the data), nothing written yet
    script = textwrap.dedent("""
        import sys, time
        import nonn._io as io
        real = io.read_table_or_shards

        def slow(*a, **k):
            print("reading", flush=True)
            time.sleep(120)

        io.read_table_or_shards = slow
        from nonn.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, "fit", "X.npy", "-o", "m.nonn"],
                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "reading\n"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert len(err.strip().splitlines()) == 1 and "terminated (SIGTERM)" in err
    assert not (folder / "m.nonn").exists() and temporaries(folder) == []


def test_sigkill_leftover_is_removed_by_the_next_save(folder):
    proc = start_stopped_fit(folder)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    left = temporaries(folder)
    assert len(left) == 1 and f"-{proc.pid}-" in left[0]  # kill -9 cannot clean up
    # a temporary of a writer that is still running (this test process) ...
    alive = f".nonn-{_io._host_tag()}-{os.getpid()}-inprogress.tmp"
    (folder / alive).write_bytes(b"partial")
    # ... and a file that merely looks similar are not touched
    (folder / ".nonn-notes.tmp").write_bytes(b"mine")
    r = run("fit", "X.npy", "-o", "other.nonn", "--detector", "knn", cwd=folder)
    assert r.returncode == 0, r.stderr
    assert temporaries(folder) == sorted([alive, ".nonn-notes.tmp"])
    assert nonn.load(folder / "other.nonn").n_features_in_ == 6


def test_score_output_is_cleaned_up_the_same_way(folder, X, cli):
    # write_scores goes through the same atomic write
    nonn.KNN().fit(X).save(folder / "m.nonn")
    stale = f".nonn-{_io._host_tag()}-999999999-abc.tmp"  # no such pid
    (folder / stale).write_bytes(b"x")
    r = cli("score", "m.nonn", "X.npy", "-o", "s.csv", cwd=folder)
    assert r.returncode == 0, r.stderr
    assert temporaries(folder) == []


def test_resave_keeps_permission_bits(folder, X, cli):
    r = cli("fit", "X.npy", "-o", "m.nonn", "--detector", "knn", cwd=folder)
    assert r.returncode == 0, r.stderr
    os.chmod(folder / "m.nonn", 0o600)
    r = cli("fit", "X.npy", "-o", "m.nonn", "--detector", "knn", cwd=folder)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(folder / "m.nonn").st_mode) == 0o600
    r = cli("score", "m.nonn", "X.npy", "-o", "s.csv", cwd=folder)
    os.chmod(folder / "s.csv", 0o640)
    r = cli("score", "m.nonn", "X.npy", "-o", "s.csv", cwd=folder)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(folder / "s.csv").st_mode) == 0o640
    # the library's save too
    nonn.load(folder / "m.nonn").save(folder / "m.nonn")
    assert stat.S_IMODE(os.stat(folder / "m.nonn").st_mode) == 0o600


# ------------------------------------------------------ outputs that are inputs
def test_output_equal_to_an_input_is_refused(folder, X, cli):
    data = (folder / "X.npy").read_bytes()
    one_error_line(cli("fit", "X.npy", "-o", "X.npy", cwd=folder),
                   "same file as TRAIN", "Give -o another file name")
    assert (folder / "X.npy").read_bytes() == data
    # spelled differently, through a symbolic link, or a hard link
    os.symlink(folder / "X.npy", folder / "link.npy")
    os.link(folder / "X.npy", folder / "hard.npy")
    for out in ("./X.npy", str(folder / "X.npy"), "link.npy", "hard.npy"):
        one_error_line(cli("fit", "X.npy", "-o", out, cwd=folder), "same file as TRAIN")
    assert (folder / "X.npy").read_bytes() == data
    nonn.KNN().fit(X).save(folder / "m.nonn")
    model = (folder / "m.nonn").read_bytes()
    one_error_line(cli("score", "m.nonn", "X.npy", "-o", "m.nonn", cwd=folder),
                   "same file as MODEL")
    one_error_line(cli("score", "m.nonn", "X.npy", "-o", "X.npy", cwd=folder),
                   "same file as QUERIES")
    assert (folder / "m.nonn").read_bytes() == model
    assert (folder / "X.npy").read_bytes() == data


def test_score_images_output_equal_to_an_input_is_refused(folder, X, cli):
    # (score-images writes .csv: an input named .csv is the one at risk)
    nonn.KNN().fit(X).save(folder / "model.csv")
    one_error_line(cli("score-images", "model.csv", "img.png", "-o", "model.csv",
                       cwd=folder), "same file as MODEL")
    (folder / "photo.csv").write_bytes(b"not really an image")
    _fake_image_model(folder / "images.nonn")
    one_error_line(cli("score-images", "images.nonn", "photo.csv", "-o", "photo.csv",
                       cwd=folder), "same file as an input image")


# ------------------------------------------------------------- odd inputs
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need POSIX")
@pytest.mark.parametrize("name", ["pipe.csv", "pipe.npy", "pipe.parquet"])
def test_named_pipe_input_is_refused_without_blocking(folder, name):
    os.mkfifo(folder / name)
    # nobody ever writes to the pipe: opening it would block for good
    one_error_line(run("fit", name, "-o", "m.nonn", cwd=folder, timeout=60),
                   "is a named pipe, not a regular file")


def test_device_input_is_refused(folder):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    os.symlink("/dev/zero", folder / "zero.npy")
    one_error_line(run("fit", "zero.npy", "-o", "m.nonn", cwd=folder, timeout=60),
                   "is a device")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need POSIX")
def test_special_file_output_is_refused(folder, cli):
    os.mkfifo(folder / "out.nonn")
    one_error_line(cli("fit", "X.npy", "-o", "out.nonn", "--detector", "knn", cwd=folder),
                   "not a regular file")
    assert stat.S_ISFIFO(os.stat(folder / "out.nonn").st_mode)  # not replaced
    assert temporaries(folder) == []


def test_swapped_model_and_data_never_suggest_pickle(folder, X, cli):
    nonn.KNN().fit(X).save(folder / "m.nonn")
    pd.DataFrame(X).to_csv(folder / "X.csv", index=False)
    for data in ("X.npy", "X.csv"):
        err = one_error_line(cli("score", data, "m.nonn", "-o", "s.csv", cwd=folder),
                             "look swapped", f"nonn score m.nonn {data} -o s.csv")
        assert "pickle" not in err.lower()
    # data files that are not what their extension says
    (folder / "text.npy").write_text("0.1,0.2\n")
    (folder / "text.npz").write_text("0.1,0.2\n")
    for name in ("text.npy", "text.npz"):
        err = one_error_line(cli("fit", name, "-o", "m2.nonn", cwd=folder),
                             "neither a .npy array nor a .npz archive")
        assert "pickle" not in err.lower()
    np.save(folder / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    err = one_error_line(cli("fit", "objects.npy", "-o", "m2.nonn", cwd=folder),
                         "holds Python objects")
    assert "pickle.load" not in err and "allow_pickle" not in err
    os.rename(folder / "m.nonn", folder / "model.npz")
    one_error_line(cli("fit", "model.npz", "-o", "m2.nonn", cwd=folder),
                   "is a nonn model file, not data")


def _fake_image_model(path):
    """The metadata of an image model (enough to be recognised as one)."""
    import json

    meta = json.dumps({"format": "nonn-vision-model", "format_version": 1}).encode()
    with zipfile.ZipFile(path, "w") as z:
        with z.open("__meta__.npy", "w") as fh:
            np.lib.format.write_array(fh, np.frombuffer(meta, dtype=np.uint8))


def test_image_model_and_detector_model_name_the_right_command(folder, X, cli):
    _fake_image_model(folder / "images.nonn")
    one_error_line(cli("score", "images.nonn", "X.npy", "-o", "s.csv", cwd=folder),
                   "is an image model", "nonn score-images images.nonn")
    nonn.KNN().fit(X).save(folder / "m.nonn")
    (folder / "img").mkdir()
    one_error_line(cli("score-images", "m.nonn", "img", "-o", "s.csv", cwd=folder),
                   "is a detector model (from `nonn fit`)", "nonn score m.nonn")


def test_bench_unknown_dataset_is_one_line_error(tmp_path, cli):
    r = cli("bench", "--suite", "classical", "--datasets", "nope", "--out", "b",
            cwd=tmp_path, env={"NONN_DATA": str(tmp_path / "no-such-folder")})
    one_error_line(r, "NONN_DATA")
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").rglob("*.csv"))
    # a data folder without the dataset: the name is refused before any run
    (tmp_path / "data" / "adbench" / "Classical").mkdir(parents=True)
    (tmp_path / "data" / "adbench" / "CV_by_ResNet18").mkdir(parents=True)
    r = cli("bench", "--suite", "classical", "--datasets", "nope", "--out", "b",
            cwd=tmp_path, env={"NONN_DATA": str(tmp_path / "data")})
    one_error_line(r, "No ADBench dataset called 'nope'")
    assert not any((tmp_path / "b").rglob("*.csv")) if (tmp_path / "b").exists() else True


# -------------------------------------------------------- data read as meant
def test_pandas_numeric_header_is_a_header(folder, X, cli):
    pd.DataFrame(X).to_csv(folder / "X.csv", index=False)  # header 0,1,...,5
    r = cli("fit", "X.csv", "-o", "m.nonn", "--detector", "knn", cwd=folder)
    assert r.returncode == 0, r.stderr
    assert "on 300 samples x 6 features" in r.stdout
    model = nonn.load(folder / "m.nonn")
    np.testing.assert_array_equal(model._fit_X, X)
    assert list(model.feature_names_in_) == ["0", "1", "2", "3", "4", "5"]
    # --header no reads that row as data (it is numeric)
    r = cli("fit", "X.csv", "-o", "m2.nonn", "--detector", "knn", "--header", "no", cwd=folder)
    assert r.returncode == 0 and "on 301 samples" in r.stdout
    # to_csv() with its index: the unnamed first column is the index, not a feature
    pd.DataFrame(X).to_csv(folder / "Xi.csv")
    r = cli("fit", "Xi.csv", "-o", "m3.nonn", "--detector", "knn", cwd=folder)
    assert r.returncode == 0 and "on 300 samples x 6 features" in r.stdout
    assert "taken as the row index" in r.stderr
    # a headerless file of numbers: every row is data
    np.savetxt(folder / "plain.csv", X, delimiter=",", fmt="%.17g")
    X2, names = _io.read_table(folder / "plain.csv")
    assert names is None
    np.testing.assert_array_equal(X2, X)


def test_numeric_header_over_measurements_is_a_header(tmp_path):
    path = tmp_path / "years.csv"
    path.write_text("1990,1991,1992\n0.5,1.25,3\n2.5,3.5,4.75\n")
    X, names = _io.read_table(path)
    assert names == ["1990", "1991", "1992"] and X.tolist() == [[0.5, 1.25, 3], [2.5, 3.5, 4.75]]
    # integers above integers (counts): data, like any other row
    path.write_text("1990,1991,1992\n3,4,5\n6,7,8\n")
    assert _io.read_table(path)[1] is None and _io.read_table(path)[0].shape == (3, 3)
    # a column of integers below: no evidence of a header
    path.write_text("1,2\n0.5,6\n2.5,3\n")
    assert _io.read_table(path)[0].shape == (3, 2)


def test_header_choices(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("3,4\n5,6\n7,8\n")
    assert _io.read_table(path)[0].shape == (3, 2)
    X, names = _io.read_table(path, header="yes")
    assert names == ["3", "4"] and X.tolist() == [[5, 6], [7, 8]]
    path.write_text("a,b\n5,6\n")
    with pytest.raises(ValueError, match=r"non-numeric column\(s\) 1, 2 \(counting from 1\)"):
        _io.read_table(path, header="no")
    with pytest.raises(ValueError, match="header setting .* applies to .csv files"):
        np.save(tmp_path / "a.npy", np.zeros((2, 2)))
        _io.read_table(tmp_path / "a.npy", header="yes")


def test_csv_first_row_with_na_is_data_not_a_header(folder, cli):
    (folder / "na.csv").write_text("1.5,NA,3\n4,5,6\n7,8,9\n")
    one_error_line(cli("fit", "na.csv", "-o", "m.nonn", cwd=folder),
                   "1 missing value", "column(s) 2 (counting from 1)", "data row 1")
    for marker in ("", "NaN", "nan", "N/A", "null"):
        (folder / "na.csv").write_text(f"1.5,{marker},3\n4,5,6\n7,8,9\n")
        with pytest.raises(ValueError, match="missing value"):
            _io.read_table(folder / "na.csv")


def test_non_numeric_columns_are_named(folder, X, cli):
    df = pd.DataFrame(X, columns=[f"f{j}" for j in range(6)])
    df.insert(2, "city", ["Haifa"] * len(df))
    df["day"] = "mon"
    df.to_csv(folder / "mixed.csv", index=False)
    one_error_line(cli("fit", "mixed.csv", "-o", "m.nonn", cwd=folder),
                   "non-numeric column(s) 'city', 'day'", "'Haifa' in data row 1")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(df), folder / "mixed.parquet")
    one_error_line(cli("fit", "mixed.parquet", "-o", "m.nonn", cwd=folder),
                   "non-numeric column(s) 'city', 'day'")


def _named(folder, X, names, name):
    pd.DataFrame(X, columns=names).to_csv(folder / name, index=False)
    return name


def test_feature_names_are_stored_and_shown(folder, X, cli):
    names = ["age", "height", "weight", "pulse", "temp", "spo2"]
    _named(folder, X, names, "train.csv")
    assert cli("fit", "train.csv", "-o", "m.nonn", cwd=folder).returncode == 0
    model = nonn.load(folder / "m.nonn")
    assert list(model.feature_names_in_) == names
    assert nonn.persistence.read_meta(folder / "m.nonn")["fitted"]["feature_names_in_"] == names
    info = cli("info", "m.nonn", cwd=folder)
    assert info.returncode == 0
    assert "features:     age, height, weight, pulse, temp, spo2" in info.stdout
    # a model fitted on unnamed data says so
    assert cli("fit", "X.npy", "-o", "u.nonn", "--detector", "knn", cwd=folder).returncode == 0
    assert "features:     unnamed" in cli("info", "u.nonn", cwd=folder).stdout


def test_score_reorders_named_columns_with_a_note(folder, X, cli):
    names = ["age", "height", "weight", "pulse", "temp", "spo2"]
    _named(folder, X, names, "train.csv")
    assert cli("fit", "train.csv", "-o", "m.nonn", "--detector", "knn", cwd=folder).returncode == 0
    rng = np.random.default_rng(1)
    Q = np.vstack([rng.normal(size=(20, 6)), 6 + rng.normal(size=(3, 6))])
    _named(folder, Q, names, "q.csv")
    order = [3, 0, 5, 1, 4, 2]
    _named(folder, Q[:, order], [names[j] for j in order], "q_shuffled.csv")
    a = cli("score", "m.nonn", "q.csv", "-o", "a.csv", cwd=folder)
    b = cli("score", "m.nonn", "q_shuffled.csv", "-o", "b.csv", cwd=folder)
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    assert a.stderr == ""
    assert b.stderr.strip() == ("nonn: note: 'q_shuffled.csv' has the model's columns in "
                                "another order; reordered to match the model.")
    assert (folder / "a.csv").read_text() == (folder / "b.csv").read_text()
    # the oracle: the library on the columns in the model's order
    got = np.loadtxt(folder / "b.csv", delimiter=",", skiprows=1)[:, 1]
    ref = nonn.KNN().fit(X).anomaly_score(Q)
    np.testing.assert_array_equal(got, ref)


def test_score_refuses_missing_or_extra_columns_naming_them(folder, X, cli):
    names = ["age", "height", "weight", "pulse", "temp", "spo2"]
    _named(folder, X, names, "train.csv")
    assert cli("fit", "train.csv", "-o", "m.nonn", "--detector", "knn", cwd=folder).returncode == 0
    _named(folder, X, ["age", "height", "weight", "pulse", "temp", "bmi"], "q.csv")
    one_error_line(cli("score", "m.nonn", "q.csv", "-o", "s.csv", cwd=folder),
                   "missing 'spo2'", "not in the model 'bmi'")
    _named(folder, np.hstack([X, X[:, :1]]), names + ["extra"], "q2.csv")
    one_error_line(cli("score", "m.nonn", "q2.csv", "-o", "s.csv", cwd=folder),
                   "not in the model 'extra'", "nonn info MODEL")
    assert not (folder / "s.csv").exists()
    # unnamed queries are taken in order, with a note
    r = cli("score", "m.nonn", "X.npy", "-o", "s.csv", cwd=folder)
    assert r.returncode == 0
    assert "has no column names; its columns are taken in the order of the model's" in r.stderr


def test_api_dataframe_keeps_scikit_learn_behaviour(X):
    names = ["a", "b", "c", "d", "e", "f"]
    df = pd.DataFrame(X, columns=names)
    for cls in (nonn.KNNN, nonn.KNN, nonn.GlobalEigenKNN, nonn.LocalEigenKNN):
        det = cls().fit(df)
        assert list(det.feature_names_in_) == names
        np.testing.assert_array_equal(det.anomaly_score(df), cls().fit(X).anomaly_score(X))
        with pytest.raises(ValueError, match="feature names should match"):
            det.anomaly_score(df[names[::-1]])


def test_feature_names_survive_save_and_load(tmp_path, X):
    names = ["a", "b", "c", "d", "e", "f"]
    det = nonn.KNN().fit(pd.DataFrame(X, columns=names))
    det.save(tmp_path / "m.nonn")
    back = nonn.load(tmp_path / "m.nonn")
    assert list(back.feature_names_in_) == names
    with pytest.raises(ValueError, match="feature names should match"):
        back.anomaly_score(pd.DataFrame(X, columns=names[::-1]))
    assert not hasattr(nonn.load(_save(nonn.KNN().fit(X), tmp_path / "u.nonn")),
                       "feature_names_in_")


def _save(det, path):
    det.save(path)
    return path


def test_parquet_column_names_and_pandas_index(tmp_path, X):
    pytest.importorskip("pyarrow")
    df = pd.DataFrame(X, columns=list("abcdef"), index=[f"r{i}" for i in range(len(X))])
    df.to_parquet(tmp_path / "t.parquet")  # stores the index as a column
    got, names = _io.read_table(tmp_path / "t.parquet")
    assert names == list("abcdef")
    np.testing.assert_array_equal(got, X)


# ----------------------------------------------------------- errors in flags
def test_backend_param_errors_are_one_line_in_flags(folder, cli):
    err = one_error_line(cli("fit", "X.npy", "-o", "m.nonn", "--backend-param", "index=HNSW32",
                             cwd=folder),
                         "--backend-param index=HNSW32", "--backend auto",
                         "FAISS index options need --backend faiss")
    assert "backend=" not in err and "backend_params" not in err
    err = one_error_line(cli("fit", "X.npy", "-o", "m.nonn", "--backend-param", "efsearch=64",
                             cwd=folder), "--backend-param efsearch=64")
    pytest.importorskip("faiss")
    one_error_line(cli("fit", "X.npy", "-o", "m.nonn", "--backend", "faiss",
                       "--backend-param", "efsearch=64", cwd=folder),
                   "not an option of the 'faiss' backend",
                   "Did you mean --backend-param efSearch=64?")
    assert not (folder / "m.nonn").exists()


def test_library_spellings_become_flags():
    cases = {
        "The 'contamination' parameter of KNNN must be a float in the range (0, 0.5]. Got 0.7 "
        "instead. For example: KNNN(contamination=0.01).":
        "--contamination must be a float in the range (0, 0.5]; got 0.7. For example: "
        "--contamination 0.01.",
        "for example backend='faiss', backend_params={'index': 'HNSW32'}.":
        "for example --backend faiss, --backend-param index=HNSW32.",
        "pass weights='/w/resnet18.pth'.": "pass --weights /w/resnet18.pth.",
        "n_neighbors=50 is more than the number of other training points (49); using 49. The "
        "value used is stored as the fitted attribute n_neighbors_.":
        "--n-neighbors 50 is more than the number of other training points (49); using 49. "
        "`nonn info` shows the value used.",
        "For example: KNN(scale='standard').": "For example: --scale standard.",
        # not a flag: unchanged
        "n_jobs=None (all cores)": "n_jobs=None (all cores)",
        "--backend-param index=HNSW32 is fine": "--backend-param index=HNSW32 is fine",
    }
    for text, want in cases.items():
        assert in_flags(text) == want


# ------------------------------------------------ output meant for a terminal
def _progress_run(folder, *flags, tty=False):
    """Score with stderr on a pseudo-terminal (tty) or a pipe; returns stderr."""
    if not (folder / "m.nonn").exists():
        rng = np.random.default_rng(0)
        np.save(folder / "q.npy", rng.normal(size=(3000, 16)))
        nonn.KNN().fit(rng.normal(size=(500, 16))).save(folder / "m.nonn")
    # a tiny working memory: the queries are scored in many chunks, one bar step each
    env = {**os.environ, "SKLEARN_WORKING_MEMORY": "1"}
    cmd = [sys.executable, "-m", "nonn", "score", "m.nonn", "q.npy", "-o", "s.csv", *flags]
    if not tty:
        return subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=300,
                              env=env).stderr
    import fcntl
    import pty
    import struct
    import termios

    main_fd, child_fd = pty.openpty()
    # a terminal of 24 x 80 (a new pseudo-terminal is 0 x 0: tqdm draws nothing)
    fcntl.ioctl(child_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.DEVNULL, stderr=child_fd,
                            env=env)
    os.close(child_fd)
    chunks = []
    while True:
        try:
            data = os.read(main_fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=300)
    os.close(main_fd)
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals need POSIX")
def test_progress_bars_only_on_a_terminal(folder):
    bar = "it/s]"
    assert bar in _progress_run(folder, tty=True)
    assert bar not in _progress_run(folder)  # stderr is a pipe (a log file alike)
    assert bar in _progress_run(folder, "--progress")
    assert bar not in _progress_run(folder, "--no-progress", tty=True)


@pytest.mark.slow
def test_compile_notice_only_when_numba_compiles(folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("numba-cache")
    env = {"NUMBA_CACHE_DIR": str(cache)}
    notice = "nonn: compiling kernels (first use, ~20 s)"
    first = run("fit", "X.npy", "-o", "m.nonn", "--detector", "knn", cwd=folder, env=env,
                timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines().count(notice) == 1
    # the same kernels again: numba loads them from its cache, silently
    second = run("fit", "X.npy", "-o", "m.nonn", "--detector", "knn", cwd=folder, env=env,
                 timeout=600)
    assert second.returncode == 0, second.stderr
    assert notice not in second.stderr


def test_score_on_a_local_cluster_shows_no_dask_advice(folder):
    pytest.importorskip("distributed")
    pytest.importorskip("pyarrow")
    rng = np.random.default_rng(0)
    # queries large enough for Dask's "Sending large graph" warning (> 10 MB)
    np.save(folder / "train.npy", rng.normal(size=(2000, 8)).astype(np.float32))
    np.save(folder / "q.npy", rng.normal(size=(400_000, 8)).astype(np.float32))
    assert run("fit", "train.npy", "-o", "m.nonn", cwd=folder).returncode == 0
    env = {"DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    r = run("score", "m.nonn", "q.npy", "-o", "s.parquet", "--cluster", "local",
            cwd=folder, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "large graph" not in r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr


def test_shard_folder_column_names(tmp_path, X):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "shards"
    folder.mkdir()
    names = list("abcdef")
    for i, part in enumerate((X[:100], X[100:])):
        pq.write_table(pa.table({n: part[:, j] for j, n in enumerate(names)}),
                       folder / f"part-{i}.parquet")
    got, got_names = _io.read_table_or_shards(folder)
    assert got_names == names
    np.testing.assert_array_equal(got, X)
    np.save(folder / "part-2.npy", X[:5])  # an unnamed shard: columns taken in order
    assert _io.read_table_or_shards(folder)[1] is None
    os.remove(folder / "part-2.npy")
    pq.write_table(pa.table({n: X[:5, j] for j, n in enumerate(names[::-1])}),
                   folder / "part-2.parquet")
    with pytest.raises(ValueError, match="name their columns differently"):
        _io.read_table_or_shards(folder)
