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


def test_add_to_class_adds_a_property():
    class C:
        def __init__(self):
            self.x = 5

    @add_to_class(C)
    @property
    def doubled(self):
        return 2 * self.x

    assert C().doubled == 10 and isinstance(C.__dict__["doubled"], property)


@pytest.mark.parametrize("value, expected", [("true", True), ("1", True), ("TRUE", True),
                                             ("", False), ("0", False), ("false", False)])
def test_in_ci(monkeypatch, value, expected):
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_not_in_ci_when_unset(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert in_ci() is False


def test_gpu_datasheet_numbers_live_in_one_place():
    """Every chapter's roofline reads qlora_mini.utils.GPU_DATASHEETS: no notebook's or module's
    source types one of its numbers again (outputs are not searched)."""
    import json
    import re
    from pathlib import Path

    from qlora_mini.utils import GPU_DATASHEETS
    root = Path(__file__).resolve().parents[1]
    values = {v for d in GPU_DATASHEETS.values() for v in d.values() if v}
    spellings = {f"{v:g}" for v in values} | {f"{v / 1e12:g}e12" for v in values}
    pattern = re.compile(r"(?<![\d.])(" + "|".join(re.escape(s) for s in spellings) + r")(?![\d])")
    sources = {p: p.read_text() for p in (root / "qlora_mini").glob("*.py") if p.name != "utils.py"}
    for nb in (root / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        sources[nb] = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    found = {str(p.relative_to(root)): pattern.findall(text) for p, text in sources.items()}
    assert not {p: f for p, f in found.items() if f}
    assert pattern.findall("peak = 989e12") and pattern.findall("bw = 3.35e12")  # it can fail
