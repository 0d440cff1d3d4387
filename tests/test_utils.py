"""The plumbing helpers: ceil_div against math.ceil on exact fractions, add_to_class, in_ci."""
from fractions import Fraction
import math

import pytest

from qlora_mini.utils import add_to_class, ceil_div, in_ci


def test_ceil_div_matches_exact_ceiling():
    for a in [0, 1, 2, 63, 64, 65, 10**18 + 1]:
        for b in [1, 2, 3, 64, 256]:
            assert ceil_div(a, b) == math.ceil(Fraction(a, b))


def test_add_to_class_adds_a_method():
    class C:
        pass

    @add_to_class(C)
    def twice(self, x):
        return 2 * x

    assert C().twice(3) == 6 and C.twice is twice


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), ("TRUE", True),
                                             ("", False), ("0", False), ("false", False)])
def test_in_ci(monkeypatch, value, expected):
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_not_in_ci_when_unset(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert in_ci() is False
