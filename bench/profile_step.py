"""Where the time of one QLoRA training step goes: torch.profiler over bench/step.py's model.

For each compute dtype, builds both sides (qlora_mini, reference), and after warm-up profiles a few
steps of each, alternating (one profiler per step), then splits their CPU time into: 4-bit dequantization (our kernels.dequantize_4bit as
linear4bit calls it; bitsandbytes.functional.dequantize_4bit as its MatMul4Bit calls it, both
wrapped in a record_function), matrix products (aten::mm/addmm/bmm/matmul), attention (sdpa),
dtype casts and copies (aten::copy_/_to_copy), the optimizer step, the remaining ATen operators,
and what is left: Python and dispatch overhead (step time minus the operators' self time).

    python bench/profile_step.py                  # fp32 and bf16, 4 profiled steps each
    python bench/profile_step.py --dtype fp32 --side qlora_mini --top 25
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step as bench  # noqa: E402  bench/step.py: the same model, batch and step

GROUPS = {  # ATen operator -> category (self CPU time)
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int4pack_mm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "casts/copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous"),
}


def wrap_dequantize():
    """Put a record_function("dequantize") around each side's 4-bit dequantization."""
    import bitsandbytes.autograd._functions as bnb_functions
    import bitsandbytes.functional as bnb_F

    import qlora_mini.kernels as kernels

    def wrapped(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with record_function("dequantize"):
                return fn(*args, **kwargs)
        return run

    kernels.dequantize_4bit = wrapped(kernels.dequantize_4bit)  # linear4bit calls it by name
    bnb_F.dequantize_4bit = wrapped(bnb_F.dequantize_4bit)
    assert bnb_functions.F is bnb_F  # MatMul4Bit calls F.dequantize_4bit through the module


def profile_steps(built: dict, inputs: dict, steps: int) -> dict:
    """{side: {operator or range: [self ms, total ms, calls]} summed over steps} and the wall
    time, with the sides' steps alternating (one profiler per step) so they share the noise."""
    acc = {side: defaultdict(lambda: [0.0, 0.0, 0]) for side in built}
    wall = dict.fromkeys(built, 0.0)
    for i in range(steps):
        for side in (list(built) if i % 2 == 0 else list(built)[::-1]):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                bench.train_step(*built[side], inputs)
                wall[side] += time.perf_counter() - t0
            for e in prof.key_averages():
                row = acc[side][e.key]
                row[0] += e.self_cpu_time_total / 1e3
                row[1] += e.cpu_time_total / 1e3
                row[2] += e.count
    return acc, wall


def breakdown(ops: dict, wall_s: float, steps: int) -> dict:
    """ms per step by category. "dequantize" and "optimizer" are inclusive (the ATen operators
    they run count there too); the other categories are the self time of ATen operators."""
    per = defaultdict(float)
    for key, (self_ms, total_ms, _) in ops.items():
        if key == "dequantize":
            per["dequantize"] += total_ms / steps
        elif key.startswith("Optimizer.step#"):
            per["optimizer"] += total_ms / steps
        if key.startswith("aten::"):
            per["ATen operators, self"] += self_ms / steps
            for group, names in GROUPS.items():
                if key in names:
                    per[group] += self_ms / steps
    per["step (wall)"] = 1e3 * wall_s / steps
    per["Python and dispatch (wall - ATen self)"] = per["step (wall)"] - per["ATen operators, self"]
    return {k: round(v, 1) for k, v in per.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=list(bench.DTYPES), action="append")
    ap.add_argument("--side", choices=list(bench.BUILD), action="append")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, help="JSON (default bench/results/step-profile-<machine>"
                                             "-<threads>t.json)")
    args = ap.parse_args(argv)
    import qlora_mini  # noqa: F401
    if args.threads:
        torch.set_num_threads(args.threads)
    wrap_dequantize()
    inputs, out, top = bench.batch(args.vocab), {}, {}
    start, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        bench.save_model(folder, args.vocab)
        for dtype in args.dtype or list(bench.DTYPES):
            sides = args.side or list(bench.BUILD)
            built = {side: bench.BUILD[side](folder, bench.DTYPES[dtype]) for side in sides}
            for _ in range(args.warmup):
                for side in sides:
                    bench.train_step(*built[side], inputs)
            acc, wall = profile_steps(built, inputs, args.steps)
            for side in sides:
                out[f"{side} {dtype}"] = breakdown(acc[side], wall[side], args.steps)
            print(f"\n=== {dtype} compute: ms per step ===")
            print(json.dumps({k: out[f"{s} {dtype}"] for s in sides for k in [f"{s} {dtype}"]},
                             indent=1))
            keys = sorted(set().union(*acc.values()),
                          key=lambda k: -max(acc[s].get(k, [0])[0] for s in sides))
            print(f"{'operator (self ms per step, calls)':60s}" + "".join(f"{s:>22s}" for s in sides))
            top[dtype] = {k: {s: [round(acc[s][k][0] / args.steps, 2), acc[s][k][2] // args.steps]
                              for s in sides if k in acc[s]} for k in keys[:args.top]}
            for k in keys[:args.top]:
                print(f"{k[:60]:60s}" + "".join(
                    f"{acc[s][k][0] / args.steps:14.1f} {acc[s][k][2] // args.steps:6d} "
                    if k in acc[s] else " " * 22 for s in sides))
            del built
    info = bench.machine()
    result = {"benchmark": "QLoRA training step profile (torch.profiler), ms per step",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": info, "versions": bench.versions(), "commit": bench.commit(),
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "wall_s": round(time.time() - start, 1), "torch_threads": torch.get_num_threads(),
              "config": {"vocab_size": args.vocab, "warmup": args.warmup, "steps": args.steps},
              "breakdown_ms_per_step": out,
              "top_operators": "{dtype: {operator: {side: [self ms per step, calls per step]}}}",
              "operators": top}
    path = args.out or (bench.RESULTS / f"step-profile-{bench.machine_slug(info)}"
                                        f"-{torch.get_num_threads()}t.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
