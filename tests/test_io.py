"""Reading matrices and writing score tables (nonn._io)."""

import os
import stat
import sys

import numpy as np
import pytest

from nonn._io import SCORE_COLUMNS, read_matrix, write_scores


@pytest.fixture
def X():
    return np.random.default_rng(0).normal(size=(7, 3))


def leftovers(folder):
    """Temporary files an atomic write would leave on failure."""
    return [p for p in os.listdir(folder) if p.startswith(".nonn-")]


# ---------------------------------------------------------------- read: npy/npz
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_npy_round_trip_keeps_dtype(tmp_path, X, dtype):
    path = tmp_path / "x.npy"
    np.save(path, X.astype(dtype))
    got = read_matrix(path)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, X.astype(dtype))


def test_npz_picks_X_then_only_array_then_key(tmp_path, X):
    np.savez(tmp_path / "xy.npz", X=X, y=np.arange(7))
    np.testing.assert_array_equal(read_matrix(tmp_path / "xy.npz"), X)
    np.savez(tmp_path / "one.npz", emb=X)
    np.testing.assert_array_equal(read_matrix(tmp_path / "one.npz"), X)
    np.savez(tmp_path / "two.npz", a=X, b=2 * X)
    np.testing.assert_array_equal(read_matrix(tmp_path / "two.npz", key="b"), 2 * X)


def test_npz_ambiguous_or_missing_key_names_the_arrays(tmp_path, X):
    path = tmp_path / "two.npz"
    np.savez(path, a=X, b=X)
    with pytest.raises(ValueError, match=r"several arrays \['a', 'b'\].*--key"):
        read_matrix(path)
    with pytest.raises(ValueError, match=r"no array named 'c'.*\['a', 'b'\]"):
        read_matrix(path, key="c")


def test_not_a_matrix(tmp_path):
    np.save(tmp_path / "v.npy", np.arange(5.0))
    with pytest.raises(ValueError, match=r"shape \(5,\); expected a 2-D matrix"):
        read_matrix(tmp_path / "v.npy")
    np.save(tmp_path / "s.npy", np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="expected numbers"):
        read_matrix(tmp_path / "s.npy")


def test_pickled_npy_is_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([[object()]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Cannot read .* as a .npy array"):
        read_matrix(tmp_path / "o.npy")


def test_corrupted_npz(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="Cannot read .*bad.npz"):
        read_matrix(tmp_path / "bad.npz")


# ----------------------------------------------------------------- read: csv
def test_csv_with_and_without_header(tmp_path, X):
    plain = tmp_path / "plain.csv"
    np.savetxt(plain, X, delimiter=",", fmt="%.17g")
    np.testing.assert_array_equal(read_matrix(plain), X)
    headed = tmp_path / "headed.csv"
    np.savetxt(headed, X, delimiter=",", fmt="%.17g", header="a,b,c", comments="")
    np.testing.assert_array_equal(read_matrix(headed), X)


def test_csv_bom_comment_header_and_single_row(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_text("\ufeff# exported\nf1,f2\n1.5,2\n", encoding="utf-8")
    got = read_matrix(path)
    assert got.shape == (1, 2)
    np.testing.assert_array_equal(got, [[1.5, 2.0]])


def test_csv_errors_name_the_file_and_the_format(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(ValueError, match=r"bad.csv' has non-numeric column\(s\) 'b' \(e.g. "
                       r"'x' in data row 2\)"):
        read_matrix(bad)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2\n3\n")
    with pytest.raises(ValueError, match=r"ragged.csv' has 1 missing value.*short rows.*column"
                       r"\(s\) 2 \(counting from 1\).*data row 2"):
        read_matrix(ragged)
    long_row = tmp_path / "long.csv"
    long_row.write_text("1,2\n3,4,5\n")
    with pytest.raises(ValueError, match="long.csv.*numeric CSV.*comma-separated"):
        read_matrix(long_row)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="no data rows"):
        read_matrix(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("a,b\n")
    with pytest.raises(ValueError, match="no data rows"):
        read_matrix(header_only)


# ------------------------------------------------------------- read: parquet
def test_parquet_numeric_columns(tmp_path, X):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({f"f{j}": X[:, j] for j in range(3)}), path)
    np.testing.assert_array_equal(read_matrix(path), X)


@pytest.mark.parametrize("fixed", [False, True])
def test_parquet_embedding_column(tmp_path, X, fixed):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    typ = pa.list_(pa.float64(), 3) if fixed else pa.list_(pa.float64())
    emb = pa.array(X.tolist(), type=typ)
    only = tmp_path / "only.parquet"
    pq.write_table(pa.table({"embedding": emb}), only)
    np.testing.assert_array_equal(read_matrix(only), X)
    with_id = tmp_path / "with_id.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(7)], "embedding": emb}), with_id)
    np.testing.assert_array_equal(read_matrix(with_id, key="embedding"), X)
    with pytest.raises(ValueError, match=r"list column.*--key"):
        read_matrix(with_id)


def test_parquet_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "x": [1.0, 2.0]}), path)
    with pytest.raises(ValueError, match=r"non-numeric column\(s\) 'id'"):
        read_matrix(path)
    pq.write_table(pa.table({"x": [1.0, None]}), path)
    with pytest.raises(ValueError, match="missing values"):
        read_matrix(path)
    pq.write_table(pa.table({"e": pa.array([[1.0, 2.0], [1.0]])}), path)
    with pytest.raises(ValueError, match="different lengths"):
        read_matrix(path)
    pq.write_table(pa.table({"x": [1.0, 2.0]}), path)
    with pytest.raises(ValueError, match="no column named 'y'"):
        read_matrix(path, key="y")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="Cannot read .* as a parquet file"):
        read_matrix(tmp_path / "junk.parquet")


def test_parquet_without_pyarrow_gives_install_hint(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r'pip install "nonn\[io\]"'):
        read_matrix(tmp_path / "x.parquet")
    with pytest.raises(ImportError, match=r'pip install "nonn\[io\]"'):
        write_scores(tmp_path / "s.parquet", [1.0], [-1.0], [1])
    assert not (tmp_path / "s.parquet").exists()


# -------------------------------------------------------------- read: misuse
def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"unknown extension '.txt'.*\.npy, \.npz, \.csv or "
                       r"\.parquet"):
        read_matrix(tmp_path / "x.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_matrix(tmp_path / "missing.npy")
    (tmp_path / "dir.npy").mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder"):
        read_matrix(tmp_path / "dir.npy")


def test_key_only_for_npz_and_parquet(tmp_path, X):
    np.save(tmp_path / "x.npy", X)
    with pytest.raises(ValueError, match="Drop the key"):
        read_matrix(tmp_path / "x.npy", key="X")


# --------------------------------------------------------------------- write
@pytest.fixture
def scores():
    a = np.array([0.1, 2.5, 1e-300, 7.0], dtype=np.float64)
    return a, -a, np.array([1, -1, 1, -1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_csv_scores_are_exact(tmp_path, dtype):
    a = np.random.default_rng(1).gamma(2.0, size=50).astype(dtype)
    labels = np.where(a > 3, -1, 1)
    path = tmp_path / "s.csv"
    write_scores(path, a, -a, labels)
    assert path.read_text().splitlines()[0] == ",".join(SCORE_COLUMNS)
    table = np.loadtxt(path, delimiter=",", skiprows=1)
    np.testing.assert_array_equal(table[:, 0], np.arange(50))
    # float64 parsing gives back the exact scores, float32 ones included
    assert np.array_equal(table[:, 1], a.astype(np.float64))
    assert np.array_equal(table[:, 2], -a.astype(np.float64))
    np.testing.assert_array_equal(table[:, 3], labels)


def test_npy_npz_scores(tmp_path, scores):
    a, s, lab = scores
    write_scores(tmp_path / "s.npy", a, s, lab)
    t = np.load(tmp_path / "s.npy", allow_pickle=False)
    assert t.dtype.names == SCORE_COLUMNS
    np.testing.assert_array_equal(t["anomaly_score"], a)
    np.testing.assert_array_equal(t["score_samples"], s)
    np.testing.assert_array_equal(t["label"], lab)
    write_scores(tmp_path / "s.npz", a, s, lab)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:
        assert tuple(z.files) == SCORE_COLUMNS
        np.testing.assert_array_equal(z["anomaly_score"], a)
        np.testing.assert_array_equal(z["index"], np.arange(4))


def test_parquet_scores(tmp_path, scores):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    a, s, lab = scores
    write_scores(tmp_path / "s.parquet", a, s, lab)
    t = pq.read_table(tmp_path / "s.parquet")
    assert tuple(t.column_names) == SCORE_COLUMNS
    np.testing.assert_array_equal(t.column("anomaly_score").to_numpy(), a)
    np.testing.assert_array_equal(t.column("label").to_numpy(), lab)


def test_write_refuses_bad_input_without_leaving_files(tmp_path, scores):
    a, s, lab = scores
    with pytest.raises(ValueError, match=r"unknown extension '.txt'.*\.csv"):
        write_scores(tmp_path / "s.txt", a, s, lab)
    with pytest.raises(ValueError, match="one length"):
        write_scores(tmp_path / "s.csv", a, s[:2], lab)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_scores(tmp_path / "nope" / "s.csv", a, s, lab)
    assert os.listdir(tmp_path) == []


def test_write_is_atomic(tmp_path, scores, monkeypatch):
    import nonn._io as io

    a, s, lab = scores
    path = tmp_path / "s.csv"
    path.write_text("previous\n")

    def half_then_fail(fh, *args):
        fh.write(b"index,anomaly_score\n0,")
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "_write_csv", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_scores(path, a, s, lab)
    assert path.read_text() == "previous\n"
    assert leftovers(tmp_path) == []


def test_written_file_follows_umask(tmp_path, scores):
    old = os.umask(0o022)
    try:
        write_scores(tmp_path / "s.csv", *scores)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s.csv").st_mode) == 0o644
