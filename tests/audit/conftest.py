"""A piecewise stack (real nats-server, SoftHSM, kms-crypto, ceremony, kms-broker) for
the audit tests: one per module for tests that only add entries, and the function-scoped
`parts` from tests/e2e for tests that break the stream or kill processes; and `nc`, a
plain connection to a nats-server of the test's own, for the writer-level tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from tests.conftest import start_nats
from tests.e2e.conftest import Parts, parts, running_parts  # noqa: F401 - re-exported fixture


@pytest.fixture(scope="module")
def audit_parts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parts]:
    with running_parts(tmp_path_factory.mktemp("audit"), Parts) as built:
        yield built


@pytest.fixture
async def nc(tmp_path: Path) -> AsyncIterator[NATS]:
    server = start_nats(tmp_path / "nats")
    conn = await nats.connect(server.url)
    try:
        yield conn
    finally:
        await conn.close()
        server.stop()
