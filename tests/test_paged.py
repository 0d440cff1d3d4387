"""PagedAdamW (chapter 7) against torch.optim.AdamW and bitsandbytes' PagedAdamW32bit; the CUDA source."""
import copy
import os
import shutil
import subprocess
import warnings

import bitsandbytes as bnb
import pytest
import torch

from qlora_mini.paged import CSRC, PagedAdamW

SHAPES = [(64, 32), (128,), (3, 5, 7)]  # ragged sizes on purpose: the update is elementwise


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _run(opt_cls, steps=8, **kw):
    params = _params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = opt_cls(params, **kw)
    for i in range(steps):
        g = torch.Generator().manual_seed(100 + i)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


KW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def test_matches_torch_adamw_bit_for_bit():
    ours, _ = _run(PagedAdamW, **KW)
    ref, _ = _run(torch.optim.AdamW, foreach=False, **KW)  # same ops in the same order
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_matches_bitsandbytes_paged_adamw32bit():
    # bnb 0.50 runs PagedAdamW32bit on CPU (it warns and falls back to ordinary buffers); its
    # update is algebraically AdamW's but rearranged (eps scaled by sqrt(1-b2^t)), so a few ulps.
    ours, _ = _run(PagedAdamW, **KW)
    ref, _ = _run(bnb.optim.PagedAdamW32bit, **KW)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_and_torch_compatible():
    params, opt = _run(PagedAdamW, steps=3, **KW)
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}  # torch.optim.AdamW's keys
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours2 = PagedAdamW(clone, **KW)
    ours2.load_state_dict(copy.deepcopy(sd))  # load_state_dict keeps references otherwise
    theirs = torch.optim.AdamW(torch_clone, foreach=False, **KW)
    theirs.load_state_dict(copy.deepcopy(sd))
    for i in range(3):
        g = torch.Generator().manual_seed(7 + i)
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for group in (params, clone, torch_clone):
            for p, gr in zip(group, grads):
                p.grad = gr.clone()
        opt.step(), ours2.step(), theirs.step()
    for a, b, c in zip(params, clone, torch_clone):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_one_notice_on_cpu():
    params = _params()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = PagedAdamW(params, lr=1e-3)
        for _ in range(3):
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
    notes = [w for w in caught if "PagedAdamW" in str(w.message)]
    assert len(notes) == 1 and "no paging" in str(notes[0].message)
    assert not opt.unified and opt.paged_bytes == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="lr"):
        PagedAdamW(_params(), lr=-1.0)


@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_source_compiles(tmp_path, arch):
    """nvcc compiles paged_alloc.cu for sm_80 / sm_90 (skipped without nvcc, except under CI=1)."""
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        if os.environ.get("CI") == "1":
            pytest.fail("CI=1 but nvcc was not found: cannot check qlora_mini/csrc/paged_alloc.cu")
        pytest.skip("nvcc not found")
    run = subprocess.run([nvcc, "-c", str(CSRC / "paged_alloc.cu"), "-o", str(tmp_path / "p.o"),
                          f"-gencode=arch=compute_{arch},code=sm_{arch}"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.skipif(os.environ.get("QLORA_MINI_CHECK_CPP") != "1",
                    reason="slow (~30 s): set QLORA_MINI_CHECK_CPP=1 to syntax-check the torch binding")
def test_cpp_binding_syntax():
    from torch.utils.cpp_extension import include_paths
    import sysconfig
    cmd = ["c++", "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=paged_alloc",
           "-I" + sysconfig.get_paths()["include"], *("-I" + p for p in include_paths()),
           str(CSRC / "paged_alloc.cpp")]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
