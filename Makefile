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

.PHONY: install reproduce smoke test lab benchmarks gpu-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(PIP_TORCH_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

reproduce: install
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m splitlora.notebooks

smoke: install
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m splitlora.notebooks --smoke

test: install
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m pytest

lab: install
	$(BIN)/jupyter lab notebooks/

benchmarks: install
	$(BIN)/python benchmarks/card_speed.py

gpu-smoke: install
	$(BIN)/python scripts/gpu_smoke.py

clean:
	rm -rf $(VENV) notebooks/executed .pytest_cache
