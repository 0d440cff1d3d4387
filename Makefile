# The two commands of the README: `make book` and `make test`. Both set up .venv first.
PY := .venv/bin/python
STAMP := .venv/.setup-stamp
# Python caches each module it imports as bytecode (.pyc) in .venv, once, for every later process.
# CI's machines set PYTHONDONTWRITEBYTECODE, which would make every process (a test's subprocess,
# each notebook's kernel) compile torch & co. anew; within these targets it is unset. (Compiling
# all of site-packages up front instead took 37 s of a 2-core set-up.)
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup book student test unit export check-export notebooks clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml tools/setup.sh
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
