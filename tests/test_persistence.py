import json
import os
import zipfile

import numpy as np
import pytest

import nonn
from nonn import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN, ModelFileError, load
from nonn import _archive, persistence

ESTIMATORS = [KNNN, KNN, GlobalEigenKNN, LocalEigenKNN]
rng = np.random.default_rng(0)
X = rng.normal(size=(120, 9))
Q = rng.normal(size=(30, 9)) * 1.5


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.nonn"
    KNNN(contamination=0.1).fit(X).save(path)
    return path


@pytest.mark.parametrize("cls", ESTIMATORS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_identical_scores(cls, dtype, tmp_path):
    det = cls(contamination=0.05).fit(X.astype(dtype))
    path = tmp_path / "m.nonn"
    det.save(path)
    det2 = load(path)
    assert type(det2) is cls
    assert det2.get_params() == det.get_params()
    np.testing.assert_array_equal(det2.anomaly_score(Q), det.anomaly_score(Q))
    np.testing.assert_array_equal(det2.predict(Q), det.predict(Q))
    assert det2.offset_ == det.offset_ and det2.backend_ == det.backend_
    assert det2.anomaly_score(Q).dtype == dtype


@pytest.mark.parametrize("params", [
    dict(memory="lean"),
    dict(n_neighbors="auto", n_neighbors_of_neighbors="auto", random_state=3),
])
def test_round_trip_lean_and_auto(params, tmp_path):
    det = KNNN(**params).fit(X)
    det.save(tmp_path / "m.nonn")
    with np.load(tmp_path / "m.nonn", allow_pickle=False) as npz:
        stored = set(npz.files)
    assert ("eigenvectors_" in stored) == (params.get("memory") != "lean")
    det2 = load(tmp_path / "m.nonn")
    assert det2.get_params() == det.get_params()
    assert det2.auto_params_ == det.auto_params_
    assert (det2.n_neighbors_, det2.n_neighbors_of_neighbors_) == (
        det.n_neighbors_, det.n_neighbors_of_neighbors_)
    np.testing.assert_array_equal(det2.anomaly_score(Q), det.anomaly_score(Q))


def test_calibrated_threshold_survives(tmp_path):
    det = KNNN().fit(X[:80]).calibrate(X[80:], false_alarm_rate=0.2)
    det.save(tmp_path / "m.nonn")
    det2 = load(tmp_path / "m.nonn")
    assert det2.offset_ == det.offset_ and det2.threshold_source_ == det.threshold_source_


def test_file_is_plain_npz_with_json_meta(model_path):
    with zipfile.ZipFile(model_path) as zf:
        names = zf.namelist()
    assert "__meta__.npy" in names
    meta = persistence.read_meta(model_path)
    assert meta["format"] == "nonn-model" and meta["format_version"] == persistence.FORMAT_VERSION
    assert meta["estimator"] == "KNNN" and meta["nonn_version"] == nonn.__version__
    json.dumps(meta)


def test_truncated_file_refused(model_path, tmp_path):
    data = model_path.read_bytes()
    for cut in [10, len(data) // 2, len(data) - 30]:
        bad = tmp_path / f"cut{cut}.nonn"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="truncated|corrupted|not a"):
            load(bad)


def test_corrupted_bytes_refused(model_path, tmp_path):
    data = bytearray(model_path.read_bytes())
    # flip bytes in the middle of the largest member (the eigenvectors)
    with zipfile.ZipFile(model_path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    pos = info.header_offset + 200 + info.file_size // 2
    data[pos:pos + 8] = bytes(255 - b for b in data[pos:pos + 8])
    bad = tmp_path / "flipped.nonn"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupted"):
        load(bad)


def _rewrite(src, dst, meta_update=None, arrays_update=None):
    with np.load(src, allow_pickle=False) as npz:
        payload = {k: npz[k] for k in npz.files}
    meta = json.loads(bytes(payload["__meta__"]).decode())
    meta.update(meta_update or {})
    payload.update(arrays_update or {})
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(dst, "wb") as fh:
        np.savez(fh, **payload)


def test_future_version_refused(model_path, tmp_path):
    bad = tmp_path / "future.nonn"
    _rewrite(model_path, bad, {"format_version": 99, "nonn_version": "9.0"})
    with pytest.raises(ModelFileError, match="newer nonn.*Upgrade"):
        load(bad)


def test_unknown_estimator_refused(model_path, tmp_path):
    bad = tmp_path / "evil.nonn"
    _rewrite(model_path, bad, {"estimator": "os.system"})
    with pytest.raises(ModelFileError, match="unknown estimator"):
        load(bad)


def test_pickled_payload_never_unpickled(model_path, tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    bad = tmp_path / "pickle.nonn"
    obj = np.empty(1, dtype=object)
    obj[0] = Boom()
    _rewrite(model_path, bad, arrays_update={"eigenvectors_": obj})
    with pytest.raises(ModelFileError):
        load(bad)
    assert not (tmp_path / "pwned").exists()


def test_shape_mismatch_refused(model_path, tmp_path):
    bad = tmp_path / "shape.nonn"
    _rewrite(model_path, bad, arrays_update={"eigenvalues_": np.zeros((3, 3))})
    with pytest.raises(ModelFileError, match="shape"):
        load(bad)


def test_not_a_model(tmp_path):
    p = tmp_path / "x.nonn"
    with open(p, "wb") as fh:
        np.savez(fh, a=np.arange(3))
    with pytest.raises(ModelFileError, match="not a nonn model"):
        load(p)
    p.write_text("hello")
    with pytest.raises(ModelFileError, match="not a readable nonn model"):
        load(p)
    npy = tmp_path / "x.npy"
    np.save(npy, np.arange(3))
    with pytest.raises(ModelFileError, match="single array, not a nonn model"):
        load(npy)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model file"):
        load(tmp_path / "nope.nonn")


def test_save_is_atomic(model_path, monkeypatch):
    before = model_path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_archive, "_write_member", broken)
    with pytest.raises(OSError, match="disk full"):
        KNN().fit(X).save(model_path)
    assert model_path.read_bytes() == before  # old model intact
    assert [p.name for p in model_path.parent.iterdir()] == [model_path.name]  # no temp left


def test_save_unfitted_refused(tmp_path):
    with pytest.raises(ValueError, match="not fitted"):
        KNNN().save(tmp_path / "m.nonn")
    assert not (tmp_path / "m.nonn").exists()


def test_format_1_files_load_with_their_training_scores_as_calibration(tmp_path):
    """Files of format 1 (before calibration arrays) still load: their
    leave-one-out training scores become the calibration scores."""
    import io

    det = KNN(contamination=0.1).fit(X)
    path = tmp_path / "m.nonn"
    det.save(path)
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    meta = json.loads(bytes(np.load(io.BytesIO(members["__meta__.npy"]))).decode())
    meta["format_version"] = 1
    for key in ("calibration_rows_", "calibration_scores_"):
        members.pop(key.lstrip("_") + ".npy")
        meta["arrays"].pop(key.lstrip("_"))
    buf = io.BytesIO()
    np.save(buf, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    members["__meta__.npy"] = buf.getvalue()
    old = tmp_path / "old.nonn"
    with zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    det1 = load(old)
    np.testing.assert_array_equal(det1.calibration_scores_, det.train_scores_)
    np.testing.assert_array_equal(det1.pvalue(Q), det.pvalue(Q))
