"""Declarative checks of a fitted model's state (arrays and scalars).

Each estimator declares, next to its ``_state_arrays``/``_state_scalars``,
a ``_state_spec``: one line per fitted attribute saying what a valid value
is, in terms of named dimensions shared by all of them::

    "_fit_X":         Array("N", "D"),               # model dtype, finite
    "neighborhoods_": Array("N", "Kp", ids="N"),     # int64, each in [0, N)
    "set_size_":      Int(1, "D", binds="L"),

A dimension name is bound the first time it is seen (``D`` is the
metadata's ``n_features_in``; ``N`` the first array with ``N`` in its shape)
and must match everywhere else, so arrays are checked against each other
and against the fitted scalars, not only against the shapes a file
announces. :func:`check_state` runs these checks on the arrays' shapes and
dtypes first (for a file: from the ``.npy`` headers, before any data is
read), then on the scalars, then on the arrays' values, and raises
:class:`StateError` naming the attribute. It runs on every ``load`` (so no
kernel ever sees a file's arrays unchecked) and every ``save`` (so what is
saved loads).

Adding a fitted attribute to a saved estimator: add its name to
``_state_arrays``/``_state_scalars`` and one spec line; a test checks every
saved attribute has one.
"""

from __future__ import annotations

import math
import numbers
import re

import numpy as np

#: the dtypes of a model's floating-point data
DATA_DTYPES = ("float32", "float64")
#: elements checked at once for finiteness (bounds the temporary mask)
_BLOCK = 1 << 20


class StateError(ValueError):
    """The fitted attribute ``name`` is not what its spec says; the message
    completes "<name> ..." (the loader turns it into a ``ModelFileError``)."""

    def __init__(self, name, message):
        super().__init__(message)
        self.name = name


def _dim(term, sym):
    """Value of a dimension term: an int, or ``"NAME"`` / ``"NAME-1"``
    (``None`` while ``NAME`` is unbound)."""
    if isinstance(term, int):
        return term
    m = re.fullmatch(r"([A-Za-z_]\w*)\s*(?:([+-])\s*(\d+))?", term)
    base = sym.get(m.group(1))
    if base is None:
        return None
    delta = int(m.group(3) or 0)
    return base - delta if m.group(2) == "-" else base + delta


def _all_finite(arr):
    flat = arr.reshape(-1)
    return all(np.isfinite(flat[i:i + _BLOCK]).all() for i in range(0, flat.size, _BLOCK))


class Array:
    """A fitted array.

    Parameters
    ----------
    *shape : int or str
        Its dimensions: ints, or names bound across the state (``"N"``).
    dtype : str, default="data"
        ``"data"``: the model's dtype (float32 or float64); or a numpy dtype
        name (``"int64"`` for ids and sizes, ``"float16"``...).
    finite : bool, default=True for floating dtypes
    ids : str, optional
        Every value is an id in ``[0, ids)`` (a dimension name).
    low : float, optional
        Every value is at least ``low``.
    positive : bool, default=False
        Every value is > 0.
    check : callable, optional
        ``check(arr, sym) -> str or None``: anything else wrong (a message
        completing "must ...").
    """

    def __init__(self, *shape, dtype="data", finite=None, ids=None, low=None, positive=False,
                 check=None):
        self.shape, self.dtype, self.ids = shape, dtype, ids
        self.finite = (dtype == "data" or np.dtype(dtype).kind == "f") if finite is None \
            else finite
        self.low, self.positive, self.check = low, positive, check

    def describe(self, sym):
        dims = ", ".join(str(d) if _dim(d, sym) is None or isinstance(d, int)
                         else f"{d}={_dim(d, sym)}" for d in self.shape)
        return f"shape ({dims}{',' if len(self.shape) == 1 else ''})"

    def check_header(self, name, shape, dtype, sym):
        """Check shape and dtype, binding unbound dimension names."""
        want = sym["dtype"] if self.dtype == "data" else np.dtype(self.dtype)
        if np.dtype(dtype).newbyteorder("=") != want:
            raise StateError(name, f"has dtype {np.dtype(dtype).name}; expected "
                             f"{want.name}.")
        if len(shape) != len(self.shape):
            raise StateError(name, f"has {len(shape)} dimensions, shape {tuple(shape)}; "
                             f"expected {self.describe(sym)}.")
        for term, n in zip(self.shape, shape):
            want_n = _dim(term, sym)
            if want_n is None:
                sym[term] = n
            elif n != want_n:
                raise StateError(name, f"has shape {tuple(shape)}; expected "
                                 f"{self.describe(sym)}.")

    def check_values(self, name, arr, sym):
        if self.finite and not _all_finite(arr):
            raise StateError(name, f"holds NaN or infinite values; a fitted model's are "
                             "all finite.")
        if arr.size and self.ids is not None:
            n = sym[self.ids]
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= n:
                bad = lo if lo < 0 else hi
                raise StateError(name, f"holds the id {bad}, outside [0, {n}) "
                                 f"({self.ids}={n}).")
        if arr.size and self.low is not None and arr.min() < self.low:
            raise StateError(name, f"holds {arr.min()!r}, below its minimum {self.low}.")
        if arr.size and self.positive and not (arr > 0).all():
            raise StateError(name, f"holds {arr.min()!r}; its values must be > 0.")
        if self.check is not None:
            problem = self.check(arr, sym)
            if problem:
                raise StateError(name, problem)


class Scalar:
    """A fitted scalar; subclasses say which. ``default``: the value a file
    written before the attribute existed stands for (absent: required)."""

    _missing = object()

    def __init__(self, binds=None, default=_missing):
        self.binds, self.default = binds, default

    def convert(self, name, value, sym):
        value = self._convert(name, value, sym)
        if self.binds is not None:
            bound = sym.get(self.binds)
            if bound is None:
                sym[self.binds] = value
            elif bound != value:
                raise StateError(name, f"is {value!r} but the arrays have "
                                 f"{self.binds}={bound}.")
        return value

    def _fail(self, name, value, expected):
        raise StateError(name, f"must be {expected}; got {value!r}.")


class Int(Scalar):
    """An int in ``[low, high]`` (bounds: ints, dimension terms or None)."""

    def __init__(self, low=None, high=None, **kw):
        super().__init__(**kw)
        self.low, self.high = low, high

    def _convert(self, name, value, sym):
        lo = None if self.low is None else _dim(self.low, sym)
        hi = None if self.high is None else _dim(self.high, sym)
        expected = f"an int in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            self._fail(name, value, expected)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self._fail(name, value, expected)
        return int(value)


class Real(Scalar):
    """A finite real number in ``[low, high]``; ``positive``: > 0;
    ``power_of_two``: an exact power of two (a scale factor that rounds
    nothing)."""

    def __init__(self, low=None, high=None, positive=False, power_of_two=False, **kw):
        super().__init__(**kw)
        self.low, self.high, self.positive, self.pow2 = low, high, positive, power_of_two

    def _convert(self, name, value, sym):
        parts = ["a finite float"]
        if self.low is not None or self.high is not None:
            parts.append(f"in [{'-inf' if self.low is None else self.low}, "
                         f"{'inf' if self.high is None else self.high}]")
        if self.positive:
            parts.append("> 0")
        if self.pow2:
            parts.append("(a power of two)")
        expected = " ".join(parts)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            self._fail(name, value, expected)
        value = float(value)
        if not math.isfinite(value) or (self.low is not None and value < self.low) or (
                self.high is not None and value > self.high) or (self.positive and value <= 0):
            self._fail(name, value, expected)
        if self.pow2 and (value <= 0 or math.frexp(value)[0] != 0.5):
            self._fail(name, value, expected)
        return value


class Str(Scalar):
    """A string (one of ``options`` when given), at most ``max_len`` long."""

    def __init__(self, options=None, max_len=10_000, **kw):
        super().__init__(**kw)
        self.options, self.max_len = options, max_len

    def _convert(self, name, value, sym):
        if self.options is not None:
            if not isinstance(value, str) or value not in self.options:
                self._fail(name, value, "one of " + ", ".join(map(repr, self.options)))
        elif not isinstance(value, str) or len(value) > self.max_len:
            self._fail(name, value, f"a string of at most {self.max_len} characters")
        return value


class Strings(Scalar):
    """A list of ``length`` strings (a dimension term), e.g. column names."""

    def __init__(self, length, max_len=10_000, **kw):
        super().__init__(**kw)
        self.length, self.max_len = length, max_len

    def _convert(self, name, value, sym):
        n = _dim(self.length, sym)
        if (not isinstance(value, list) or (n is not None and len(value) != n)
                or not all(isinstance(v, str) and len(v) <= self.max_len for v in value)):
            self._fail(name, value if not isinstance(value, list) or len(value) < 10 else
                       f"a list of {len(value)}", f"a list of {self.length}={n} strings")
        return list(value)


class Dict(Scalar):
    """A dict with some of the keys of ``fields`` (``{key: Scalar}``)."""

    def __init__(self, fields, **kw):
        super().__init__(**kw)
        self.fields = fields

    def _convert(self, name, value, sym):
        if not isinstance(value, dict) or not set(value) <= set(self.fields):
            self._fail(name, value, f"a dict with keys among {sorted(self.fields)}")
        return {k: self.fields[k]._convert(f"{name}[{k!r}]", v, sym) for k, v in value.items()}


class Optional(Scalar):
    """None, or what ``spec`` accepts."""

    def __init__(self, spec, **kw):
        super().__init__(**kw)
        self.spec = spec

    def _convert(self, name, value, sym):
        return None if value is None else self.spec._convert(name, value, sym)


# ------------------------------------------------------------ value checks
def permutation(arr, sym):
    """An ``Array`` ``check``: a permutation of ``range(len(arr))``."""
    seen = np.zeros(arr.size, dtype=bool)
    if arr.size and (arr.min() < 0 or arr.max() >= arr.size):
        return f"must be a permutation of range({arr.size}); it holds {arr.min()}..{arr.max()}."
    seen[arr] = True
    if not seen.all():
        return f"must be a permutation of range({arr.size}); it repeats an index."
    return None


def set_sizes(arr, sym):
    """An ``Array`` ``check``: feature-set sizes in [1, L], all L but the
    last, summing to D (the layout every Eq. 2 kernel assumes)."""
    L, D = sym["L"], sym["D"]
    if arr.size == 0 or arr.min() < 1 or arr.max() > L or (arr[:-1] != L).any() \
            or int(arr.sum()) != D:
        shown = arr.tolist() if arr.size <= 8 else f"[{arr[0]}, ..., {arr[-1]}]"
        return (f"must hold sizes in [1, L={L}], all equal to L but the last, summing to "
                f"D={D}; it holds {shown}.")
    return None


# ----------------------------------------------------------------- checks
def check_state(spec, sym, headers, scalars, read):
    """Check a fitted state against ``spec`` (``{attribute: Array or Scalar}``).

    Parameters
    ----------
    spec : dict
    sym : dict
        Bound names: at least ``"dtype"`` (the model's numpy dtype) and
        ``"D"``; more are bound as the checks run (returned).
    headers : dict
        ``{array attribute: (shape, dtype)}`` for every ``Array`` in ``spec``.
    scalars : dict
        ``{scalar attribute: value}``; a missing one takes its spec's default.
    read : callable
        ``read(attribute) -> ndarray``: the array's data, read only after
        every shape, dtype and scalar has passed.

    Returns
    -------
    (arrays, scalars) : the arrays read, and the scalars converted.
    """
    arrays = {n: s for n, s in spec.items() if isinstance(s, Array)}
    for name, s in arrays.items():
        shape, dtype = headers[name]
        s.check_header(name, shape, dtype, sym)
    out = {}
    for name, s in spec.items():
        if isinstance(s, Array):
            continue
        if name in scalars:
            out[name] = s.convert(name, scalars[name], sym)
        elif s.default is not Scalar._missing:
            out[name] = s.default
        else:
            raise StateError(name, "is missing.")
    values = {}
    for name, s in arrays.items():
        arr = read(name)
        s.check_values(name, arr, sym)
        values[name] = arr
    return values, out
