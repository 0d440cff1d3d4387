"""One LLaMA-65B decoder layer in QLoRA form, forward + backward with gradient checkpointing, on
the CPU; peak memory from the allocator's own events (chapter 10).

    python bench/layer65b.py --out bench/results/layer65b_cpu.json      # ~1-3 min, ~3 GB
    python bench/layer65b.py --size 7B --tokens 64 --out /tmp/x.json    # a quick smoke run

The layer: hidden 8192, FFN 22016, 64 heads (LLaMA-65B), its 7 linear layers as qlora_mini
Linear4bit (NF4 + double quantization; random 4-bit codes and block constants, which is enough for
memory and time: no value depends on them), LoRA r=64 (alpha 16, dropout 0.05) on all 7 in the
LoRA dtype (--lora-dtype, the reference's bf16 by default), RMSNorm weights in fp32, bf16 compute,
PyTorch's SDPA attention. The input is (1, tokens, 8192) bf16, as the checkpointed layer input the
layer below hands over; the output gradient is given. Inside the profiled region: one checkpointed
forward (saves the input only) and the backward (recompute, then gradients).

Memory: torch.profiler(profile_memory=True) records every CPU allocator allocation and free; the
running sum of those events, in time order, is the memory the layer's computation adds on top of
what was resident before (weights, adapters, input, output gradient), reported separately. Times
are wall times of one run on a shared 2-core machine (the load average is recorded), not medians.
"""
import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn

import qlora_mini  # noqa: F401  (silences bitsandbytes' log line)
from qlora_mini.linear4bit import STATE_FIELDS, Linear4bit, replace_module
from qlora_mini.lora import LoRALinear
from qlora_mini.memory import activation_terms, llama_config, storage_bytes
from qlora_mini.random_qlora import random_linear4bit

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def build_layer(size: str, r: int, lora_dtype, seed: int = 0):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    cfg = llama_config(size)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, layer_idx=0)
    g = torch.Generator().manual_seed(seed)
    for name in LINEARS:
        lin = layer.get_submodule(name)
        base = random_linear4bit(lin.in_features, lin.out_features, "cpu", g)
        replace_module(layer, name, LoRALinear(base, r=r, alpha=16, dropout=0.05))
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        norm.weight = nn.Parameter(torch.ones(cfg.hidden_size))                 # fp32 norms
        norm.weight.requires_grad_(False)
    for m in layer.modules():
        if isinstance(m, LoRALinear):
            m.lora_A.to(lora_dtype)
            m.lora_B.to(lora_dtype)
    layer.train()
    return cfg, layer, LlamaRotaryEmbedding(cfg)


def allocator_timeline(prof) -> list[tuple[int, int]]:
    """(time ns, bytes allocated and not yet freed) after each CPU allocator event."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.device("cpu").type
                    or (e.name() == "[memory]" and str(e.device_type()).endswith("CPU")))
    out, total = [], 0
    for t, n in events:
        total += n
        out.append((t, total))
    return out


def measure(size="65B", tokens=512, r=64, lora_dtype=torch.bfloat16, threads=2) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.checkpoint import checkpoint
    torch.set_num_threads(threads)
    cfg, layer, rope = build_layer(size, r, lora_dtype)
    x = torch.randn(1, tokens, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn_like(x).detach()
    pos = torch.arange(tokens)[None]
    cos, sin = rope(x, pos)
    lora = [p for n, p in layer.named_parameters() if "lora_" in n]
    resident = dict(
        weights_4bit=storage_bytes(m.packed for m in layer.modules() if isinstance(m, Linear4bit)),
        constants=storage_bytes(getattr(m, f) for m in layer.modules() if isinstance(m, Linear4bit)
                               for f in STATE_FIELDS),
        lora=storage_bytes(lora),
        norms=storage_bytes([layer.input_layernorm.weight, layer.post_attention_layernorm.weight]),
        input_and_output_grad=storage_bytes([x, grad_out]), rope=storage_bytes([cos, sin]))
    run = lambda h: layer(h, position_embeddings=(cos, sin))  # noqa: E731
    checkpoint(run, x, use_reentrant=True).backward(grad_out)   # warm-up (and first grads)
    for p in [*lora, x]:
        p.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        y = checkpoint(run, x, use_reentrant=True)             # (1, T, h) bf16; saves x only
        t1 = time.perf_counter()
        y.backward(grad_out)                                   # recompute + gradients
        t2 = time.perf_counter()
    timeline = allocator_timeline(prof)
    peak = max(b for _, b in timeline)
    t_start = timeline[0][0]
    step = max(1, len(timeline) // 400)
    terms = activation_terms(cfg, 1, tokens, r=r, lora_dropout=0.05)
    layer_terms = {k: v for k, v in terms.items() if k.startswith("layer:")}
    return dict(
        size=size, tokens=tokens, r=r, lora_dtype=str(lora_dtype), threads=threads,
        shape=dict(hidden=cfg.hidden_size, ffn=cfg.intermediate_size,
                   heads=cfg.num_attention_heads),
        resident_bytes=resident, peak_added_bytes=peak,
        after_bytes=timeline[-1][1],
        lora_grad_bytes=storage_bytes(p.grad for p in lora),
        forward_s=t1 - t0, backward_s=t2 - t1,
        accounting_layer_terms=layer_terms,
        largest_dequantized_weight_bytes=2 * cfg.hidden_size * cfg.intermediate_size,
        timeline=[((t - t_start) / 1e9, b) for t, b in timeline[::step]])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="65B", choices=["7B", "13B", "33B", "65B"])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--lora-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "layer65b_cpu.json")
    a = ap.parse_args(argv)
    load_before = os.getloadavg()
    res = measure(a.size, a.tokens, a.r, getattr(torch, a.lora_dtype), a.threads)
    import bitsandbytes
    import transformers
    res.update(what="one LLaMA decoder layer, QLoRA (NF4+DQ, LoRA on 7 linears), fwd+bwd with "
                    "gradient checkpointing, CPU allocator events",
               date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                            load_average_before=load_before, load_average_after=os.getloadavg()),
               versions=dict(python=platform.python_version(), torch=torch.__version__,
                             transformers=transformers.__version__,
                             bitsandbytes=bitsandbytes.__version__))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "timeline"}, indent=1))


if __name__ == "__main__":
    main()
