"""The detectors' ``scale`` option: scikit-learn's scalers' statistics,
learned at fit, stored in the model and applied to every query."""

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MinMaxScaler, RobustScaler, StandardScaler

import nonn
from nonn import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN
from nonn._scaling import apply_column_scaling, fit_column_scaling

DETECTORS = (KNNN, KNN, GlobalEigenKNN, LocalEigenKNN)
SCALERS = {"standard": StandardScaler, "minmax": MinMaxScaler, "robust": RobustScaler}


def units_data(seed=0, n=240, dtype=np.float64):
    """Columns in very different units, one of them constant."""
    rng = np.random.default_rng(seed)
    units = np.array([1.0, 10.0, 100.0, 1e3, 1e-3, 1.0, 5.0])
    X = rng.normal(size=(n, 7)) * units + rng.normal(size=7) * units
    X[:, 5] = 7.0  # constant in training
    Q = np.vstack([rng.normal(size=(25, 7)) * units, 4 * units * rng.normal(size=(5, 7))])
    return X.astype(dtype), Q.astype(dtype)


@pytest.mark.parametrize("method", SCALERS)
@pytest.mark.parametrize("cls", DETECTORS)
def test_scale_is_the_scikit_learn_scaler_then_the_detector(cls, method):
    X, Q = units_data()
    det = cls(scale=method).fit(X)
    scaler = SCALERS[method]().fit(X)
    ref = cls().fit(scaler.transform(X))
    np.testing.assert_allclose(det.anomaly_score(Q), ref.anomaly_score(scaler.transform(Q)),
                               rtol=1e-9)
    np.testing.assert_allclose(det.train_scores_, ref.train_scores_, rtol=1e-9)
    assert det.offset_ == pytest.approx(ref.offset_, rel=1e-9)
    # a Pipeline gives the same scores (the documented recipe)
    pipe = make_pipeline(SCALERS[method](), cls()).fit(X)
    np.testing.assert_allclose(-pipe.score_samples(Q), det.anomaly_score(Q), rtol=1e-9)


@pytest.mark.parametrize("method", SCALERS)
def test_statistics_match_the_scalers(method):
    X, _ = units_data(1)
    center, factor = fit_column_scaling(X, method)
    sc = SCALERS[method]().fit(X)
    np.testing.assert_allclose(apply_column_scaling(X, center, factor), sc.transform(X),
                               rtol=1e-12, atol=1e-12)
    # the constant column: no division by zero, training rows at 0, factor 1
    assert factor[5] == 1.0
    assert np.all(np.isfinite(factor)) and np.all(factor > 0)
    assert np.all(apply_column_scaling(X, center, factor)[:, 5] == 0)


@pytest.mark.parametrize("method", SCALERS)
def test_statistics_in_chunks_equal_one_block(method):
    X, _ = units_data(2, n=3000)
    one = fit_column_scaling(X, method, working_memory=1024)
    # 0.001 MiB: row (or column) blocks of a few entries each
    many = fit_column_scaling(X, method, working_memory=0.001)
    np.testing.assert_allclose(many[0], one[0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(many[1], one[1], rtol=1e-12)


@pytest.mark.parametrize("dtype, exponents", [(np.float32, (-30, -10, 10, 30)),
                                              (np.float64, (-300, -100, 100, 300))])
@pytest.mark.parametrize("method", SCALERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_magnitude_scales_alike(method, dtype, exponents, seed):
    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(200, 5)) * [1, 3, 0.2, 8, 1]).astype(dtype)
    Q = (rng.normal(size=(40, 5)) * [1, 3, 0.2, 8, 1] * 1.5).astype(dtype)
    base = KNN(scale=method).fit(X).anomaly_score(Q)
    for e in exponents:
        c = dtype(10.0) ** e if dtype is np.float64 else np.float32(10.0 ** e)
        got = KNN(scale=method).fit(X * c).anomaly_score(Q * c)
        assert np.all(np.isfinite(got))
        assert spearmanr(got, base).statistic > 0.9999, e
        np.testing.assert_allclose(got, base, rtol=1e-3 if dtype is np.float32 else 1e-9)


def test_saved_and_loaded_scale(tmp_path):
    X, Q = units_data()
    for cls in DETECTORS:
        det = cls(scale="robust").fit(X)
        det.save(tmp_path / "m.nonn")
        back = nonn.load(tmp_path / "m.nonn")
        assert back.scale == "robust"
        np.testing.assert_array_equal(back.scale_center_, det.scale_center_)
        np.testing.assert_array_equal(back.scale_factor_, det.scale_factor_)
        np.testing.assert_array_equal(back.anomaly_score(Q), det.anomaly_score(Q))
    meta = nonn.persistence.read_meta(tmp_path / "m.nonn")
    assert {"scale_center_", "scale_factor_"} <= set(meta["arrays"])
    # without scale the model holds no scaling arrays (and older files load)
    KNN().fit(X).save(tmp_path / "plain.nonn")
    assert "scale_center_" not in nonn.persistence.read_meta(tmp_path / "plain.nonn")["arrays"]
    KNNN(memory="lean", scale="standard").fit(X).save(tmp_path / "lean.nonn")
    lean = nonn.load(tmp_path / "lean.nonn")
    assert lean.memory == "lean" and hasattr(lean, "scale_center_")


def test_scale_none_leaves_the_data_untouched_and_refit_forgets():
    X, Q = units_data()
    det = KNN(scale="standard").fit(X)
    assert hasattr(det, "scale_center_")
    det.set_params(scale=None).fit(X)
    assert not hasattr(det, "scale_center_")
    assert det._fit_X is not None and np.array_equal(det._fit_X, X)
    np.testing.assert_array_equal(det.anomaly_score(Q), KNN().fit(X).anomaly_score(Q))


def test_float32_stays_float32():
    X, Q = units_data(dtype=np.float32)
    det = KNNN(scale="standard").fit(X)
    assert det._fit_X.dtype == np.float32
    assert det.anomaly_score(Q).dtype == np.float32


def test_bad_scale_values():
    X, _ = units_data()
    with pytest.raises(ValueError, match=r"The 'scale' parameter of KNN must be None or a str "
                       r"among \{'standard', 'minmax', 'robust'\}. Got 'zscore' instead."):
        KNN(scale="zscore").fit(X)
    # a query beyond what the dtype can hold after scaling is an error, not inf
    det = KNN(n_neighbors=1, scale="minmax").fit(np.array([[0.0], [1e-300], [2e-300]]))
    with pytest.raises(ValueError, match="overflow"):
        det.anomaly_score(np.array([[1e10]]))


def test_distributed_refuses_robust_scale():
    """Medians and quartiles need all rows of a column in one place; the
    standard and min-max scalings are fitted on the cluster (equality with
    KNNN: tests/test_distributed.py)."""
    pytest.importorskip("distributed")
    from nonn.distributed import DistributedKNNN

    X, _ = units_data()
    det = DistributedKNNN(scale="robust")
    with pytest.raises(ValueError, match="does not support scale='robust'"):
        det.fit(X)
    assert not hasattr(det, "client_")  # refused before any cluster starts


def test_cli_scale_option(tmp_path, capsys):
    from nonn.cli import main

    X, Q = units_data()
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "Q.npy", Q)
    assert main(["fit", str(tmp_path / "X.npy"), "-o", str(tmp_path / "m.nonn"),
                 "--scale", "robust"]) == 0
    model = nonn.load(tmp_path / "m.nonn")
    assert model.scale == "robust"
    sc = RobustScaler().fit(X)
    ref = KNNN().fit(sc.transform(X)).anomaly_score(sc.transform(Q))
    assert main(["score", str(tmp_path / "m.nonn"), str(tmp_path / "Q.npy"), "-o",
                 str(tmp_path / "s.csv")]) == 0
    got = np.loadtxt(tmp_path / "s.csv", delimiter=",", skiprows=1)[:, 1]
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m.nonn")]) == 0
    assert "scale = 'robust'" in capsys.readouterr().out
    assert main(["fit", str(tmp_path / "X.npy"), "-o", str(tmp_path / "n.nonn"),
                 "--scale", "none"]) == 0
    assert nonn.load(tmp_path / "n.nonn").scale is None


@pytest.mark.parametrize("scale", ["standard", "robust"])
def test_float32_scaled_model_saves_and_loads(tmp_path, scale):
    """The column statistics are float64 whatever the data's dtype; a
    float32 model with them saves and loads with the same scores."""
    X, Q = units_data()
    model = KNNN(scale=scale).fit(X.astype(np.float32))
    assert model.scale_center_.dtype == np.float64
    loaded = nonn.load(model.save(tmp_path / "m.nonn"))
    np.testing.assert_array_equal(loaded.scale_factor_, model.scale_factor_)
    np.testing.assert_array_equal(loaded.anomaly_score(Q.astype(np.float32)),
                                  model.anomaly_score(Q.astype(np.float32)))
