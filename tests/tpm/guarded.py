"""A crypto service on a swtpm whose dictionary-attack limit is lowered to MAX_TRIES,
with one P-256 key that needs its auth value: the setup the auth-guard tests share
(one Sign at a time, and the same through SignBatch)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_CAP, TPM2_PT

from crypto_service.config import Tpm2Config
from crypto_service.providers.tpm2 import Tpm2Provider
from crypto_service.service import CryptoService
from crypto_service.throttle import AuthGuard
from edgekms.crypto_client import CryptoClient
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2
from mgmt.swtpm import Swtpm

MAX_TRIES = 3
RECOVERY = 600  # seconds: long enough that the TPM forgives nothing during a test
RIGHT_AUTH = b"right value"


@dataclass
class GuardedTpm:
    tcti: str
    auth: Path  # the key-auth file: the provider reads it on every use
    state_dir: Path
    guard: AuthGuard
    crypto: CryptoClient
    key_id: bytes
    public_key_der: bytes

    def provider(self) -> Tpm2Provider:
        """Another provider on the same TPM and key state (once the service is gone)."""
        return Tpm2Provider(
            Tpm2Config(tcti=self.tcti, state_dir=self.state_dir, key_auth_file=self.auth)  # type: ignore[call-arg]
        )


def lockout_counter(tcti: str) -> int:
    """The TPM's own count of authorization failures."""
    with ESAPI(tcti) as esys:
        _, data = esys.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
        return int(data.data.tpmProperties[0].value)


@contextlib.asynccontextmanager
async def guarded_tpm(
    nats_url: str, tpm: Swtpm, directory: Path, provider_id: str
) -> AsyncIterator[GuardedTpm]:
    with ESAPI(tpm.tcti) as esys:
        esys.dictionary_attack_parameters(MAX_TRIES, RECOVERY, 0)
    auth = directory / "auth"
    auth.write_bytes(RIGHT_AUTH)
    state_dir = directory / "state"
    guard = AuthGuard.for_tpm(MAX_TRIES, RECOVERY)
    provider = Tpm2Provider(
        Tpm2Config(tcti=tpm.tcti, state_dir=state_dir, key_auth_file=auth)  # type: ignore[call-arg]
    )
    nc = await nats.connect(nats_url)
    service = CryptoService(nc, provider, provider_id, workers=1, auth_guard=guard)
    await service.start()
    try:
        crypto = CryptoClient(nc)
        key_id = secrets.token_bytes(16)
        made = await crypto.generate_key(
            provider_id,
            crypto_pb2.GenerateKeyRequest(
                key_id=key_id,
                label="guarded",
                key_type=pb.KEY_TYPE_EC_P256,
                options=pb.KeyOptions(require_auth=True),
            ),
            timeout=60,
        )
        yield GuardedTpm(tpm.tcti, auth, state_dir, guard, crypto, key_id, made.public_key_der)
    finally:
        await service.stop()
        await nc.close()
        provider.close()
