# The two commands: `make run` (set up, then the embedded default in the foreground)
# and `make test` (set up, then every check). Both install what is missing first.
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= $(HOME)/.local/share/edgekms
PYTEST_ARGS ?=

.PHONY: setup run test lint typecheck protos check-protos lock bench clean

setup:
	@./scripts/bootstrap.sh

run: setup
	$(BIN)/kmsctl up --data-dir $(DATA_DIR)

test: setup lint typecheck
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy broker crypto_service mgmt protos/edgekms tests scripts bench

# Regenerate protos/edgekms/v1/*_pb2*.py after changing a .proto (a test fails if stale).
protos: setup
	$(BIN)/python scripts/gen_protos.py

# Re-pin every Python dependency (exact versions) after changing pyproject.toml.
lock:
	$(BIN)/uv pip compile -q --python-version 3.11 --extra dev pyproject.toml -o requirements.lock

# Benchmarks (not part of `make test`): results land in bench/results/.
bench:
	@WITH_BENCH=1 ./scripts/bootstrap.sh
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
