"""Tests for qlora_mini.quantization (chapter 1): absmax, blockwise round trips, quantile codes."""
import math

import pytest
import torch
from scipy.stats import norm

import qlora_mini  # noqa: F401  (silences bitsandbytes' log line)
from qlora_mini.codebooks import get_code
from qlora_mini.quantization import (absmax_dequantize, absmax_quantize, code_entropy,
                                     dequantize_blockwise, empirical_quantile, linear_code,
                                     normalized_mse, quantile_code, quantile_code_estimate,
                                     quantize_blockwise, round_to_code)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- absmax int8
def test_absmax_int8_round_trip_error_is_at_most_half_a_step():
    x = randn(1000)
    q, absmax = absmax_quantize(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert q.abs().max() == 127 and absmax == x.abs().max()
    assert (absmax_dequantize(q, absmax) - x).abs().max() <= absmax / 254 + 1e-6


def test_absmax_int8_one_outlier_zeroes_small_values():
    x = randn(4096)
    x[0] = 60.0
    x_hat = absmax_dequantize(*absmax_quantize(x))
    small = x.abs() < 60.0 / 254 * 0.99
    assert (x_hat[small] == 0).all()
    assert normalized_mse(x[1:], x_hat[1:]) > 50 * normalized_mse(
        x[1:], absmax_dequantize(*absmax_quantize(x[1:])))


def test_normalized_mse_basics():
    x = randn(100)
    assert normalized_mse(x, x) == 0
    assert normalized_mse(x, torch.zeros_like(x)) == pytest.approx(1.0)
    assert normalized_mse(x, 2 * x) == pytest.approx(1.0)


# ---------------------------------------------------------------- nearest level
@pytest.mark.parametrize("name", ["nf4", "fp4", "int4"])
def test_round_to_code_is_the_nearest_level(name):
    code = get_code(name)
    x = torch.rand(5000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    idx = round_to_code(x, code).long()
    dist = (x[:, None] - code[None, :]).abs()                  # (n, 16)
    assert torch.allclose(dist[torch.arange(len(x)), idx], dist.min(dim=1).values)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_storage_indices_are_the_nearest_levels(quant_type):
    """Chapter 3's 4-bit indices are chapter 1's nearest-level rounding, recomputed here another
    way: the sorted position is the number of float32 cuts (midpoints between neighbouring
    levels) strictly below the value, so a value on a cut goes to the lower level. The blocks
    hold values on every cut and have absmax 1 (scaled == x)."""
    from qlora_mini.storage import quantize_4bit, unpack_nibbles
    code = get_code(quant_type)
    order = torch.argsort(code, stable=True)                     # sorted position -> index
    levels = code[order]
    cuts = (levels[:-1] + levels[1:]) / 2                        # (15,) float32
    x = randn(64, 64, seed=6).clamp(-0.99, 0.99)
    x[:, 0] = 1.0
    x[:, 1:16] = cuts                                            # every tie, in every block
    packed, _ = quantize_4bit(x, 64, quant_type, double_quant=False)
    idx = unpack_nibbles(packed, x.numel())
    want = order[(x.reshape(-1, 1) > cuts[None, :]).sum(dim=1)]
    assert torch.equal(idx, want)
    dist = (x.reshape(-1, 1) - code[None, :]).abs()              # and it is a nearest level
    assert torch.allclose(dist.gather(1, idx[:, None]), dist.min(dim=1, keepdim=True).values)


def test_round_to_code_ties_go_to_the_lower_level():
    code = torch.tensor([0.0, 1.0])
    assert round_to_code(torch.tensor([0.5]), code).item() == 0


# ---------------------------------------------------------------- blockwise
@pytest.mark.parametrize("name", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("shape,blocksize", [((64, 64), 64), ((7, 33), 64), ((1000,), 100),
                                             ((3, 5), 4096), ((1,), 32)])
def test_blockwise_round_trip_properties(name, shape, blocksize):
    code = get_code(name)
    x = randn(*shape, seed=3)
    idx, absmax = quantize_blockwise(x, code, blocksize)
    n = x.numel()
    assert idx.dtype == torch.uint8 and idx.shape == (n,) and int(idx.max()) < 16
    assert absmax.dtype == torch.float32 and absmax.shape == (math.ceil(n / blocksize),)
    flat = torch.nn.functional.pad(x.reshape(-1), (0, absmax.numel() * blocksize - n))
    assert torch.equal(absmax, flat.view(-1, blocksize).abs().amax(dim=1))
    x_hat = dequantize_blockwise(idx, absmax, code, blocksize, x.shape)
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    # every value is within half the largest gap between levels (times its block's absmax)
    gap = code.sort().values.diff().max()
    per_value = absmax.repeat_interleave(blocksize)[:n].view(x.shape)
    assert ((x - x_hat).abs() <= gap / 2 * per_value + 1e-6).all()
    # each block's absmax is stored exactly (±1 are levels of every 4-bit code)
    assert torch.allclose(x_hat.reshape(-1).abs().max(), x.abs().max())


def test_blockwise_codebook_values_survive_exactly():
    code = get_code("nf4")
    x = code.repeat(4) * 3.0                      # blocks of 16 values, each block's absmax is 3
    idx, absmax = quantize_blockwise(x, code, 16)
    assert torch.equal(dequantize_blockwise(idx, absmax, code, 16, x.shape), x)


def test_blockwise_zeros_stay_zeros():
    x = torch.zeros(100)
    for name in ["nf4", "fp4", "int4"]:
        idx, absmax = quantize_blockwise(x, get_code(name), 64)
        assert (dequantize_blockwise(idx, absmax, get_code(name), 64, x.shape) == 0).all()


def test_blockwise_linear_8bit_with_one_block_is_absmax_int8():
    x = randn(300)
    idx, absmax = quantize_blockwise(x, linear_code(8), 512)
    q, a = absmax_quantize(x)
    assert torch.equal(idx.long() - 127, q.long()) and torch.equal(absmax[0], a)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_blockwise_equals_bitsandbytes(quant_type):
    import bitsandbytes.functional as F
    W = randn(128, 192, seed=4)                    # in_features a multiple of 64 (bnb CPU bug)
    packed, qs = F.quantize_4bit(W, blocksize=64, quant_type=quant_type)
    idx, absmax = quantize_blockwise(W, get_code(quant_type), 64)
    bnb_idx = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], dim=-1).view(-1)
    assert torch.equal(idx, bnb_idx) and torch.equal(absmax, qs.absmax)
    x_hat = dequantize_blockwise(idx, absmax, get_code(quant_type), 64, W.shape)
    assert torch.equal(x_hat, F.dequantize_4bit(packed, qs))


def test_blockwise_works_with_an_unsorted_many_level_code():
    code = linear_code(6)[torch.randperm(63, generator=torch.Generator().manual_seed(5))]
    x = randn(1000)
    idx, absmax = quantize_blockwise(x, code, 64)
    x_hat = dequantize_blockwise(idx, absmax, code, 64, x.shape)
    assert normalized_mse(x, x_hat) < 1e-3


# ---------------------------------------------------------------- quantiles and entropy
def test_empirical_quantile_matches_torch_quantile():
    x = randn(999)
    p = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    assert torch.allclose(empirical_quantile(x, p), torch.quantile(x.double(), p))


def test_quantile_code_is_close_to_normal_quantiles():
    x = randn(2**16)
    exact = quantile_code(x, 4)
    theory = torch.tensor(norm.ppf((torch.arange(16) + 0.5).numpy() / 16), dtype=torch.float32)
    assert exact.shape == (16,) and exact.dtype == torch.float32
    assert torch.all(exact.diff() > 0)
    assert (exact - theory).abs().max() < 0.03


def test_quantile_code_estimate_is_the_papers_formula():
    x = torch.arange(1, 18, dtype=torch.float32)   # 17 values: Q_X(j/17) is easy to write down
    est = quantile_code_estimate(x, 4)
    q = empirical_quantile(x, torch.arange(17, dtype=torch.float64) / 17)
    assert torch.allclose(est.double(), (q[:-1] + q[1:]) / 2)
    assert est.shape == (16,) and torch.all(est.diff() > 0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantile_code_entropy_is_about_bits(bits):
    x = randn(2**15)
    idx = round_to_code(x, quantile_code(x, bits))
    assert code_entropy(idx, 2**bits) > bits - 0.03
    assert code_entropy(idx, 2**bits) <= bits + 1e-9


def test_uniform_levels_carry_less_entropy_than_quantile_levels():
    x = randn(2**15)
    c_lin, _ = quantize_blockwise(x, linear_code(4), x.numel())
    c_q = round_to_code(x, quantile_code(x, 4))
    assert code_entropy(c_lin, 16) < 3.0 < 3.95 < code_entropy(c_q, 16)


def test_code_entropy_extremes():
    assert code_entropy(torch.zeros(10, dtype=torch.uint8), 16) == 0
    assert code_entropy(torch.arange(16).repeat(3), 16) == pytest.approx(4.0)


# ---------------------------------------------------------------- bad inputs name the argument
@pytest.mark.parametrize("call,exc,name", [
    (lambda: absmax_quantize([1.0, 2.0]), TypeError, "x"),
    (lambda: absmax_quantize(torch.arange(4)), TypeError, "x"),
    (lambda: absmax_quantize(torch.empty(0)), ValueError, "x"),
    (lambda: absmax_quantize(torch.tensor([1.0, float("nan")])), ValueError, "x"),
    (lambda: absmax_dequantize(torch.zeros(3), torch.tensor(1.0)), TypeError, "q"),
    (lambda: quantize_blockwise(torch.tensor([1.0, float("inf")]), get_code("nf4"), 64),
     ValueError, "x"),
    (lambda: quantize_blockwise(torch.ones(8), get_code("nf4"), 0), ValueError, "blocksize"),
    (lambda: quantize_blockwise(torch.ones(8), get_code("nf4"), 64.0), ValueError, "blocksize"),
    (lambda: quantize_blockwise(torch.ones(8), [0.0, 1.0], 64), TypeError, "code"),
    (lambda: quantize_blockwise(torch.ones(8), torch.zeros(300), 64), ValueError, "code"),
    (lambda: dequantize_blockwise(torch.zeros(7, dtype=torch.uint8), torch.ones(1),
                                  get_code("nf4"), 64, (8,)), ValueError, "idx"),
    (lambda: dequantize_blockwise(torch.zeros(8, dtype=torch.uint8), torch.ones(2),
                                  get_code("nf4"), 64, (8,)), ValueError, "absmax"),
    (lambda: quantile_code(torch.ones(8), 0), ValueError, "bits"),
    (lambda: quantile_code(torch.ones(8), 9), ValueError, "bits"),
    (lambda: quantile_code_estimate(torch.ones(8), 2.0), ValueError, "bits"),
    (lambda: linear_code(1), ValueError, "bits"),
    (lambda: code_entropy(torch.ones(3), 4), TypeError, "idx"),
    (lambda: code_entropy(torch.tensor([0, 5]), 4), ValueError, "idx"),
    (lambda: code_entropy(torch.tensor([0, 1]), 0), ValueError, "k"),
    (lambda: normalized_mse(torch.ones(3), torch.ones(4)), ValueError, "x_hat"),
    (lambda: empirical_quantile(torch.ones(3), torch.tensor([1.5])), ValueError, "p"),
])
def test_bad_inputs_raise_naming_the_argument(call, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        call()
