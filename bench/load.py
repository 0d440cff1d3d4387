"""Loading a 16-bit checkpoint into 4 bits on the CPU: qlora_mini.load_4bit vs transformers +
BitsAndBytesConfig, each in its own fresh process (chapter 10).

    python bench/load.py make  --ckpt /tmp/qlora_load_ckpt        # ~1.1 GB bf16, 6 shards
    python bench/load.py run   --ckpt /tmp/qlora_load_ckpt --out bench/results/load_cpu.json

`make` writes a random LLaMA-shaped bf16 checkpoint (never commit it). `run` loads it `--repeats`
times per side, alternating; each load runs in a subprocess whose thread samples VmRSS, RssAnon
and RssFile from /proc/self/status every 5 ms. Reported: wall time of the load call, peak RSS,
peak anonymous memory above the process's baseline after imports, and the tensor bytes of the
loaded model. The bound checked: anonymous growth <= model bytes + largest shard + 64 MiB.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

SHAPE = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)
SLACK = 64 * 2 ** 20    # the bound's "small constant": interpreter, allocator, one chunk


def status() -> dict:
    """VmRSS, RssAnon, RssFile of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Peak of each /proc/self/status field while running (sampled every `every` seconds)."""

    def __init__(self, every=0.005):
        super().__init__(daemon=True)
        self.every, self.peak, self.stop = every, status(), threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = {k: max(v, self.peak[k]) for k, v in status().items()}
            time.sleep(self.every)


def make(ckpt: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(torch.bfloat16)
    model.save_pretrained(ckpt, max_shard_size="200MB")
    n = sum(p.numel() for p in model.parameters())
    print(f"{ckpt}: {n / 1e6:.0f}M parameters, {len(list(ckpt.glob('*.safetensors')))} shards")


def tensor_bytes(model) -> int:
    """Bytes of the model's tensors, each storage once; bitsandbytes keeps a weight's absmax and
    nested constants in a QuantState beside the parameter, so those are added too."""
    seen, total = set(), 0
    extra = []
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            extra += [qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code]
                                             if qs.nested else [])
    for t in [*model.parameters(), *model.buffers(), *extra]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def one(side: str, ckpt: str, threads: int) -> dict:
    """One load in this process (called in a fresh subprocess)."""
    import torch
    torch.set_num_threads(threads)
    import qlora_mini  # noqa: F401
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from qlora_mini.load4bit import load_4bit
    base = status()
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    if side == "qlora_mini":
        model = load_4bit(ckpt, compute_dtype=torch.bfloat16, device="cpu")
    else:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, quantization_config=q,
                                                     device_map="cpu")
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    return dict(side=side, wall_s=wall, model_bytes=tensor_bytes(model), baseline=base,
                peak=sampler.peak, final=status(),
                anon_growth=sampler.peak["RssAnon"] - base["RssAnon"])


def run(ckpt: Path, out: Path, repeats: int, threads: int) -> None:
    import torch
    import transformers
    import bitsandbytes
    shards = sorted(ckpt.glob("*.safetensors"))
    load_before, runs = os.getloadavg(), []
    for i in range(repeats):
        for side in ("qlora_mini", "transformers+bnb"):
            cmd = [sys.executable, __file__, "one", "--side", side, "--ckpt", str(ckpt),
                   "--threads", str(threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(side, {k: runs[-1][k] for k in ("wall_s", "anon_growth", "model_bytes")},
                  flush=True)
    largest = max(s.stat().st_size for s in shards)
    n_params = json.loads((ckpt / "config.json").read_text())
    result = dict(
        what="load a bf16 LLaMA-shaped checkpoint into NF4+DQ (bf16 compute) on the CPU",
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                     threads=threads, load_average_before=load_before,
                     mem_total_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        versions=dict(python=platform.python_version(), torch=torch.__version__,
                      transformers=transformers.__version__, bitsandbytes=bitsandbytes.__version__),
        checkpoint=dict(shape=SHAPE, parameters=_n_params(n_params), shards=len(shards),
                        bytes=sum(s.stat().st_size for s in shards), largest_shard_bytes=largest),
        bound=dict(rule="anonymous growth <= model bytes + largest shard + slack", slack_bytes=SLACK),
        runs=runs)
    result["machine"]["load_average_after"] = os.getloadavg()
    for side in ("qlora_mini", "transformers+bnb"):
        rs = [r for r in runs if r["side"] == side]
        result[side] = dict(wall_s_median=statistics.median(r["wall_s"] for r in rs),
                            anon_growth_max=max(r["anon_growth"] for r in rs),
                            peak_rss_max=max(r["peak"]["VmRSS"] for r in rs),
                            model_bytes=rs[0]["model_bytes"],
                            within_bound=all(r["anon_growth"] <= r["model_bytes"] + largest + SLACK
                                             for r in rs))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("qlora_mini", "transformers+bnb")}, indent=1))


def _n_params(c: dict) -> int:
    h, i, L, V = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    return L * (4 * h * h + 3 * h * i + 2 * h) + 2 * V * h + h


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["make", "run", "one"])
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/qlora_load_ckpt"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load_cpu.json")
    ap.add_argument("--side", choices=["qlora_mini", "transformers+bnb"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    if a.cmd == "make":
        make(a.ckpt)
    elif a.cmd == "run":
        run(a.ckpt, a.out, a.repeats, a.threads)
    else:
        print(json.dumps(one(a.side, str(a.ckpt), a.threads)))


if __name__ == "__main__":
    main()
