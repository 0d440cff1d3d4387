"""LoRA over 4-bit weights, checked against the ecosystem: transformers + bitsandbytes for the
quantized model, PEFT for the LoRA layers, their gradients and the adapter files.

Equivalence tests are exact (torch.equal) in float32 and in bfloat16 compute, with one caveat
about bitsandbytes on CPU: in eval mode, on a CPU with AVX512-BF16, its Linear4bit repacks the
weight for a fused kernel that casts the input and absmax to bfloat16 (whatever the compute
dtype; bitsandbytes/backends/cpu/ops.py); in train mode
it dequantizes and calls F.linear, as we do. So exact comparisons put the bitsandbytes model in
train mode (dropout 0), and the fused path gets its own test with a tolerance.
"""
import json

import pytest
import torch
import torch.nn as nn

from qlora_mini.linear4bit import Linear4bit
from qlora_mini.lora import load_adapter, save_adapter
from qlora_mini.lora import LoRALinear, lora_layers, merge_qlora, prepare_qlora, trainable_parameters

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
F32 = torch.float32
R, ALPHA = 8, 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LLaMA saved with save_pretrained; in_features all multiples of 64 (bnb's CPU bug)."""
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def ours(model_dir, **kw):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=F32)
    options = dict(r=R, alpha=ALPHA, dropout=0.0, compute_dtype=F32, gradient_checkpointing=False,
                   dtype_policy="fp32")   # PEFT's defaults (fp32 adapters, norms, embeddings): like with like
    return prepare_qlora(model, **{**options, **kw})


def bnb_model(model_dir, compute_dtype=F32):
    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qc,
                                                             dtype=F32, device_map="cpu")


def peft_model(model_dir, **kw):
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM", **kw)
    return peft.get_peft_model(bnb_model(model_dir), cfg)


def randomize_B(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def peft_lora_params(pm):
    """{module path: (A, B)} of a PEFT model, path without PEFT's wrapper prefix."""
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = (mod.lora_A["default"].weight, mod.lora_B["default"].weight)
    return out


# ---------------------------------------------------------------------------------- the layer
def test_fresh_layer_equals_base_and_init_matches_peft():
    torch.manual_seed(0)
    base = nn.Linear(128, 64)
    q = Linear4bit.from_linear(base, compute_dtype=F32)
    x = torch.randn(3, 128)
    torch.manual_seed(5)
    layer = LoRALinear(q, r=R, alpha=ALPHA, dropout=0.05).eval()
    assert torch.equal(layer(x), q(x))  # B = 0: exactly the base
    assert layer.scaling == ALPHA / R and not layer.lora_B.weight.any()
    plain = nn.Sequential(nn.Linear(128, 64))
    torch.manual_seed(5)  # PEFT creates A then B as nn.Linear, then re-initializes: same RNG draws
    pm = peft.get_peft_model(plain, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"]))
    assert torch.equal(layer.lora_A.weight, pm.base_model.model[0].lora_A["default"].weight)


def test_rejects_bad_arguments():
    with pytest.raises(TypeError):
        LoRALinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError):
        LoRALinear(nn.Linear(64, 64), r=0)


def test_backward_reaches_only_A_and_B():
    q = Linear4bit.from_linear(nn.Linear(128, 64), compute_dtype=F32)
    layer = LoRALinear(q, r=4, alpha=8, dropout=0.0)
    randomize_B(nn.ModuleDict({"l": layer}))
    layer(torch.randn(5, 128)).square().sum().backward()
    assert layer.lora_A.weight.grad.abs().sum() > 0 and layer.lora_B.weight.grad.abs().sum() > 0
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


# ------------------------------------------------------------------------- prepare_qlora
def test_prepare_qlora_structure_and_counts_match_peft(model_dir):
    model = ours(model_dir)
    assert isinstance(model.lm_head, nn.Linear) and not model.lm_head.weight.requires_grad
    assert len(lora_layers(model)) == 2 * 7
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.{ab}.weight" for n in lora_layers(model) for ab in ("lora_A", "lora_B")}
    assert trainable_parameters(model, verbose=False) == peft_model(model_dir).get_nb_trainable_parameters()


def test_prepare_qlora_subset_and_fp32_norms(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    prepare_qlora(model, r=4, target_modules=["q_proj", "v_proj"], compute_dtype=torch.bfloat16)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.q_proj, LoRALinear) and isinstance(attn.k_proj, Linear4bit)
    assert isinstance(mlp.down_proj, Linear4bit)
    assert model.model.norm.weight.dtype == F32                      # the reference's policy:
    assert model.model.embed_tokens.weight.dtype == model.lm_head.weight.dtype == torch.bfloat16
    assert attn.q_proj.lora_A.weight.dtype == attn.q_proj.lora_B.weight.dtype == torch.bfloat16
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    x = torch.randint(0, 256, (2, 8))
    model.train()(input_ids=x, labels=x).loss.backward()  # bf16 layers beside fp32 norms: dtypes agree
    assert attn.q_proj.lora_A.weight.grad is not None and attn.v_proj.lora_B.weight.grad.abs().sum() > 0
    merged = merge_qlora(model.eval(), quantize=True)     # re-quantized layers keep the dtype contract
    assert not lora_layers(merged) and torch.isfinite(merged(input_ids=x).logits).all()
    with pytest.raises(ValueError):
        prepare_qlora(transformers.AutoModelForCausalLM.from_pretrained(model_dir), target_modules=["nope"])


def test_checkpointing_does_not_change_gradients(model_dir, tokens):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = ours(model_dir, gradient_checkpointing=ckpt).train()
        randomize_B(model)
        model(input_ids=tokens, labels=tokens).loss.backward()
        grads.append([m.lora_A.weight.grad for m in lora_layers(model).values()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------ transformers + bitsandbytes, PEFT
def test_logits_equal_transformers_bitsandbytes(model_dir, tokens):
    ref = bnb_model(model_dir).train()  # train mode: dequantize + F.linear, as we do (see top)
    with torch.no_grad():
        assert torch.equal(ours(model_dir).eval()(input_ids=tokens).logits, ref(input_ids=tokens).logits)


def test_logits_close_to_bitsandbytes_fused_cpu_kernel(model_dir, tokens):
    ref = bnb_model(model_dir).eval()  # may repack for a fused kernel that multiplies in bf16
    with torch.no_grad():
        a, b = ours(model_dir).eval()(input_ids=tokens).logits, ref(input_ids=tokens).logits
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)  # bf16 products: ~3 significant digits


@pytest.mark.parametrize("target_modules", ["all-linear", ["q_proj", "v_proj"]])
def test_logits_equal_with_bf16_compute(model_dir, tokens, target_modules):
    ref = bnb_model(model_dir, torch.bfloat16).train()
    with torch.no_grad():
        a = ours(model_dir, compute_dtype=torch.bfloat16, target_modules=target_modules).eval()(input_ids=tokens).logits
        assert torch.equal(a, ref(input_ids=tokens).logits)


def copy_peft_lora_into_ours(pm, model):
    theirs = peft_lora_params(pm)
    assert set(theirs) == set(lora_layers(model))
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            m.lora_A.weight.copy_(theirs[name][0])
            m.lora_B.weight.copy_(theirs[name][1])


@pytest.mark.parametrize("compute_dtype", [F32, torch.bfloat16])
def test_one_training_step_gradients_match_peft(model_dir, tokens, compute_dtype):
    pm = peft.get_peft_model(bnb_model(model_dir, compute_dtype), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False))
    pm.train()                                                    # random A and B
    model = ours(model_dir, compute_dtype=compute_dtype).train()
    copy_peft_lora_into_ours(pm, model)
    loss_ref = pm(input_ids=tokens, labels=tokens).loss
    loss = model(input_ids=tokens, labels=tokens).loss
    loss_ref.backward()
    loss.backward()
    assert torch.equal(loss, loss_ref)
    theirs = peft_lora_params(pm)
    for name, m in lora_layers(model).items():
        torch.testing.assert_close(m.lora_A.weight.grad, theirs[name][0].grad, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(m.lora_B.weight.grad, theirs[name][1].grad, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- adapter files
def test_adapter_files_are_peft_format(model_dir, tmp_path):
    from safetensors import safe_open
    model = ours(model_dir)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 28
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (R, ALPHA, "LORA")


def test_peft_loads_our_adapter(model_dir, tokens, tmp_path):
    model = ours(model_dir).eval()
    randomize_B(model)
    save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(bnb_model(model_dir), tmp_path).train()
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, pm(input_ids=tokens).logits)


def test_we_load_peft_adapter(model_dir, tokens, tmp_path):
    pm = peft_model(model_dir, init_lora_weights=False)
    pm.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin"))  # safetensors, never pickle
    fresh = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=F32)
    model = load_adapter(fresh, tmp_path, compute_dtype=F32, gradient_checkpointing=False).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=tokens).logits, pm.train()(input_ids=tokens).logits)


def test_load_adapter_rejects_mismatched_layers(model_dir, tmp_path):
    save_adapter(ours(model_dir, target_modules=["q_proj"]), tmp_path)
    with pytest.raises(ValueError):
        load_adapter(ours(model_dir), tmp_path)


# -------------------------------------------------------------------------------- merging
def test_merge_16bit_is_exact_and_4bit_is_not(model_dir, tokens):
    model = ours(model_dir).eval()
    randomize_B(model)
    adapter = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        ref = model(input_ids=tokens).logits
        W16 = layer.merge_to_16bit(F32).weight                       # (out, in) float32
        torch.testing.assert_close(W16, layer.base.dequantize(F32) + layer.delta_weight())
        # re-quantizing rounds each weight back to an NF4 level: an error comparable to the update
        rel = (layer.merge_to_4bit().dequantize(F32) - W16).norm() / layer.delta_weight().norm()
        assert rel > 0.1
        errors = []
        for options in (dict(dtype=F32), dict(quantize=True)):
            fresh = ours(model_dir).eval()
            fresh.load_state_dict(adapter, strict=False)
            merged = merge_qlora(fresh, **options)
            assert not lora_layers(merged)
            errors.append((merged(input_ids=tokens).logits - ref).abs().max().item())
    assert errors[0] < 1e-4 and errors[1] > 10 * errors[0]


def test_prepare_qlora_refuses_a_prepared_model(model_dir):
    model = ours(model_dir)
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        prepare_qlora(model)
    assert {n: type(m) for n, m in model.named_modules()} == before   # nothing half-applied


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_new_adapters_follow_the_models_mode(model_dir, tokens, mode):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=F32)
    getattr(model, mode)()
    prepare_qlora(model, r=R, dropout=0.5, compute_dtype=F32, gradient_checkpointing=False)
    assert all(m.training == (mode == "train") for m in model.modules())
    if mode == "eval":                                  # no dropout: two calls agree exactly
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, model(tokens).logits)


def _checkpoint_kwargs(model):
    """The keyword arguments transformers passes to torch.utils.checkpoint, read off the model."""
    layer = model.model.layers[0]
    fn = getattr(layer, "_gradient_checkpointing_func", None)
    return getattr(fn, "keywords", None)


def test_one_checkpointing_setting_for_qlora_and_plain_lora(model_dir, tmp_path):
    from qlora_mini import train as T
    cfgs = {q: T.TrainConfig(model=str(model_dir), quantize=q, lora_r=4, compute_dtype="float32")
            for q in (True, False)}
    models = {q: T.build_model(c) for q, c in cfgs.items()}
    kwargs = {q: _checkpoint_kwargs(m) for q, m in models.items()}
    assert kwargs[True] is not None and kwargs[True] == kwargs[False]
    assert kwargs[True].get("use_reentrant") is True                 # the reference's setting
    for m in models.values():                                       # adapters still get gradients
        x = torch.randint(0, 256, (1, 8))
        m.train()(input_ids=x, labels=x).loss.backward()
        assert all(l.lora_B.weight.grad is not None for l in lora_layers(m).values())


def reference_casts(pm):
    """artidoro/qlora's get_accelerate_model with --bf16, after get_peft_model."""
    for name, module in pm.named_modules():
        if "lora_" in name:
            module.to(torch.bfloat16)
        if "norm" in name:
            module.to(F32)
        if ("lm_head" in name or "embed_tokens" in name) and hasattr(module, "weight"):
            module.to(torch.bfloat16)
    return pm


def test_reference_dtype_policy_equals_peft_with_the_references_casts(model_dir, tokens):
    pm = reference_casts(peft.get_peft_model(bnb_model(model_dir, torch.bfloat16), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)))
    from qlora_mini.dtype_policy import input_to_weight_dtype     # the reference gets it from autocast
    pm.lm_head.register_forward_pre_hook(input_to_weight_dtype)
    model = ours(model_dir, compute_dtype=torch.bfloat16, dtype_policy="reference").train()
    copy_peft_lora_into_ours(pm.train(), model)
    kind = lambda n: "lora" if "lora_" in n else "norm" if "norm" in n else "other"  # noqa: E731
    dtypes = lambda m: {(kind(n), p.dtype) for n, p in m.named_parameters() if p.dtype != torch.uint8}  # noqa: E731
    assert dtypes(model) == dtypes(pm) == {("lora", torch.bfloat16), ("norm", F32),
                                           ("other", torch.bfloat16)}
    loss, loss_ref = model(input_ids=tokens, labels=tokens).loss, pm(input_ids=tokens, labels=tokens).loss
    (loss + loss_ref).backward()
    assert torch.equal(loss, loss_ref)
    theirs = peft_lora_params(pm)
    for name, m in lora_layers(model).items():
        assert torch.equal(m.lora_A.weight.grad, theirs[name][0].grad)
        assert torch.equal(m.lora_B.weight.grad, theirs[name][1].grad)


def test_fp16_compute_keeps_fp32_adapters_and_bad_policy_is_refused(model_dir):
    model = ours(model_dir, compute_dtype=torch.float16, dtype_policy="reference")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {F32}
    assert model.model.embed_tokens.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype_policy"):
        ours(model_dir, dtype_policy="bf16")


def test_policy_without_a_dtype_takes_the_4bit_layers_or_says_why():
    from qlora_mini.dtype_policy import apply_dtype_policy
    model = nn.Sequential(Linear4bit.from_linear(nn.Linear(64, 64), compute_dtype=torch.float16))
    assert apply_dtype_policy(model, "reference", None) == F32   # fp16 compute: fp32 adapters
    model = nn.Sequential(Linear4bit.from_linear(nn.Linear(64, 64), compute_dtype=torch.bfloat16))
    assert apply_dtype_policy(model, "reference", None) == torch.bfloat16
    with pytest.raises(ValueError, match="no Linear4bit: name the compute dtype"):
        apply_dtype_policy(nn.Sequential(nn.Linear(64, 64)), "reference", None)


def test_prepare_qlora_takes_a_load_4bit_model(model_dir, tokens):
    from qlora_mini.load4bit import load_4bit
    a = prepare_qlora(load_4bit(model_dir, compute_dtype=F32, device="cpu"), r=R, alpha=ALPHA,
                      dropout=0.0, compute_dtype=F32, gradient_checkpointing=False)
    b = ours(model_dir)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if "lora_A" not in k)
