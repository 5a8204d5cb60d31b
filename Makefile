# Two entry points: `make demo` (the main job) and `make test` (the suite). Each builds .venv
# on first use: it reuses a torch already installed on the machine (as on a GPU box), else
# installs torch==2.13.0 (the CPU wheel).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opsd-installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml setup.py
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "reusing the installed torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q torch==2.13.0; \
	  fi; \
	fi
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opsd demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q -rs bench/bench_divergence.py --benchmark-json=.benchmarks/divergence.json
	$(PY) bench/report.py .benchmarks/divergence.json

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check opsd_kernels tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
