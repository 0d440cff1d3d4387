# The two commands of the README: `make book` and `make test`. Both set up .venv first.
PY := .venv/bin/python
STAMP := .venv/.setup-stamp
# Python caches each module it imports as bytecode (.pyc) in .venv, once, for every later process.
# CI's machines set PYTHONDONTWRITEBYTECODE, which would make every process (a test's subprocess,
# each notebook's kernel) compile torch & co. anew; within these targets it is unset. (Compiling
# all of site-packages up front instead took 37 s of a 2-core set-up.)
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup book student test test-avx2 unit export check-export notebooks clean lock

setup: $(STAMP)

$(STAMP): requirements.txt requirements.lock pyproject.toml tools/setup.sh
	bash tools/setup.sh
	touch $@

book: setup
	.venv/bin/jupyter-book build . --all

# The student edition: every chapter without its exercise solutions, in _build/student/notebooks
student: setup
	$(PY) tools/student.py

# Two pytest-xdist workers of one thread each: on CI's 2 cores that is ~1.5x faster than one
# process with two threads (most tests are small and import-bound). Every test module and every
# notebook stays on one worker (--dist loadscope), so module fixtures and a notebook's kernel are
# shared as before. Set PYTEST_WORKERS=0 to run in one process.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadscope

test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest $(XDIST) tests notebooks --nbval-lax \
		--nbval-sanitize-with tools/nbval_sanitize.cfg

# The same suite as a CPU without AVX-512 runs it (GitHub's hosted runners, most laptops): torch's
# and oneDNN's dispatch capped at AVX2, and tools/avx2_cpu.c preloaded into every process so that
# bitsandbytes and `g++ -march=native` (our CPU twin) see no AVX-512 either. It stops, saying
# why, where a CPU with AVX-512 cannot hide it (no CPUID faulting). Without AVX-512 a bf16 matmul
# is tens of times slower; the suite computes in fp32 where it can, so it takes about as long.
AVX2_LIB := .venv/lib/avx2_cpu.so
AVX2_ENV := LD_PRELOAD=$(abspath $(AVX2_LIB)) ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2

$(AVX2_LIB): tools/avx2_cpu.c
	gcc -O2 -shared -fPIC -Wall -o $@ $< -ldl

test-avx2: setup $(AVX2_LIB)
	$(AVX2_ENV) $(PY) -c "import torch, qlora_mini, bitsandbytes.functional as F; \
		assert torch.backends.cpu.get_cpu_capability() == 'AVX2' and not F.lib.has_avx512f_cpu(), \
		'this CPU cannot hide its AVX-512 from bitsandbytes: no AVX2-only run here'"
	$(AVX2_ENV) $(MAKE) test

# The quick loop: everything under tests/ but the rendered book in a browser (it builds the whole
# book first) and the tests marked `processes` (torchrun launches, SIGKILLed runs: each process
# imports torch and transformers anew). `make test`, which CI runs, runs them all.
unit: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest $(XDIST) tests --ignore=tests/test_browser.py \
		-m "not processes"

export: setup
	$(PY) tools/export.py

check-export: setup
	$(PY) tools/export.py --check

clean:
	rm -rf _build .pytest_cache

notebooks: setup
	for nb in notebooks/*.ipynb; do $(PY) -m jupyter nbconvert --to notebook --execute --inplace "$$nb" || exit 1; done
	$(PY) tools/export.py

# requirements.lock: every package of requirements.txt and what they need, pinned, resolved by uv
# for Linux x86_64 and Python 3.11 against torch 2.13.0 (which the lock leaves to tools/setup.sh,
# with the CUDA libraries of tools/lock-excludes.txt). Run after editing requirements.txt.
lock: setup
	$(PY) -m pip install --progress-bar off -q uv==0.13.10
	$(PY) -m uv pip compile requirements.txt tools/lock-torch.txt --excludes tools/lock-excludes.txt \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-emit-package torch \
		--no-emit-package qlora-mini --custom-compile-command "make lock" -o requirements.lock
