import math
from dataclasses import dataclass, replace

import torch

from qlora_mini.codebooks import get_code

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # double quantization: one fp32 constant per 256 absmax values


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic map that double quantization stores the absmax in: (256,) float32,
    sorted. It is bitsandbytes' ``create_dynamic_map()``; we take it from there (teaching it is
    not the point of this chapter, being byte-compatible is)."""
    from bitsandbytes.functional import create_dynamic_map
    return create_dynamic_map(signed=True).float()


@dataclass
class QuantState4bit:
    """Everything besides the packed codes that dequantization needs.

    absmax: (n_blocks,) float32, or (n_blocks,) uint8 codes of (absmax - offset) when double
    quantized; then nested_absmax (ceil(n_blocks / 256),) float32, nested_code (256,) float32 and
    offset () float32 are set. code: (16,) float32 codebook indexed by the 4-bit code.
    """
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def to(self, device) -> "QuantState4bit":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, absmax=move(self.absmax), code=move(self.code), offset=move(self.offset),
                       nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code))

    def nbytes(self, include_codebooks: bool = False) -> int:
        """Bytes of the quantization constants. The codebooks (16 and 256 floats) are the same
        for every tensor of a model, so by default they are not charged to this one."""
        parts = [self.absmax, self.offset, self.nested_absmax]
        if include_codebooks:
            parts += [self.code, self.nested_code]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _check_blocksize(blocksize) -> None:
    ok = isinstance(blocksize, int) and 32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0
    if not ok:
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")


def _check_weight(W) -> None:
    """Refuse what would quantize to silent garbage: non-float, empty, NaN or Inf."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.dtype not in FLOAT_DTYPES:
        raise TypeError(f"W must be float32, bfloat16 or float16, got {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"W is empty (shape {tuple(W.shape)}): there is nothing to quantize")
    bad = (~torch.isfinite(W)).sum().item()
    if bad:
        raise ValueError(f"W has {bad} NaN/Inf value(s); quantizing them would corrupt their block")


def blockwise_absmax(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split flat x (n,) float32 into blocks (the last may be ragged) and scale each into [-1, 1].

    Returns (scaled (n,) float32, absmax (n_blocks,) float32). Like bitsandbytes, full blocks are
    multiplied by 1/absmax and the ragged tail is divided by its absmax: the last bit of the
    quotient can differ between the two, and we want the same bytes as bitsandbytes.
    """
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].view(-1, blocksize)                                 # (n_full, blocksize)
    absmax = blocks.abs().amax(dim=1)                                     # (n_full,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)  # (full,)
    if full < n:
        tail_absmax = x[full:].abs().amax().clamp(min=1e-38)             # ()
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, x[full:] / tail_absmax])
    return scaled.clamp(-1, 1), absmax


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry for each value: (n,) float32 → (n,) uint8.

    Sort the code, cut halfway between neighbours, and bucketize; a value exactly on a cut goes
    to the lower entry (as in bitsandbytes). For FP4 the sorted position maps back to the code.
    """
    order = torch.argsort(code)                                           # (k,) int64
    sorted_code = code[order]
    cuts = (sorted_code[:-1] + sorted_code[1:]) / 2                       # (k-1,) float32
    idx = torch.bucketize(scaled, cuts)                                   # (n,) int64, sorted index
    return order[idx].to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(n,) uint8 codes in 0..15, n even → (n/2,) uint8: element 2i in the high nibble."""
    return (codes[0::2] << 4) | codes[1::2]                               # (n/2,) uint8


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(ceil(n/2),) uint8 → (n,) int64 codes: the inverse of :func:`pack_nibbles`."""
    codes = torch.stack([packed >> 4, packed & 0xF], dim=-1)              # (n/2, 2) uint8
    return codes.view(-1)[:n].long()


def nearest_code_lut(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU rounding to a sorted 256-entry code: (n,) float32 in [-1, 1] → (n,) uint8.

    Not the exact nearest entry: the value is first snapped to one of 65,536 evenly spaced points
    in [-1, 1], and each point has a precomputed nearest code. Near a cut between two codes this
    can pick the farther one; we mirror it (float32 arithmetic, truncation) to get the same bytes.
    """
    grid = -1.0 + (2.0 * torch.arange(65536, device=scaled.device)) / 65535   # (65536,) float32
    cuts = 0.5 * (code[:-1] + code[1:])                                       # (255,) float32
    lut = torch.searchsorted(cuts, grid).to(torch.uint8)                      # (65536,) uint8
    point = ((scaled.clamp(-1, 1) + 1.0) * 0.5) * 65535.0 + 0.5               # (n,) float32
    return lut[point.long()]


def quantize_absmax(absmax: torch.Tensor) -> dict:
    """Double quantization: store absmax - mean(absmax) as 8-bit dynamic codes in blocks of 256.

    (n_blocks,) float32 → uint8 codes (n_blocks,), nested absmax (ceil(n_blocks/256),) float32,
    the (256,) dynamic code and the scalar offset. (bitsandbytes' CPU kernel multiplies every
    block, the ragged one too, by 1/absmax, and writes code 0 for an all-zero block.)
    """
    n, bs = absmax.numel(), NESTED_BLOCKSIZE
    offset = absmax.mean()                                                    # () float32
    centered = torch.nn.functional.pad(absmax - offset, (0, -n % bs)).view(-1, bs)  # (nb2, 256)
    nested_absmax = centered.abs().amax(dim=1)                                # (nb2,) float32
    scaled = (centered * (1.0 / nested_absmax)[:, None]).view(-1)[:n]         # (n,) float32
    nested_code = dynamic_code().to(absmax.device)
    codes = nearest_code_lut(scaled.nan_to_num(0.0), nested_code)             # (n,) uint8
    codes[(nested_absmax == 0).repeat_interleave(bs)[:n]] = 0
    return dict(absmax=codes, offset=offset, nested_absmax=nested_absmax, nested_code=nested_code)


def dequantize_absmax(state: QuantState4bit) -> torch.Tensor:
    """The fp32 absmax per block: stored directly, or rebuilt from its 8-bit codes."""
    if not state.double_quant:
        return state.absmax
    n = state.absmax.numel()
    values = state.nested_code[state.absmax.long()]                        # (n_blocks,) float32
    scale = state.nested_absmax.repeat_interleave(state.nested_blocksize)[:n]  # (n_blocks,)
    return values * scale + state.offset


def quantize_4bit(W: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                  double_quant: bool = True) -> tuple[torch.Tensor, QuantState4bit]:
    """Quantize W (any shape; float32/bfloat16/float16) to packed 4-bit codes.

    Returns (packed (ceil(W.numel()/2),) uint8, state). Byte-compatible with bitsandbytes 0.50's
    ``quantize_4bit(W, blocksize, quant_type=..., compress_statistics=double_quant)``.
    """
    _check_weight(W)
    _check_blocksize(blocksize)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    code = get_code(quant_type).to(W.device)                              # (16,) float32
    scaled, absmax = blockwise_absmax(W.reshape(-1).float(), blocksize)   # (n,), (n_blocks,)
    scaled = torch.nn.functional.pad(scaled, (0, scaled.numel() % 2))      # even length: a 0 pads
    packed = pack_nibbles(nearest_code(scaled, code))                     # (ceil(n/2),) uint8
    state = QuantState4bit(absmax=absmax, shape=W.shape, dtype=W.dtype, blocksize=blocksize,
                           quant_type=quant_type, code=code)
    if double_quant:
        state = replace(state, **quantize_absmax(absmax))
    return packed, state


def check_state(packed: torch.Tensor, state: QuantState4bit) -> None:
    """Refuse a state that does not describe ``packed``: sizes, dtypes and fields must agree."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    if not isinstance(state, QuantState4bit):
        raise TypeError(f"state must be a QuantState4bit, got {type(state).__name__} "
                        "(convert a bitsandbytes QuantState with QuantState4bit.from_bnb)")
    _check_blocksize(state.blocksize)
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(f"state.quant_type must be one of {QUANT_TYPES}, got {state.quant_type!r}")
    if packed.numel() != -(-state.numel // 2):
        raise ValueError(f"packed has {packed.numel()} bytes but state.shape {tuple(state.shape)} "
                         f"needs {-(-state.numel // 2)}: this state belongs to another tensor")
    if state.absmax.numel() != state.n_blocks:
        raise ValueError(f"state.absmax has {state.absmax.numel()} entries, expected {state.n_blocks} "
                         f"blocks of {state.blocksize}")
    expect = torch.uint8 if state.double_quant else torch.float32
    if state.absmax.dtype != expect:
        raise ValueError(f"state.absmax must be {expect} (double_quant={state.double_quant}), "
                         f"got {state.absmax.dtype}")
    if state.double_quant and state.nested_absmax.numel() != -(-state.n_blocks // state.nested_blocksize):
        raise ValueError(f"state.nested_absmax has {state.nested_absmax.numel()} entries, expected "
                         f"{-(-state.n_blocks // state.nested_blocksize)}")


def dequantize_4bit(packed: torch.Tensor, state: QuantState4bit,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Packed 4-bit codes back to a tensor of ``state.shape`` in ``dtype`` (default: the dtype
    that was quantized). Each value is code[c] * absmax of its block, computed in float32 and
    rounded once to ``dtype``, as bitsandbytes does. CUDA tensors go to the compiled kernel
    (chapter 4) when it is available."""
    check_state(packed, state)
    dtype = state.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if packed.is_cuda:
        from qlora_mini import kernels
        if kernels.available():
            return kernels.dequantize_4bit_cuda(packed, state, dtype)
    return _dequantize_4bit_torch(packed, state, dtype)


def _dequantize_4bit_torch(packed, state, dtype):
    """The PyTorch reference: the specification the CUDA kernel is tested against."""
    n, bs = state.numel, state.blocksize
    values = state.code[unpack_nibbles(packed.reshape(-1), n)]            # (n,) float32
    absmax = dequantize_absmax(state)                                     # (n_blocks,) float32
    pad = state.n_blocks * bs - n
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, bs)       # (n_blocks, bs)
    out = (values * absmax[:, None]).view(-1)[:n]                         # (n,) float32
    return out.to(dtype).view(state.shape)


def to_bnb(packed: torch.Tensor, state: QuantState4bit):
    """Our (packed, state) as bitsandbytes' (packed (ceil(n/2), 1) uint8, QuantState)."""
    from bitsandbytes.functional import QuantState
    check_state(packed, state)
    state2 = None
    if state.double_quant:
        state2 = QuantState(absmax=state.nested_absmax, code=state.nested_code,
                            blocksize=state.nested_blocksize, dtype=torch.float32)
    qs = QuantState(absmax=state.absmax, shape=torch.Size(state.shape), code=state.code,
                    blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype,
                    offset=state.offset, state2=state2)
    return packed.reshape(-1, 1), qs


def from_bnb(packed: torch.Tensor, qs) -> tuple[torch.Tensor, QuantState4bit]:
    """bitsandbytes' (packed, QuantState) as our (packed (ceil(n/2),) uint8, QuantState4bit)."""
    nested = {}
    if qs.nested:
        nested = dict(offset=qs.offset.float().reshape(()), nested_absmax=qs.state2.absmax,
                      nested_code=qs.state2.code, nested_blocksize=qs.state2.blocksize)
    state = QuantState4bit(absmax=qs.absmax, shape=torch.Size(qs.shape), dtype=qs.dtype,
                           blocksize=qs.blocksize, quant_type=qs.quant_type, code=qs.code, **nested)
    packed = packed.reshape(-1).view(torch.uint8)
    check_state(packed, state)
    return packed, state


def bits_per_param(packed: torch.Tensor, state: QuantState4bit) -> float:
    """Bits of actual storage per parameter: packed codes plus quantization constants."""
    return 8 * (packed.numel() * packed.element_size() + state.nbytes()) / state.numel
