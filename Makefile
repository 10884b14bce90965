# The two commands a newcomer runs: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is test-only and pinned to the CPU wheel; a local wheel directory is used when present.
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: test train install bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# One stamp per extra: `make train` installs the app only, `make test` adds the reference implementations.
$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q $(PIP_FLAGS) -e '.[$*]'
	touch $@

install: $(VENV)/.installed-train

# jax's CUDA compiler, for compiling to a GPU on a machine without one (bench/gpu_target.py): the plugin that
# matches the installed jaxlib, in its own folder so that no other jax process loads it. Test- and bench-only.
$(VENV)/gpu_aot/.installed: $(VENV)/.installed-test
	v=$$($(PY) -c 'import jaxlib; print(jaxlib.__version__)') && \
	  $(PY) -m pip install -q $(PIP_FLAGS) --no-deps --target $(VENV)/gpu_aot "jax-cuda12-plugin==$$v" "jax-cuda12-pjrt==$$v"
	touch $@

test: $(VENV)/.installed-test $(VENV)/gpu_aot/.installed
	$(PY) -m pytest -q -n 2 --dist worksteal --doctest-modules galore_jax/optim tests

train: $(VENV)/.installed-train
	$(PY) train.py --config configs/tiny.py

bench: $(VENV)/.installed-train
	$(PY) -m bench.step_time

clean:
	rm -rf $(VENV) .pytest_cache
