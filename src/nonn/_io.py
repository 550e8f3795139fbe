"""Reading embedding matrices and writing score tables for the command line.

Matrices come from ``.npy``, ``.npz``, ``.csv`` or ``.parquet`` files;
score tables go to the same formats. CSV files are parsed by pandas; Parquet
needs pyarrow, imported only when a parquet file is actually read or
written. Tables with named columns (a CSV header, Parquet column names)
keep their names, so that a model remembers them and queries are matched to
them by name.

Every output is written to a temporary file in the target folder and
renamed into place, so an error or an interrupt never leaves a half-written
file behind. The temporary file's name carries the writer's host and
process id; a later write into the same folder removes the temporaries of
writers on this host that no longer run (a process killed with SIGKILL).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import socket
import stat
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


def extension(path):
    """The file extension of ``path``, lower case (``''`` for none)."""
    return os.path.splitext(os.fspath(path))[1].lower()


def _formats(exts):
    return ", ".join(exts[:-1]) + " or " + exts[-1]


def import_pyarrow():
    """``(pyarrow, pyarrow.parquet)``, or an ImportError saying how to
    install them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(_PYARROW_HINT) from exc
    return pa, pq


# --------------------------------------------------------------------- read
#: ``header`` values of :func:`read_table`
HEADER_CHOICES = ("auto", "yes", "no")


def read_table(path, key=None, header="auto"):
    """Read a 2-D numeric matrix and its column names from a file.

    Parameters
    ----------
    path : str or path-like
        ``.npy``; ``.npz`` (the array named ``key``, else ``"X"``, else the
        only array); ``.csv`` (comma-separated numbers, one sample per row,
        parsed by pandas; see ``header``); ``.parquet`` (all columns numeric,
        one feature each, or one list column holding each row's embedding;
        needs pyarrow).
    key : str, optional
        Array name in a ``.npz`` file, or embedding column in a ``.parquet``
        file. Not accepted for other formats.
    header : {"auto", "yes", "no"}, default="auto"
        Whether the first row of a CSV file names the columns. "auto": it
        does when one of its fields is text (not a number and not a
        missing-value marker such as ``NA``); when it is exactly
        ``0,1,...,d-1``, the names pandas gives an unnamed frame
        (``df.to_csv(index=False)``); or when it is all integers above
        columns of non-integer numbers (see :func:`_has_header`). Any other
        first row of numbers and missing values is data. Only CSV files
        take a setting other than "auto".

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
        Numeric, as stored (the estimators choose the float dtype); CSV
        files give float64.
    names : list of str or None
        The column names (a CSV header, Parquet's numeric columns), or None
        when the file has none (``.npy``, ``.npz``, a list column, a CSV
        file without header).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        Unknown extension, not a regular file (a named pipe, a device),
        unreadable content, non-numeric columns, missing values, or not a
        2-D numeric matrix.
    ImportError
        A parquet file without pyarrow installed.
    """
    path = os.fspath(path)
    ext = extension(path)
    if ext not in MATRIX_FORMATS:
        raise ValueError(
            f"Cannot read {path!r}: unknown extension {ext or '(none)'!r}. "
            f"Expected {_formats(MATRIX_FORMATS)}."
        )
    check_regular_file(path, f"a {_formats(MATRIX_FORMATS)} file")
    if key is not None and ext not in (".npz", ".parquet"):
        raise ValueError(
            f"A key ({key!r}) names an array in a .npz file or a column in a .parquet "
            f"file; {path!r} is a {ext} file. Drop the key."
        )
    if header not in HEADER_CHOICES:
        raise ValueError(f"header must be one of {HEADER_CHOICES}; got {header!r}.")
    if header != "auto" and ext != ".csv":
        raise ValueError(f"A header setting ({header!r}) applies to .csv files; {path!r} is "
                         f"a {ext} file. Drop it.")
    if ext == ".csv":
        X, names = _read_csv(path, header)
    elif ext == ".parquet":
        X, names = _read_parquet(path, key)
    else:
        X, names = {".npy": _read_npy, ".npz": _read_npz}[ext](path, key), None
    return _check_matrix(X, path), names


def read_matrix(path, key=None, header="auto"):
    """The matrix of :func:`read_table` (without the column names)."""
    return read_table(path, key=key, header=header)[0]


def check_regular_file(path, expected="a file"):
    """Raise unless ``path`` is a regular file (following links).

    Checked with ``stat``, which never blocks: opening a named pipe would
    wait for a writer, and a device may never end.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path!r} does not exist. Expected {expected}.") from None
    except OSError as exc:
        raise ValueError(f"Cannot read {path!r}: {exc.strerror or exc}.") from None
    if stat.S_ISREG(mode):
        return path
    if stat.S_ISDIR(mode):
        raise FileNotFoundError(f"{path!r} is a folder, not a file. Expected {expected}.")
    if stat.S_ISFIFO(mode):
        what = "a named pipe"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        what = "a device"
    elif stat.S_ISSOCK(mode):
        what = "a socket"
    else:
        what = "a special file"
    raise ValueError(f"{path!r} is {what}, not a regular file. Expected {expected}; write "
                     "the data to a file first.")


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


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


def _magic(path):
    try:
        with open(path, "rb") as fh:
            return fh.read(6)
    except OSError as exc:
        raise ValueError(f"Cannot read {path!r}: {exc.strerror or exc}.") from None


def _not_format(path, fmt, head):
    """The error for a file whose first bytes are not those of ``fmt`` (numpy
    would say it holds pickled data, and suggest unpickling it)."""
    if head.startswith(_NPY_MAGIC):
        actual = "a .npy array"
    elif head.startswith(_ZIP_MAGICS):
        actual = "a zip archive (a .npz archive or a nonn model?)"
    elif not head:
        actual = "empty"
    else:
        actual = "neither a .npy array nor a .npz archive (text? another format?)"
    return ValueError(f"Cannot read {path!r} as {fmt}: the file is {actual}. Check the file, "
                      "or give it the extension of its real format.")


def _read_npy(path, key):
    head = _magic(path)
    if not head.startswith(_NPY_MAGIC):
        raise _not_format(path, "a .npy array", head)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"Cannot read {path!r} as a .npy array: {_no_pickle(exc)}") from exc


def _no_pickle(exc):
    """numpy's message, without its advice to load a file with pickle (never
    safe for a file from someone else, and never what nonn reads)."""
    text = str(exc)
    if "pickle" in text.lower():
        return "it holds Python objects (pickled data), not numbers"
    return text


def _read_npz(path, key):
    head = _magic(path)
    if not head.startswith(_ZIP_MAGICS):
        raise _not_format(path, "a .npz archive", head)
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"Cannot read {path!r} as a .npz archive: {_no_pickle(exc)}") from exc
    with npz:
        names = list(npz.files)
        if "__meta__" in names and key is None:
            raise ValueError(f"{path!r} is a nonn model file, not data. Pass the data file "
                             "(a model goes where the command asks for MODEL).")
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
            raise ValueError(f"Cannot read the array {name!r} of {path!r}: "
                             f"{_no_pickle(exc)}") from exc


#: what pandas' read_csv reads as a missing value by default (its
#: documented ``na_values`` list); in a first row these mean data, not names
_NA_MARKERS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
    "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})
_INT = re.compile(r"^[+-]?\d+$")


def _is_number(field):
    try:
        float(field)
    except ValueError:
        return False
    return True


#: rows after the first that ``header="auto"`` looks at
_SNIFF_ROWS = 100


def _first_rows(path, n=1 + _SNIFF_ROWS):
    """The fields of the first ``n`` rows that are neither blank nor ``#`` comments."""
    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            for line in fh:
                if line.strip() and not line.lstrip().startswith("#"):
                    rows.append(next(csv.reader([line])))
                    if len(rows) == n:
                        break
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"Cannot read {path!r} as a text CSV file: {exc}") from exc
    except csv.Error as exc:
        raise ValueError(f"Cannot read {path!r} as a CSV file: {exc}") from exc
    return rows


def _has_header(rows):
    """``header="auto"``: whether the first of ``rows`` names the columns.

    It does when one of its fields is text (neither a number nor a missing
    value marker); when it is exactly pandas' names for an unnamed frame
    (``0,1,...``, after an empty name for the index with ``to_csv()``); or,
    as :meth:`csv.Sniffer.has_header` reasons, when it is all integers above
    columns that each hold non-integer numbers (``1990,1991`` over
    measurements). Anything else, numbers and missing values, is data.
    """
    values = [f.strip() for f in rows[0]]
    if any(v not in _NA_MARKERS and not _is_number(v) for v in values):
        return True
    names = values[1:] if len(values) > 1 and values[0] == "" else values
    if not all(_INT.match(v) for v in names):
        return False
    if [int(v) for v in names] == list(range(len(names))):
        return True
    below = [[f.strip() for f in r] for r in rows[1:] if len(r) == len(values)]
    if not below or len(values) != len(names):
        return False
    for j in range(len(values)):
        column = [r[j] for r in below if r[j] not in _NA_MARKERS]
        if not column or not all(_is_number(v) for v in column):
            return False
        if all(_INT.match(v) for v in column):
            return False  # integers below integers: data like any other row
    return True


def _describe_columns(columns, header, limit=10):
    """Column names for a message: quoted names, or 1-based positions."""
    shown = [repr(str(c)) if header else str(int(c) + 1) for c in columns[:limit]]
    more = f" and {len(columns) - limit} more" if len(columns) > limit else ""
    return ", ".join(shown) + more + ("" if header else " (counting from 1)")


def _read_csv(path, header):
    import pandas as pd

    rows = _first_rows(path)
    if not rows:
        raise ValueError(f"{path!r} has no data rows; expected one sample per row.")
    first = rows[0]
    has_header = _has_header(rows) if header == "auto" else header == "yes"
    try:
        df = pd.read_csv(path, header=0 if has_header else None, comment="#",
                         encoding="utf-8-sig", skip_blank_lines=True, low_memory=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path!r} has no data rows; expected one sample per row.") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise ValueError(
            f"Cannot read {path!r} as a numeric CSV ({' '.join(str(exc).split())}). Expected "
            "comma-separated numbers, one sample per row, with at most one header row."
        ) from exc
    if has_header and len(df.columns) > 1 and not first[0].strip():
        # the header names every column but the first: pandas' to_csv()
        # with its default index=True wrote the row index there
        warnings.warn(f"{path!r}: the first column has no name in the header; it is taken as "
                      "the row index pandas writes (to_csv without index=False) and not "
                      "used as a feature.", UserWarning, stacklevel=3)
        df = df.iloc[:, 1:]
    if len(df) == 0:
        raise ValueError(f"{path!r} has a header but no data rows; expected one sample per row.")
    numeric = [pd.api.types.is_numeric_dtype(t) or pd.api.types.is_bool_dtype(t)
               for t in df.dtypes]
    bad = [c for c, ok in zip(df.columns, numeric) if not ok]
    if bad:
        col = df[bad[0]]
        values = pd.to_numeric(col, errors="coerce")
        row = int(np.flatnonzero(values.isna().to_numpy() & col.notna().to_numpy())[0])
        raise ValueError(
            f"{path!r} has non-numeric column(s) {_describe_columns(bad, has_header)} (e.g. "
            f"{str(col.iloc[row])[:40]!r} in data row {row + 1}). Expected numbers only; drop "
            "or encode those columns first."
        )
    missing = df.isna().to_numpy()
    if missing.any():
        rows, cols = np.nonzero(missing)
        names = list(df.columns[np.unique(cols)])
        raise ValueError(
            f"{path!r} has {int(missing.sum())} missing value(s) (empty fields, NA, NaN or "
            f"short rows) in column(s) {_describe_columns(names, has_header)}, the first in "
            f"data row {int(rows[0]) + 1}. Remove or impute them first."
        )
    X = df.to_numpy(dtype=np.float64)
    names = [str(c) for c in df.columns] if has_header else None
    return X, names


def _read_parquet(path, key):
    pa, pq = import_pyarrow()
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ValueError(f"Cannot read {path!r} as a parquet file: {exc}") from exc
    # a DataFrame's index written by pandas (to_parquet) is not a feature
    index_cols = (table.schema.pandas_metadata or {}).get("index_columns", [])
    index_cols = [c for c in index_cols if isinstance(c, str) and c in table.column_names]
    if index_cols:
        table = table.drop(index_cols)
    names = table.column_names
    if key is not None:
        if key not in names:
            raise ValueError(f"{path!r} has no column named {key!r}; it has {names}.")
        return _list_column(pa, table.column(key), key, path), None
    lists = [n for n in names if _is_list(pa, table.schema.field(n).type)]
    if lists:
        if len(names) == 1:
            return _list_column(pa, table.column(names[0]), names[0], path), None
        raise ValueError(
            f"{path!r} has the list column(s) {lists} among other columns {names}. "
            "Name the embedding column with the key (--key NAME)."
        )
    bad = [n for n in names if not _is_numeric(pa, table.schema.field(n).type)]
    if bad:
        raise ValueError(
            f"{path!r} has non-numeric column(s) {_describe_columns(bad, True)}. Expected only "
            "numeric columns (one feature each) or one list column of embeddings; drop or "
            "encode the others."
        )
    if not names:
        raise ValueError(f"{path!r} has no columns.")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path!r} has duplicate column names {dup}; rename them.")
    cols = []
    for n in names:
        col = table.column(n)
        if col.null_count:
            raise ValueError(f"{path!r}: column {n!r} has {col.null_count} missing values. "
                             "Remove or impute them first.")
        cols.append(col.to_numpy())
    return np.column_stack(cols), [str(n) for n in names]


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
    ext = extension(path)
    if ext not in SCORE_FORMATS:
        raise ValueError(
            f"Cannot write scores to {path!r}: unknown extension {ext or '(none)'!r}. "
            f"Expected {_formats(SCORE_FORMATS)}."
        )
    if ext == ".parquet":
        import_pyarrow()
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
    if os.path.exists(path) and not os.path.isfile(path):
        # the result is renamed over the path: that would replace a named
        # pipe or a device node (/dev/null) with a regular file
        raise ValueError(f"Cannot write {path!r}: it is a named pipe, a device or another "
                         "special file, not a regular file; give a file name.")


def write_scores(path, anomaly_score, score_samples, labels, p_value=None):
    """Write a score table to ``path`` atomically, in the format its
    extension names.

    Columns: ``index`` (row of the query), ``anomaly_score`` (higher = more
    anomalous), ``score_samples`` (higher = more normal), ``label`` (+1
    inlier, -1 outlier) and, when ``p_value`` is given, ``p_value``
    (float64, the conformal p-value of each query).

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
    cols = {"index": np.arange(len(a), dtype=np.int64), "anomaly_score": a,
            "score_samples": s, "label": lab}
    if p_value is not None:
        cols["p_value"] = np.asarray(p_value, dtype=np.float64)
    if not (all(c.ndim == 1 for c in cols.values())
            and len({len(c) for c in cols.values()}) == 1):
        raise ValueError(
            f"{', '.join(list(cols)[1:])} must be 1-D and of one length; got shapes "
            f"{', '.join(str(c.shape) for c in list(cols.values())[1:])}."
        )
    writer = {".csv": _write_csv, ".npy": _write_npy, ".npz": _write_npz,
              ".parquet": _write_parquet}[ext]
    atomic_write(path, lambda fh: writer(fh, cols))
    return path


def _write_csv(fh, cols):
    fh.write((",".join(cols) + "\n").encode("ascii"))
    n = len(cols["index"])
    for start in range(0, n, _CSV_CHUNK):
        sl = slice(start, start + _CSV_CHUNK)
        # floats as their shortest round-trip repr (exact when read back)
        parts = [c[sl].tolist() if c.dtype.kind in "iu" else c[sl].astype(np.float64).tolist()
                 for c in cols.values()]
        fh.write("".join(",".join(map(repr, row)) + "\n"
                         for row in zip(*parts)).encode("ascii"))


def _write_npy(fh, cols):
    table = np.empty(len(cols["index"]), dtype=[(k, c.dtype) for k, c in cols.items()])
    for name, col in cols.items():
        table[name] = col
    np.save(fh, table, allow_pickle=False)


def _write_npz(fh, cols):
    np.savez(fh, **cols)


def _write_parquet(fh, cols):
    pa, pq = import_pyarrow()
    pq.write_table(pa.table(cols), fh)


def current_umask():
    """The process's file-creation mask (read without changing it): the
    permissions a new file or folder gets are ``0o666`` / ``0o777`` without
    its bits."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_TMP_PREFIX, _TMP_SUFFIX = ".nonn-", ".tmp"
# .nonn-<host>-<pid>-<random>.tmp, host a digest of the host name (a shared
# folder may be written from several machines, whose process ids overlap)
_TMP_NAME = re.compile(r"^\.nonn-([0-9a-f]{8})-(\d+)-[A-Za-z0-9_]+\.tmp$")


def _host_tag():
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: the existence check, nothing is sent
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or we cannot tell: keep its file
    return True


def remove_stale_temporaries(folder):
    """Remove the temporary files of :func:`atomic_write` in ``folder`` whose
    writer (a process on this host) no longer runs, e.g. one killed with
    SIGKILL mid-write. Returns the names removed.

    Only names this module writes are touched; a writer that is still running
    keeps its file. (On Windows, where ``os.kill`` cannot test a process, this
    does nothing.)
    """
    if os.name != "posix":
        return []
    host, me = _host_tag(), os.getpid()
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP_NAME.match(name)
        if not m or m.group(1) != host:
            continue
        pid = int(m.group(2))
        if pid == me or _pid_alive(pid):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass  # removed by another writer meanwhile, or not ours to remove
    return removed


def atomic_write(path, write):
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then
    rename it over ``path``; on any error (or interrupt) nothing is left.

    The result gets the permission bits of the file it replaces (a
    ``chmod 600`` model stays private), or those any new file in the folder
    would get. Before writing, the temporaries left by dead writers on this
    host are removed (:func:`remove_stale_temporaries`).
    """
    path = os.fspath(path)
    check_output_folder(path)
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temporaries(folder)
    try:
        old = os.stat(path)
        mode = stat.S_IMODE(old.st_mode) if stat.S_ISREG(old.st_mode) else None
    except OSError:
        mode = None
    if mode is None:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{_host_tag()}-{os.getpid()}-",
                               suffix=_TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def same_file(a, b):
    """Whether paths ``a`` and ``b`` name the same file (links and hard
    links included; by resolved path when one does not exist yet)."""
    a, b = os.fspath(a), os.fspath(b)
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def check_not_an_input(output, inputs):
    """Raise if ``output`` is one of ``inputs`` (``{name: path}`` or pairs,
    the name as the command line says it): writing it would destroy what is
    read."""
    for what, path in (inputs.items() if isinstance(inputs, dict) else inputs):
        if path is not None and same_file(output, path):
            raise ValueError(
                f"The output {os.fspath(output)!r} is the same file as {what} "
                f"{os.fspath(path)!r}; writing it would destroy that input. Give -o "
                "another file name."
            )


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
             if not name.startswith(".") and extension(name) in SHARD_FORMATS
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
    if extension(path) == ".npy":
        if key is not None:
            raise ValueError(f"A key ({key!r}) names a column in .parquet shards; {path!r} is "
                             "a .npy file. Drop the key.")
        try:
            A = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"Cannot read {path!r} as a .npy array: {exc}") from exc
        _check_matrix(A[:0], path)
        return A.shape[0], A.shape[1], A.dtype
    pa, pq = import_pyarrow()
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
    return read_shards_table(folder, key)[0]


def read_shards_table(folder, key=None):
    """:func:`read_shards` and the shards' column names: those of the shards
    when every shard names its columns (alike, else an error), None when
    one does not (columns are then taken in order)."""
    parts = [read_table(p, key=key) for p in shard_paths(folder)]
    widths = {X.shape[1] for X, _ in parts}
    if len(widths) > 1:
        raise ValueError(f"The shards of {os.fspath(folder)!r} have different numbers of "
                         f"features {sorted(widths)}; expected one.")
    names = [n for _, n in parts]
    named = [n for n in names if n is not None]
    if any(n != named[0] for n in named):
        raise ValueError(f"The shards of {os.fspath(folder)!r} name their columns differently; "
                         "expected the same columns in the same order in every shard.")
    return np.concatenate([X for X, _ in parts]), (names[0] if len(named) == len(names)
                                                   else None)


def read_matrix_or_shards(path, key=None, header="auto"):
    """:func:`read_matrix` for a file, :func:`read_shards` for a folder."""
    return read_table_or_shards(path, key=key, header=header)[0]


def read_table_or_shards(path, key=None, header="auto"):
    """:func:`read_table` for a file, :func:`read_shards_table` for a folder."""
    if is_shard_folder(path):
        if header != "auto":
            raise ValueError(f"A header setting ({header!r}) applies to .csv files; "
                             f"{os.fspath(path)!r} is a folder of shards. Drop it.")
        return read_shards_table(path, key)
    return read_table(path, key=key, header=header)
