"""PagedAdamW (chapter 7) against torch.optim.AdamW and bitsandbytes' PagedAdamW32bit; the CUDA source."""
import copy
import os
import shutil
import subprocess
import warnings

import bitsandbytes as bnb
import pytest
import torch

import qlora_mini.paged as paged
from qlora_mini.kernels import CSRC
from qlora_mini.paged import PagedAdamW, adamw_update, adamw_update_foreach, chunks
from qlora_mini.utils import in_ci

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


@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_matches_torch_adamw_bit_for_bit(weight_decay):
    kw = {**KW, "weight_decay": weight_decay}
    ours, _ = _run(PagedAdamW, **kw)
    ref, _ = _run(torch.optim.AdamW, foreach=False, **kw)  # same ops in the same order
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


def test_multi_tensor_update_is_the_single_tensor_update():
    """adamw_update_foreach against the specification adamw_update, one tensor at a time, with
    per-tensor step counts that differ (a parameter that had no gradient at some step)."""
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=g) for s in SHAPES + [(1,), (33, 65)]]
    a, b = [p.clone() for p in params], [p.clone() for p in params]
    states = [[(torch.zeros_like(p), torch.zeros_like(p), torch.tensor(0.0)) for p in params]
              for _ in range(2)]
    kw = dict(lr=3e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05)
    for step in range(6):
        live = [i for i in range(len(params)) if (i + step) % 3]  # some tensors skip some steps
        grads = {i: torch.randn(params[i].shape, generator=g) for i in live}
        for i in live:
            adamw_update(a[i], grads[i], *states[0][i], **kw)
        adamw_update_foreach([b[i] for i in live], [grads[i] for i in live],
                             *([states[1][i][k] for i in live] for k in range(3)), **kw)
    for x, y, (m0, v0, s0), (m1, v1, s1) in zip(a, b, *states):
        assert torch.equal(x, y) and torch.equal(m0, m1) and torch.equal(v0, v1)
        assert s0.item() == s1.item()


def test_chunks_bound_the_elements_and_keep_every_tensor_once():
    sizes = [5, 3, 8, 1, 20, 2, 2]
    params = [torch.empty(n) for n in sizes]
    got = list(chunks(params, max_numel=8))
    assert [[p.numel() for p in c] for c in got] == [[5, 3], [8], [1], [20], [2, 2]]
    assert [id(p) for c in got for p in c] == [id(p) for p in params]


def test_bf16_parameters_updated_in_float32():
    """A bf16 parameter is updated in float32 (from its bf16 value) and rounded back, as
    torch.optim.AdamW does on a float32 copy."""
    ours = [torch.nn.Parameter(p.detach().bfloat16()) for p in _params()]
    ref = [torch.nn.Parameter(p.detach().float()) for p in ours]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = PagedAdamW(ours, **KW)
    torch_opt = torch.optim.AdamW(ref, foreach=False, **KW)
    for p, q in zip(ours, ref):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step(), torch_opt.step()
    for p, q in zip(ours, ref):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q.bfloat16())


@pytest.fixture
def fake_unified(monkeypatch):
    """Stand-ins for the CUDA extension, so the managed-memory bookkeeping runs on a CPU:
    'managed' buffers are ordinary CPU tensors and prefetches are recorded."""
    prefetched = []
    monkeypatch.setattr(paged, "paged_zeros",
                        lambda shape, device, dtype=torch.float32: torch.zeros(shape, dtype=dtype))
    monkeypatch.setattr(paged, "prefetch", lambda t, index: prefetched.append(t))
    return prefetched


def test_paged_bytes_counts_states_once_after_load_state_dict(fake_unified):
    params, state_bytes = _params(), 2 * 4 * sum(p.numel() for p in _params())
    opt = PagedAdamW(params, paged=False, max_paged_bytes=state_bytes, **KW)
    opt.unified = True  # as on a CUDA machine, with the fake extension
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.paged_bytes == state_bytes
    assert len(fake_unified) == 2 * len(params)  # every state prefetched before the update
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # a resume: fits in max_paged_bytes
    assert opt.paged_bytes == state_bytes
    opt.step()
    assert opt.paged_bytes == state_bytes


def test_paged_bytes_guard_still_refuses(fake_unified):
    params = _params()
    opt = PagedAdamW(params, paged=False, max_paged_bytes=4 * params[0].numel(), **KW)
    opt.unified = True
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(MemoryError, match="max_paged_bytes"):
        opt.step()


def test_one_notice_on_cpu(monkeypatch):
    monkeypatch.setattr(paged, "_told_not_paged", False)   # as in a fresh process
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
    """nvcc compiles paged_alloc.cu for sm_80 / sm_90 (skipped without nvcc, except in CI)."""
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        if in_ci():
            pytest.fail("CI but nvcc was not found: cannot check qlora_mini/csrc/paged_alloc.cu")
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
