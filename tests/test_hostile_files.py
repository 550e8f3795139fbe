"""Hostile model files: every probe of the adversarial review of model loading
is refused with a ``ModelFileError`` that names the member, never a crash,
a hang, a raw numpy/numba error, a memory blow-up or advice to unpickle.

The files are crafted from real saved models by ``tests/hostile.py``.
Probes that crashed the process before (heap overflows, out-of-bounds
reads) run in a subprocess, so that a regression fails a test instead of
killing the test run.
"""

import json
import os
import pickle
import subprocess
import sys
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest

import hostile as H
import nonn
from nonn import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN, ModelFileError, load
from nonn import _model_file, persistence
from nonn.cli import main

X = np.random.default_rng(0).normal(size=(500, 8))
Q = np.random.default_rng(1).normal(size=(20, 8))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Saved models of every kind, the review's ``KNNN().fit(X)`` first (the
    review's default then: five features per set, K' = 50, which the probes'
    layouts assume), then today's default (all features in one set)."""
    folder = tmp_path_factory.mktemp("models")
    review = dict(set_size=5, n_neighbors_of_neighbors=50)
    fitted = {
        "knnn": KNNN(**review),
        "lean": KNNN(memory="lean", **review),
        "auto": KNNN(n_neighbors="auto", eig_floor="auto", random_state=0, **review),
        "knn": KNN(),
        "global": GlobalEigenKNN(),
        "local": LocalEigenKNN(),
        "f32": KNNN(**review),
        "default": KNNN(),
        "default_lean": KNNN(memory="lean"),
        # 8 features in one set, neighborhoods of 5: the dual form, whose
        # scoring re-reads each neighborhood's rows by the stored ids
        "dual": KNNN(n_neighbors_of_neighbors=5),
    }
    out = {}
    for name, det in fitted.items():
        det.fit(X.astype(np.float32) if name == "f32" else X)
        out[name] = det.save(folder / f"{name}.nonn")
    return out


def refused(path, *fragments):
    """Load ``path``, expecting a ModelFileError whose message holds
    ``fragments``; returns the message."""
    with pytest.raises(ModelFileError) as info:
        load(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "pickle" not in message.replace(repr(str(path)), "").lower()
    return message


def edit_meta(change):
    def edit(meta):
        change(meta)
    return edit


# ------------------------------------------------------------ the probes
def _arr(path, name):
    with np.load(path, allow_pickle=False) as npz:
        return npz[name].copy()


def probe_set_sizes_huge(m, d):
    return H.rewrite(m["knnn"], d, {"set_sizes_": np.array([10**4, 10**4])})


def probe_lean_ids_huge(m, d):
    nb = _arr(m["lean"], "neighborhoods_")
    nb[:, 1:] = 10**12
    return H.rewrite(m["lean"], d, {"neighborhoods_": nb})


def probe_dual_ids_huge(m, d):
    nb = _arr(m["dual"], "neighborhoods_")
    nb[:, 1:] = 10**12
    return H.rewrite(m["dual"], d, {"neighborhoods_": nb})


def probe_dual_eigen_width(m, d):
    return H.rewrite(m["dual"], d, {
        "eigenvalues_": _arr(m["dual"], "eigenvalues_")[:, :, :4],
        "eigenvectors_": _arr(m["dual"], "eigenvectors_")[:, :, :4, :4]})


def probe_eigen_one_row(m, d):
    return H.rewrite(m["knnn"], d, {"eigenvalues_": _arr(m["knnn"], "eigenvalues_")[:1],
                                    "eigenvectors_": _arr(m["knnn"], "eigenvectors_")[:1]})


def probe_fit_X_3_columns(m, d):
    return H.rewrite(m["knnn"], d, {"fit_X": _arr(m["knnn"], "fit_X")[:, :3]})


def probe_feature_order_huge(m, d):
    order = _arr(m["knnn"], "feature_order_")
    order[0] = 10**6
    return H.rewrite(m["knnn"], d, {"feature_order_": order})


def probe_feature_order_repeats(m, d):
    order = _arr(m["knnn"], "feature_order_")
    order[0] = order[1]
    return H.rewrite(m["knnn"], d, {"feature_order_": order})


def probe_fit_X_nan(m, d):
    fx = _arr(m["knnn"], "fit_X")
    fx[7, 3] = np.nan
    return H.rewrite(m["knnn"], d, {"fit_X": fx})


def probe_meta_deflate_bomb(m, d):
    return H.deflate_bomb(m["knnn"], d, H.META, (1 << 30,), "u1")


def probe_fit_X_deflate_bomb(m, d):
    return H.deflate_bomb(m["knnn"], d, "fit_X.npy", (1 << 24, 8), "<f8", announce=True)


def probe_npy_header_bomb(m, d):
    return H.header_bomb(m["knnn"], d, "fit_X.npy", (10**12,))


def probe_alias_bomb(m, d):
    return H.alias_bomb(m["knnn"], d, "eigenvectors_.npy", 40)


def probe_many_members(m, d):
    files = H.members(m["knnn"])
    entries = [H.stored(n, b) for n, b in files.items()]
    entries += [H.stored(f"x{i}.npy", b"") for i in range(20_000)]
    return H.write_zip(d, entries)


def probe_nested_json(m, d):
    return H.rewrite(m["knnn"], d, raw={H.META: H.raw_meta_bytes(H.nested_json(100_000))})


def probe_meta_too_large(m, d):
    meta = H.meta_of(m["knnn"])
    meta["pad"] = "x" * (2 << 20)
    return H.rewrite(m["knnn"], d, raw={H.META: H.meta_bytes(meta)})


def _meta_probe(change):
    def build(m, d):
        return H.rewrite(m["knnn"], d, meta=change)
    return build


def _drop(key):
    return lambda meta: meta.pop(key)


def _set(path, value):
    def change(meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def probe_object_member(m, d):
    obj = np.empty(2, dtype=object)
    obj[:] = [{"a": 1}, "x"]
    buf = __import__("io").BytesIO()
    np.lib.format.write_array(buf, obj, allow_pickle=True)
    return H.rewrite(m["knnn"], d, raw={"eigenvectors_.npy": buf.getvalue()})


def probe_unknown_member(m, d):
    return H.rewrite(m["knnn"], d, raw={"extra.npy": H.npy_bytes(np.zeros(3))})


def probe_missing_member(m, d):
    return H.rewrite(m["knnn"], d, drop=["eigenvectors_"])


def probe_ids_negative(m, d):
    nb = _arr(m["knnn"], "neighborhoods_")
    nb[3, 2] = -7
    return H.rewrite(m["knnn"], d, {"neighborhoods_": nb})


def probe_set_sizes_layout(m, d):
    return H.rewrite(m["knnn"], d, {"set_sizes_": np.array([3, 5])})


def probe_eig_floor_zero(m, d):
    return H.rewrite(m["knnn"], d, {"eig_floor_": np.zeros(2)})


def probe_ids_int32(m, d):
    return H.rewrite(m["knnn"], d, {"neighborhoods_": _arr(m["knnn"], "neighborhoods_")
                                    .astype(np.int32)})


def probe_fit_X_float32(m, d):
    return H.rewrite(m["knnn"], d, {"fit_X": _arr(m["knnn"], "fit_X").astype(np.float32)})


def probe_lie_about_shape(m, d):
    return H.rewrite(m["knnn"], d, {"fit_X": _arr(m["knnn"], "fit_X")[:-1]}, announce=False)


def probe_compressed_small(m, d):
    files = H.members(m["knnn"])
    with zipfile.ZipFile(d, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return d


def probe_knn_fit_X_3_columns(m, d):
    return H.rewrite(m["knn"], d, {"fit_X": _arr(m["knn"], "fit_X")[:, :3]})


def probe_global_components_cut(m, d):
    return H.rewrite(m["global"], d, {"components_": _arr(m["global"], "components_")[:3]})


def probe_local_set_sizes_huge(m, d):
    return H.rewrite(m["local"], d, {"set_sizes_": np.array([10**4, 10**4])})


def probe_auto_params_bad(m, d):
    return H.rewrite(m["auto"], d, meta=_set(["fitted", "auto_params_"], {"n_neighbors": "x"}))


def probe_f32_eigen_float64(m, d):
    return H.rewrite(m["f32"], d, {"eigenvectors_": _arr(m["f32"], "eigenvectors_")
                                   .astype(np.float64)})


#: (probe, expected fragments of the message); every one a ModelFileError
PROBES = {
    # Critical: memory corruption before
    "set_sizes_huge": (probe_set_sizes_huge, ["the array 'set_sizes_'", "summing to D=8"]),
    "lean_ids_huge": (probe_lean_ids_huge, ["the array 'neighborhoods_'",
                                            "the id 1000000000000", "[0, 500)"]),
    "dual_ids_huge": (probe_dual_ids_huge, ["the array 'neighborhoods_'",
                                            "the id 1000000000000", "[0, 500)"]),
    "dual_eigen_width": (probe_dual_eigen_width, ["'eigenvalues_'", "eigen-pairs per set"]),
    "eigen_one_row": (probe_eigen_one_row, ["the array 'eigenvalues_' has shape (1, 2, 5)",
                                            "N=500"]),
    "fit_X_3_columns": (probe_fit_X_3_columns, ["the array 'fit_X' has shape (500, 3)",
                                                "D=8"]),
    "feature_order_huge": (probe_feature_order_huge, ["the array 'feature_order_'",
                                                      "permutation of range(8)"]),
    "feature_order_repeats": (probe_feature_order_repeats, ["'feature_order_'", "repeats"]),
    "fit_X_nan": (probe_fit_X_nan, ["the array 'fit_X' holds NaN"]),
    # High: bombs
    "meta_deflate_bomb": (probe_meta_deflate_bomb, ["'__meta__.npy' is compressed"]),
    "fit_X_deflate_bomb": (probe_fit_X_deflate_bomb, ["'fit_X.npy' is compressed"]),
    "npy_header_bomb": (probe_npy_header_bomb, ["'fit_X' declares shape (1000000000000,)"]),
    "alias_bomb": (probe_alias_bomb, ["more than the", "entries sharing data"]),
    "many_members": (probe_many_members, ["members in a", "a nonn model has a dozen"]),
    "nested_json": (probe_nested_json, ["nested"]),
    "meta_too_large": (probe_meta_too_large, ["its metadata is", "at most 1048576"]),
    # Medium/low: metadata
    "missing_fitted": (_meta_probe(_drop("fitted")), ["the metadata key 'fitted' is missing"]),
    "missing_params": (_meta_probe(_drop("params")), ["the metadata key 'params' is missing"]),
    "missing_n_features_in": (_meta_probe(_drop("n_features_in")),
                              ["the metadata key 'n_features_in' is missing"]),
    "dtype_bogus": (_meta_probe({"dtype": "bogus"}), ["'dtype' must be one of", "'bogus'"]),
    "dtype_object": (_meta_probe({"dtype": "object"}), ["'dtype' must be one of", "'object'"]),
    "n_jobs_x": (_meta_probe(_set(["params", "n_jobs"], "x")),
                 ["the metadata key 'params' is invalid", "'n_jobs' parameter"]),
    "offset_abc": (_meta_probe(_set(["fitted", "offset_"], "abc")),
                   ["the fitted value 'offset_' must be a finite float; got 'abc'"]),
    "offset_nan": (_meta_probe(_set(["fitted", "offset_"], float("nan"))),
                   ["the fitted value 'offset_' must be a finite float"]),
    "n_neighbors_huge": (_meta_probe(_set(["fitted", "n_neighbors_"], 10**30)),
                         ["the fitted value 'n_neighbors_' must be an int in [1, 499]"]),
    "n_neighbors_bool": (_meta_probe(_set(["fitted", "n_neighbors_"], True)),
                         ["the fitted value 'n_neighbors_' must be an int"]),
    "kp_mismatch": (_meta_probe(_set(["fitted", "n_neighbors_of_neighbors_"], 7)),
                    ["'n_neighbors_of_neighbors_' is 7 but the arrays have Kp=50"]),
    "set_size_mismatch": (_meta_probe(_set(["fitted", "set_size_"], 4)),
                          ["'set_sizes_' must hold sizes in [1, L=4]"]),
    "backend_unknown": (_meta_probe(_set(["fitted", "backend_"], "os.system")),
                        ["the fitted value 'backend_' must be one of"]),
    "fitted_unknown": (_meta_probe(_set(["fitted", "data_scale"], 1.0)),
                       ["fitted values include 'data_scale'"]),
    "fitted_missing_scalar": (_meta_probe(lambda meta: meta["fitted"].pop("offset_")),
                              ["the fitted value 'offset_' is missing"]),
    "params_unknown": (_meta_probe(_set(["params", "evil"], 1)),
                       ["parameters this nonn does not accept"]),
    "backend_params_unknown": (_meta_probe(_set(["params", "backend_params"], {"evil": 1})),
                               ["the search backend cannot be built", "evil"]),
    "n_features_in_str": (_meta_probe({"n_features_in": "8"}),
                          ["the metadata key 'n_features_in' must be a int"]),
    "array_table_bogus": (_meta_probe(_set(["arrays", "fit_X", "dtype"], "bogus")),
                          ["the metadata's entry for the array 'fit_X'"]),
    "format_version_str": (_meta_probe({"format_version": "1"}),
                           ["invalid format version '1'"]),
    "estimator_unknown": (_meta_probe({"estimator": "os.system"}),
                          ["unknown estimator 'os.system'"]),
    # members
    "object_member": (probe_object_member, ["'eigenvectors_' holds dtype object"]),
    "unknown_member": (probe_unknown_member, ["the member 'extra'"]),
    "missing_member": (probe_missing_member, ["lacks the array 'eigenvectors_'"]),
    "ids_negative": (probe_ids_negative, ["the array 'neighborhoods_' holds the id -7"]),
    "set_sizes_layout": (probe_set_sizes_layout, ["the array 'set_sizes_'",
                                                  "all equal to L but the last"]),
    "eig_floor_zero": (probe_eig_floor_zero, ["the array 'eig_floor_'", "> 0"]),
    "ids_int32": (probe_ids_int32, ["the array 'neighborhoods_' has dtype int32; expected "
                                    "int64"]),
    "fit_X_float32": (probe_fit_X_float32, ["the array 'fit_X' has dtype float32; expected "
                                            "float64"]),
    "lie_about_shape": (probe_lie_about_shape, ["the metadata announces"]),
    "compressed_small": (probe_compressed_small, ["is compressed"]),
    # the other estimators
    "knn_fit_X_3_columns": (probe_knn_fit_X_3_columns, ["the array 'fit_X' has shape (500, 3)"]),
    "global_components_cut": (probe_global_components_cut,
                              ["the array 'components_' has shape (3, 8)"]),
    "local_set_sizes_huge": (probe_local_set_sizes_huge, ["the array 'set_sizes_'"]),
    "auto_params_bad": (probe_auto_params_bad, ["auto_params_['n_neighbors']\" must be an int"]),
    "f32_eigen_float64": (probe_f32_eigen_float64, ["the array 'eigenvectors_' has dtype "
                                                    "float64; expected float32"]),
}


@pytest.fixture(scope="module")
def probes(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("probes")
    return {name: build(models, folder / f"{name}.nonn")
            for name, (build, _) in PROBES.items()}


@pytest.mark.parametrize("name", list(PROBES))
def test_probe_is_refused_naming_the_member(name, probes):
    refused(probes[name], *PROBES[name][1])


#: probes that corrupted memory or read out of bounds before
CRASHERS = ["set_sizes_huge", "lean_ids_huge", "dual_ids_huge", "dual_eigen_width",
            "eigen_one_row", "fit_X_3_columns",
            "local_set_sizes_huge", "ids_negative"]

_LOAD_AND_SCORE = """
import sys
import numpy as np
import nonn
for path in sys.argv[1:]:
    try:
        det = nonn.load(path)
    except nonn.ModelFileError as exc:
        print("REFUSED", exc, flush=True)
        continue
    det.anomaly_score(np.random.default_rng(0).normal(size=(50, det.n_features_in_)))
    print("SCORED", path, flush=True)
"""


def test_crashing_probes_are_refused_in_a_fresh_process(probes):
    res = subprocess.run([sys.executable, "-c", _LOAD_AND_SCORE,
                          *(str(probes[n]) for n in CRASHERS)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert len(lines) == len(CRASHERS), res.stdout
    for name, line in zip(CRASHERS, lines):
        assert line.startswith("REFUSED"), (name, line)


@pytest.mark.parametrize("name", ["meta_deflate_bomb", "fit_X_deflate_bomb", "npy_header_bomb",
                                  "alias_bomb", "nested_json", "many_members"])
def test_bombs_use_less_memory_than_twice_the_file(name, probes):
    path = probes[name]
    size = os.path.getsize(path)
    persistence._registry()  # imports done before measuring
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError):
            load(path)
        with pytest.raises(ModelFileError):
            persistence.read_meta(path) if name != "npy_header_bomb" else load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * size, (peak, size)


def test_info_does_not_read_bombs(probes, capsys):
    for name in ("meta_deflate_bomb", "fit_X_deflate_bomb", "nested_json", "alias_bomb"):
        path = probes[name]
        tracemalloc.start()
        try:
            rc = main(["info", str(path)])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("nonn: error:") and len(err.splitlines()) == 1, err
        assert peak < 2 * os.path.getsize(path) + (1 << 20), (name, peak)


def test_every_probe_through_main_is_one_line_exit_2(probes, tmp_path, capsys):
    np.save(tmp_path / "q.npy", Q)
    for name, path in probes.items():
        rc = main(["score", str(path), str(tmp_path / "q.npy"), "-o", str(tmp_path / "s.csv")])
        out, err = capsys.readouterr()
        assert rc == 2, (name, out, err)
        assert err.startswith("nonn: error:") and len(err.splitlines()) == 1, (name, err)
        assert "pickle" not in err.lower() and "Traceback" not in err
    assert not (tmp_path / "s.csv").exists()


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "nonn", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_subprocess_representative_probes(probes, tmp_path):
    np.save(tmp_path / "q.npy", Q)
    for cmd, name, fragment in [
        ("score", "set_sizes_huge", "the array 'set_sizes_'"),
        ("info", "meta_deflate_bomb", "is compressed"),
    ]:
        args = [cmd, probes[name]] + ([tmp_path / "q.npy", "-o", tmp_path / "s.csv"]
                                      if cmd == "score" else [])
        res = _cli(*args)
        assert res.returncode == 2, (name, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nonn: error:"), res.stderr
        assert fragment in lines[0] and "pickle" not in lines[0].lower()


# --------------------------------------------------------- not a zip at all
def test_non_zip_files_are_refused_without_unsafe_advice(tmp_path, capsys):
    cases = {
        "text.nonn": b"not a model\n",
        "serialized.nonn": pickle.dumps({"a": 1}),
        "empty.nonn": b"",
        "short.nonn": b"PK\x03\x04",
    }
    obj = np.empty(2, dtype=object)
    np.save(tmp_path / "object.npy", obj, allow_pickle=True)
    paths = [tmp_path / "object.npy"]
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    for path in paths:
        message = refused(path)
        assert "not a readable nonn model" in message or "single array" in message
        assert main(["info", str(path)]) == 2
        err = capsys.readouterr().err.replace(repr(str(path)), "")
        assert len(err.splitlines()) == 1 and "pickle" not in err.lower()


# ------------------------------------------------------ non-regular files
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need POSIX")
def test_named_pipe_is_refused_without_blocking(tmp_path, capsys):
    fifo = tmp_path / "pipe.nonn"
    os.mkfifo(fifo)
    rescued = []

    def rescue():
        # a regression that opens the pipe for reading blocks until a
        # writer comes: come as one after a while, so the test fails (not hangs)
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader waiting: nothing to rescue
            return
        rescued.append(True)
        os.close(fd)

    for call in (lambda: load(fifo), lambda: main(["info", str(fifo)])):
        timer = threading.Timer(5.0, rescue)
        timer.start()
        try:
            try:
                call()
            except ModelFileError as exc:
                assert "a named pipe" in str(exc)
        finally:
            timer.cancel()
        assert not rescued, "reading the model blocked on the named pipe"
    assert "a named pipe" in capsys.readouterr().err


def test_folder_and_device_are_refused(tmp_path):
    refused(tmp_path, "is a folder")
    if os.path.exists("/dev/zero"):
        refused("/dev/zero", "is a device")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model file"):
        load(tmp_path / "nope.nonn")


# ------------------------------------------------ legitimate variants load
def test_legitimate_encodings_load_alike(models, tmp_path):
    """What the reader must not refuse: big-endian and Fortran-ordered
    arrays (np.save writes them so), and zip64 end records (files > 4 GiB)."""
    det = load(models["knnn"])
    expected = det.anomaly_score(Q)
    files = H.members(models["knnn"])
    swapped = {}
    for name, raw in files.items():
        if name == H.META:
            continue
        arr = H.npy_array(raw)
        swapped[name] = H.npy_bytes(arr.astype(arr.dtype.newbyteorder(">")) if arr.ndim != 2
                                    else np.asfortranarray(arr))
    meta = H.meta_of(models["knnn"])
    for name in swapped:
        arr = H.npy_array(swapped[name])
        meta["arrays"][name[:-4]]["dtype"] = arr.dtype.str
    H.rewrite(models["knnn"], tmp_path / "be.nonn", meta=lambda m: m.update(meta),
              raw=swapped)
    np.testing.assert_array_equal(load(tmp_path / "be.nonn").anomaly_score(Q), expected)


def test_zip64_end_record_is_read(models, tmp_path, monkeypatch):
    files = H.members(models["knnn"])
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1 << 10)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)
    path = tmp_path / "zip64.nonn"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    monkeypatch.undo()
    assert b"PK\x06\x06" in path.read_bytes()  # a zip64 end record was written
    np.testing.assert_array_equal(load(path).anomaly_score(Q),
                                  load(models["knnn"]).anomaly_score(Q))


# ------------------------------------------------------ the specs and save
@pytest.mark.parametrize("cls", [KNNN, KNN, GlobalEigenKNN, LocalEigenKNN])
def test_every_saved_attribute_has_a_spec(cls):
    names = set(cls._state_arrays) | set(cls._state_scalars)
    assert names <= set(cls._state_spec), names - set(cls._state_spec)


def test_image_systems_have_specs():
    from nonn.vision.systems import SPADE, FeatureDetector

    for cls in (FeatureDetector, SPADE):
        assert set(cls._extra_arrays) <= set(cls._state_spec)


def test_save_refuses_a_state_that_would_not_load(tmp_path):
    det = KNNN().fit(X)
    det.feature_order_ = det.feature_order_.copy()
    det.feature_order_[0] = det.feature_order_[1]
    with pytest.raises(ValueError, match="Refusing to save.*'feature_order_'.*repeats"):
        det.save(tmp_path / "m.nonn")
    assert not (tmp_path / "m.nonn").exists()


def test_model_archive_has_only_stored_members(models):
    with zipfile.ZipFile(models["knnn"]) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
        assert sorted(zf.namelist()) == sorted(
            [a.lstrip("_") + ".npy" for a in KNNN._state_arrays_for(KNNN().get_params())
             + KNNN._optional_arrays] + [H.META])


# ------------------------------------------------------- the kernels alone
_KERNEL_PROBES = r"""
import numpy as np
from nonn import _eq2_kernels as E
from nonn.neighbors import _kernels as K

rng = np.random.default_rng(0)
N, D, L, S = 50, 10, 5, 2
X = rng.normal(size=(N, D))
sizes = np.array([5, 5], np.int64)
groups = np.tile(np.arange(6, dtype=np.int64), (N, 1))
w, V = np.empty((N, S, L)), np.empty((N, S, L, L))
E.primal_eigen(X, groups, sizes, L, 1e-24, w, V)
q = 7
Q = rng.normal(size=(q, D))
idx = rng.integers(0, N, size=(q, 3)).astype(np.int64)
out, floor, loc = np.empty((q, 3)), np.full(S, 1e-3), np.full(S, 0.1)
sq, ids = np.empty((q, 3)), np.empty((q, 3), np.int64)
none = np.zeros(1, np.int64)
graph = groups[:, 1:].copy()
self_ids = np.full(q, -1, np.int64)
ptr, members = np.array([0, 2, 4], np.int64), np.arange(4, dtype=np.int64)
gids = np.array([[0, 1], [1, 0]], np.int64)
huge = idx.copy(); huge[0, 0] = 10**12
neg = idx.copy(); neg[2, 1] = -3
bad_groups = groups.copy(); bad_groups[3, 2] = 10**12
bad_graph = graph.copy(); bad_graph[idx[0, 0], 1] = 10**12
big_sizes = np.array([10**4, 10**4], np.int64)

def run(name, f):
    try:
        f()
    except (IndexError, ValueError) as exc:
        print(name, type(exc).__name__, flush=True)
    else:
        print(name, "no error", flush=True)

run("eigen ids", lambda: E.primal_eigen(X, bad_groups, sizes, L, 1e-24, w, V))
run("eigen sizes", lambda: E.primal_eigen(X, groups, big_sizes, L, 1e-24, w, V))
run("eigen out", lambda: E.primal_eigen(X, groups, sizes, L, 1e-24, w[:3], V))
run("eigen width", lambda: E.primal_eigen(X, groups, sizes[:1], L, 1e-24, w, V))
wd, Ud = np.empty((N, S, 6)), np.empty((N, S, 6, 6))
run("dual ids", lambda: E.dual_eigen(X, bad_groups, sizes, L, wd, Ud))
run("dual sizes", lambda: E.dual_eigen(X, groups, big_sizes, L, wd, Ud))
run("eq2 ids", lambda: E.primal_score(Q, huge, X, V, w, sizes, floor, loc, out))
run("eq2 negative", lambda: E.primal_score(Q, neg, X, V, w, sizes, floor, loc, out))
run("eq2 sizes", lambda: E.primal_score(Q, idx, X, V, w, big_sizes, floor, loc, out))
run("eq2 eigen rows", lambda: E.primal_score(Q, idx, X, V[:1], w[:1], sizes, floor, loc, out))
run("eq2 floor", lambda: E.primal_score(Q, idx, X, V, w, sizes, floor[:1], loc, out))
run("eq2 query width", lambda: E.primal_score(Q[:, :3], idx, X, V, w, sizes, floor, loc, out))
run("eq2 local floor", lambda: E.primal_score(Q, idx, X, V, w, sizes, floor, loc[:1], out))
run("exact ids", lambda: K.exact_sq_sorted(X, Q, huge, sq, ids))
run("exact negative", lambda: K.exact_sq_sorted(X, Q, neg, sq, ids))
run("refine graph", lambda: K.refine_by_neighbors(X, Q, idx, bad_graph, 3, none, none[:0],
                                                   self_ids, sq, ids))
run("refine first", lambda: K.refine_by_neighbors(X, Q, huge, graph, 3, none, none[:0],
                                                   self_ids, sq, ids))
run("refine ptr", lambda: K.refine_by_neighbors(X, Q, idx, graph, 3,
                                                 np.array([0, 5, 3, 8, 8, 8, 8, 8]),
                                                 np.zeros(8, np.int64), self_ids, sq, ids))
run("refine fanout", lambda: K.refine_by_neighbors(X, Q, idx, graph, -5, none, none[:0],
                                                    self_ids, sq, ids))
run("groups gids", lambda: K.expand_groups(np.array([[0, 7], [1, 0]]), ptr, members,
                                           np.full(2, -1), np.full(2, -1),
                                           np.empty((2, 3), np.int64)))
run("groups ptr", lambda: K.expand_groups(gids, np.array([0, 2, 40]), members, np.full(2, -1),
                                          np.full(2, -1), np.empty((2, 3), np.int64)))
run("groups own", lambda: K.expand_groups(gids, ptr, members, np.array([0, 1]),
                                          np.array([0, 9]), np.empty((2, 3), np.int64)))
print("done", flush=True)
"""


def test_kernels_refuse_bad_ids_and_sizes_at_entry():
    """The kernels that index by ids or sizes raise on bad ones even when
    called directly (no validation before them); in a subprocess, since a
    missing check would read or write out of bounds."""
    res = subprocess.run([sys.executable, "-c", _KERNEL_PROBES], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[-1] == "done" and len(lines) == 23, res.stdout
    for line in lines[:-1]:
        assert line.endswith("IndexError") or line.endswith("ValueError"), line


# ------------------------------------------------------------ image models
@pytest.fixture(scope="module")
def image_models(tmp_path_factory):
    from nonn.vision import SPADE, FeatureDetector

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(30, 16)).astype(np.float32)
    maps = rng.normal(size=(30, 4, 3, 3)).astype(np.float16)
    feature = FeatureDetector(nn="knnn", n_neighbors_of_neighbors=10).fit_features(feats)
    spade = SPADE(nn="knnn", n_neighbors=3, n_neighbors_of_neighbors=10,
                  map_size=3).fit_features(feats, maps)
    return {"feature": feature.save(folder / "feature.nonn"),
            "spade": spade.save(folder / "spade.nonn"),
            "feature_system": feature, "spade_system": spade, "feats": feats}


#: parameters image systems gained after format 1 (a format-1 file has none)
LATER_PARAMS = ("image_score", "map_score_q", "coreset_ratio", "n_map_calibration",
                "map_normalize")


def _legacy_image_file(system, path):
    """``system`` written in image format 1 (the detector's whole model file
    embedded as a byte array), as nonn wrote it before format 2."""
    core = str(path) + ".core"
    persistence.save(system.detector_, core)
    with open(core, "rb") as fh:
        det_bytes = np.frombuffer(fh.read(), dtype=np.uint8)
    os.remove(core)
    arrays = {name.rstrip("_"): getattr(system, name) for name in system._extra_arrays}
    meta = {"format": "nonn-vision-model", "format_version": 1,
            "nonn_version": nonn.__version__, "system": type(system).__name__,
            "params": {k: v for k, v in _model_file.jsonable(system.get_params()).items()
                       if k not in LATER_PARAMS},
            "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str}
                       for k, v in arrays.items()}}
    with open(path, "wb") as fh:
        np.savez(fh, **arrays, detector=det_bytes,
                 __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return path


def test_image_model_is_one_archive_and_round_trips(image_models):
    from nonn.vision import load as load_image

    with zipfile.ZipFile(image_models["spade"]) as zf:
        names = set(zf.namelist())
    assert "detector/eigenvectors_.npy" in names and "train_maps.npy" in names
    assert "detector.npy" not in names
    back = load_image(image_models["spade"])
    feats = image_models["feats"][:5] + 0.5
    system = image_models["spade_system"]
    # the embedded detector's scores of the pooled features (SPADE's default
    # image score also needs the images' maps)
    np.testing.assert_array_equal(back.detector_.anomaly_score(back._prep(feats)),
                                  system.detector_.anomaly_score(system._prep(feats)))
    assert back.image_score == system.image_score


@pytest.mark.parametrize("kind", ["feature", "spade"])
def test_image_format_1_files_still_load(kind, image_models, tmp_path):
    from nonn.vision import load as load_image
    from nonn.vision.systems import read_meta

    system = image_models[f"{kind}_system"]
    path = _legacy_image_file(system, tmp_path / "v1.nonn")
    back = load_image(path)
    feats = image_models["feats"][:5] + 0.5
    np.testing.assert_array_equal(back.detector_.anomaly_score(back._prep(feats)),
                                  system.detector_.anomaly_score(system._prep(feats)))
    assert read_meta(path)["detector"]["estimator"] == "KNNN"


def test_image_format_1_with_hostile_embedded_detector(image_models, tmp_path):
    from nonn.vision import load as load_image

    system = image_models["spade_system"]
    path = _legacy_image_file(system, tmp_path / "v1.nonn")
    files = H.members(path)
    inner = tmp_path / "inner.nonn"
    inner.write_bytes(H.npy_array(files["detector.npy"]).tobytes())
    sizes = H.npy_array(H.members(inner)["set_sizes_.npy"])
    H.rewrite(inner, tmp_path / "inner_bad.nonn", {"set_sizes_": np.full_like(sizes, 10**4)})
    files["detector.npy"] = H.npy_bytes(np.frombuffer(
        (tmp_path / "inner_bad.nonn").read_bytes(), dtype=np.uint8))
    bad = H.write_zip(tmp_path / "v1_bad.nonn", [H.stored(n, b) for n, b in files.items()])
    with pytest.raises(ModelFileError, match=r"embedded detector.*the array 'set_sizes_'"):
        load_image(bad)


def test_image_probes(image_models, tmp_path, capsys):
    from nonn.vision import load as load_image

    src = image_models["spade"]
    nb = H.npy_array(H.members(src)["detector/neighborhoods_.npy"])
    nb[:, 1:] = 10**12
    cases = {
        "detector ids": (H.rewrite(src, tmp_path / "a.nonn", {"neighborhoods_": nb},
                                   prefix="detector/"),
                         "(its detector): the array 'neighborhoods_' holds the id"),
        "maps shape": (H.rewrite(src, tmp_path / "b.nonn", {
            "train_maps": H.npy_array(H.members(src)["train_maps.npy"])[:, :, :2]}),
            "the array 'train_maps' has shape (30, 4, 2, 3)"),
        "features nan": (H.rewrite(src, tmp_path / "c.nonn", {
            "train_features": np.full((30, 16), np.nan, np.float32)}),
            "the array 'train_features' holds NaN"),
        "meta bomb": (H.deflate_bomb(src, tmp_path / "d.nonn", H.META, (1 << 30,), "u1"),
                      "is compressed"),
        "sigma": (H.rewrite(src, tmp_path / "e.nonn", meta=_set(["params", "sigma"], "x")),
                  "'sigma' parameter"),
        "map_detector_params": (H.rewrite(src, tmp_path / "f.nonn", meta=_set(
            ["params", "map_detector_params"], {"evil": 1})), "does not accept"),
        "nn": (H.rewrite(src, tmp_path / "g.nonn", meta=_set(["params", "nn"], "knn")),
               "nn='knn' but the detector is a KNNN"),
        "unknown member": (H.rewrite(src, tmp_path / "h.nonn",
                                     raw={"evil.npy": H.npy_bytes(np.zeros(2))}),
                           "the member 'evil'"),
        "map_size": (H.rewrite(src, tmp_path / "i.nonn", meta=_set(["params", "map_size"], 4)),
                     "the array 'train_maps' has shape (30, 4, 3, 3)"),
    }
    for name, (path, fragment) in cases.items():
        with pytest.raises(ModelFileError) as info:
            load_image(path)
        assert fragment in str(info.value), (name, str(info.value))
        assert main(["info", "--verify", str(path)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("nonn: error:"), (name, err)
