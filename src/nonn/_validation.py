"""Parameter and input validation with one error grammar.

Every message says what was expected, what came, and how to fix it:
"The 'n_neighbors' parameter of KNNN must be an int in the range [1, inf).
Got 0 instead. ..."
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.utils.validation import validate_data


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _big_int(value):
    """Whether ``value`` is an int outside the 64-bit range (counts, seeds and
    thread numbers are 64-bit ints downstream; numpy cannot even test such an
    int for finiteness)."""
    return (isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
            and not _INT64_MIN <= value <= _INT64_MAX)


def _as_float(value):
    """``float(value)``, or None where it overflows."""
    try:
        return float(value)
    except OverflowError:
        return None


class Interval:
    """A numeric range constraint; ``kind`` is "int" or "real"."""

    def __init__(self, kind, left, right, closed="both"):
        self.kind, self.left, self.right, self.closed = kind, left, right, closed

    def accepts(self, value):
        if isinstance(value, (bool, np.bool_)):
            return False
        if self.kind == "int" and not isinstance(value, numbers.Integral):
            return False
        if self.kind == "real" and not isinstance(value, numbers.Real):
            return False
        if _big_int(value):
            if self.kind == "int":
                return False
            value = _as_float(value)
            if value is None:
                return False
        if not np.isfinite(value):
            return False
        lo_ok = self.left is None or (
            value >= self.left if self.closed in ("both", "left") else value > self.left
        )
        hi_ok = self.right is None or (
            value <= self.right if self.closed in ("both", "right") else value < self.right
        )
        return lo_ok and hi_ok

    def __str__(self):
        lb = "[" if self.closed in ("both", "left") and self.left is not None else "("
        rb = "]" if self.closed in ("both", "right") and self.right is not None else ")"
        lo = "-inf" if self.left is None else self.left
        hi = "inf" if self.right is None else self.right
        noun = "an int" if self.kind == "int" else "a float"
        return f"{noun} in the range {lb}{lo}, {hi}{rb}"


class Options:
    """One of a fixed set of strings."""

    def __init__(self, *options):
        self.options = options

    def accepts(self, value):
        return isinstance(value, str) and value in self.options

    def __str__(self):
        return "a str among {" + ", ".join(repr(o) for o in self.options) + "}"


class IsNone:
    def accepts(self, value):
        return value is None

    def __str__(self):
        return "None"


class IsDict:
    def accepts(self, value):
        return isinstance(value, dict)

    def __str__(self):
        return "a dict"


def validate_params(estimator, constraints, hints=None):
    """Check ``estimator``'s constructor arguments against ``constraints``.

    ``constraints`` maps a parameter name to a list of accepted constraint
    objects; ``hints`` maps a parameter name to an example of a valid call.
    """
    hints = hints or {}
    cls = type(estimator).__name__
    for name, accepted in constraints.items():
        value = getattr(estimator, name)
        if any(c.accepts(value) for c in accepted):
            continue
        if len(accepted) == 1:
            expected = str(accepted[0])
        else:
            expected = ", ".join(str(c) for c in accepted[:-1]) + " or " + str(accepted[-1])
        hint = hints.get(name)
        fix = f" For example: {cls}({name}={hint})." if hint else ""
        raise ValueError(
            f"The '{name}' parameter of {cls} must be {expected}. Got {_show(value)} instead"
            f"{_why(value, accepted)}.{fix}"
        )


def _show(value, limit=60):
    """``repr(value)``, shortened when it is very long (a huge int)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:20]}...{text[-10:]} ({len(text)} characters)"


def _why(value, accepted):
    """Why an int the ranges seem to allow is refused anyway."""
    if not _big_int(value):
        return ""
    if any(isinstance(c, Interval) and c.kind == "real" for c in accepted):
        if _as_float(value) is None:
            return " (too large for a float)"
        return ""
    return " (beyond the 64-bit integer range)"


_FIXES = (
    ("NaN", "Remove or impute the rows with NaN or inf before calling nonn."),
    ("infinity", "Remove or impute the rows with NaN or inf before calling nonn."),
    ("features, but",
     "Pass data embedded exactly like the training data (same columns, same order)."),
    ("minimum of", "Pass at least 2 training rows and 1 feature."),
    ("Expected 2D array", "Pass a 2-D array of shape (n_samples, n_features); "
     "reshape a single sample with X.reshape(1, -1)."),
    ("Sparse", "Convert it with X.toarray(); k-NNN works on dense embeddings."),
    ("string", "Pass numeric embeddings (convert or drop non-numeric columns)."),
    ("could not convert", "Pass numeric embeddings (convert or drop non-numeric columns)."),
    ("Complex", "Pass real-valued embeddings."),
)


def check_array_input(estimator, X, *, reset):
    """Validate ``X`` and return it as a C-contiguous float32/float64 array.

    float32 stays float32 (half the memory); any other numeric dtype becomes
    float64. Errors keep scikit-learn's wording (tools match on it) and add
    the fix.
    """
    try:
        X = validate_data(
            estimator,
            X,
            reset=reset,
            dtype=[np.float64, np.float32],
            order="C",
            ensure_min_samples=2 if reset else 1,
            ensure_all_finite=True,
        )
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        for key, fix in _FIXES:
            if key in msg:
                raise type(exc)(f"{msg} {fix}") from exc
        raise
    return X
