"""Benchmark: 4-bit dequantization, qlora_mini's kernels vs bitsandbytes, on a GPU or a CPU.

GPU mode (default): NF4 + double quant → bf16, the CUDA kernel.

Effective bandwidth = the bytes that must move (packed codes + absmax codes + nested absmax read,
bf16 output written) / time, for:
  qlora_mini    qlora_mini.kernels.dequantize_4bit_cuda (one launch)
  bitsandbytes  bitsandbytes.functional.dequantize_4bit (its own launches; charged the same bytes)
  copy          torch.Tensor.copy_ of a bf16 buffer of the output's size (bytes read + written):
                the practical ceiling, measured in the same run
Times are medians of CUDA-event timings after warm-up, with L2 flushed before every timed call.
Each size is first checked bit for bit against bitsandbytes. Writes JSON to bench/results/.

    python bench/dequant.py                        # LLaMA shapes from 4096x4096 to 8192x22016
    python bench/dequant.py --sizes 4096x4096 --iters 20

CPU mode (--cpu): the CPU twin through the dispatcher qlora_mini.kernels.dequantize_4bit (allocating
its output, as bitsandbytes does) and kernels.dequantize_4bit_cpu into a reused ``out``, against
bitsandbytes.functional.dequantize_4bit and two copies of the output's size and dtype: ``src.clone()``
(allocates, as the dispatcher does: compared with it) and ``dst.copy_(src)`` into a
preallocated buffer (compared with the ``out=`` call), for NF4 and FP4, with and without
double quant, to fp32/bf16/fp16, sizes 1024x1024 to 8192x22016; and ``kernel_only``, the
compiled function alone through ctypes with its arguments built once (what the Python around it
costs), against ``copy_``. The contestants run in rounds, each round in a fresh seeded random
order, so that a busy machine slows them alike and none always runs right after the same other
one (which would warm its caches); medians after warm-up. Each configuration is first checked
against bitsandbytes (equal values), and the kernel alone against the dispatcher.

    python bench/dequant.py --cpu                  # all sizes and configurations
    python bench/dequant.py --cpu --sizes 1024x1024,4096x4096 --iters 7
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# (rows, cols): LLaMA-7B attention and MLP, 13B MLP, 65B attention and MLP (the largest linear)
SIZES = [(4096, 4096), (4096, 11008), (5120, 13824), (8192, 8192), (8192, 22016)]
BLOCKSIZE = 64


def bytes_moved(n: int, blocksize: int = BLOCKSIZE) -> int:
    """Minimum traffic of NF4+DQ → bf16: everything stored read (chapter 3's storage_nbytes:
    packed codes, uint8 absmax codes, nested absmax, offset), 2n written."""
    from qlora_mini.storage import storage_nbytes
    return storage_nbytes(n, blocksize, double_quant=True) + 2 * n


def time_ms(fn, warmup: int, iters: int, flush: torch.Tensor) -> float:
    """Median milliseconds of fn() over iters calls, L2 flushed (flush.zero_()) before each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_size(rows: int, cols: int, warmup: int, iters: int, flush: torch.Tensor) -> dict:
    import bitsandbytes.functional as F

    from qlora_mini import kernels
    from qlora_mini.storage import quantize_4bit, to_bnb

    g = torch.Generator(device="cuda").manual_seed(rows * cols % 2**31)
    W = torch.randn(rows, cols, generator=g, device="cuda", dtype=torch.bfloat16)
    packed, state = quantize_4bit(W, BLOCKSIZE, "nf4", double_quant=True)
    del W
    p_bnb, qs = to_bnb(packed, state)
    out = torch.empty(rows, cols, dtype=torch.bfloat16, device="cuda")
    ours = kernels.dequantize_4bit_cuda(packed, state, torch.bfloat16, out=out)
    theirs = F.dequantize_4bit(p_bnb, qs)
    if not torch.equal(ours.view(torch.int16), theirs.view(torch.int16)):
        raise AssertionError(f"{rows}x{cols}: kernel output differs from bitsandbytes")
    del theirs
    src, dst = torch.empty_like(out), torch.empty_like(out)
    n = rows * cols
    ms = {
        "qlora_mini": time_ms(lambda: kernels.dequantize_4bit_cuda(packed, state, torch.bfloat16, out=out),
                              warmup, iters, flush),
        "bitsandbytes": time_ms(lambda: F.dequantize_4bit(p_bnb, qs), warmup, iters, flush),
        "copy": time_ms(lambda: dst.copy_(src), warmup, iters, flush),
    }
    moved = {"qlora_mini": bytes_moved(n), "bitsandbytes": bytes_moved(n), "copy": 2 * 2 * n}
    return dict(rows=rows, cols=cols, n=n, bytes_moved=moved, ms=ms,
                gb_per_s={k: moved[k] / (ms[k] * 1e-3) / 1e9 for k in ms})


def environment() -> dict:
    import bitsandbytes

    import qlora_mini
    from qlora_mini import kernels
    props = torch.cuda.get_device_properties(0)
    return dict(device=torch.cuda.get_device_name(0), capability=f"sm_{props.major}{props.minor}",
                memory_gb=round(props.total_memory / 1e9, 1), torch=torch.__version__,
                cuda=torch.version.cuda, bitsandbytes=bitsandbytes.__version__,
                qlora_mini=qlora_mini.__version__, kernel_path=kernels.active_path(),
                python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def run(sizes=SIZES, warmup: int = 10, iters: int = 50) -> dict:
    """Benchmark every size; returns the JSON-ready record (environment + one row per size)."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench/dequant.py needs a CUDA GPU: torch.cuda.is_available() is False "
                           "here. Run it on a machine with an NVIDIA GPU and a CUDA build of torch.")
    from qlora_mini import kernels
    if not kernels.available():
        raise RuntimeError(f"the qlora_mini CUDA kernel did not build: {kernels.active_path()}")
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB > any L2
    rows = [bench_size(r, c, warmup, iters, flush) for r, c in sizes]
    config = dict(quant_type="nf4", double_quant=True, blocksize=BLOCKSIZE, out_dtype="bfloat16",
                  warmup=warmup, iters=iters, statistic="median", l2_flushed=True)
    return dict(environment(), config=config, results=rows)


# ------------------------------------------------------------------------------------------ CPU

CPU_SIZES = [(1024, 1024), (4096, 4096), (4096, 11008), (8192, 8192), (8192, 22016)]
CPU_DTYPES = ("float32", "bfloat16", "float16")


def shuffled_rounds_ms(fns: dict, warmup: int, iters: int, seed: int = 0) -> dict:
    """Median milliseconds of each fn, called in rounds, each round in a fresh (seeded) random
    order. A busy machine slows them alike, and no fn always runs right after the same other
    one: in a fixed cyclic order (our earlier round robin) ``clone`` always followed ``copy``,
    which had just read clone's source into the cache, a head start at sizes that fit in it."""
    names, order = list(fns), random.Random(seed)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for _ in range(iters):
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


@functools.cache
def raw_cpu_library():
    """The CPU kernel alone (same source and flags as the extension, no binding), for ctypes."""
    from qlora_mini import kernel_build
    return kernel_build.build_cpu_library()


def bench_cpu_config(packed, state, p_bnb, qs, dtype_name: str, warmup: int, iters: int) -> dict:
    import bitsandbytes.functional as F

    from qlora_mini import kernel_build, kernels
    dtype = getattr(torch, dtype_name)
    qs.dtype = dtype
    ours, theirs = kernels.dequantize_4bit(packed, state, dtype), F.dequantize_4bit(p_bnb, qs)
    if not torch.equal(ours, theirs.reshape(ours.shape)):
        raise AssertionError(f"{tuple(state.shape)} {state.quant_type} -> {dtype_name}: differs from bnb")
    src, dst = torch.empty_like(ours).copy_(theirs.reshape(ours.shape)), torch.empty_like(ours)
    out, raw_out = torch.empty_like(ours), torch.empty_like(ours)
    lib = raw_cpu_library()
    raw_args, _keep = kernel_build._c_args(packed, state, raw_out)  # built once: the kernel alone
    threads = torch.get_num_threads()
    err = lib.qlora_mini_dequantize_4bit_cpu(ctypes.byref(raw_args), threads, 0)
    if err or not torch.equal(raw_out, ours):
        raise AssertionError(f"{tuple(state.shape)} -> {dtype_name}: the kernel alone differs ({err})")
    del ours, theirs
    ms = shuffled_rounds_ms({
        "qlora_mini": lambda: kernels.dequantize_4bit(packed, state, dtype),
        "qlora_mini_out": lambda: kernels.dequantize_4bit_cpu(packed, state, dtype, out=out),
        "kernel_only": lambda: lib.qlora_mini_dequantize_4bit_cpu(ctypes.byref(raw_args), threads, 0),
        "bitsandbytes": lambda: F.dequantize_4bit(p_bnb, qs),
        "copy": lambda: dst.copy_(src),
        "clone": lambda: src.clone(),
    }, warmup, iters)
    n, out_bytes = state.numel, state.numel * dst.element_size()
    moved = packed.numel() + state.nbytes() + out_bytes            # read codes + constants, write
    return dict(quant_type=state.quant_type, double_quant=state.double_quant, dtype=dtype_name,
                path=kernels.dequantize_path(packed), ms=ms,
                bytes_moved={"qlora_mini": moved, "qlora_mini_out": moved, "kernel_only": moved,
                             "bitsandbytes": moved,
                             "copy": 2 * out_bytes, "clone": 2 * out_bytes},
                vs_bitsandbytes=ms["bitsandbytes"] / ms["qlora_mini"],
                vs_copy=ms["copy"] / ms["qlora_mini"],
                vs_clone=ms["clone"] / ms["qlora_mini"],
                out_vs_copy=ms["copy"] / ms["qlora_mini_out"],
                kernel_only_vs_copy=ms["copy"] / ms["kernel_only"],
                copy_gb_per_s=2 * out_bytes / (ms["copy"] * 1e-3) / 1e9,
                qlora_mini_gb_per_s=moved / (ms["qlora_mini"] * 1e-3) / 1e9, n=n)


def iters_for(n: int, iters: int) -> int:
    """More rounds for small matrices, whose sub-millisecond timings a busy machine disturbs most
    (a 1024x1024 round takes about a millisecond)."""
    return iters if n > 1 << 25 else 2 * iters + 1 if n > 1 << 22 else 20 * iters + 1


def run_cpu(sizes=CPU_SIZES, warmup: int = 3, iters: int = 9, dtypes=CPU_DTYPES) -> dict:
    """Every size × {nf4, fp4} × {double quant, not} × dtypes on the CPU; the JSON-ready record."""
    import bitsandbytes
    import bitsandbytes.functional as F

    import qlora_mini
    from qlora_mini import kernels
    from qlora_mini.storage import from_bnb
    started, load_before = time.perf_counter(), os.getloadavg()
    rows = []
    for r, c in sizes:
        W = torch.randn(r, c, generator=torch.Generator().manual_seed(r * c % 2**31))
        for quant_type in ("nf4", "fp4"):
            for dq in (True, False):
                p_bnb, qs = F.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type=quant_type,
                                            compress_statistics=dq)
                packed, state = from_bnb(p_bnb, qs)
                for dtype_name in dtypes:
                    row = bench_cpu_config(packed, state, p_bnb, qs, dtype_name, warmup,
                                           iters_for(r * c, iters))
                    rows.append(dict(rows=r, cols=c, **row))
                    print(f"{r}x{c} {quant_type} dq={dq!s:5} -> {dtype_name:8} "
                          f"ours {row['ms']['qlora_mini']:8.2f} ms  bnb {row['ms']['bitsandbytes']:8.2f}"
                          f"  copy {row['ms']['copy']:8.2f}   vs bnb {row['vs_bitsandbytes']:.2f}x"
                          f"  vs clone {row['vs_clone']:.2f}x  out= vs copy_ {row['out_vs_copy']:.2f}x",
                          flush=True)
        del W
    config = dict(blocksize=BLOCKSIZE, warmup=warmup, statistic="median",
                  iters={f"{r}x{c}": iters_for(r * c, iters) for r, c in sizes},
                  schedule="rounds in a seeded random order",
                  qlora_mini_call="kernels.dequantize_4bit (allocates)",
                  bitsandbytes_call="bitsandbytes.functional.dequantize_4bit (allocates)",
                  qlora_mini_out_call="kernels.dequantize_4bit_cpu(..., out=out), out reused",
                  kernel_only_call="the same kernel source built alone (no binding), through "
                                   "ctypes, its arguments built once (no Python or binding per "
                                   "call), out reused",
                  copy_call="dst.copy_(src), preallocated, output size and dtype",
                  clone_call="src.clone(), allocates, output size and dtype")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from step import commit  # bench/step.py: HEAD, "+dirty" when code differs from it
    return dict(kind="cpu", device=kernels.cpu_name(), cores=os.cpu_count(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(),  # torch's dispatch
                bitsandbytes_cpu_path="AVX-512" if F.lib.has_avx512f_cpu() else "AVX2/scalar",
                threads=torch.get_num_threads(), torch=torch.__version__, commit=commit(),
                bitsandbytes=bitsandbytes.__version__, qlora_mini=qlora_mini.__version__,
                kernel_path=kernels.active_path("cpu"), python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                load_average_before=load_before, load_average_after=os.getloadavg(),
                wall_s=round(time.perf_counter() - started, 1), config=config, results=rows)


def save(record: dict, outdir: Path = RESULTS) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", record["device"]).strip("-").lower()
    if record.get("cpu_capability", "AVX512") != "AVX512":   # e.g. make test-avx2's capped CPU
        slug += f"-{record['cpu_capability'].lower()}"
    prefix = "dequant_cpu" if record.get("kind") == "cpu" else "dequant"
    path = outdir / f"{prefix}_{slug}_{record['date'][:10]}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="benchmark the CPU twin instead")
    ap.add_argument("--sizes", type=parse_sizes, default=None, help="e.g. 4096x4096,8192x22016")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON file")
    args = ap.parse_args(argv)
    if args.cpu:
        record = run_cpu(args.sizes or CPU_SIZES, args.warmup or 3, args.iters or 9)
        worst_bnb = min(r["vs_bitsandbytes"] for r in record["results"])
        worst_clone = min(r["vs_clone"] for r in record["results"])
        worst_out = min(r["out_vs_copy"] for r in record["results"])
        print(f"{record['device']}, {record['threads']} threads, torch {record['torch']}, "
              f"bitsandbytes {record['bitsandbytes']}, load {record['load_average_before'][0]:.1f}"
              f" -> {record['load_average_after'][0]:.1f}: worst ratio vs bnb {worst_bnb:.2f}x, "
              f"vs an allocating copy {worst_clone:.2f}x; out= vs copy_ into a preallocated buffer "
              f"{worst_out:.2f}x")
        print(f"wrote {save(record, args.out)}")
        return 0
    args.sizes, args.warmup, args.iters = args.sizes or SIZES, args.warmup or 10, args.iters or 50
    try:
        record = run(args.sizes, args.warmup, args.iters)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{record['device']} ({record['capability']}), torch {record['torch']}, CUDA {record['cuda']}, "
          f"bitsandbytes {record['bitsandbytes']}")
    print(f"{'size':>12} {'qlora_mini GB/s':>16} {'bitsandbytes GB/s':>18} {'copy GB/s':>10}")
    for r in record["results"]:
        bw = r["gb_per_s"]
        print(f"{r['rows']}x{r['cols']:<7} {bw['qlora_mini']:16.0f} {bw['bitsandbytes']:18.0f} {bw['copy']:10.0f}")
    print(f"wrote {save(record, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
