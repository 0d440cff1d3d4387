# The two commands of the README: `make book` and `make test`. Both set up .venv first.
PY := .venv/bin/python
STAMP := .venv/.setup-stamp

.PHONY: setup book test unit export check-export clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml tools/setup.sh
	bash tools/setup.sh
	touch $@

book: setup
	$(PY) -m jupyter_book build . --all

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
