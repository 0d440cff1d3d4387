"""Chapter 5's accounting is the training command's own: qlora_memory equals, to the byte, the
tensors of the model that recipe.build_model builds plus its gradients and optimizer state after
one step, on a tiny LLaMA, for the reference's dtype policy and for the fp32 one."""
import pytest
import torch
from tiny_model import make_tiny_model

import qlora_mini  # noqa: F401
from qlora_mini import train as T
from qlora_mini.memory import COMPONENTS, meta_model, qlora_memory, storage_bytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("compute,policy", [("bfloat16", "reference"), ("bfloat16", "fp32")])
def test_accounting_equals_built_model_after_one_step(tiny, compute, policy):
    cfg = T.load_config("default", {"model": str(tiny), "compute_dtype": compute, "lora_r": 8})
    cfg.dtype_policy = policy                 # the config key the lead adds; build_model reads it
    model = T.build_model(cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = T.make_optimizer(cfg, params)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    built = (storage_bytes([*model.parameters(), *model.buffers()])
             + storage_bytes(p.grad for p in params) + storage_bytes(states))

    fp32 = policy == "fp32"
    acc = qlora_memory(model.config, r=cfg.lora_r, model=meta_model(model.config),
                       compute_dtype=torch.float32 if fp32 else getattr(torch, compute),
                       lora_dtype=torch.float32 if fp32 else None)
    assert built == sum(acc[k] for k in COMPONENTS if k != "activations")
    lora_dtypes = {p.dtype for p in params}
    expect = torch.float32 if fp32 or compute == "float16" else torch.bfloat16
    assert lora_dtypes == {expect} and {p.grad.dtype for p in params} == {expect}
    assert model.model.norm.weight.dtype == torch.float32


def test_accounting_equals_the_real_model_after_one_step():
    """Issue 23: the same equality on Appendix B's SmolLM2-135M (grouped-query attention, tied
    embeddings, 30 layers), rank 64 on every linear layer, float32 throughout."""
    cfg = T.load_config("default", {"model": "smollm2-135m", "compute_dtype": "float32",
                                    "lora_r": 64, "gradient_checkpointing": False})
    cfg.dtype_policy = "fp32"
    model = T.build_model(cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = T.make_optimizer(cfg, params)
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    built = (storage_bytes([*model.parameters(), *model.buffers()])
             + storage_bytes(p.grad for p in params) + storage_bytes(states))
    acc = qlora_memory(model.config, r=64, model=meta_model(model.config),
                       compute_dtype=torch.float32, lora_dtype=torch.float32)
    assert built == sum(acc[k] for k in COMPONENTS if k != "activations")
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 3
