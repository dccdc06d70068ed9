"""The crypto service's AuthGuard keeps a real TPM (swtpm, DA max tries lowered to 3)
out of dictionary-attack lockout: wrong auth values stop reaching the TPM one short of
its limit, and the TPM's own counter proves it never locked out."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import nats
import pytest
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_CAP, TPM2_PT

from crypto_service.config import Tpm2Config
from crypto_service.providers.tpm2 import Tpm2Provider
from crypto_service.service import CryptoService
from crypto_service.throttle import AuthGuard
from edgekms.algorithms import verify_signature
from edgekms.crypto_client import CryptoClient
from edgekms.errors import PermissionDenied, ResourceExhausted
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2
from mgmt.natsserver import NatsServer
from tests.tpm.swtpm_fixtures import SwtpmFactory, swtpm_factory

__all__ = ["swtpm_factory"]

pytestmark = pytest.mark.tpm

MAX_TRIES = 3
RECOVERY = 600  # seconds: long enough that the TPM forgives nothing during the test
ALG = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256


def _lockout_counter(tcti: str) -> int:
    with ESAPI(tcti) as esys:
        _, data = esys.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.LOCKOUT_COUNTER, 1)
        return int(data.data.tpmProperties[0].value)


async def test_guard_keeps_the_tpm_out_of_lockout(
    nats_server: NatsServer, swtpm_factory: SwtpmFactory, tmp_path: Path
) -> None:
    tpm = swtpm_factory()
    with ESAPI(tpm.tcti) as esys:
        esys.dictionary_attack_parameters(MAX_TRIES, RECOVERY, 0)
    auth = tmp_path / "auth"
    auth.write_bytes(b"right value")
    provider = Tpm2Provider(
        Tpm2Config(tcti=tpm.tcti, state_dir=tmp_path / "state", key_auth_file=auth)  # type: ignore[call-arg]
    )
    guard = AuthGuard.for_tpm(MAX_TRIES, RECOVERY)
    assert guard.max_failures == MAX_TRIES - 1
    nc = await nats.connect(nats_server.url)
    service = CryptoService(nc, provider, "tpmguard", workers=1, auth_guard=guard)
    await service.start()
    try:
        crypto = CryptoClient(nc)
        key_id = secrets.token_bytes(16)
        made = await crypto.generate_key(
            "tpmguard",
            crypto_pb2.GenerateKeyRequest(
                key_id=key_id,
                label="guarded",
                key_type=pb.KEY_TYPE_EC_P256,
                options=pb.KeyOptions(require_auth=True),
            ),
            timeout=60,
        )
        digest = hashlib.sha256(b"guard").digest()
        request = crypto_pb2.SignRequest(key_id=key_id, algorithm=ALG, data=digest)
        good = await crypto.sign("tpmguard", request, timeout=30)
        assert verify_signature(made.public_key_der, ALG, digest, good.signature)

        auth.write_bytes(b"a wrong guess")
        for _ in range(MAX_TRIES - 1):
            with pytest.raises(PermissionDenied) as denied:
                await crypto.sign("tpmguard", request, timeout=30)
            assert denied.value.reason == "tpm.auth_failed"
        for _ in range(5):  # without the guard, the first of these would lock the TPM out
            with pytest.raises(ResourceExhausted) as throttled:
                await crypto.sign("tpmguard", request, timeout=30)
            assert throttled.value.reason == "auth.throttled"
            assert int(throttled.value.details["retry_after_seconds"]) > 0
    finally:
        await service.stop()
        await nc.close()
        provider.close()

    assert _lockout_counter(tpm.tcti) == MAX_TRIES - 1  # the refused guesses never got there
    # Not locked out: with the right value the key signs at once (no waiting 600 s).
    auth.write_bytes(b"right value")
    fresh = Tpm2Provider(
        Tpm2Config(tcti=tpm.tcti, state_dir=tmp_path / "state", key_auth_file=auth)  # type: ignore[call-arg]
    )
    try:
        signature = fresh.sign(key_id, ALG, digest)
    finally:
        fresh.close()
    assert verify_signature(made.public_key_der, ALG, digest, signature)
