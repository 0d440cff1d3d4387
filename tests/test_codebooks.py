"""Tests for qlora_mini.codebooks (chapter 2): NF4, FP4 and Int4 against bitsandbytes."""
import ast
import inspect
import re

import pytest
import torch
from scipy.stats import norm

import qlora_mini  # noqa: F401  (silences bitsandbytes' log line)
import bitsandbytes.functional as F
from qlora_mini.codebooks import NF4_OFFSET, fp4_code, get_code, int4_code, normal_float_code
from qlora_mini.quantization import (dequantize_blockwise, normalized_mse, quantize_blockwise,
                                     round_to_code)


def bnb_int4():
    """bitsandbytes' Int4 table. get_4bit_type("int4") raises in 0.50.2 (it divides an integer
    tensor in place), so fall back to the list in its source when it does."""
    try:
        return F.get_4bit_type("int4", device="cpu")
    except RuntimeError:
        source = inspect.getsource(F.get_4bit_type)
        listed = ast.literal_eval(re.search(r'"int4":\s*data = (\[[^\]]*\])', source).group(1))
        return torch.tensor(listed, dtype=torch.float32) / max(abs(v) for v in listed)


def test_nf4_equals_bitsandbytes_exactly():
    ours, theirs = normal_float_code(), F.get_4bit_type("nf4", device="cpu")
    assert (ours - theirs).abs().max() <= 1e-7
    assert torch.equal(ours, theirs)                    # in fact bit for bit


def test_nf4_equals_create_normal_map():
    m = F.create_normal_map()                           # (256,): 16 distinct values, 241 zeros
    assert m.numel() == 256 and torch.equal(normal_float_code(), m.unique())


@pytest.mark.parametrize("offset", [0.95, 0.99])
def test_normal_float_code_other_offsets_match_create_normal_map(offset):
    assert torch.equal(normal_float_code(offset), F.create_normal_map(offset).unique())


def test_nf4_structure():
    code = normal_float_code()
    assert code.shape == (16,) and code.dtype == torch.float32
    assert torch.all(code.diff() > 0)                   # sorted, 16 distinct levels
    assert code[0] == -1 and code[7] == 0 and code[15] == 1
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7
    # the positive levels are normal quantiles divided by the outermost one
    p = torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double().numpy()
    expect = torch.tensor(norm.ppf(p) / norm.ppf(NF4_OFFSET), dtype=torch.float32).flip(0)
    assert torch.allclose(code[8:], expect, atol=1e-6)


def test_nf4_offset_is_the_papers_and_bitsandbytes():
    """The outermost probability: the paper's 1 - delta with delta = (1/30 + 1/32) / 2 (halfway
    between the 15- and 16-level spacings), and bitsandbytes' create_normal_map default."""
    assert NF4_OFFSET == pytest.approx(1 - (1 / 30 + 1 / 32) / 2, abs=5e-8)
    assert NF4_OFFSET == inspect.signature(F.create_normal_map).parameters["offset"].default


def test_fp4_equals_bitsandbytes():
    assert torch.equal(fp4_code(), F.get_4bit_type("fp4", device="cpu"))


def test_fp4_decodes_sign_exponent_mantissa():
    magnitudes = [0, 0.0625, 8, 12, 4, 6, 2, 3]         # codes 0..7, bitsandbytes' E2M1 variant
    code = fp4_code() * 12
    assert torch.allclose(code[:8], torch.tensor(magnitudes, dtype=torch.float32))
    assert torch.equal(code[8:], -code[:8])             # bit 3 is the sign


def test_int4_equals_bitsandbytes():
    assert torch.equal(int4_code(), bnb_int4())
    assert torch.equal(int4_code().sort().values.unique(), torch.arange(-7, 8) / 7)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_get_code(quant_type):
    code = get_code(quant_type)
    assert code.shape == (16,) and code.dtype == torch.float32
    assert code.abs().max() == 1


@pytest.mark.parametrize("bad", ["NF4", "af4", "int8", None, 4])
def test_get_code_rejects_unknown_types_naming_the_argument(bad):
    with pytest.raises(ValueError, match="quant_type"):
        get_code(bad)


def test_codes_round_trip_through_their_own_levels():
    for name in ["nf4", "fp4", "int4"]:
        code = get_code(name)
        idx = round_to_code(code, code).long()
        assert torch.equal(code[idx], code)             # each level maps to itself (±0 aside)


def test_nf4_has_the_lowest_error_on_gaussian_blocks_and_int4_beats_fp4():
    x = torch.randn(2**14, generator=torch.Generator().manual_seed(0))
    err = {}
    for name in ["nf4", "fp4", "int4"]:
        idx, absmax = quantize_blockwise(x, get_code(name), 64)
        err[name] = normalized_mse(x, dequantize_blockwise(idx, absmax, get_code(name), 64, x.shape))
    assert err["nf4"] < err["int4"] < err["fp4"]
