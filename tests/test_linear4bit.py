"""Chapter 5: Linear4bit, checked against F.linear on the dequantized weight and bitsandbytes 0.50."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qlora_mini  # noqa: F401  (silences bitsandbytes' `kernels` log line before bnb loads)
import bitsandbytes as bnb
from qlora_mini.linear4bit import Linear4bit, linear4bit_nbytes, quantize_model
from qlora_mini.memory import SavedTensors
from qlora_mini.storage import dequantize_4bit, quantize_4bit

# in_features multiples of 64: bitsandbytes' AVX-512 CPU dequantization is wrong otherwise.
SHAPES = [(64, 32), (128, 96), (320, 200)]
# bitsandbytes' fused CPU inference kernel also needs out_features to be a multiple of 32.
SHAPES_BNB = [(64, 32), (128, 96), (320, 224)]


def make(in_features, out_features, bias=True, seed=0, **kw):
    """A seeded nn.Linear and its Linear4bit, computing in bf16 (the paper's) unless kw says else:
    explicit, as the default is bf16 only on a CPU that has it natively (tests/test_utils.py)."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    return linear, Linear4bit.from_linear(linear, **{"compute_dtype": torch.bfloat16, **kw})


@pytest.mark.parametrize("in_features,out_features", SHAPES)
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
def test_forward_equals_linear_on_dequantized(in_features, out_features, quant_type, double_quant,
                                              compute_dtype):
    linear, layer = make(in_features, out_features, quant_type=quant_type, double_quant=double_quant,
                         compute_dtype=compute_dtype)
    packed, state = quantize_4bit(linear.weight.detach(), 64, quant_type, double_quant)
    assert torch.equal(layer.packed, packed)
    assert torch.equal(layer.dequantize(), dequantize_4bit(packed, state))
    x = torch.randn(2, 5, in_features)
    y = layer(x)
    assert y.dtype == compute_dtype and y.shape == (2, 5, out_features)
    W = dequantize_4bit(packed, state, compute_dtype)
    assert torch.equal(y, F.linear(x.to(compute_dtype), W, linear.bias.to(compute_dtype)))


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_input_gradient_equals_autograd_through_dequantized(compute_dtype, x_dtype):
    linear, layer = make(128, 96, compute_dtype=compute_dtype)
    x = torch.randn(3, 7, 128, dtype=x_dtype)
    g = torch.randn(3, 7, 96)
    x1 = x.clone().requires_grad_()
    (layer(x1).float() * g).sum().backward()
    x2 = x.clone().requires_grad_()
    W = layer.dequantize(compute_dtype)
    (F.linear(x2.to(compute_dtype), W, linear.bias.to(compute_dtype)).float() * g).sum().backward()
    assert x1.grad.dtype == x_dtype
    assert torch.equal(x1.grad, x2.grad)


def test_frozen_no_weight_gradient():
    _, layer = make(64, 32)
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias", "packed"]
    assert not any(p.requires_grad for p in layer.parameters())
    assert not isinstance(getattr(layer, "weight", None), nn.Parameter)
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    assert layer.bias.grad is None and layer.packed.grad is None and x.grad is not None


def test_bias_gradient_if_unfrozen():
    linear, layer = make(64, 32, compute_dtype=torch.float32)
    layer.bias.requires_grad_(True)
    x = torch.randn(3, 4, 64)
    layer(x).pow(2).sum().backward()
    b = linear.bias.detach().clone().requires_grad_()
    F.linear(x, layer.dequantize(torch.float32), b).pow(2).sum().backward()
    torch.testing.assert_close(layer.bias.grad, b.grad)


def test_no_bias():
    linear, layer = make(64, 32, bias=False)
    assert layer.bias is None
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), F.linear(x.bfloat16(), layer.dequantize(torch.bfloat16)))


def test_nothing_of_weight_size_saved_for_backward():
    _, layer = make(512, 384)
    x = torch.randn(16, 512, requires_grad=True)
    with SavedTensors(layer) as ours:
        layer(x)
    assert ours.nbytes == 0                            # only references to the layer's own buffers
    assert all(excluded for *_, excluded in ours.records)
    with SavedTensors() as everything:
        layer(x)
    held = sum(b.nbytes for b in layer.buffers()) + layer.packed.nbytes
    assert everything.nbytes == held < 512 * 384 * 2 // 3
    with SavedTensors(layer) as plain:
        x.bfloat16() @ layer.dequantize(torch.bfloat16).T
    assert plain.nbytes >= 512 * 384 * 2               # the 16-bit weight is kept alive


def test_backward_dequantizes_again(monkeypatch):
    from qlora_mini import kernels           # the dispatcher chapter 5 calls by name
    calls = []
    real = kernels.dequantize_4bit
    monkeypatch.setattr(kernels, "dequantize_4bit",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    _, layer = make(64, 32)
    x = torch.randn(2, 64, requires_grad=True)
    y = layer(x)
    assert len(calls) == 1
    y.sum().backward()
    assert len(calls) == 2


def test_state_dict_round_trip():
    _, layer = make(128, 64)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = Linear4bit(128, 64, compute_dtype=torch.bfloat16)   # not in a state_dict: as made
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))
    assert set(layer.state_dict()) == {"bias", "packed", "absmax", "code", "offset", "nested_absmax",
                                       "nested_code"}
    with pytest.raises(RuntimeError):                  # a non-DQ layer has no nested constants
        Linear4bit(128, 64, double_quant=False).load_state_dict(layer.state_dict())


def test_state_follows_buffers_and_meta():
    layer = Linear4bit(128, 64, device="meta")
    assert layer.packed.is_meta and layer.state.absmax.is_meta
    layer = Linear4bit(128, 64, quant_type="fp4", double_quant=False)
    assert layer.state.absmax is layer.absmax and layer.state.quant_type == "fp4"
    assert layer.state.absmax.dtype == torch.float32 and layer.offset is None


def test_buffer_bytes_formula():
    for (i, o) in SHAPES + [(4096, 11008 // 64)]:
        for dq in (True, False):
            layer = Linear4bit(i, o, double_quant=dq)
            held = sum(b.nbytes for b in layer.buffers()) + layer.packed.nbytes
            assert held == linear4bit_nbytes(i, o, 64, dq)


@pytest.mark.parametrize("in_features,out_features", SHAPES_BNB)
def test_against_bitsandbytes(in_features, out_features):
    linear, layer = make(in_features, out_features)
    ref = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.bfloat16,
                            compress_statistics=True, quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, module=ref)
    ref.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    ref = ref.to("cpu")                                # bitsandbytes quantizes here
    assert torch.equal(ref.weight.data.view(-1), layer.packed)
    W_ref = bnb.functional.dequantize_4bit(ref.weight.data, ref.weight.quant_state)
    assert torch.equal(W_ref, layer.dequantize())
    # Training path (x requires grad): bnb dequantizes to bf16 and calls F.linear, as we do: equal.
    x = torch.randn(2, 9, in_features)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x1), layer(x2)                      # bnb returns x's dtype, we the compute dtype
    assert torch.equal(y_ref, y.float())
    y_ref.sum().backward()
    y.float().sum().backward()
    assert torch.equal(x1.grad, x2.grad)
    # Inference path (eval, no grad): bnb's fused AVX-512 bf16 CPU kernel accumulates in another
    # order, so outputs differ by bf16 rounding: at most 2 bf16 ulps of the largest output.
    ref.eval()
    with torch.no_grad():
        y_inf = ref(x)
    tol = 2 * 2.0 ** -7 * y.float().abs().max().item()
    assert (y_inf - y.float()).abs().max().item() <= tol


def test_bad_input_errors():
    _, layer = make(64, 32)
    with pytest.raises(ValueError, match="in_features=64"):
        layer(torch.randn(4, 63))
    with pytest.raises(ValueError, match="in_features=64"):
        layer(torch.randn(64, 4))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="quant_type"):
        Linear4bit(64, 32, quant_type="int3")
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit(64, 32, compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(4, 4, 1))


def test_quantize_model():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)))
    model.add_module("lm_head", nn.Linear(64, 10))
    x = torch.randn(5, 64)
    ref = [model.body[0].weight.detach().clone(), model.body[2].weight.detach().clone()]
    quantize_model(model)
    assert isinstance(model.body[0], Linear4bit) and isinstance(model.body[2], Linear4bit)
    assert type(model.lm_head) is nn.Linear
    assert not any(p.requires_grad for p in model.parameters())
    for W, layer in zip(ref, (model.body[0], model.body[2])):
        assert torch.equal(layer.packed, quantize_4bit(W)[0])
    y = model.lm_head(model.body(x).float())
    assert y.shape == (5, 10)


def test_dtype_casts_keep_the_quantized_weight():
    _, layer = make(128, 64, double_quant=False)       # absmax is fp32 here: a cast would round it
    W = layer.dequantize(torch.float32)
    dtypes = {n: b.dtype for n, b in layer.named_buffers()}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.float16)):
        cast(layer)
        assert {n: b.dtype for n, b in layer.named_buffers()} == dtypes
        assert torch.equal(layer.dequantize(torch.float32), W)
    assert layer.bias.dtype == torch.float16           # the bias is an ordinary parameter
    assert layer(torch.randn(2, 128)).dtype == torch.bfloat16


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.up = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 16)
        self.norm = nn.LayerNorm(8)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(8, 10)


def test_linear_layer_names_selects_by_suffix_and_skips_lm_head():
    from qlora_mini.linear4bit import linear_layer_names
    net = _Net()
    every = [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    assert linear_layer_names(net) == every                          # "all-linear"
    assert linear_layer_names(net, ["q_proj"]) == ["layers.0.q_proj", "layers.1.q_proj"]
    assert linear_layer_names(net, ["1.up"]) == ["layers.1.up"]     # a dotted suffix
    assert "lm_head" in linear_layer_names(net, skip=())
    with pytest.raises(ValueError, match="matched no"):             # a suffix, not a substring
        linear_layer_names(net, ["proj"])


@pytest.mark.parametrize("bad", ["q_proj", [], [3], None])
def test_linear_layer_names_rejects_bad_values(bad):
    from qlora_mini.linear4bit import linear_layer_names
    with pytest.raises(ValueError, match="target_modules"):
        linear_layer_names(_Net(), bad)


def test_nothing_to_quantize_is_an_error_naming_the_value():
    with pytest.raises(ValueError, match=r"target_modules='all-linear'.*matched no Linear layer"):
        quantize_model(nn.Sequential(nn.ReLU()))


def test_replace_module_puts_the_new_module_in_place():
    from qlora_mini.linear4bit import replace_module
    net = _Net()
    old, new = net.layers[1].up, nn.Identity()
    assert replace_module(net, "layers.1.up", new) is old
    assert net.get_submodule("layers.1.up") is new and net.layers[0].up is not new
    top = nn.Linear(2, 2)
    replace_module(net, "lm_head", top)
    assert net.lm_head is top


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32])
def test_quant_storage_keeps_bytes_and_results(quant_storage):
    """The packed codes as a frozen parameter in any storage dtype: the same bytes (compared with
    chapter 3's quantize_4bit), the same outputs and gradients, and dtype casts of the model
    (which convert floating-point parameters) leave them alone."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 67)                         # 128 * 67 / 2 bytes: ragged for fp32
    ref = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.float32, quant_storage=quant_storage)
    assert isinstance(layer.packed, nn.Parameter) and not layer.packed.requires_grad
    assert layer.packed.dtype == quant_storage
    assert torch.equal(layer.packed_bytes, quantize_4bit(linear.weight.detach())[0])
    x = torch.randn(3, 128, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = ref(x), layer(x2)
    (y.square().sum() + y2.square().sum()).backward()
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    before = layer.packed_bytes.clone()
    for cast in (torch.float64, torch.bfloat16, torch.float32):
        nn.Sequential(layer).to(cast)
        assert layer.packed.dtype == quant_storage and torch.equal(layer.packed_bytes, before)
    assert "packed" in dict(layer.named_parameters()) and "packed" in layer.state_dict()


def test_bad_quant_storage():
    with pytest.raises(ValueError, match="quant_storage"):
        Linear4bit(64, 8, quant_storage=torch.int32)
