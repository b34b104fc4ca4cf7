# The two set-up commands of the README: `make demo` and `make test`. Both build .venv from scratch
# if needed. torch is pinned here (CPU build) while the package itself asks for a range.
PYTHON ?= python3
VENV ?= .venv
TORCH_PIN ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: venv demo test test-slow clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,plot]" "$(TORCH_PIN)"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/edgeprism demo

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
