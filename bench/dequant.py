"""Benchmark: NF4 + double quant → bf16 dequantization, qlora_mini's CUDA kernel vs bitsandbytes.

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
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# (rows, cols): LLaMA-7B attention and MLP, 13B MLP, 65B attention and MLP (the largest linear)
SIZES = [(4096, 4096), (4096, 11008), (5120, 13824), (8192, 8192), (8192, 22016)]
BLOCKSIZE = 64


def bytes_moved(n: int, blocksize: int = BLOCKSIZE, nested: int = 256) -> int:
    """Minimum traffic of NF4+DQ → bf16: n/2 packed + n/blocksize uint8 absmax codes + 4 bytes
    per nested block read, 2n written (the two codebooks and the offset are negligible)."""
    n_blocks = -(-n // blocksize)
    return -(-n // 2) + n_blocks + 4 * -(-n_blocks // nested) + 2 * n


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


def save(record: dict, outdir: Path = RESULTS) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", record["device"]).strip("-").lower()
    path = outdir / f"dequant_{slug}_{record['date'][:10]}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=parse_sizes, default=SIZES, help="e.g. 4096x4096,8192x22016")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON file")
    args = ap.parse_args(argv)
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
