# Quick start: `make demo` (release the bundled example: convert, tokenizer, smoke + parity, card, push to a
# loopback Hub and download it back) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hubconv-installed
# The CPU build of torch; override e.g. TORCH_SPEC='torch==2.13.0 --index-url <your index>' for GPU builds.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= out/demo
DEMO_HUB ?= out/devhub

.PHONY: setup demo test lint verify-image clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/hubconv release --config examples/tiny-llama3-torchtitan/.hubconv.yml --output $(DEMO_OUT) --overwrite \
		--local-hub $(DEMO_HUB)

test: setup
	$(BIN)/ruff check hubconv tests benchmarks
	$(BIN)/actionlint .github/workflows/*.yml examples/workflows/*.yml
	$(BIN)/python -m pytest -q

# Build the action's Docker image without a Docker engine and release the example through its entrypoint (root).
# RUNNER_TEMP_AS_ON_GITHUB=1: RUNNER_TEMP is passed but not mounted, exactly as GitHub's runner does.
verify-image: setup
	RUNNER_TEMP_AS_ON_GITHUB=1 bash scripts/verify-image.sh

lint: setup
	$(BIN)/ruff check hubconv tests benchmarks
	$(BIN)/ruff format --check hubconv tests benchmarks

clean:
	rm -rf $(VENV) out
