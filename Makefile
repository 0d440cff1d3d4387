# The two commands of the README: `make book` and `make test`. Both set up .venv first.
PY := .venv/bin/python
STAMP := .venv/.setup-stamp

.PHONY: setup book test unit export check-export notebooks clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml tools/setup.sh
	bash tools/setup.sh
	touch $@

book: setup
	.venv/bin/jupyter-book build . --all

test: setup
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-sanitize-with tools/nbval_sanitize.cfg

unit: setup
	$(PY) -m pytest tests

export: setup
	$(PY) tools/export.py

check-export: setup
	$(PY) tools/export.py --check

clean:
	rm -rf _build .pytest_cache

notebooks: setup
	for nb in notebooks/*.ipynb; do $(PY) -m jupyter nbconvert --to notebook --execute --inplace "$$nb" || exit 1; done
	$(PY) tools/export.py
