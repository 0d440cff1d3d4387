"""Chapter 5: the memory accounting, checked on meta-device LLaMA counts and, byte for byte, on a
small quantized LLaMA with PEFT LoRA adapters (CPU)."""
import pytest
import torch
import torch.nn as nn

import qlora_mini  # noqa: F401  (silences bitsandbytes' `kernels` log line before bnb loads)
from qlora_mini.linear4bit import STATE_FIELDS, Linear4bit, quantize_model
from qlora_mini.memory import (GB, SavedTensors, activation_bytes, activation_terms, count_parameters,
                               full_finetune_memory, llama_config, meta_model, qlora_memory)


@pytest.fixture(scope="module")
def llama65():
    return meta_model(llama_config("65B"))


def test_llama_65b_counts(llama65):
    c = count_parameters(llama65)
    h, i, L, V = 8192, 22016, 80, 32000               # LLaMA-65B (Touvron et al. 2023, Table 2)
    linear = L * (4 * h * h + 3 * h * i)               # q, k, v, o and gate, up, down per layer
    assert c.linear == linear                          # 64.760e9
    assert c.total == linear + 2 * V * h + (2 * L + 1) * h  # + embeddings, head, RMSNorm weights
    assert round(c.total / 1e9, 3) == 65.286          # the "65B" of the model's name
    assert len(c.linear_shapes) == 80 * 7
    assert all(p.is_meta for p in llama65.parameters())


def test_full_finetuning_65b(llama65):
    ff = full_finetune_memory(None, model=llama65)
    assert 780 < sum(ff.values()) / GB < 784               # the paper's ">780 GB": 12 B/param
    assert ff["Adam m, v"] == 4 * ff["weights"]


def test_qlora_65b_fits_48gb(llama65):
    q = qlora_memory(llama_config("65B"), 1, 512, r=64, model=llama65)
    assert 40 < sum(q.values()) / GB < 48
    no_dq = qlora_memory(llama_config("65B"), 1, 512, r=64, model=llama65, double_quant=False)
    saved = (no_dq["quantization constants"] - q["quantization constants"]) / GB
    assert 2.9 < saved < 3.1                              # "about 3 GB" (0.373 bits/param)


def test_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        llama_config("70B")
    with pytest.raises(ValueError, match="attention"):
        activation_terms(llama_config("7B"), attention="paged")


def test_checkpointing_saves_activation_memory():
    cfg = llama_config("7B")
    assert activation_bytes(cfg, 1, 512, True) < activation_bytes(cfg, 1, 512, False) / 5


def test_saved_tensors_groups_and_exclude():
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensors(lin) as s:
        lin(x)
    assert s.nbytes == x.nbytes                           # the weight is excluded, x is not
    with SavedTensors() as s:
        y = x * 2
        s.new_group()
        (y * y).sum()
    assert s.groups == [] and s.nbytes == y.nbytes         # x*2 saves nothing; y*y saves y once


def small_qlora(dropout, r=8, layers=2, kv_heads=2):
    """A small bf16 LLaMA with PEFT LoRA on all linear layers whose base layers are our Linear4bit."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=256)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16),
                           LoraConfig(r=r, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))
    quantize_model(model, compute_dtype=torch.bfloat16, skip=("lm_head", "default"))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.data = p.data.bfloat16()
        p.requires_grad_(True)
    model.enable_input_require_grads()
    model.config.use_cache = False
    return cfg, model, lora


def nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def test_accounting_equals_bytes_of_small_quantized_model():
    cfg, model, lora = small_qlora(0.05)
    acc = qlora_memory(cfg, 2, 16, r=8, norm_dtype=torch.bfloat16)  # PEFT model: bf16 norms
    bufs, params = dict(model.named_buffers()), dict(model.named_parameters())
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 2 * 7
    assert acc["4-bit weights"] == nbytes(p for n, p in params.items() if n.endswith(".packed"))
    assert acc["quantization constants"] == nbytes(b for n, b in bufs.items()
                                                   if n.rsplit(".", 1)[-1] in STATE_FIELDS)
    assert acc["embeddings, head, norms"] == (nbytes(p for n, p in params.items()
                                                     if "lora_" not in n and not n.endswith(".packed"))
                                              + nbytes(b for n, b in bufs.items() if "inv_freq" in n))
    assert acc["LoRA weights"] == nbytes(lora)
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert acc["LoRA gradients"] == nbytes(p.grad for p in lora)


@pytest.mark.parametrize("dropout,attention,kv_heads", [(0.0, "sdpa", 2), (0.05, "sdpa", 4),
                                                        (0.05, "eager", 2)])
def test_activations_equal_saved_bytes(dropout, attention, kv_heads):
    cfg, model, _ = small_qlora(dropout, kv_heads=kv_heads)
    model.base_model.model.config._attn_implementation = attention
    B, T = 2, 24
    ids = torch.randint(0, 256, (B, T))
    with SavedTensors(model) as s:
        model(input_ids=ids, labels=ids)
    kw = dict(r=8, lora_dropout=dropout, attention="flash" if attention == "sdpa" else "eager",
              mask_bytes=2)                                # the CPU's dropout mask is bf16
    assert s.nbytes == activation_bytes(cfg, B, T, gradient_checkpointing=False, **kw)


def test_checkpointed_activations_equal_saved_bytes():
    cfg, model, _ = small_qlora(0.05, layers=3)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    B, T = 2, 24
    ids = torch.randint(0, 256, (B, T))
    with SavedTensors(model) as fwd:
        loss = model(input_ids=ids, labels=ids).loss
    rec = SavedTensors(model)
    for layer in model.base_model.model.model.layers:
        layer.input_layernorm.register_forward_pre_hook(lambda *_: rec.new_group())
    with rec:
        loss.backward()
    per_layer = rec.groups + [rec.nbytes]
    t = activation_terms(cfg, B, T, r=8, mask_bytes=2)
    layer = sum(v for k, v in t.items() if k.startswith("layer:") and k != "layer: checkpointed input")
    assert fwd.nbytes == 3 * t["layer: checkpointed input"] + t["model: final norm + loss"]
    assert per_layer == [layer + t["model: RoPE cos, sin"]] * 3
    assert activation_bytes(cfg, B, T, True, r=8, mask_bytes=2) == fwd.nbytes + per_layer[0]


def test_adam_states_32bit():
    import bitsandbytes as bnb
    cfg, model, lora = small_qlora(0.0)
    ids = torch.randint(0, 256, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt = bnb.optim.AdamW(lora, lr=1e-4, optim_bits=32)
    opt.step()
    states = [t for st in opt.state.values() for k, t in st.items() if k in ("state1", "state2")]
    assert all(t.dtype == torch.float32 for t in states)
    assert nbytes(states) == qlora_memory(cfg, r=8, step_bytes=0)["Adam m, v"]  # bnb: int steps


def test_storage_bytes_counts_each_storage_once():
    from qlora_mini.memory import storage_bytes
    a, b = torch.zeros(10, 4), torch.zeros(3, dtype=torch.float64)   # 160 + 24 bytes
    assert storage_bytes([a, a[2:], a.t(), None, b, b.view(3, 1)]) == 10 * 4 * 4 + 3 * 8
    assert storage_bytes([]) == 0
