"""Reading embedding matrices and writing score tables for the command line.

Matrices come from ``.npy``, ``.npz``, ``.csv`` or ``.parquet`` files;
score tables go to the same formats. Parquet needs pyarrow, imported only
when a parquet file is actually read or written. Every output is written to
a temporary file in the target folder and renamed into place, so an error or
an interrupt never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zipfile

import numpy as np

#: input formats, by lower-cased extension
MATRIX_FORMATS = (".npy", ".npz", ".csv", ".parquet")
#: output formats of score tables, by lower-cased extension
SCORE_FORMATS = (".csv", ".npy", ".npz", ".parquet")
#: columns of a score table, in order
SCORE_COLUMNS = ("index", "anomaly_score", "score_samples", "label")

_PYARROW_HINT = 'Parquet files need pyarrow: pip install "nonn[io]" (or pip install pyarrow).'
# Rows formatted per write in CSV output: bounds the memory of the text
# buffer on millions of queries without a Python call per row.
_CSV_CHUNK = 65536


def _extension(path):
    return os.path.splitext(os.fspath(path))[1].lower()


def _formats(exts):
    return ", ".join(exts[:-1]) + " or " + exts[-1]


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(_PYARROW_HINT) from exc
    return pa, pq


# --------------------------------------------------------------------- read
def read_matrix(path, key=None):
    """Read a 2-D numeric matrix (n_samples, n_features) from a file.

    Parameters
    ----------
    path : str or path-like
        ``.npy``; ``.npz`` (the array named ``key``, else ``"X"``, else the
        only array); ``.csv`` (comma-separated numbers, one sample per row; a
        first row that is not all numbers is taken as a header and skipped);
        ``.parquet`` (all columns numeric, one feature each, or one list
        column holding each row's embedding; needs pyarrow).
    key : str, optional
        Array name in a ``.npz`` file, or embedding column in a ``.parquet``
        file. Not accepted for other formats.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
        Numeric, as stored (the estimators choose the float dtype).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        Unknown extension, unreadable content, or not a 2-D numeric matrix.
    ImportError
        A parquet file without pyarrow installed.
    """
    path = os.fspath(path)
    ext = _extension(path)
    if ext not in MATRIX_FORMATS:
        raise ValueError(
            f"Cannot read {path!r}: unknown extension {ext or '(none)'!r}. "
            f"Expected {_formats(MATRIX_FORMATS)}."
        )
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"{path!r} {what}. Expected a {_formats(MATRIX_FORMATS)} file.")
    if key is not None and ext not in (".npz", ".parquet"):
        raise ValueError(
            f"A key ({key!r}) names an array in a .npz file or a column in a .parquet "
            f"file; {path!r} is a {ext} file. Drop the key."
        )
    reader = {".npy": _read_npy, ".npz": _read_npz, ".csv": _read_csv,
              ".parquet": _read_parquet}[ext]
    X = reader(path, key)
    return _check_matrix(X, path)


def _check_matrix(X, path):
    X = np.asarray(X)
    if X.dtype.kind not in "biuf":
        raise ValueError(
            f"{path!r} holds {X.dtype} data; expected numbers (int or float). "
            "Convert the embeddings to a numeric array first."
        )
    if X.ndim != 2:
        raise ValueError(
            f"{path!r} holds an array of shape {X.shape}; expected a 2-D matrix "
            "(n_samples, n_features), one sample per row."
        )
    return X


def _read_npy(path, key):
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"Cannot read {path!r} as a .npy array: {exc}") from exc


def _read_npz(path, key):
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"Cannot read {path!r} as a .npz archive: {exc}") from exc
    with npz:
        names = list(npz.files)
        if key is not None:
            if key not in names:
                raise ValueError(
                    f"{path!r} has no array named {key!r}; it holds {names}. "
                    "Pass one of these as the key (--key)."
                )
            name = key
        elif "X" in names:
            name = "X"
        elif len(names) == 1:
            name = names[0]
        else:
            raise ValueError(
                f"{path!r} holds several arrays {names} and none is named 'X'. "
                "Name the one to use with the key (--key NAME)."
            )
        try:
            return npz[name]
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"Cannot read the array {name!r} of {path!r}: {exc}") from exc


def _is_number(field):
    try:
        float(field)
    except ValueError:
        return False
    return True


def _read_csv(path, key):
    try:
        with open(path, encoding="utf-8-sig") as fh:
            first, lineno = "", 0
            for lineno, line in enumerate(fh, 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    first = line
                    break
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"Cannot read {path!r} as a text CSV file: {exc}") from exc
    if not first:
        raise ValueError(f"{path!r} has no data rows; expected one sample per row.")
    header = not all(_is_number(f) for f in first.strip().split(","))
    try:
        with warnings.catch_warnings():
            # an empty body is reported below with the file's name
            warnings.simplefilter("ignore", UserWarning)
            X = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2,
                           skiprows=lineno if header else 0, encoding="utf-8-sig")
    except ValueError as exc:
        raise ValueError(
            f"Cannot read {path!r} as a numeric CSV: {exc} Expected comma-separated "
            "numbers, one sample per row, with at most one header row."
        ) from exc
    if X.size == 0:
        raise ValueError(f"{path!r} has a header but no data rows; expected one sample per row.")
    return X


def _read_parquet(path, key):
    pa, pq = _pyarrow()
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"Cannot read {path!r} as a parquet file: {exc}") from exc
    names = table.column_names
    if key is not None:
        if key not in names:
            raise ValueError(f"{path!r} has no column named {key!r}; it has {names}.")
        return _list_column(pa, table.column(key), key, path)
    lists = [n for n in names if _is_list(pa, table.schema.field(n).type)]
    if lists:
        if len(names) == 1:
            return _list_column(pa, table.column(names[0]), names[0], path)
        raise ValueError(
            f"{path!r} has the list column(s) {lists} among other columns {names}. "
            "Name the embedding column with the key (--key NAME)."
        )
    bad = [n for n in names if not _is_numeric(pa, table.schema.field(n).type)]
    if bad:
        raise ValueError(
            f"{path!r} has non-numeric columns {bad}. Expected only numeric columns (one "
            "feature each) or one list column of embeddings; drop the others."
        )
    if not names:
        raise ValueError(f"{path!r} has no columns.")
    cols = []
    for n in names:
        col = table.column(n)
        if col.null_count:
            raise ValueError(f"{path!r}: column {n!r} has {col.null_count} missing values. "
                             "Remove or impute them first.")
        cols.append(col.to_numpy())
    return np.column_stack(cols)


def _is_list(pa, typ):
    return pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)


def _is_numeric(pa, typ):
    return pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)


def _list_column(pa, col, name, path):
    if not _is_list(pa, col.type):
        if _is_numeric(pa, col.type):
            # a single scalar feature column
            if col.null_count:
                raise ValueError(f"{path!r}: column {name!r} has {col.null_count} missing "
                                 "values. Remove or impute them first.")
            return col.to_numpy()[:, None]
        raise ValueError(f"{path!r}: column {name!r} has type {col.type}; expected a list "
                         "of numbers per row (the embedding) or numbers.")
    if not _is_numeric(pa, col.type.value_type):
        raise ValueError(f"{path!r}: column {name!r} holds lists of {col.type.value_type}; "
                         "expected lists of numbers.")
    arr = col.combine_chunks()
    if arr.null_count:
        raise ValueError(f"{path!r}: column {name!r} has {arr.null_count} missing rows.")
    import pyarrow.compute as pc

    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise ValueError(
            f"{path!r}: the embeddings in column {name!r} have different lengths "
            f"({int(lengths.min())} to {int(lengths.max())}); expected one length."
        )
    values = arr.flatten()
    if values.null_count:
        raise ValueError(f"{path!r}: column {name!r} has missing values inside embeddings.")
    d = int(lengths[0]) if len(lengths) else 0
    return values.to_numpy(zero_copy_only=False).reshape(len(arr), d)


# -------------------------------------------------------------------- write
def check_scores_path(path):
    """Check early that scores can be written to ``path`` (format, pyarrow,
    existing folder), before any long computation. Returns the extension."""
    path = os.fspath(path)
    ext = _extension(path)
    if ext not in SCORE_FORMATS:
        raise ValueError(
            f"Cannot write scores to {path!r}: unknown extension {ext or '(none)'!r}. "
            f"Expected {_formats(SCORE_FORMATS)}."
        )
    if ext == ".parquet":
        _pyarrow()
    check_output_folder(path)
    return ext


def check_output_folder(path):
    """Raise if ``path`` cannot be a file in an existing folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Cannot write {path!r}: the folder {folder!r} does not exist.")
    if os.path.isdir(path):
        raise IsADirectoryError(f"Cannot write {path!r}: it is a folder; give a file name.")


def write_scores(path, anomaly_score, score_samples, labels):
    """Write a score table to ``path`` atomically, in the format its
    extension names.

    Columns: ``index`` (row of the query), ``anomaly_score`` (higher = more
    anomalous), ``score_samples`` (higher = more normal) and ``label`` (+1
    inlier, -1 outlier).

    * ``.csv``: a header row, then one row per query; floats are written
      with Python's shortest round-trip repr, so reading them back as
      float64 gives the exact values (float32 scores included).
    * ``.npy``: one structured array with those fields (``a["label"]``).
    * ``.npz``: one array per column.
    * ``.parquet``: one column each (needs pyarrow).

    The file appears complete or not at all: it is written to a temporary
    file in the same folder, then renamed over ``path``.
    """
    ext = check_scores_path(path)
    a = np.asarray(anomaly_score)
    s = np.asarray(score_samples)
    lab = np.asarray(labels).astype(np.int64, copy=False)
    if not (a.ndim == s.ndim == lab.ndim == 1 and len(a) == len(s) == len(lab)):
        raise ValueError(
            "anomaly_score, score_samples and labels must be 1-D and of one length; got "
            f"shapes {a.shape}, {s.shape} and {lab.shape}."
        )
    index = np.arange(len(a), dtype=np.int64)
    writer = {".csv": _write_csv, ".npy": _write_npy, ".npz": _write_npz,
              ".parquet": _write_parquet}[ext]
    atomic_write(path, lambda fh: writer(fh, index, a, s, lab))
    return path


def _write_csv(fh, index, a, s, lab):
    fh.write((",".join(SCORE_COLUMNS) + "\n").encode("ascii"))
    for start in range(0, len(a), _CSV_CHUNK):
        sl = slice(start, start + _CSV_CHUNK)
        rows = zip(index[sl].tolist(), a[sl].astype(np.float64).tolist(),
                   s[sl].astype(np.float64).tolist(), lab[sl].tolist())
        fh.write("".join(f"{i},{x!r},{y!r},{l}\n" for i, x, y, l in rows).encode("ascii"))


def _write_npy(fh, index, a, s, lab):
    table = np.empty(len(a), dtype=[("index", np.int64), ("anomaly_score", a.dtype),
                                    ("score_samples", s.dtype), ("label", np.int64)])
    for name, col in zip(SCORE_COLUMNS, (index, a, s, lab)):
        table[name] = col
    np.save(fh, table, allow_pickle=False)


def _write_npz(fh, index, a, s, lab):
    np.savez(fh, **dict(zip(SCORE_COLUMNS, (index, a, s, lab))))


def _write_parquet(fh, index, a, s, lab):
    pa, pq = _pyarrow()
    table = pa.table(dict(zip(SCORE_COLUMNS, (index, a, s, lab))))
    pq.write_table(table, fh)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then
    rename it over ``path``; on any error (or interrupt) nothing is left."""
    path = os.fspath(path)
    check_output_folder(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".nonn-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); give the result the
        # permissions any other new file in that folder would get.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------- shard folders
#: file formats of a shard folder (one matrix per file, rows concatenated)
SHARD_FORMATS = (".npy", ".parquet")


def is_shard_folder(path):
    """Whether ``path`` is a folder (of matrix shards)."""
    return os.path.isdir(os.fspath(path))


def shard_paths(folder):
    """The ``.npy`` / ``.parquet`` files of a shard folder, in name order
    (their rows are concatenated in that order). Hidden files and other
    extensions are skipped; a folder without shards is an error."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder of shards.")
    paths = [os.path.join(folder, name) for name in sorted(os.listdir(folder))
             if not name.startswith(".") and _extension(name) in SHARD_FORMATS
             and os.path.isfile(os.path.join(folder, name))]
    if not paths:
        raise ValueError(
            f"The folder {folder!r} holds no {_formats(SHARD_FORMATS)} shards. Put one matrix "
            "per file in it (rows are concatenated in file-name order), or pass a file.")
    return paths


def shard_info(path, key=None):
    """``(n_rows, n_features, dtype)`` of one shard, read from its header
    (``.npy``) or metadata (``.parquet``) without loading the rows (a list
    column's length is read from its first row)."""
    path = os.fspath(path)
    if _extension(path) == ".npy":
        if key is not None:
            raise ValueError(f"A key ({key!r}) names a column in .parquet shards; {path!r} is "
                             "a .npy file. Drop the key.")
        try:
            A = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"Cannot read {path!r} as a .npy array: {exc}") from exc
        _check_matrix(A[:0], path)
        return A.shape[0], A.shape[1], A.dtype
    pa, pq = _pyarrow()
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"Cannot read {path!r} as a parquet file: {exc}") from exc
    n = pf.metadata.num_rows
    schema = pf.schema_arrow
    names = [key] if key is not None else schema.names
    types = [schema.field(name).type for name in names if name in schema.names]
    if len(types) == 1 and _is_list(pa, types[0]):
        first = next(pf.iter_batches(batch_size=1, columns=names), None)
        one = (_read_parquet_table(pa, first, key, path) if first is not None
               else np.empty((0, 0)))
        return n, one.shape[1], _float_dtype(types[0].value_type)
    if not types or any(not _is_numeric(pa, t) for t in types):
        # let the full reader raise its precise error
        read_matrix(path, key=key)
    dt = np.result_type(*[_float_dtype(t) for t in types])
    return n, len(types), dt


def _float_dtype(arrow_type):
    """The dtype a shard column becomes in the estimators: float32 stays
    float32, every other number becomes float64."""
    return np.dtype(np.float32) if str(arrow_type) == "float" else np.dtype(np.float64)


def _read_parquet_table(pa, batch, key, path):
    table = pa.Table.from_batches([batch])
    name = key if key is not None else table.column_names[0]
    return _list_column(pa, table.column(name), name, path)


def read_shards(folder, key=None):
    """All shards of a folder concatenated in memory (name order)."""
    parts = [read_matrix(p, key=key) for p in shard_paths(folder)]
    widths = {p.shape[1] for p in parts}
    if len(widths) > 1:
        raise ValueError(f"The shards of {os.fspath(folder)!r} have different numbers of "
                         f"features {sorted(widths)}; expected one.")
    return np.concatenate(parts)


def read_matrix_or_shards(path, key=None):
    """:func:`read_matrix` for a file, :func:`read_shards` for a folder."""
    return read_shards(path, key) if is_shard_folder(path) else read_matrix(path, key=key)
