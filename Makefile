# Set-up and the everyday commands. `make quickstart` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (no multi-GB CUDA download). On a GPU machine install your CUDA torch first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup quickstart test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# Train attention, gated DeltaNet and MoM on MQAR (CPU by default), then print the table and write the plots.
quickstart: setup
	$(BIN)/sandbox-train -m experiment=quickstart
	$(BIN)/sandbox-report outputs/quickstart

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs multirun
