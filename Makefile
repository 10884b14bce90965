# The two commands a newcomer runs: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is test-only and pinned to the CPU wheel; a local wheel directory is used when present.
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: test train install bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_FLAGS) -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 tests

train: $(VENV)/.installed
	$(PY) train.py --config configs/tiny.py

bench: $(VENV)/.installed
	$(PY) -m bench.step_time

clean:
	rm -rf $(VENV) .pytest_cache
