"""One power-of-two factor that brings the data to a scale the arithmetic
handles, learned at fit and applied to every query.

The scores of nonn's detectors do not depend on the data's units (KNNN's and
the eigen-normalised baselines' eigenvalue floor is relative), but the
arithmetic behind them does: the search squares norms, the neighborhood
eigen-solver squares covariance entries (fourth powers of the data), and
those overflow or underflow once the data sit far from 1 -- float32 data
times 1e10 or 1e-12 already do, float64 data times 1e+-100. So a detector
multiplies its training data and every query by one power of two,
``2**data_scale_exponent_``, before the search and the operator see them.

Multiplying by a power of two is exact in binary floating point (only the
exponent changes, as long as nothing over- or underflows), so the scaled
data are the user's data in other units, bit for bit: neighbors, ties and
every scale-free score are those of the data as given, computed where the
arithmetic is safe. Scores that carry units (:class:`nonn.KNN`'s distances)
are multiplied back by the same exact factor.

Data whose root-mean-square entry already lies in ``[2**-SAFE_EXPONENT,
2**SAFE_EXPONENT]`` are used as given (exponent 0: no copy, the same bits as
before this step existed); other data are brought to an RMS in ``[1, 2)``.
Within that band the kernels have wide margins in float32 (squared
covariances of at most ~2**64 times the local-to-global variance ratio).
RMS normalisation also bounds the largest entry: at most ``sqrt(n_values)``
times the RMS, so no entry of the scaled training data can overflow.

The factor is computed without ever overflowing: the largest absolute entry
``m`` first (exact, in the data's dtype), then, only when ``m`` alone cannot
place the RMS in the band, the sum of squares of the data divided by the
power of two just above ``m`` (every term at most 1), in float64.
"""

from __future__ import annotations

import math

import numpy as np

#: data whose RMS entry lies in [2**-SAFE_EXPONENT, 2**SAFE_EXPONENT] are
#: used as given
SAFE_EXPONENT = 16
#: rows per float64 block when summing squares (bounded extra memory)
_BLOCK_VALUES = 1 << 20


def max_abs(X):
    """The largest absolute entry of ``X`` as a Python float (no temporary
    array: the maximum and the minimum, in the data's dtype)."""
    if X.size == 0:
        return 0.0
    return max(abs(float(X.max())), abs(float(X.min())))


def sum_squares(X, e):
    """``sum((X * 2**-e)**2)`` in float64, in blocks of rows (no float64 copy
    of ``X``). With ``max|X| < 2**e`` every term is below 1: no overflow."""
    X = np.asarray(X)
    rows = max(1, _BLOCK_VALUES // max(X.shape[1], 1)) if X.ndim == 2 else X.shape[0]
    total = 0.0
    with np.errstate(under="ignore"):
        for start in range(0, X.shape[0], rows):
            b = np.ldexp(X[start:start + rows], -e)
            total += float(np.einsum("ij,ij->", b, b, dtype=np.float64))
    return total


def choose_exponent(m, count, sum_squares_at):
    """The exponent ``k`` of the factor ``2**k`` for data whose largest
    absolute entry is ``m`` over ``count`` values; ``sum_squares_at(e)``
    returns ``sum((x * 2**-e)**2)`` (called at most once, only when needed:
    the RMS lies in ``[m / sqrt(count), m]``, which often settles it)."""
    if not m > 0:  # all zeros: nothing to scale
        return 0
    lo, hi = 2.0 ** -SAFE_EXPONENT, 2.0 ** SAFE_EXPONENT
    if m <= hi and m >= lo * math.sqrt(count):
        return 0
    e = math.frexp(m)[1]  # m < 2**e <= 2m
    s = sum_squares_at(e)  # >= (m / 2**e)**2 >= 1/4
    log2_rms = e + 0.5 * math.log2(s / count)
    if -SAFE_EXPONENT <= log2_rms <= SAFE_EXPONENT:
        return 0
    return -math.floor(log2_rms)


def fit_exponent(X):
    """The exponent for the training data ``X`` (2-D, finite)."""
    return choose_exponent(max_abs(X), X.size, lambda e: sum_squares(X, e))


def check_exponent(k):
    """``k`` as an int, refusing a value no fit produces (a corrupted model)."""
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) \
            or not -1200 <= int(k) <= 1200:
        raise ValueError(f"data_scale_exponent_ must be an int in the range [-1200, 1200]; got "
                         f"{k!r}. The model is corrupted: fit it again.")
    return int(k)


def scale(X, k, what="The queries"):
    """``X * 2**k`` (exact; a new array) or ``X`` itself when ``k == 0``.

    Refuses, with a ValueError, data that the factor would take past the
    largest value of their dtype (possible only for ``k > 0``, i.e. a model
    fitted on tiny data, and data much larger than its training data)."""
    if k == 0:
        return X
    if k > 0:
        m = max_abs(X)
        limit = math.ldexp(float(np.finfo(X.dtype).max), -k)
        if m > limit:
            raise ValueError(
                f"{what} hold values up to {m:.3g}, which cannot be represented in "
                f"{X.dtype} at the model's working scale: the training data were tiny (RMS "
                f"about 2**{-k}), so every input is multiplied by 2**{k}, and only values up to "
                f"{limit:.3g} stay finite. Pass float64 data (fit and queries), or check that "
                "the queries are in the training data's units.")
    with np.errstate(under="ignore"):
        return np.ldexp(X, k)


def unscale_scores(scores, k):
    """Scores that carry the data's units, computed on data multiplied by
    ``2**k``, back in the user's units (exact). A ValueError if that
    overflows the scores' dtype."""
    if k == 0:
        return scores
    with np.errstate(over="ignore", under="ignore"):
        out = np.ldexp(scores, -k)
    if not np.isfinite(out).all():
        raise ValueError(
            f"Some scores (distances) exceed the largest {out.dtype} value in the data's "
            f"units (up to {float(np.max(scores)):.3g} * 2**{-k}). The data are too large "
            f"to measure in {out.dtype}: pass float64 data.")
    return out
