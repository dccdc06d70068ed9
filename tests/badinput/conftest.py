"""Real parts for the bad-input catalogue, borrowed from the suites that own them: the
whole stack as `kmsctl up` starts it (tests/e2e), a CA service over NATS on the SoftHSM
token (tests/ca), and kms-crypto processes on that token (tests/crypto)."""

from __future__ import annotations

from tests.ca.conftest import ca_crypto, ca_env, ca_nats
from tests.crypto.conftest import client, crypto_factory, hsm0, nc
from tests.e2e.conftest import kms_stack

__all__ = ["ca_crypto", "ca_env", "ca_nats", "client", "crypto_factory", "hsm0", "kms_stack", "nc"]
