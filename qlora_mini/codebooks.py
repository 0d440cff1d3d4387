import torch
from scipy.stats import norm

NF4_OFFSET = 0.9677083  # the outermost quantile: norm.ppf(0.9677083) ≈ 1.848 standard deviations


def normal_float_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """NF4: 8 positive and 7 negative quantiles of N(0, 1) plus an exact zero, scaled to [-1, 1].

    The probabilities are spaced in float32 as bitsandbytes' ``create_normal_map`` spaces them, so
    the 16 values agree with bitsandbytes' to the last bit. Returns (16,) float32, sorted.
    """
    p_pos = torch.linspace(offset, 0.5, 9)[:-1]            # (8,) float32, offset → 0.5
    p_neg = torch.linspace(offset, 0.5, 8)[:-1]            # (7,) float32
    pos = norm.ppf(p_pos.tolist())                         # (8,) float64, positive quantiles
    neg = -norm.ppf(p_neg.tolist())                        # (7,) float64, negative quantiles
    code = torch.tensor([*pos, 0.0, *neg], dtype=torch.float32).sort().values  # (16,)
    return code / code.max()


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 (E2M1 variant), in code order 0..15: bit 3 is the sign, bits 2-1 the
    exponent e, bit 0 the mantissa m. e > 0 gives 2**(4 - e) * (1 + m/2); e = 0 gives 0 or 1/16.
    Scaled by the largest magnitude (12). Returns (16,) float32, NOT sorted."""
    c = torch.arange(16)
    sign = 1 - 2 * (c >> 3)                                # (16,) ±1
    e, m = (c >> 1) & 3, c & 1                             # (16,) exponent and mantissa bits
    mag = torch.where(e > 0, 2.0 ** (4 - e) * (1 + m / 2), m * 0.0625)
    code = (sign * mag).float()
    return code / code.abs().max()


def int4_code() -> torch.Tensor:
    """Symmetric integer 4-bit code, bitsandbytes' 'int4' layout: 7..0, -0..-7 over 7. (16,)."""
    return torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, -0.0, -1, -2, -3, -4, -5, -6, -7]) / 7


def get_code(quant_type: str) -> torch.Tensor:
    """The (16,) float32 codebook of "nf4", "fp4" or "int4", indexed by the 4-bit code."""
    makers = {"nf4": normal_float_code, "fp4": fp4_code, "int4": int4_code}
    if quant_type not in makers:
        raise ValueError(f"quant_type must be one of {sorted(makers)}, got {quant_type!r}")
    return makers[quant_type]()
