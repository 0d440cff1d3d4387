"""Benchmark: one QLoRA training step, qlora_mini against transformers + bitsandbytes + PEFT (CPU).

The model: a randomly initialised LLaMA (transformers' LlamaForCausalLM, seed 0) with 4 layers,
hidden size 512, intermediate size 1408 (LLaMA's 8/3 ratio, rounded to a multiple of 64), 8 heads,
and the vocabulary of the book's default model (4,096 tokens; ``--vocab 32000`` for LLaMA's). It
is saved once with ``save_pretrained`` to a temporary folder, and both sides load that folder:

  qlora_mini   from_pretrained (fp32) -> qlora_mini.prepare_qlora (NF4 + double quantization,
               LoRA r=64 alpha=16 on all linear layers but lm_head, dropout 0, gradient
               checkpointing, dtype_policy="fp32": PEFT's dtypes, fp32 adapters, norms,
               embeddings and head, like the reference) -> qlora_mini.PagedAdamW
  reference    from_pretrained with BitsAndBytesConfig(nf4, double quant, compute dtype) ->
               peft.prepare_model_for_kbit_training (gradient checkpointing) -> peft.get_peft_model
               (LoraConfig r=64 alpha=16, "all-linear", dropout 0) -> bnb.optim.PagedAdamW32bit

Both in train mode, compute dtype fp32 and then bf16, batch 2 x 256 tokens (random ids, labels =
inputs), lr 2e-4, no weight decay. A step is forward + backward + optimizer step + zero_grad.

Time: both models live in one process; after warm-up steps, steps of the two sides alternate
(the order flips every round) so that they share the machine's noise; we report the median step
time and tokens/s = tokens per batch / median, and beside them the median CPU time of a step
(all threads, spin-waiting included) and its minor page faults (fresh memory the step touched):
on a shared, loaded machine these say more than the wall time. ``--threads`` sets torch's threads
(default: torch's own choice, one per core).

Peak memory: torch's CPU allocator is plain malloc, so we read the kernel's peak resident set
(VmHWM in /proc/self/status) in a fresh subprocess per side and dtype. Each child imports the
same libraries, builds its model, returns the memory the build freed to the system (glibc's
malloc_trim: otherwise the heap keeps what loading the fp32 checkpoint left, which differs by
side and run), then resets the peak (writing 5 to /proc/self/clear_refs) and runs a few steps:
``train_peak_MB`` is the peak resident memory while training (libraries and model included),
``build_peak_MB`` the peak while loading and quantizing, ``baseline_MB`` the resident memory after
the imports alone. Each is the median of three such children per side and dtype (the sides take
turns going first); one child's peak moves by several MB from run to run.

    python bench/step.py                 # ~5 minutes on 2 cores: writes bench/results/step-<machine>.json
    python bench/step.py --iters 5 --no-memory
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8)
R, ALPHA, LR, BATCH, SEQ = 64, 16, 2e-4, 2, 256


def save_model(folder: Path, vocab: int) -> None:
    """The random LLaMA both sides load (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**SHAPE, vocab_size=vocab, max_position_embeddings=2 * SEQ)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)


def ours(folder: Path, dtype: torch.dtype):
    import qlora_mini
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    qlora_mini.prepare_qlora(model, r=R, alpha=ALPHA, dropout=0.0, compute_dtype=dtype,
                             gradient_checkpointing=True, dtype_policy="fp32")  # PEFT's dtypes
    params = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no paging on a CPU"
        opt = qlora_mini.PagedAdamW(params, lr=LR, weight_decay=0.0)
    return model.train(), opt


def reference(folder: Path, dtype: torch.dtype):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qc,
                                                 dtype=torch.float32, device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU"
        opt = bnb.optim.PagedAdamW32bit(params, lr=LR, weight_decay=0.0)
    return model.train(), opt


BUILD = {"qlora_mini": ours, "reference": reference}


def batch(vocab: int) -> dict:
    ids = torch.randint(vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, labels=ids)


def train_step(model, opt, inputs) -> float:
    loss = model(**inputs).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)[1])


def memory_child(side: str, dtype: str, folder: Path, vocab: int, steps: int) -> dict:
    """Run in a fresh process: peak resident memory (MB) of building and of training one side."""
    import bitsandbytes  # noqa: F401  the same imports on both sides: the same baseline
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import qlora_mini  # noqa: F401
    baseline = _status_kb("VmRSS")
    model, opt = BUILD[side](folder, DTYPES[dtype])
    inputs = batch(vocab)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what the build freed, on both sides
    build_peak, resident = _status_kb("VmHWM"), _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    for _ in range(steps):
        train_step(model, opt, inputs)
    return {"baseline_MB": baseline / 1024, "build_peak_MB": build_peak / 1024,
            "model_resident_MB": resident / 1024, "train_peak_MB": _status_kb("VmHWM") / 1024}


def _memory_run(side: str, dtype: str, folder: Path, vocab: int, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", side, "--dtype", dtype, "--dir", str(folder),
           "--vocab", str(vocab), "--steps", str(steps), "--threads", str(torch.get_num_threads())]
    run = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def measure_memory(folder: Path, vocab: int, steps: int = 3, repeats: int = 3,
                   dtypes=tuple(DTYPES)) -> dict:
    """Per dtype and side, the median of ``repeats`` fresh children, field by field (one child's
    peak moves by several MB from run to run), with every child's numbers under "runs". The sides
    take turns going first."""
    runs = {}
    for k in range(repeats):
        for dtype in dtypes:
            for side in (list(BUILD) if k % 2 == 0 else list(BUILD)[::-1]):
                one = _memory_run(side, dtype, folder, vocab, steps)
                runs.setdefault(dtype, {}).setdefault(side, []).append(one)
    return {dtype: {side: {**{f: statistics.median(r[f] for r in rs) for f in rs[0]}, "runs": rs}
                    for side, rs in sides.items()} for dtype, sides in runs.items()}


def measure_time(folder: Path, vocab: int, warmup: int, iters: int,
                 dtypes=tuple(DTYPES)) -> dict:
    """Median step time of both sides, interleaved in one process, per compute dtype."""
    inputs, out = batch(vocab), {}
    for name, dtype in ((name, DTYPES[name]) for name in dtypes):
        built = {side: build(folder, dtype) for side, build in BUILD.items()}
        first_loss = {side: train_step(*built[side], inputs) for side in built}
        for _ in range(warmup - 1):
            for side in built:
                train_step(*built[side], inputs)
        times, cpu, faults = ({side: [] for side in built} for _ in range(3))
        for i in range(iters):
            order = list(built) if i % 2 == 0 else list(built)[::-1]
            for side in order:
                f0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
                t0 = time.perf_counter()
                train_step(*built[side], inputs)
                times[side].append(time.perf_counter() - t0)
                cpu[side].append(time.process_time() - c0)
                faults[side].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        tokens = BATCH * SEQ
        res = {side: {"median_ms": 1e3 * statistics.median(t), "tokens_per_s":
                      tokens / statistics.median(t), "step_ms": [round(1e3 * x, 2) for x in t],
                      "cpu_ms_median": 1e3 * statistics.median(cpu[side]),
                      "minor_page_faults_median": statistics.median(faults[side]),
                      "first_loss": first_loss[side]} for side, t in times.items()}
        res["ratio"] = res["qlora_mini"]["tokens_per_s"] / res["reference"]["tokens_per_s"]
        out[name] = res
        del built
        gc.collect()
    return out


def machine() -> dict:
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return {"cpu": cpu[1].strip() if cpu else platform.processor(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "platform": platform.platform()}


def machine_slug(info: dict) -> str:
    """'intel-r-xeon-r-processor-2c': the CPU model and the number of cores, for file names, and
    torch's dispatch where it is capped below AVX-512 ('...-2c-avx2': make test-avx2's CPU)."""
    capped = "" if info["cpu_capability"] == "AVX512" else f"-{info['cpu_capability'].lower()}"
    return re.sub(r"[^a-z0-9]+", "-", info["cpu"].lower()).strip("-") + f"-{info['cores']}c{capped}"


def commit() -> str | None:
    """The repository's commit (with '+dirty' when files differ from it), or None."""
    def git(*args):
        run = subprocess.run(["git", *args], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
        return run.stdout.strip() if run.returncode == 0 else None
    head = git("rev-parse", "--short", "HEAD")       # results files written here do not count
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                ":(top,exclude)bench/results")
    return head and head + ("+dirty" if dirty else "")


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    import qlora_mini
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__, "qlora_mini": qlora_mini.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)  # timed rounds: medians of 10 moved by ~10%
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                    help="compute dtypes to measure (bf16 is emulated, ~70x slower, on AVX2)")
    ap.add_argument("--out", type=Path, help="JSON path (default bench/results/step-<machine>.json, "
                    "-<N>t before .json with --threads N other than the core count)")
    ap.add_argument("--memory-child", choices=list(BUILD), help=argparse.SUPPRESS)
    ap.add_argument("--dtype", choices=list(DTYPES), help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(memory_child(args.memory_child, args.dtype, args.dir, args.vocab,
                                      args.steps)))
        return 0

    import qlora_mini  # noqa: F401  quiets bitsandbytes' import-time log line
    if args.threads:
        torch.set_num_threads(args.threads)
    start, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama-4x512"
        save_model(folder, args.vocab)
        timing = measure_time(folder, args.vocab, args.warmup, args.iters, args.dtypes)
        memory = {} if args.no_memory else measure_memory(folder, args.vocab, dtypes=args.dtypes)
    info = machine()
    result = {
        "benchmark": "QLoRA training step, qlora_mini vs transformers + bitsandbytes + PEFT",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": info, "versions": versions(), "commit": commit(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "wall_s": round(time.time() - start, 1), "torch_threads": torch.get_num_threads(),
        "config": {**SHAPE, "vocab_size": args.vocab, "r": R, "alpha": ALPHA, "lora_dropout": 0.0,
                   "batch": BATCH, "seq_len": SEQ, "lr": LR, "gradient_checkpointing": True,
                   "warmup": args.warmup, "iters": args.iters, "seed": 0},
        "time": timing, "memory": memory,
    }
    for name, res in timing.items():
        mem = memory.get(name, {})
        peaks = {s: mem.get(s, {}).get("train_peak_MB", float("nan")) for s in BUILD}
        cpu = {s: res[s]["cpu_ms_median"] for s in BUILD}
        print(f"{name}: qlora_mini {res['qlora_mini']['tokens_per_s']:7.0f} tok/s, reference "
              f"{res['reference']['tokens_per_s']:7.0f} tok/s, ratio {res['ratio']:.2f}; CPU ms "
              f"{cpu['qlora_mini']:.0f} vs {cpu['reference']:.0f}; "
              f"train peak MB {peaks['qlora_mini']:.0f} vs {peaks['reference']:.0f}")
    threads = f"-{args.threads}t" if args.threads and args.threads != os.cpu_count() else ""
    out = args.out or RESULTS / f"step-{machine_slug(info)}{threads}.json"   # e.g. ...-2c-1t.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
