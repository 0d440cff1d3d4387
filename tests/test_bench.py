"""bench/dequant.py's CPU mode, which made the committed CPU record: its schedule (every contestant
once a round, in an order that changes) and one configuration end to end on a small weight."""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_dequant", ROOT / "bench" / "dequant.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_run_every_contestant_once_in_changing_order(bench):
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abcde"}
    ms = bench.shuffled_rounds_ms(fns, warmup=1, iters=20)
    assert set(ms) == set(fns) and all(t >= 0 for t in ms.values())
    rounds = [calls[5 * i:5 * i + 5] for i in range(1, 21)]          # after the warm-up round
    assert all(sorted(r) == list("abcde") for r in rounds)
    before_e = {r[r.index("e") - 1] for r in rounds if r[0] != "e"}
    assert len(before_e) > 1, "a fixed order: 'e' always follows the same contestant"


def test_one_cpu_configuration(bench):
    import bitsandbytes.functional as F
    from qlora_mini import kernels
    from qlora_mini.storage import from_bnb
    if not kernels.cpu_available():
        pytest.skip("the CPU twin did not build on this machine")
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    p_bnb, qs = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = from_bnb(p_bnb, qs)
    row = bench.bench_cpu_config(packed, state, p_bnb, qs, "bfloat16", warmup=1, iters=3)
    assert set(row["ms"]) == {"qlora_mini", "qlora_mini_out", "kernel_only", "bitsandbytes",
                              "copy", "clone"}
    assert row["kernel_only_vs_copy"] == pytest.approx(row["ms"]["copy"] / row["ms"]["kernel_only"])
    assert row["vs_clone"] == pytest.approx(row["ms"]["clone"] / row["ms"]["qlora_mini"])


def test_cpu_record_names_machine_versions_and_commit(bench):
    """run_cpu's record: every configuration of a size, and what made it (machine, versions,
    the commit, git's HEAD as `git rev-parse` reports it independently)."""
    import subprocess

    from qlora_mini import kernels
    if not kernels.cpu_available():
        pytest.skip("the CPU twin did not build on this machine")
    record = bench.run_cpu(sizes=[(32, 64)], warmup=0, iters=1, dtypes=("float16",))
    assert len(record["results"]) == 4                                # nf4/fp4 x dq on/off
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    if head:                                                          # a git checkout
        assert record["commit"].split("+")[0] == head
    assert record["kind"] == "cpu" and record["device"] == kernels.cpu_name()
    assert record["bitsandbytes"] and record["torch"] == torch.__version__
