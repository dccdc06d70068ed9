"""The crypto service's AuthGuard keeps a real TPM (swtpm, DA max tries lowered to 3)
out of dictionary-attack lockout: wrong auth values stop reaching the TPM one short of
its limit, and the TPM's own counter proves it never locked out."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edgekms.algorithms import verify_signature
from edgekms.errors import PermissionDenied, ResourceExhausted
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2
from mgmt.natsserver import NatsServer
from tests.tpm.guarded import MAX_TRIES, RIGHT_AUTH, guarded_tpm, lockout_counter
from tests.tpm.swtpm_fixtures import SwtpmFactory, swtpm_factory

__all__ = ["swtpm_factory"]

pytestmark = pytest.mark.tpm

ALG = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256


async def test_guard_keeps_the_tpm_out_of_lockout(
    nats_server: NatsServer, swtpm_factory: SwtpmFactory, tmp_path: Path
) -> None:
    digest = hashlib.sha256(b"guard").digest()
    async with guarded_tpm(nats_server.url, swtpm_factory(), tmp_path, "tpmguard") as tpm:
        assert tpm.guard.max_failures == MAX_TRIES - 1
        crypto = tpm.crypto
        request = crypto_pb2.SignRequest(key_id=tpm.key_id, algorithm=ALG, data=digest)
        good = await crypto.sign("tpmguard", request, timeout=30)
        assert verify_signature(tpm.public_key_der, ALG, digest, good.signature)

        tpm.auth.write_bytes(b"a wrong guess")
        for _ in range(MAX_TRIES - 1):
            with pytest.raises(PermissionDenied) as denied:
                await crypto.sign("tpmguard", request, timeout=30)
            assert denied.value.reason == "tpm.auth_failed"
        for _ in range(5):  # without the guard, the first of these would lock the TPM out
            with pytest.raises(ResourceExhausted) as throttled:
                await crypto.sign("tpmguard", request, timeout=30)
            assert throttled.value.reason == "auth.throttled"
            assert int(throttled.value.details["retry_after_seconds"]) > 0

    assert lockout_counter(tpm.tcti) == MAX_TRIES - 1  # the refused guesses never got there
    # Not locked out: with the right value the key signs at once (no waiting 600 s).
    tpm.auth.write_bytes(RIGHT_AUTH)
    fresh = tpm.provider()
    try:
        signature = fresh.sign(tpm.key_id, ALG, digest)
    finally:
        fresh.close()
    assert verify_signature(tpm.public_key_der, ALG, digest, signature)
