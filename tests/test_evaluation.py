"""Tests of the evaluation harness (nonn.evaluation)."""

import math

import numpy as np
import pytest

pd = pytest.importorskip("pandas")  # the harness needs pandas (extra: nonn[bench])

from nonn import KNN
from nonn.datasets import data_home
from nonn.evaluation import (
    DETECTORS,
    Detector,
    auroc_ap,
    get_detectors,
    novelty_split,
    plot_results,
    register_detector,
    run_benchmark,
    run_suite,
    summarize,
    table7_grid,
    to_markdown,
    write_csv,
    write_markdown,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _have_data():
    try:
        return (data_home() / "adbench").is_dir()
    except FileNotFoundError:
        return False


needs_data = pytest.mark.skipif(not _have_data(), reason="no data folder (set NONN_DATA)")


def _toy(n_normal=120, n_anom=15, d=4, seed=0):
    rng = np.random.default_rng(seed)
    X = np.vstack([rng.normal(size=(n_normal, d)), rng.normal(4.0, 1.0, size=(n_anom, d))])
    y = np.r_[np.zeros(n_normal, np.int64), np.ones(n_anom, np.int64)]
    perm = rng.permutation(len(y))
    return X[perm], y[perm]


# ---------------------------------------------------------------- protocol


def test_split_sizes_and_disjointness():
    _, y = _toy(120, 15)
    train, test = novelty_split(y, seed=3)
    assert len(train) == 120 - 15 and len(test) == 2 * 15
    assert np.all(y[train] == 0)  # never an anomaly in training
    assert int(y[test].sum()) == 15  # all anomalies in test
    assert (y[test] == 0).sum() == 15  # hold-out as large as the anomaly count
    assert not set(train) & set(test)
    assert set(train) | set(test) == set(range(len(y)))


def test_split_reproducible_and_seed_dependent():
    _, y = _toy()
    a = novelty_split(y, seed=1)
    b = novelty_split(y, seed=1)
    c = novelty_split(y, seed=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_split_caps():
    y = np.r_[np.zeros(1000, np.int64), np.ones(300, np.int64)]
    train, test = novelty_split(y, seed=0, max_train=200, max_test=100)
    assert len(train) == 200 and len(test) == 100
    assert int(y[test].sum()) == 50  # the test set stays balanced
    assert np.all(y[train] == 0) and not set(train) & set(test)
    # a cap subsamples the rows the uncapped split uses
    full_train, full_test = novelty_split(y, seed=0, max_train=None, max_test=None)
    assert set(train) <= set(full_train) and set(test) <= set(full_test)


def test_split_errors():
    with pytest.raises(ValueError, match="at least one anomaly"):
        novelty_split(np.zeros(10, int))
    with pytest.raises(ValueError, match="no normal row"):
        novelty_split(np.r_[np.zeros(3, int), np.ones(3, int)])
    with pytest.raises(ValueError, match="max_train"):
        novelty_split(np.r_[np.zeros(9, int), np.ones(1, int)], max_train=1)


def test_metrics():
    y = np.array([0, 0, 1, 1])
    assert auroc_ap(y, [0.1, 0.2, 0.8, 0.9]) == (1.0, 1.0)
    assert auroc_ap(y, [0.1, 0.2, np.inf, 0.9])[0] == 1.0  # inf ranks first
    with pytest.raises(ValueError, match="NaN"):
        auroc_ap(y, [0.1, np.nan, 0.8, 0.9])


# ---------------------------------------------------------------- registry


def test_registry_contents_and_patterns():
    for name in ("KNNN", "KNNN-paper", "KNN-mean-euclidean", "KNN-kth-cosine",
                 "GlobalEigenKNN", "LocalEigenKNN", "pyod-KNN", "pyod-LOF", "pyod-IForest",
                 "sklearn-LOF", "sklearn-IForest", "authors-knnn", "authors-knnn-p1"):
        assert name in DETECTORS
    dets, _ = get_detectors("KNN-*")
    assert [d.name for d in dets] == ["KNN-mean-euclidean", "KNN-mean-cosine",
                                      "KNN-kth-euclidean", "KNN-kth-cosine",
                                      "KNN-k1-euclidean", "KNN-k1-cosine",
                                      "KNN-k5-euclidean", "KNN-k5-cosine"]
    dets, _ = get_detectors("KNNN,KNNN")  # duplicates dropped
    assert [d.name for d in dets] == ["KNNN"]
    with pytest.raises(ValueError, match="Close matches"):
        get_detectors("KNNNN")


def test_missing_peer_is_skipped_with_a_note():
    ghost = Detector("ghost", lambda seed: None, requires=("no_such_module_xyz",))
    dets, notes = get_detectors([ghost, "KNNN"])
    assert [d.name for d in dets] == ["KNNN"]
    assert "no_such_module_xyz" in notes[0]


def test_register_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_detector(Detector("KNNN", lambda seed: None))


# ------------------------------------------------------------------- runs


class _Boom:
    def fit(self, X):
        raise RuntimeError("boom on purpose")


def test_run_suite_records_a_failing_detector_and_goes_on():
    data = {"toy": _toy(), "toy2": _toy(seed=1)}
    dets = [Detector("boom", lambda seed: _Boom()), "KNN-mean-euclidean"]
    df = run_suite(data, dets, seeds=(0, 1), progress=False)
    assert list(df.columns[:7]) == ["dataset", "seed", "detector", "auroc", "ap", "fit_s",
                                    "score_s"]
    assert len(df) == 2 * 2 * 2
    bad = df[df.detector == "boom"]
    assert bad["auroc"].isna().all() and bad["ap"].isna().all()
    assert bad["error"].str.contains("RuntimeError: boom on purpose").all()
    good = df[df.detector == "KNN-mean-euclidean"]
    assert (good["error"] == "").all() and (good["auroc"] > 0.95).all()
    assert (good["n_train"] == 105).all() and (good["n_test"] == 30).all()


def test_run_suite_same_rows_for_every_detector_and_reproducible():
    X, y = _toy()
    seen = []

    class Spy:
        def fit(self, X):
            seen.append(X.copy())
            return self

        def anomaly_score(self, X):
            return X[:, 0]

    dets = [Detector("spy1", lambda s: Spy()), Detector("spy2", lambda s: Spy())]
    run_suite([("toy", X, y)], dets, seeds=(0,), progress=False)
    np.testing.assert_array_equal(seen[0], seen[1])
    a = run_suite([("toy", X, y)], ["KNN-mean-euclidean"], seeds=(5,), progress=False)
    b = run_suite([("toy", X, y)], ["KNN-mean-euclidean"], seeds=(5,), progress=False)
    assert a["auroc"].tolist() == b["auroc"].tolist()


def test_run_suite_bad_dataset_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("NONN_DATA", str(tmp_path))
    (tmp_path / "adbench" / "Classical").mkdir(parents=True)
    (tmp_path / "adbench" / "CV_by_ResNet18").mkdir(parents=True)
    df = run_suite(["no_such_set", ("toy", *_toy())], ["KNN-mean-euclidean"], seeds=(0,),
                   progress=False)
    assert df.loc[0, "error"].startswith("load: FileNotFoundError")
    assert df.loc[1, "error"] == ""


def test_dataset_spec_forms():
    X, y = _toy()
    a = run_suite(("toy", X, y), ["KNN-mean-euclidean"], seeds=(0,), progress=False)
    b = run_suite(("toy", (X, y)), ["KNN-mean-euclidean"], seeds=(0,), progress=False)
    c = run_suite({"toy": (X, y)}, ["KNN-mean-euclidean"], seeds=(0,), progress=False)
    assert a["auroc"].tolist() == b["auroc"].tolist() == c["auroc"].tolist()
    d = run_suite([("t1", X, y), ("t2", X, y)], ["KNN-mean-euclidean"], seeds=(0,),
                  progress=False)
    assert d["dataset"].tolist() == ["t1", "t2"]


def test_checkpoint_and_resume(tmp_path):
    ck = tmp_path / "results.csv"
    data = {"a": _toy(), "b": _toy(seed=2)}
    calls = []

    def make(seed):
        calls.append(seed)
        return KNN()

    det = Detector("counted", make)
    df1 = run_suite(data, [det], seeds=(0, 1), progress=False, checkpoint=ck)
    assert ck.exists() and len(calls) == 4
    df2 = run_suite(data, [det], seeds=(0, 1, 2), progress=False, checkpoint=ck, resume=True)
    assert len(calls) == 6  # only the new seed ran
    assert len(df2) == 6
    merged = df2[df2.seed < 2].sort_values(["dataset", "seed"])["auroc"].to_numpy()
    np.testing.assert_allclose(merged, df1.sort_values(["dataset", "seed"])["auroc"])


def test_scaling_option():
    X, y = _toy()
    X = X * np.array([1, 1000, 1, 1])
    df = run_suite([("toy", X, y)], ["KNN-mean-euclidean"], seeds=(0,), scale="minmax",
                   progress=False)
    assert df.loc[0, "error"] == ""
    with pytest.raises(ValueError, match="scale"):
        from nonn.evaluation import _scale

        _scale(X, X, "robust")


# -------------------------------------------------------------- summaries


def _hand_frame():
    rows = []
    # dataset d1: A > B > C ; d2: B > A = C ; d3: C fails
    vals = {"d1": {"A": 0.9, "B": 0.8, "C": 0.7},
            "d2": {"A": 0.6, "B": 0.7, "C": 0.6},
            "d3": {"A": 0.5, "B": 0.4, "C": math.nan}}
    for ds, v in vals.items():
        for seed in (0, 1):
            for det, a in v.items():
                rows.append(dict(dataset=ds, seed=seed, detector=det, auroc=a,
                                 ap=a if not math.isnan(a) else math.nan, fit_s=1.0,
                                 score_s=0.5, n_train=10, n_test=4, n_features=2,
                                 error="" if not math.isnan(a) else "X: failed",
                                 warnings=""))
    return pd.DataFrame(rows)


def test_summarize_ranks_on_a_hand_made_frame():
    s = summarize(_hand_frame())
    assert s.dropped == ["d3"]  # C has no result there: out of the means
    assert s.ranks.loc["d1"].tolist() == [1.0, 2.0, 3.0]
    assert s.ranks.loc["d2"].tolist() == [2.5, 1.0, 2.5]  # ties share the average rank
    o = s.overall
    assert o.loc["A", "mean_rank"] == pytest.approx(1.75)
    assert o.loc["B", "mean_rank"] == pytest.approx(1.5)
    assert o.loc["C", "mean_rank"] == pytest.approx(2.75)
    assert o.loc["A", "mean_auroc"] == pytest.approx(0.75)
    assert o.loc["B", "mean_auroc"] == pytest.approx(0.75)
    assert o.loc["C", "wins"] == 0 and o.loc["A", "wins"] == 1 and o.loc["B", "wins"] == 1
    assert o.loc["C", "n_failed"] == 2 and o.loc["A", "n_failed"] == 0
    assert o.loc["A", "fit_s"] == pytest.approx(6.0)  # total over 3 datasets x 2 seeds
    assert (o["n_datasets"] == 2).all()
    assert list(o.index)[-1] == "C"
    # per-dataset table keeps the failed dataset (NaN) for the record
    assert math.isnan(s.auroc.loc["d3", "C"]) and s.auroc.loc["d3", "A"] == 0.5


def test_markdown_csv_and_plot(tmp_path):
    s = summarize(_hand_frame())
    md = to_markdown(s, reference={"d1": {"paper": 0.95}, "mean": {"paper": 0.9}}, title="t")
    assert "| dataset | A | B | C | paper |" in md
    assert "**0.900**" in md  # best of d1 in bold
    assert "Left out of the means" in md and "d3" in md
    assert write_markdown(s, tmp_path / "s.md").read_text().startswith("Mean AUROC")
    csv = write_csv(s, tmp_path / "a.csv")
    assert pd.read_csv(csv, index_col=0).shape == (3, 3)
    write_csv(_hand_frame(), tmp_path / "r.csv")
    assert len(pd.read_csv(tmp_path / "r.csv")) == 18
    pytest.importorskip("matplotlib")
    for kind in ("dots", "ranks", "both"):
        p = plot_results(s, tmp_path / f"{kind}.png", kind=kind)
        assert p.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="kind"):
        plot_results(s, tmp_path / "x.png", kind="pie")


def test_table7_grid_on_toy_data():
    X, y = _toy(200, 20)
    out = table7_grid(("toy", X, y), ks=(1, 3), kprimes=(0, 10), seeds=(0,), progress=False)
    assert list(out[["k", "kprime"]].itertuples(index=False, name=None)) == [
        (1, 0), (1, 10), (3, 0), (3, 10)]
    assert out["auroc"].between(0.5, 1.0).all() and (out["n_failed"] == 0).all()
    out = table7_grid(("toy", X, y), pairs=[(3, 25)], seeds=(0,), progress=False)
    assert out.loc[0, "paper"] == 0.757


# --------------------------------------------------------------- real data


@pytest.mark.data
@needs_data
def test_real_benchmark_writes_everything(tmp_path):
    pytest.importorskip("matplotlib")
    df, s, md = run_benchmark("mvtec", tmp_path, detectors="KNN-mean-euclidean,KNNN",
                              seeds=(0,), datasets=["MVTec-AD_bottle", "MVTec-AD_toothbrush"],
                              progress=False)
    for f in ("results.csv", "auroc.csv", "summary.csv", "summary.md", "summary.png"):
        assert (tmp_path / f).exists()
    assert (df["error"] == "").all()
    n_anom = df["dataset"].map({"MVTec-AD_bottle": 63, "MVTec-AD_toothbrush": 30})
    assert (df["n_test"] == 2 * n_anom).all()
    assert "paper k-NN" in md
    assert s.auroc.loc["MVTec-AD_bottle", "KNN-mean-euclidean"] > 0.9


def test_check_datasets_accepts_image_tasks(tmp_path):
    """One-class image tasks come from the feature cache, not the ADBench
    folder: naming one is not a missing data set."""
    from nonn.evaluation import check_datasets

    check_datasets(["cifar10-effnet224-0", "fashion-effnet224-9"], home=tmp_path)
    with pytest.raises(FileNotFoundError):
        check_datasets(["cifar10-effnet224-0", "no_such_set"], home=tmp_path)
