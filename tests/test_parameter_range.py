"""Integers beyond what the parameters can hold get the standard parameter
error (one grammar: expected, got, why, how to fix), never a raw TypeError."""

import numpy as np
import pytest

from nonn import KNN, KNNN, GlobalEigenKNN, LocalEigenKNN

X = np.random.default_rng(0).normal(size=(60, 6))


@pytest.mark.parametrize("cls,name", [(KNNN, "n_neighbors"), (KNNN, "n_neighbors_of_neighbors"),
                                      (KNNN, "set_size"), (KNN, "n_neighbors"),
                                      (LocalEigenKNN, "set_size"), (GlobalEigenKNN, "n_jobs")])
@pytest.mark.parametrize("value", [10**30, -(10**30), 2**63])
def test_huge_int_is_the_standard_parameter_error(cls, name, value):
    with pytest.raises(ValueError, match=rf"The '{name}' parameter of {cls.__name__} must be "
                       rf"(None or )?an int in the range .* Got {value} instead \(beyond the "
                       r"64-bit integer range\)\."):
        cls(**{name: value}).fit(X)


def test_huge_int_for_a_float_parameter():
    with pytest.raises(ValueError, match=r"The 'eig_floor' parameter of KNNN must be a float .*"
                       r"\(\d+ characters\) instead \(too large for a float\)\. For example"):
        KNNN(eig_floor=10**400).fit(X)
    # a big int that is a finite float is a valid floor
    assert KNNN(eig_floor=10**20).fit(X).eig_floor_rel_ == 1e20


def test_largest_64_bit_int_is_still_a_count():
    det = KNN(n_neighbors=2**63 - 1)
    with pytest.warns(UserWarning, match="n_neighbors"):
        det.fit(X)
    assert det.n_neighbors_ == len(X) - 1
