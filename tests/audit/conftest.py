"""A piecewise stack (real nats-server, SoftHSM, kms-crypto, ceremony, kms-broker) for
the audit tests: one per module for tests that only add entries, and the function-scoped
`parts` from tests/e2e for tests that break the stream or kill processes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Parts, parts, running_parts  # noqa: F401 - re-exported fixture


@pytest.fixture(scope="module")
def audit_parts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parts]:
    with running_parts(tmp_path_factory.mktemp("audit"), Parts) as built:
        yield built
