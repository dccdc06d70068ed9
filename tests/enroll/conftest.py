"""One real `kmsctl up` stack (nats-server with JetStream, SoftHSM, kms-crypto, the CA
service, kms-broker) for the package's renewal, enrollment and device tests, with the
mini-CA initialised, plus helpers to run kmsctl against it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from mgmt.cli import cli
from tests.e2e.conftest import KmsStack, start_stack, stop_stack

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    started = start_stack(tmp_path_factory.mktemp("enroll") / "data")
    yield started
    assert stop_stack(started) == 0, started.log_path.read_text()[-2000:]


@pytest.fixture(scope="package")
def ca_dir(stack: KmsStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("enroll-ca")
    done = run(stack, "ca", "init", "--name", "Enroll CA", "--out-dir", str(out))
    assert done.exit_code == 0, done.output
    return out


def run(stack: KmsStack, *args: str, config: Path | None = None) -> Result:
    """kmsctl in-process, as the stack's admin (or the client `config` names)."""
    extra = ["--config", str(config)] if config else []
    return CliRunner().invoke(cli, [*args, "--data-dir", str(stack.data_dir), *extra])


def run_json(stack: KmsStack, *args: str, config: Path | None = None) -> Any:
    result = run(stack, *args, "-o", "json", config=config)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)
