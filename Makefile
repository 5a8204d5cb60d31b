# Two entry points: `make demo` (the main job) and `make test` (the suite). Each builds .venv
# on first use: it reuses a torch already installed on the machine (as on a GPU box), else
# installs torch==2.13.0 (the CPU wheel). The native extension (csrc/, python/) is built by
# setup.py through CMake + Ninja against that torch, so the package is installed without build
# isolation (which would download a second, multi-GB torch); it is rebuilt (incrementally) when
# its sources change. Without a compiler the package still installs and `opsd env` says why.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.opsd-installed
BUILD_TOOLS := "setuptools>=64" wheel "pybind11>=2.12" ninja
NATIVE_SOURCES := CMakeLists.txt $(wildcard csrc/*.h csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.h \
                  csrc/cuda/*.cu csrc/cuda/*.cpp python/*.cpp)
# `make test` requires the extension to have been built (test_divergence_native.py fails otherwise); on a
# machine without a C++ compiler: make test OPSD_REQUIRE_NATIVE=0
OPSD_REQUIRE_NATIVE ?= 1

.PHONY: demo test test-fast bench bench-native lint clean

$(STAMP): pyproject.toml setup.py $(NATIVE_SOURCES)
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "reusing the installed torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q torch==2.13.0; \
	  fi; \
	fi
	$(PY) -m pip install -q $(BUILD_TOOLS)
	@command -v cmake >/dev/null 2>&1 || $(PY) -m pip install -q "cmake>=3.18"
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	@$(PY) -c "from opsd_kernels import env_report; print('native:', env_report()['native'])"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opsd demo

test: $(STAMP)
	OPSD_REQUIRE_NATIVE=$(OPSD_REQUIRE_NATIVE) $(PY) -m pytest -q tests

# The edit loop: everything but the tests marked slow (compilers, torch.compile, subprocesses).
test-fast: $(STAMP)
	OPSD_REQUIRE_NATIVE=$(OPSD_REQUIRE_NATIVE) $(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) -m pytest -q -rs bench/bench_divergence.py --benchmark-json=.benchmarks/divergence.json
	$(PY) bench/report.py .benchmarks/divergence.json

bench-native: $(STAMP)
	$(PY) -m pytest -q -rs bench/bench_native.py --benchmark-json=.benchmarks/native.json
	$(PY) bench/report_native.py .benchmarks/native.json

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check opsd_kernels tests bench setup.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache opsd_kernels/_C.*.so opsd_kernels/_native_build.txt
