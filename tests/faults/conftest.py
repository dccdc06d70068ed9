"""One `kmsctl up` stack with an initialised CA for the fault tests of this package.

The idempotency tests run first and leave it intact; the drill (test_drill.py) kills
its parts and is the last user. Module order in this package keeps it so."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from mgmt.bundle import make_csr
from tests.e2e.conftest import KmsStack, start_stack, stop_stack


def new_csr(common_name: str) -> bytes:
    return make_csr(ec.generate_private_key(ec.SECP256R1()), common_name, [])


@pytest.fixture(scope="package")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsStack]:
    stack = start_stack(tmp_path_factory.mktemp("faults") / "data")
    try:
        with stack.client() as client:
            client.ca_init("Fault Drill CA")
        yield stack
    finally:
        code = stop_stack(stack)
        assert code == 0, f"kmsctl up did not stop cleanly ({code})"
