# The two commands: `make run` (set up, then the embedded default in the foreground)
# and `make test` (set up, then every check). Both install what is missing first.
VENV ?= .venv
BIN := $(VENV)/bin
# `make run` and `kmsctl` read the same variable, EDGEKMS_DATA_DIR (DATA_DIR still works
# for `make run DATA_DIR=...`), and the ports: NATS_PORT, BROKER_LISTEN, CA_HTTP,
# METRICS_LISTEN (the first of the services' metrics ports).
EDGEKMS_DATA_DIR ?= $(or $(DATA_DIR),$(HOME)/.local/share/edgekms)
NATS_PORT ?= 4222
BROKER_LISTEN ?= 127.0.0.1:8443
CA_HTTP ?= 127.0.0.1:8180
METRICS_LISTEN ?= 127.0.0.1:9464
PYTEST_ARGS ?=
# `make test-arm ARCHES=armhf` runs one architecture only.
ARCHES ?=

.PHONY: setup run test lint typecheck protos check-protos lock bench bench-cluster test-board test-arm clean

setup:
	@./scripts/bootstrap.sh

run: setup
	$(BIN)/kmsctl up --data-dir $(EDGEKMS_DATA_DIR) --nats-port $(NATS_PORT) \
		--broker-listen $(BROKER_LISTEN) --ca-http $(CA_HTTP) --metrics-listen "$(METRICS_LISTEN)"

test: setup lint typecheck
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy broker crypto_service ca_service mgmt agent spiffe_agent protos/edgekms tests scripts bench

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

# One node against a three-node JetStream cluster on this machine (docs/cluster.md),
# about a minute: bench/results/cluster.md.
bench-cluster:
	$(BIN)/python -m bench.cluster

# The end-to-end subset (tests/board-subset.txt) on the board's package versions
# (requirements-board.txt, Yocto scarthgap's), in a second venv on this machine.
test-board: setup
	./scripts/test-board.sh

# The same subset on armhf (Cortex-A7) and arm64 Debian roots under qemu-user, with that
# architecture's nats-server, SoftHSM and swtpm (root; ~30 min per arch the first time,
# cached in ~/.cache/edgekms-arm). Results land in bench/results/arm/. Not part of `test`.
test-arm: setup
	./scripts/test-arm.sh $(ARCHES)

clean:
	rm -rf $(VENV) .venv-board build *.egg-info .pytest_cache .mypy_cache .ruff_cache
