"""Entry checks of nonn's compiled kernels.

Every kernel that indexes by ids or sizes it is given checks them on entry
(serially, one pass over the ids: a small share of the kernel's own work),
so that no input, not even one that skipped nonn's validation (a crafted
model file, say), makes it read or write out of bounds. numba raises these
exceptions in the caller as ordinary Python exceptions.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: lowest id accepted where a negative id means "none" (skipped by the kernel)
NONE_OK = np.iinfo(np.int64).min


@njit(cache=True)
def check_ids(ids, low, high):
    """IndexError unless every entry of the 2-D ``ids`` is in [low, high)."""
    for i in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if ids[i, j] < low or ids[i, j] >= high:
                raise IndexError("nonn kernel: an id is out of range")


@njit(cache=True)
def check_ids1(ids, low, high):
    """:func:`check_ids` for a 1-D ``ids``."""
    for i in range(ids.shape[0]):
        if ids[i] < low or ids[i] >= high:
            raise IndexError("nonn kernel: an id is out of range")


@njit(cache=True)
def check_ptr(ptr, n, total, used):
    """ValueError unless ``ptr`` (when ``used``) is a CSR pointer of ``n``
    rows into ``total`` entries: ``n + 1`` non-decreasing offsets in [0, total]."""
    if not used:
        return
    if n < 0 or ptr.shape[0] < n + 1 or ptr[0] < 0 or ptr[n] > total:
        raise ValueError("nonn kernel: invalid CSR pointers")
    for i in range(n):
        if ptr[i + 1] < ptr[i]:
            raise ValueError("nonn kernel: invalid CSR pointers")


@njit(cache=True)
def check_shapes(ok):
    if not ok:
        raise ValueError("nonn kernel: inconsistent array shapes")


@njit(cache=True)
def check_sets(sizes, L, width, shapes_ok):
    """ValueError unless the feature sets fit the layout the kernels index
    by: at least one set, each of 0..L features, set ``s`` within the first
    ``width`` columns (``s * L + sizes[s] <= width``), and ``shapes_ok``."""
    check_shapes(shapes_ok)
    if sizes.shape[0] < 1 or L < 1:
        raise ValueError("nonn kernel: no feature sets")
    for s in range(sizes.shape[0]):
        if sizes[s] < 0 or sizes[s] > L or s * L + sizes[s] > width:
            raise ValueError("nonn kernel: feature-set sizes do not fit the data")


@njit(cache=True)
def check_rows(ids, n):
    """IndexError unless every entry of ``ids`` (any shape) is in [0, n)."""
    for v in ids.ravel():
        if v < 0 or v >= n:
            raise IndexError("a neighbor id is out of range of the training rows")


@njit(cache=True)
def check_dual_sets(sizes, L, width):
    """ValueError unless every set has 1..L features and all of them fit the
    ``width`` columns of the data (the dual kernels' layout check)."""
    total = 0
    for s in range(sizes.shape[0]):
        if sizes[s] < 1 or sizes[s] > L:
            raise ValueError("a feature-set size is out of range")
        total += sizes[s]
    if sizes.shape[0] * L < total or total > width:
        raise ValueError("the feature-set sizes do not fit the data's columns")
