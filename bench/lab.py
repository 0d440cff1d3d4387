"""The GPU lab of chapter 10: one command for the first GPU this project gets.

    python bench/lab.py                          # every step, in order; no download
    python bench/lab.py --steps kernels,step65b --layers 8 --out /tmp/lab.json

It builds chapter 4's kernel, runs the test files that exercise the GPU, runs chapter 4's
dequantization benchmark (bench/dequant.py), takes an 80-layer LLaMA-65B-shaped QLoRA step (random
4-bit weights from qlora_mini.random_qlora, batch 1, 512 tokens, checkpointing, paged AdamW) under
a 48 GiB cap and records the allocator's peaks and the step time, makes the paged optimizer really
page by filling the device, and compares tokens per second and peak memory with transformers +
bitsandbytes + PEFT on the same model. It writes one JSON file under bench/results/, labelled with
the device, the driver and the versions, rewritten (atomically) after every step: a lab that
crashes keeps the steps it finished, and `pending` names the ones it did not reach.

Bad arguments, and an --out it could not write, are refused before anything runs: one `error:`
line on stderr, exit status 2. Without CUDA it refuses in one line on stderr with exit status 2
and runs nothing. It needs this
source checkout (it runs tests/ and bench/ from it), so it lives here, not in the package.
"""
import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import qlora_mini  # noqa: F401  (quiets bitsandbytes' import-time log line)

ROOT = Path(__file__).resolve().parents[1]          # the source checkout: tests/ and bench/
STEPS = ("kernels", "gpu_tests", "dequant_bench", "step65b", "paging", "vs_bnb")
STATUSES = ("ok", "failed", "skipped")
NO_CUDA = ("bench/lab.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is "
           "False): nothing was run")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python bench/lab.py", description=(
        "Build the kernels, run the GPU tests and benchmarks, an 80-layer LLaMA-65B-shaped QLoRA "
        "step under a 48 GiB cap, the paging experiment and a comparison with transformers + "
        "bitsandbytes + PEFT; write one labelled JSON file."))
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated subset of {','.join(STEPS)} (default: all, in order)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: bench/results/lab_<gpu>_<date>.json)")
    parser.add_argument("--cap-gib", type=float, default=48.0, help="memory cap of the 65B step")
    parser.add_argument("--layers", type=int, default=80, help="decoder layers of the 65B step")
    parser.add_argument("--tokens", type=int, default=512, help="sequence length (batch 1)")
    args = parser.parse_args(argv)
    steps = [step.strip() for step in args.steps.split(",") if step.strip()]
    unknown = [step for step in steps if step not in STEPS]
    if unknown or not steps:
        parser.error(f"--steps: unknown {unknown or 'empty list'}; choose from {', '.join(STEPS)}")
    if not (math.isfinite(args.cap_gib) and args.cap_gib > 0):
        parser.error(f"--cap-gib {args.cap_gib}: must be a finite number of GiB > 0")
    if args.layers < 1:
        parser.error(f"--layers {args.layers}: must be >= 1")
    if args.tokens < 2:                                     # a next-token loss needs two tokens
        parser.error(f"--tokens {args.tokens}: must be >= 2")
    args.steps = [step for step in STEPS if step in steps]          # always in the lab's order
    return args


def environment() -> dict:
    """The date, the versions, and (with CUDA) the device and its driver."""
    import bitsandbytes
    import peft
    import transformers
    env = dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               versions=dict(python=sys.version.split()[0], torch=torch.__version__,
                             cuda=torch.version.cuda, transformers=transformers.__version__,
                             bitsandbytes=bitsandbytes.__version__, peft=peft.__version__))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = dict(name=props.name, capability=f"{props.major}.{props.minor}",
                             memory_bytes=props.total_memory, driver=driver_version())
    return env


def driver_version() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def out_problem(out: Path) -> str | None:
    """Why the lab could not write its JSON file at out (None: it can), found before any step
    runs: the folder must exist and take a new file (the writes go through a temporary file
    there), and out must be a regular file if it exists (never /dev/null or a folder)."""
    if not out.parent.is_dir():
        return f"--out {out}: the folder {out.parent} does not exist"
    if out.exists() and not out.is_file():
        return f"--out {out}: exists and is not a regular file"
    try:
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"):
            pass
    except OSError as e:
        return f"--out {out}: cannot create a file in {out.parent} ({e.strerror or e})"
    return None


def write_json(out: Path, result: dict) -> None:
    """result to out atomically: a temporary file in the same folder, then os.replace, so that a
    crash while writing leaves the previous version whole and no temporary file behind."""
    temporary = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=out.parent, prefix=f".{out.name}.",
                                         suffix=".tmp", delete=False) as f:
            temporary = f.name
            json.dump(result, f, indent=1)
        os.replace(temporary, out)
    except BaseException:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise


def run_step(name: str, step_fn, *args) -> dict:
    """step_fn(*args)'s measurements with its status and seconds; a failure is recorded (the lab
    goes on), and with CUDA the device memory in use outside PyTorch's caching allocator."""
    start = time.perf_counter()
    try:
        out = step_fn(*args)
        status = out.pop("status", "ok")
    except Exception as e:  # noqa: BLE001  (a lab step fails, the lab goes on)
        out, status = dict(error=f"{type(e).__name__}: {e}"[-2000:]), "failed"
    if torch.cuda.is_available():     # the CUDA context (and other processes): not the allocator's
        free, total = torch.cuda.mem_get_info()
        out["outside_allocator_bytes"] = total - free - torch.cuda.memory_reserved()
        torch.cuda.empty_cache()
    return dict(status=status, seconds=round(time.perf_counter() - start, 2), **out)


def check_result(result: dict) -> list[str]:
    """Problems with a lab result file's shape (empty list: fine)."""
    problems = [f"missing {key!r}" for key in ("what", "date", "versions", "device", "args", "steps")
                if key not in result]
    for name, step in result.get("steps", {}).items():
        if name not in STEPS:
            problems.append(f"unknown step {name!r}")
        elif step.get("status") not in STATUSES or not isinstance(step.get("seconds"), (int, float)):
            problems.append(f"step {name!r}: needs status in {STATUSES} and seconds")
    problems += [f"unknown pending step {name!r}" for name in result.get("pending", [])
                 if name not in STEPS]
    return problems


def run_in_checkout(cmd: list[str], timeout: int) -> dict:
    """cmd in a subprocess at the checkout's root: ok when it exits 0, and its output's tail."""
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return dict(status="ok" if done.returncode == 0 else "failed", returncode=done.returncode,
                output_tail=(done.stdout + done.stderr)[-3000:])


def step_kernels(args) -> dict:
    from qlora_mini import kernels
    return dict(status="ok" if kernels.available() else "failed",
                path=kernels.active_path("cuda"))


def step_gpu_tests(args) -> dict:
    return run_in_checkout([sys.executable, "-m", "pytest", "-q", "-x", "tests/test_kernels.py",
                            "tests/test_paged.py", "tests/test_linear4bit.py"], timeout=240)


def step_dequant_bench(args) -> dict:
    return run_in_checkout([sys.executable, "bench/dequant.py", "--iters", "20"], timeout=180)


def timed_steps(model, opt, tokens: int, n: int = 3, vocab: int = 32000) -> list[float]:
    """Seconds of n training steps (forward, backward, optimizer step) on random ids."""
    ids = torch.randint(0, vocab, (1, tokens), device="cuda")       # (1, T) long
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def step_65b(args, keep: dict) -> dict:
    """The 65B step under the cap: resident bytes, the allocator's peaks, three step times."""
    from qlora_mini.paged import PagedAdamW
    from qlora_mini.random_qlora import random_qlora_model
    total = torch.cuda.get_device_properties(0).total_memory
    cap = min(args.cap_gib * 2 ** 30, total)
    torch.cuda.set_per_process_memory_fraction(cap / total)
    model = random_qlora_model("65B", args.layers, device="cuda")
    opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = timed_steps(model, opt, args.tokens)
    keep.update(model=model, opt=opt)
    return dict(layers=args.layers, tokens=args.tokens, cap_bytes=int(cap), resident_bytes=resident,
                max_memory_allocated=torch.cuda.max_memory_allocated(),
                max_memory_reserved=torch.cuda.max_memory_reserved(),
                paged_optimizer_bytes=opt.paged_bytes, step_s=times)


def step_paging(args, keep: dict) -> dict:
    """A per-process memory fraction bounds PyTorch's allocator, not CUDA's managed memory, so it
    cannot make the optimizer page: fill the device with an ordinary tensor until less is free
    than the step's transients plus the paged states, then time the steps again."""
    if "model" not in keep:
        return dict(status="skipped", reason="needs the step65b step's model")
    model, opt = keep["model"], keep["opt"]
    torch.cuda.set_per_process_memory_fraction(1.0)
    before = timed_steps(model, opt, args.tokens)
    transient = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
    free, _ = torch.cuda.mem_get_info()
    headroom = transient + 2 * 2 ** 30                      # < transient + paged states
    filler_bytes = max(0, free - headroom)
    filler = torch.empty(filler_bytes, dtype=torch.uint8, device="cuda")
    after = timed_steps(model, opt, args.tokens)
    free_during, _ = torch.cuda.mem_get_info()
    del filler
    return dict(paged_optimizer_bytes=opt.paged_bytes, filler_bytes=int(filler_bytes),
                free_bytes_during=free_during,
                exceeds_device=bool(opt.paged_bytes > headroom - transient),
                step_s_without_pressure=before, step_s_with_pressure=after)


def reference_policy(model):
    """artidoro/qlora's casts after get_peft_model: LoRA bf16, norms fp32, embeddings/head bf16."""
    for name, module in model.named_modules():
        if "lora_" in name:
            module.to(torch.bfloat16)
        elif "norm" in name.rsplit(".", 1)[-1]:
            module.to(torch.float32)
        elif name.endswith(("lm_head", "embed_tokens")):
            module.to(torch.bfloat16)
    return model


def bnb_peft_model(path):
    """The ecosystem's QLoRA of the checkpoint at path, on CUDA: transformers + bitsandbytes
    (NF4, double quantization, bf16 compute) + PEFT (r = 64 on every linear layer)."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                 quantization_config=quantization,
                                                 device_map="cuda")
    model = peft.prepare_model_for_kbit_training(model)
    lora = peft.LoraConfig(r=64, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    return reference_policy(peft.get_peft_model(model, lora))


def step_vs_bnb(args, keep: dict, layers: int = 4, steps: int = 5) -> dict:
    """The same random LLaMA-7B-shaped checkpoint (a few layers) loaded by our load_4bit and by
    transformers + bitsandbytes, LoRA r = 64 everywhere: tokens per second and peak memory."""
    from transformers import AutoModelForCausalLM
    from qlora_mini.load4bit import load_4bit
    from qlora_mini.lora import prepare_qlora
    from qlora_mini.memory import llama_config
    from qlora_mini.paged import PagedAdamW
    keep.clear()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)
    config = llama_config("7B")
    config.num_hidden_layers = layers
    out = {}
    with tempfile.TemporaryDirectory() as checkpoint:
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(checkpoint)
        for side in ("qlora_mini", "transformers+bnb+peft"):
            torch.cuda.reset_peak_memory_stats()
            if side == "qlora_mini":
                model = prepare_qlora(load_4bit(checkpoint, device="cuda"), r=64, alpha=16,
                                      dropout=0.05)
            else:
                model = bnb_peft_model(checkpoint)
            opt = PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            times = timed_steps(model.train(), opt, args.tokens, n=steps)
            warm = sorted(times[1:])                             # the first step warms up
            out[side] = dict(tokens_per_s=args.tokens / warm[len(warm) // 2],
                             max_memory_allocated=torch.cuda.max_memory_allocated(), step_s=times)
            del model, opt
            torch.cuda.empty_cache()
    return dict(shape="LLaMA-7B", layers=layers, tokens=args.tokens, **out)


STEP_FUNCTIONS = dict(kernels=step_kernels, gpu_tests=step_gpu_tests,
                      dequant_bench=step_dequant_bench, step65b=step_65b, paging=step_paging,
                      vs_bnb=step_vs_bnb)
SHARING_A_MODEL = ("step65b", "paging", "vs_bnb")   # steps handed the dict that keeps the model


def run_lab(args, result: dict, out: Path) -> int:
    """Run the chosen steps in order into result["steps"], rewriting out after each one (what is
    still to run is in result["pending"], absent once all ran); 0 when every step that ran is
    fine, 1 otherwise."""
    keep = {}
    result["pending"] = list(args.steps)
    write_json(out, result)
    for name in args.steps:
        extra = (keep,) if name in SHARING_A_MODEL else ()
        step = run_step(name, STEP_FUNCTIONS[name], args, *extra)
        result["steps"][name] = step
        result["pending"].remove(name)
        if not result["pending"]:
            del result["pending"]
        write_json(out, result)
        print(f"{name}: {step['status']} ({step['seconds']} s)", flush=True)
    print(f"wrote {out}")
    return 0 if all(step["status"] != "failed" for step in result["steps"].values()) else 1


def main(argv=None) -> int:
    """Refuse an --out it could not write, then refuse without CUDA (exit status 2, one line on
    stderr each); run the chosen steps in order, writing the JSON after each (run_lab)."""
    args = parse_args(argv)
    problem = out_problem(args.out) if args.out is not None else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    result = dict(what="qlora_mini GPU lab (python bench/lab.py)", **environment(),
                  args={k: v for k, v in vars(args).items() if k != "out"}, steps={})
    gpu = result["device"]["name"].lower().replace(" ", "-").replace("/", "-")
    out = args.out or ROOT / "bench" / "results" / f"lab_{gpu}_{result['date'][:10]}.json"
    if args.out is None:                        # the default file, once the GPU's name is known
        with contextlib.suppress(OSError):      # out_problem says why, if it could not
            out.parent.mkdir(parents=True, exist_ok=True)
        problem = out_problem(out)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    try:
        return run_lab(args, result, out)
    except KeyboardInterrupt:
        print(f"interrupted: the steps that finished are in {out}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
