# fusedlm: `make test` and `make demo` set up everything they need (a .venv with torch).
# On a GPU machine that already has torch, use `make test-gpu` / `make bench` (system python).
PY        ?= python3
VENV      ?= .venv
VPY       := $(VENV)/bin/python
TORCH_PKGS ?= torch==2.14.1 torchvision==0.29.1
DEPS      := numpy pytest ninja "setuptools>=64" wheel tqdm scipy matplotlib transformers timm scikit-learn accelerate
GPU_PY    ?= python3
DEMO_ARGS ?= --quick
# The extension is built in place (python/fusedlm/_C*.so): make the package importable.
export PYTHONPATH := $(CURDIR)/python$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: venv build test demo ctest test-gpu bench clean

$(VENV)/.installed:
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --no-cache-dir $(TORCH_PKGS) $(DEPS)
	touch $@

venv: $(VENV)/.installed

# CUDA extension when torch is a CUDA build and nvcc is found (else CPU-only): see setup.py.
build: $(VENV)/.installed
	$(VPY) setup.py -q build_ext --inplace

test: build ctest
	$(VPY) -m pytest -q tests

demo: build
	$(VPY) -m fusedlm demo $(DEMO_ARGS)

ctest:
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cmake -j $${MAX_JOBS:-2}
	ctest --test-dir build/cmake --output-on-failure

# GPU machine: torch is preinstalled; build for its arch only with all cores.
test-gpu:
	MAX_JOBS=$${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0a} FUSEDLM_FORCE_CUDA=1 \
		$(GPU_PY) setup.py -q build_ext --inplace
	$(GPU_PY) -m pytest -q -m cuda tests

bench:
	$(GPU_PY) bench/run.py --out bench/out

clean:
	rm -rf build python/fusedlm/*.so
