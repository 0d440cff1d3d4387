"""Chapter 12's data types: E3M0 against bitsandbytes, fake quantization against chapter 3's
storage and an independent Int4 rounding, window NLLs against chapter 6's perplexity, and the
statistics against numpy."""
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora_mini.studies import datatypes as D
from qlora_mini.default_model import heldout_perplexity, stdlib_corpus, token_stream, train_tokenizer
from qlora_mini.quantization import normalized_mse
from qlora_mini.storage import dequantize_4bit, quantize_4bit


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer, texts): an untrained 2-layer LLaMA and a 300-token BPE, 20 files."""
    train, _ = stdlib_corpus(max_files=20)
    tok = train_tokenizer(train, 300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64,
                                         intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    return model, tok, train[:4]


def test_e3m0_is_bitsandbytes_fp8_map_with_3_exponent_bits():
    from bitsandbytes.functional import create_fp8_map
    code = D.e3m0_code()
    assert code.shape == (16,) and code.dtype == torch.float32
    assert set(code.tolist()) == set(create_fp8_map(True, 3, 0, 4).tolist())
    assert torch.equal(code[8:], -code[:8])                  # bit 3 is the sign
    assert code[1:8].tolist() == [2.0 ** k for k in range(-6, 1)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_fake_quantize_equals_storage_round_trip(quant_type, double_quant, blocksize):
    W = torch.randn(48, 256, generator=torch.Generator().manual_seed(blocksize))
    packed, state = quantize_4bit(W, blocksize, quant_type, double_quant)
    ours = D.fake_quantize(W, D.get_code(quant_type), blocksize, double_quant)
    assert torch.equal(ours, dequantize_4bit(packed, state, torch.float32))


def test_int4_fake_quantize_is_rounding_to_sevenths():
    W = torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
    absmax = W.view(-1, 64).abs().amax(dim=1, keepdim=True)             # (32, 1)
    expect = (torch.round(W.view(-1, 64) / absmax * 7) / 7 * absmax).view(4, 512)
    torch.testing.assert_close(D.fake_quantize(W, D.data_type_code("Int4"), 64), expect)


def test_unknown_data_type_is_refused():
    with pytest.raises(ValueError, match="data type must be one of"):
        D.data_type_code("nf3")


def test_quantize_linears_touches_only_linear_weights(tiny):
    model, _, _ = tiny
    q = D.quantize_linears(model, "NF4 + DQ", 64)
    before, after = model.state_dict(), q.state_dict()
    for name, W in before.items():
        if name.endswith("proj.weight"):
            assert torch.equal(after[name], D.fake_quantize(W, D.get_code("nf4"), 64, True)), name
            assert not torch.equal(after[name], W), name
        else:                                    # embeddings, norms, lm_head: untouched
            assert torch.equal(after[name], W), name


def test_window_nll_averages_to_chapter6_perplexity(tiny):
    model, tok, texts = tiny
    nll = D.window_nll(model, token_stream(tok, texts)[:2048], seq_len=32)
    assert nll.shape == (64,) and nll.dtype == torch.float64
    ppl = heldout_perplexity(model, tok, texts, seq_len=32, max_tokens=2048)
    assert math.isclose(math.exp(nll.mean().item()), ppl, rel_tol=1e-5)


def test_intervals_match_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(4, 0.5, 200), rng.normal(4, 0.5, 200)
    b = a - 0.05 + rng.normal(0, 0.01, 200)
    se = a.std(ddof=1) / np.sqrt(200)
    ppl, lo, hi = D.perplexity_interval(torch.tensor(a))
    assert np.allclose([ppl, lo, hi], np.exp(a.mean() + np.array([0, -1.96, 1.96]) * se))
    r = D.paired_ratio(torch.tensor(a), torch.tensor(b))
    d = a - b
    sd = d.std(ddof=1) / np.sqrt(200)
    assert np.allclose([r["ratio"], r["low"], r["high"]],
                       np.exp(d.mean() + np.array([0, -1.96, 1.96]) * sd))


def test_compare_order_verdicts():
    base = torch.linspace(3, 5, 100, dtype=torch.float64)
    noise = 0.001 * torch.sin(torch.arange(100.0, dtype=torch.float64))
    nll = {"a": base + 0.2 + noise, "b": base + 0.1 - noise, "c": base + noise}
    assert D.compare_order(nll, ["a", "b", "c"])["verdict"] == "holds"
    assert D.compare_order(nll, ["c", "b", "a"])["verdict"] == "does not hold"
    assert D.compare_order(nll, ["b", "a", "c"])["verdict"] == "holds partly"  # 2 agree, 1 not
    assert D.compare_order(nll, ["c", "a", "b"])["verdict"] == "does not hold"  # 1 agrees, 2 not
    partly = D.compare_order(nll, ["a", "c", "b"])
    assert partly["verdict"] == "holds partly"
    assert partly["pairs"][("c", "b")] == "contradicts"
    nll["d"] = nll["c"] + 0.01 * torch.randn(100, generator=torch.Generator().manual_seed(0),
                                            dtype=torch.float64)
    assert D.compare_order(nll, ["c", "d"])["pairs"][("c", "d")] == "unresolved"
    # no pair resolved: nothing was shown either way (it used to say "does not hold")
    assert D.compare_order(nll, ["c", "d"])["verdict"] == "inconclusive"
    # a claim contradicted as often as it is confirmed does not hold; a ratio function is honoured
    flip = lambda a, b: {"low": 0.5, "high": 0.9} if a is nll["a"] else {"low": 1.1, "high": 1.2}
    assert D.compare_order(nll, ["a", "b", "c"], ratio=flip)["verdict"] == "does not hold"


def test_weight_mse_pools_the_linear_layers(tiny):
    model, _, _ = tiny
    Ws = [m.weight for n, m in model.named_modules() if n.endswith("proj")]
    W = torch.cat([w.reshape(-1) for w in Ws])
    W_hat = torch.cat([D.fake_quantize(w, D.get_code("fp4"), 256).reshape(-1) for w in Ws])
    assert math.isclose(D.weight_mse(model, "FP4 (E2M1)", 256), normalized_mse(W, W_hat),
                        rel_tol=1e-9)


def test_output_mse_by_hand(tiny):
    """Inputs recorded with pre-hooks, outputs by F.linear: the same pooled ratio."""
    model, tok, texts = tiny
    q = D.quantize_linears(model, "Int4", 64)
    x = token_stream(tok, texts)[:64].view(2, 32)
    names = [n for n, m in model.named_modules() if n.endswith("proj")]
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, a[0])) for n in names]
    with torch.no_grad():
        model(input_ids=x)
    for h in hooks:
        h.remove()
    F = torch.nn.functional
    num = sum((F.linear(seen[n].double(), model.get_submodule(n).weight.double())
               - F.linear(seen[n].double(), q.get_submodule(n).weight.double())).pow(2).sum()
              for n in names)
    den = sum(F.linear(seen[n].double(), model.get_submodule(n).weight.double()).pow(2).sum()
              for n in names)
    assert math.isclose(D.output_mse(model, q, x), (num / den).item(), rel_tol=1e-9)
    assert D.output_mse(model, model, x) == 0.0
