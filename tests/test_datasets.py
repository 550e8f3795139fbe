"""Tests of the real-data loaders (nonn.datasets).

The tests marked ``data`` read the real ADBench files and are skipped when
no data folder is found (a clone of the project alone still passes).
"""

import os
from pathlib import Path

import numpy as np
import pytest

from nonn import datasets
from nonn.datasets import (
    DATA_ENV,
    MVTEC_CATEGORIES,
    data_home,
    list_adbench,
    load_adbench,
    mvtec_union,
)


def _have_data():
    try:
        return (data_home() / "adbench").is_dir()
    except FileNotFoundError:
        return False


needs_data = pytest.mark.skipif(not _have_data(), reason="no data folder (set NONN_DATA)")


# ------------------------------------------------------------ no real data


def _fake_home(root):
    """A tiny data folder laid out like the real one."""
    rng = np.random.default_rng(0)
    cl = root / "adbench" / "Classical"
    cv = root / "adbench" / "CV_by_ResNet18"
    cl.mkdir(parents=True)
    cv.mkdir(parents=True)
    y = np.r_[np.zeros(20, np.int64), np.ones(5, np.int64)]
    np.savez(cl / "4_breastw.npz", X=rng.integers(0, 9, (25, 3)).astype(np.uint8), y=y)
    np.savez(cl / "12_fault.npz", X=rng.normal(size=(25, 4)), y=y.astype(np.int32))
    for c in ("bottle", "carpet"):
        np.savez(cv / f"MVTec-AD_{c}.npz", X=rng.normal(size=(25, 8)).astype(np.float32), y=y)
    np.savez(cv / "CIFAR10_0.npz", X=rng.normal(size=(25, 8)).astype(np.float32), y=y)
    return root


def test_env_variable_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_home() == tmp_path


def test_env_variable_missing_folder_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=DATA_ENV):
        data_home()


def test_cwd_relative_default(tmp_path, monkeypatch):
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "checkout").mkdir()
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path / "checkout")
    assert data_home() == (tmp_path / "shared" / "data").resolve()


def test_no_folder_anywhere_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    # hide the repository-relative fallback too
    monkeypatch.setattr(datasets, "__file__", str(tmp_path / "pkg" / "datasets.py"))
    with pytest.raises(FileNotFoundError, match=DATA_ENV):
        data_home()


def test_loaders_on_a_fake_folder(tmp_path):
    home = _fake_home(tmp_path)
    assert list_adbench("classical", home=home) == ["4_breastw", "12_fault"]
    assert list_adbench("mvtec", home=home) == ["MVTec-AD_carpet", "MVTec-AD_bottle"]
    assert set(list_adbench("cv_resnet18", home=home)) == {
        "MVTec-AD_carpet", "MVTec-AD_bottle", "CIFAR10_0"}
    X, y = load_adbench("breastw", home=home)
    assert X.dtype == np.float64 and X.shape == (25, 3)  # integer columns become float64
    assert y.dtype == np.int64 and y.sum() == 5
    X2, _ = load_adbench("4_breastw.npz", home=home)
    np.testing.assert_array_equal(X, X2)
    Xb, _ = load_adbench("bottle", home=home)
    assert Xb.dtype == np.float32  # embeddings stay float32
    Xm, _ = load_adbench("MVTec-AD_bottle", home=home)
    np.testing.assert_array_equal(Xb, Xm)


def test_unknown_name_lists_close_matches(tmp_path):
    home = _fake_home(tmp_path)
    with pytest.raises(FileNotFoundError, match="MVTec-AD_bottle"):
        load_adbench("bottel", home=home)
    with pytest.raises(FileNotFoundError, match="No ADBench dataset"):
        load_adbench("zzzzzz", home=home)


def test_bad_suite():
    with pytest.raises(ValueError, match="'suite'"):
        list_adbench("nlp")


def test_bad_labels_refused(tmp_path):
    home = _fake_home(tmp_path)
    np.savez(home / "adbench" / "Classical" / "99_bad.npz", X=np.zeros((3, 2)), y=[0, 2, 1])
    with pytest.raises(ValueError, match="0 .normal. and 1"):
        load_adbench("99_bad", home=home)


def test_mvtec_union_fake(tmp_path):
    home = _fake_home(tmp_path)
    X, y, cat = mvtec_union(["bottle", "MVTec-AD_carpet"], home=home, return_categories=True)
    assert X.shape == (50, 8) and y.sum() == 10
    assert list(np.unique(cat)) == ["bottle", "carpet"]
    with pytest.raises(ValueError, match="Unknown MVTec AD category"):
        mvtec_union(["botle"], home=home)
    with pytest.raises(ValueError, match="distinct"):
        mvtec_union(["bottle", "bottle"], home=home)
    with pytest.raises(ValueError, match="range"):
        mvtec_union(0, home=home)


# --------------------------------------------------------------- real data


@pytest.mark.data
@needs_data
def test_real_suites_are_complete():
    assert len(list_adbench("classical")) == 43
    mv = list_adbench("mvtec")
    assert len(mv) == 15
    assert [n.replace("MVTec-AD_", "") for n in mv] == list(MVTEC_CATEGORIES)


@pytest.mark.data
@needs_data
@pytest.mark.parametrize("name, shape, n_anom, dtype", [
    ("4_breastw", (683, 9), 239, np.float64),
    ("6_cardio", (1831, 21), 176, np.float64),
    ("MVTec-AD_bottle", (292, 512), 63, np.float32),
])
def test_real_files(name, shape, n_anom, dtype):
    X, y = load_adbench(name)
    assert X.shape == shape and X.dtype == dtype
    assert y.shape == (shape[0],) and int(y.sum()) == n_anom
    assert set(np.unique(y)) == {0, 1}
    assert np.isfinite(X).all()


@pytest.mark.data
@needs_data
def test_real_aliases():
    a, _ = load_adbench("bottle")
    b, _ = load_adbench("MVTec-AD_bottle")
    np.testing.assert_array_equal(a, b)
    c, _ = load_adbench("cardio")
    assert c.shape == (1831, 21)


@pytest.mark.data
@needs_data
def test_real_mvtec_union():
    X, y = mvtec_union(2)  # carpet + grid
    assert X.shape == (397 + 342, 512) and int(y.sum()) == 89 + 57


def test_data_home_is_a_path_when_found():
    if not _have_data():
        pytest.skip("no data folder")
    assert isinstance(data_home(), Path)
    assert os.path.isdir(data_home())
