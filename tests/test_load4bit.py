"""Chapter 5's loader and 4-bit checkpoints: load_4bit equals quantize_model on the full model,
save_4bit round-trips through transformers + bitsandbytes (CPU) in both directions."""
import json

import pytest
import torch

import qlora_mini  # noqa: F401  (silences bitsandbytes' log line)
from qlora_mini.linear4bit import Linear4bit, quantize_model
from qlora_mini.load4bit import load_4bit, quantize_4bit_chunked, save_4bit, shard_files
from qlora_mini.storage import quantize_4bit

BF16 = torch.bfloat16  # the compute dtype, explicit: the default is bf16 only where it is native


def tiny_config(tie=False):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                       tie_word_embeddings=tie)   # in_features multiples of 64: bnb's CPU path


def save_tiny(folder, tie=False):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(tie), dtype=torch.bfloat16).save_pretrained(
        folder, max_shard_size="100KB")
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("bf16"))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def bnb_config():
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)


@pytest.mark.parametrize("shape,quant_type,dq", [((96, 65), "nf4", True), ((33, 64), "fp4", False)])
def test_chunked_quantizer_gives_chapter3_bytes(shape, quant_type, dq):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    a, sa = quantize_4bit(W, 64, quant_type, dq)
    b, sb = quantize_4bit_chunked(W, 64, quant_type, dq, chunk=1024)
    assert torch.equal(a, b) and torch.equal(sa.absmax, sb.absmax)
    if dq:
        assert torch.equal(sa.nested_absmax, sb.nested_absmax) and torch.equal(sa.offset, sb.offset)
    with pytest.raises(ValueError, match="chunk"):
        quantize_4bit_chunked(W, 64, chunk=100)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_load_4bit_equals_quantize_model(tie, tmp_path, ids):
    from transformers import AutoModelForCausalLM
    ckpt = save_tiny(tmp_path, tie)
    assert len(shard_files(ckpt)) > 1
    ours = load_4bit(ckpt, compute_dtype=BF16, device="cpu")
    full = quantize_model(AutoModelForCausalLM.from_pretrained(ckpt, dtype=BF16), compute_dtype=BF16)
    a, b = ours.state_dict(), full.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert not ours.training and torch.equal(ours(ids).logits, full.eval()(ids).logits)


def test_save_4bit_loads_in_transformers_with_same_logits(ckpt, ids, tmp_path):
    from transformers import AutoModelForCausalLM
    ours = load_4bit(ckpt, compute_dtype=BF16, device="cpu")
    save_4bit(ours, tmp_path, max_shard_bytes=40_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    q = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert q["load_in_4bit"] and q["bnb_4bit_quant_type"] == "nf4" and q["bnb_4bit_use_double_quant"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16,
                                                  quantization_config=bnb_config())
    # train mode, no dropout: bitsandbytes' CPU inference path is a different (fused) kernel
    assert torch.equal(reloaded.train()(ids).logits, theirs.train()(ids).logits)
    assert torch.equal(ours.train()(ids).logits, theirs(ids).logits)


def test_load_4bit_reads_transformers_4bit_save_without_requantizing(ckpt, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    theirs = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16,
                                                  quantization_config=bnb_config())
    theirs.save_pretrained(tmp_path)
    import qlora_mini.load4bit as L
    monkeypatch.setattr(L, "quantize_4bit_chunked", lambda *a, **k: pytest.fail("re-quantized"))
    back = load_4bit(tmp_path, compute_dtype=BF16, device="cpu").state_dict()
    monkeypatch.undo()
    ours = load_4bit(ckpt, compute_dtype=BF16, device="cpu").state_dict()
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_save_4bit_of_a_qlora_model_keeps_base_names(ckpt, tmp_path, ids):
    from qlora_mini.lora import LoRALinear, add_lora, lora_layers
    model = load_4bit(ckpt, compute_dtype=BF16, device="cpu")
    base = model.state_dict()
    add_lora(model, [n for n, m in model.named_modules() if isinstance(m, Linear4bit)], r=4)
    assert lora_layers(model)
    save_4bit(model, tmp_path, wrappers=(LoRALinear,))
    back = load_4bit(tmp_path, compute_dtype=BF16, device="cpu").state_dict()
    assert back.keys() == base.keys() and all(torch.equal(back[k], base[k]) for k in base)


def test_bad_checkpoints(tmp_path, ckpt):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no config.json"):
        load_4bit(tmp_path, compute_dtype=BF16, device="cpu")
    (tmp_path / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_4bit(tmp_path, compute_dtype=BF16, device="cpu")
    from transformers import AutoModelForCausalLM
    small = tiny_config()
    small.num_hidden_layers = 1                       # the checkpoint has 2 layers
    AutoModelForCausalLM.from_config(small).save_pretrained(tmp_path / "one")
    cfg = json.loads((ckpt / "config.json").read_text())
    (tmp_path / "one" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="missing"):
        load_4bit(tmp_path / "one", device="cpu")
    with pytest.raises(ValueError, match="no Linear4bit"):
        save_4bit(AutoModelForCausalLM.from_config(small), tmp_path / "x")


def test_chunked_quantizer_both_paths_odd_length(monkeypatch):
    """The compiled chunk path and the PyTorch one give chapter 3's bytes, an odd length included
    (its last nibble is the code of the padding 0.0, as quantize_4bit's)."""
    import qlora_mini.load4bit as L
    W = torch.randn(7, 333, generator=torch.Generator().manual_seed(3))   # 2331 values: odd
    a, sa = quantize_4bit(W, 64, "nf4", True)
    compiled = quantize_4bit_chunked(W, 64, "nf4", True, chunk=1024)
    monkeypatch.setattr(L.kernels, "cpu_available", lambda: False)
    torch_path = quantize_4bit_chunked(W, 64, "nf4", True, chunk=1024)
    for b, sb in (compiled, torch_path):
        assert torch.equal(a, b) and torch.equal(sa.absmax, sb.absmax)


@pytest.mark.parametrize("name", ["/nonexistent/model", "./not-here", "not-here", "a/b/c"])
def test_a_missing_folder_is_named_not_taken_for_a_hub_id(name):
    with pytest.raises(FileNotFoundError, match=f"{name}: no such folder"):
        load_4bit(name, device="cpu")


def test_an_uncached_hub_id_offline_is_named(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="qlora-mini/not-cached: not a local folder, not in the hub "
                                      "cache, and the hub cannot be reached"):
        load_4bit("qlora-mini/not-cached", device="cpu")


def test_a_truncated_shard_is_named(ckpt, tmp_path):
    for f in ckpt.iterdir():
        data = f.read_bytes()
        (tmp_path / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(ValueError, match=rf"{tmp_path}/model\S*\.safetensors: not a readable"):
        load_4bit(tmp_path, compute_dtype=BF16, device="cpu")
