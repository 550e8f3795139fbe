"""Chunking under a memory budget, and optional progress bars."""

from __future__ import annotations

from sklearn import get_config


def chunk_rows(row_bytes, working_memory=None, min_rows=1, max_rows=None):
    """How many rows of ``row_bytes`` bytes fit in ``working_memory`` MiB.

    ``None`` uses scikit-learn's ``working_memory`` setting (1024 MiB by
    default), so one global knob bounds nonn and scikit-learn alike.
    """
    if working_memory is None:
        working_memory = get_config()["working_memory"]
    rows = int(working_memory * 2**20 // max(int(row_bytes), 1))
    rows = max(rows, min_rows)
    if max_rows is not None:
        rows = min(rows, max_rows)
    return max(rows, 1)


def progress(iterable, enabled, desc, total=None):
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` (and more than one step)."""
    if not enabled or (total is not None and total <= 1):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)
