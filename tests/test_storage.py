"""Chapter 3: 4-bit storage and double quantization, checked against bitsandbytes 0.50 on CPU."""
import math
import random

import pytest
import torch

import qlora_mini  # noqa: F401  (silences bitsandbytes' `kernels` log line before bnb loads)
import bitsandbytes.functional as bnbF
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from qlora_mini import storage
from qlora_mini.storage import (QuantState4bit, _dequantize_4bit_torch, bits_per_param,
                                dequantize_4bit, double_dequantize, from_bnb, quantize_4bit,
                                storage_nbytes, to_bnb)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def random_cases(n_cases, seed):
    """Random (W, blocksize, quant_type, double_quant): shapes with ragged last blocks and odd
    sizes, all three dtypes, scales from 1e-3 to 1e2, some heavy-tailed."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_cases):
        shape = rng.choice([(rng.randint(1, 700),), (rng.randint(1, 40), rng.randint(1, 90)),
                            (3, rng.randint(1, 30), 17)])
        W = torch.randn(shape, generator=gen)
        if rng.random() < 0.25:
            W = W.pow(3)  # heavy tails: a few large outliers per block
        W = W * 10 ** rng.uniform(-3, 2)
        yield (W.to(rng.choice(DTYPES)), rng.choice(BLOCKSIZES), rng.choice(["nf4", "fp4"]),
               rng.random() < 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_same_bytes_as_bitsandbytes(seed):
    for W, bs, qt, dq in random_cases(60, seed):
        packed, state = quantize_4bit(W, bs, qt, dq)
        bpacked, bstate = bnbF.quantize_4bit(W, blocksize=bs, quant_type=qt, compress_statistics=dq)
        case = f"{tuple(W.shape)} {W.dtype} blocksize={bs} {qt} dq={dq}"
        assert torch.equal(packed, bpacked.reshape(-1)), case
        assert torch.equal(state.absmax, bstate.absmax), case
        if dq:
            assert torch.equal(state.nested_absmax, bstate.state2.absmax), case
            assert torch.equal(state.offset, bstate.offset), case
            assert torch.equal(state.nested_code, bstate.state2.code), case
        assert torch.equal(state.code, bstate.code), case


def bnb_reference_dequant(bpacked, bstate, dtype):
    """bitsandbytes' own PyTorch formula (its default backend), for any shape. Its AVX-512 CPU
    kernel is wrong when the last dimension is not a multiple of the blocksize (see
    test_bitsandbytes_avx512_dequant_quirk), so this is the reference for ragged shapes."""
    absmax = bstate.absmax
    if bstate.nested:
        absmax = bnbF.dequantize_blockwise(bstate.absmax, bstate.state2) + bstate.offset
    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return fn(bpacked.reshape(-1), absmax, bstate.code, bstate.blocksize, bstate.shape, dtype)


@pytest.mark.parametrize("seed", range(2))
def test_dequantize_equals_bitsandbytes(seed):
    for W, bs, qt, dq in random_cases(40, 100 + seed):
        packed, state = quantize_4bit(W, bs, qt, dq)
        bpacked, bstate = bnbF.quantize_4bit(W, blocksize=bs, quant_type=qt, compress_statistics=dq)
        for dtype in DTYPES:
            ours = dequantize_4bit(packed, state, dtype)
            ref = bnb_reference_dequant(bpacked, bstate, dtype).reshape(W.shape)
            assert torch.equal(ours, ref), f"{tuple(W.shape)} {bs} {qt} dq={dq} -> {dtype}"
            if W.shape[-1] % bs == 0:  # where bnb's public CPU kernel is right, it agrees too
                bstate.dtype = dtype
                public = bnbF.dequantize_4bit(bpacked, bstate).reshape(W.shape)
                assert torch.equal(ours, public)


def test_conversion_each_way():
    """What one library quantizes, the other dequantizes to identical values."""
    for W, bs, qt, dq in random_cases(30, 7):
        packed, state = quantize_4bit(W, bs, qt, dq)
        bpacked, bstate = to_bnb(packed, state)
        assert torch.equal(bnb_reference_dequant(bpacked, bstate, W.dtype).reshape(W.shape),
                           dequantize_4bit(packed, state))
        bpacked2, bstate2 = bnbF.quantize_4bit(W, blocksize=bs, quant_type=qt, compress_statistics=dq)
        packed2, state2 = from_bnb(bpacked2, bstate2)
        assert torch.equal(dequantize_4bit(packed2, state2),
                           bnb_reference_dequant(bpacked2, bstate2, W.dtype).reshape(W.shape))


def test_bitsandbytes_avx512_dequant_quirk():
    """Documents (not hides) a bitsandbytes 0.50 CPU bug: with AVX-512, a last dimension smaller
    than the blocksize makes every row use the first row's absmax. Our result equals bnb's own
    PyTorch formula; the public CPU kernel differs. If this starts failing, bnb fixed it: good."""
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    bpacked, bstate = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4")
    packed, state = from_bnb(bpacked, bstate)
    ours = dequantize_4bit(packed, state)
    assert torch.equal(ours, bnb_reference_dequant(bpacked, bstate, W.dtype).reshape(W.shape))
    public = bnbF.dequantize_4bit(bpacked, bstate).reshape(W.shape)
    if not torch.equal(ours, public):
        pytest.xfail("bitsandbytes 0.50 AVX-512 CPU dequantize_4bit: wrong absmax when the last "
                     "dimension is not a multiple of the blocksize")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (63, 65), (2, 3, 129)])
def test_any_shape_round_trip(shape, dtype):
    W = torch.randn(shape).to(dtype)
    packed, state = quantize_4bit(W)
    assert packed.shape == (math.ceil(W.numel() / 2),) and packed.dtype == torch.uint8
    out = dequantize_4bit(packed, state)
    assert out.shape == W.shape and out.dtype == dtype
    err = (out.float() - W.float()).abs().max() / W.float().abs().max()
    assert err <= 0.5  # worst case: half the widest NF4 gap (0.32) of the block's absmax


def test_bits_per_param():
    W = torch.randn(1024, 1024)
    assert bits_per_param(*quantize_4bit(W, double_quant=False)) == 4.5
    dq = bits_per_param(*quantize_4bit(W, double_quant=True))
    # 4 + 8/64 + 32/(64*256) plus the 4-byte offset spread over a million weights
    assert dq == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / W.numel())


@pytest.mark.parametrize("bad, message", [
    (torch.arange(8), "float32, bfloat16 or float16"),
    (torch.randn(8, dtype=torch.complex64), "float32, bfloat16 or float16"),
    (torch.tensor([1.0, float("nan")]), "NaN/Inf"),
    (torch.tensor([1.0, float("inf")]), "NaN/Inf"),
    (torch.empty(0, 4), "empty"),
    ([1.0, 2.0], "torch.Tensor"),
])
def test_bad_weights(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        quantize_4bit(bad)


@pytest.mark.parametrize("blocksize", [16, 8192, 100, 64.0, "64"])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(torch.randn(64), blocksize=blocksize)


def test_bad_quant_type():
    with pytest.raises(ValueError, match="quant_type.*'nf4', 'fp4'"):
        quantize_4bit(torch.randn(64), quant_type="int3")


def test_state_must_match_packed():
    packed, state = quantize_4bit(torch.randn(64, 64))
    other_packed, other_state = quantize_4bit(torch.randn(32, 64))
    with pytest.raises(ValueError, match="another tensor"):
        dequantize_4bit(other_packed, state)
    with pytest.raises(ValueError, match="absmax"):
        dequantize_4bit(packed, QuantState4bit(**{**vars(state), "absmax": other_state.absmax}))
    with pytest.raises(TypeError, match="uint8"):
        dequantize_4bit(packed.float(), state)
    with pytest.raises(TypeError, match=r"QuantState4bit.*qlora_mini\.storage\.from_bnb"):
        dequantize_4bit(packed, to_bnb(packed, state)[1])
    assert callable(storage.from_bnb)                 # the conversion the message points to exists
    with pytest.raises(TypeError, match="dtype"):
        dequantize_4bit(packed, state, dtype=torch.int8)
    with pytest.raises(TypeError, match="state must be a QuantState4bit"):
        dequantize_4bit(packed, None)


def test_storage_nbytes_counts_what_is_stored():
    """The closed-form byte count used for LLaMA-65B equals the bytes of real (packed, state)."""
    rng = random.Random(3)
    for _ in range(40):
        n, bs, dq = rng.randint(1, 300_000), rng.choice(BLOCKSIZES), rng.random() < 0.5
        packed, state = quantize_4bit(torch.randn(n), bs, "nf4", dq)
        assert storage_nbytes(n, bs, dq) == packed.numel() + state.nbytes()


# ---------------------------------------------------------------- the reference
def _by_hand(packed, state, dtype):
    """The four readable steps: unpack, look up, scale per block, round once (no chunks)."""
    idx = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:state.numel].long()
    scale = double_dequantize(state).repeat_interleave(state.blocksize)[:state.numel]
    return (state.code[idx] * scale).to(dtype).view(state.shape)


@pytest.mark.parametrize("chunk", [32, 100, 4096, None])
def test_reference_in_chunks_equals_the_plain_steps(chunk):
    """Chunk borders inside, at and beyond ragged blocks and odd sizes give the same bits."""
    for W, bs, qt, dq in random_cases(12, 11):
        packed, state = quantize_4bit(W, bs, qt, dq)
        for dtype in DTYPES:
            want = _by_hand(packed, state, dtype)
            got = _dequantize_4bit_torch(packed, state, dtype, chunk=chunk)
            view = torch.int32 if dtype == torch.float32 else torch.int16
            assert torch.equal(got.view(view), want.view(view)), (tuple(W.shape), bs, qt, dq, chunk)


def test_reference_is_lean():
    """No int64 temporary as large as the output, fp32 temporaries of a chunk's size only (the
    old reference wrote int64 indices and several fp32 tensors of the whole output's size)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.rows += [(t.dtype, t.nbytes) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            return out

    n, chunk = 1 << 20, 1 << 16
    packed, state = quantize_4bit(torch.randn(n), 64, "nf4", True)
    with Sizes() as log:
        out = _dequantize_4bit_torch(packed, state, torch.bfloat16, chunk=chunk)
    assert out.nbytes == 2 * n
    assert max(b for dt, b in log.rows if dt == torch.int64) < out.nbytes / 8
    assert max(b for dt, b in log.rows if dt == torch.float32) <= 4 * chunk


def test_dequantize_4bit_is_the_reference():
    """Chapter 3's public function is the PyTorch reference and nothing else, on every dtype."""
    for W, bs, qt, dq in random_cases(6, 21):
        packed, state = quantize_4bit(W, bs, qt, dq)
        for dtype in DTYPES:
            view = torch.int32 if dtype == torch.float32 else torch.int16
            assert torch.equal(dequantize_4bit(packed, state, dtype).view(view),
                               _by_hand(packed, state, dtype).view(view))


def test_state_on_another_device_is_refused():
    """A state whose tensors live elsewhere than the packed codes is an error, not wrong values
    (the meta device stands in for a second device on a CPU-only machine)."""
    packed, state = quantize_4bit(torch.randn(4, 64))
    moved = QuantState4bit(**{**state.__dict__, "absmax": state.absmax.to("meta")})
    with pytest.raises(ValueError, match="state.absmax is on meta but packed is on cpu"):
        dequantize_4bit(packed, moved)


def test_extreme_weights_dequantize_like_bitsandbytes():
    """Issue 15 asked what [3e38, -3e38] gives with double quantization. Decision: the same bytes
    and the same values as bitsandbytes (finite, the weights themselves), checked here."""
    import bitsandbytes.functional as BF
    for W in (torch.tensor([3e38, -3e38]), torch.tensor([3.4e38, -3.4e38] * 32 + [1.0] * 64)):
        packed, state = quantize_4bit(W, double_quant=True)
        ref_packed, ref_state = BF.quantize_4bit(W, blocksize=64, quant_type="nf4",
                                                 compress_statistics=True)
        ours, theirs = dequantize_4bit(packed, state), BF.dequantize_4bit(ref_packed, ref_state)
        assert torch.equal(packed.view(-1), ref_packed.view(-1))
        assert torch.isfinite(ours).all() and torch.equal(ours, theirs.view(-1))
