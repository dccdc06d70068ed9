"""A piecewise stack (real nats-server, SoftHSM, kms-crypto, ceremony, kms-broker) for
the audit tests: one per module for tests that only add entries, and the function-scoped
`parts` from tests/e2e for tests that break the stream or kill processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import make_token, start_nats
from tests.e2e.conftest import Parts, parts  # noqa: F401 - re-exported fixture


@pytest.fixture(scope="module")
def audit_parts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parts]:
    root = tmp_path_factory.mktemp("audit")
    nats_server = start_nats(root / "nats")
    built = Parts(root, nats_server, make_token(root / "softhsm"))
    try:
        built.start_crypto()
        built.ceremony()
        built.start_broker()
        yield built
    finally:
        built.stop_all()
        nats_server.stop()
