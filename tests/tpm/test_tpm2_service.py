"""End to end over NATS: a real `kms-crypto` process with a [tpm2] config against swtpm."""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from edgekms.algorithms import verify_signature
from edgekms.crypto_client import CryptoClient
from edgekms.errors import FailedPrecondition, NotFound
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2
from mgmt.attestation import verify_certify
from mgmt.natsserver import NatsServer
from tests.logevents import has_event
from tests.tpm.conftest import AUTH_VALUE
from tests.tpm.swtpm_fixtures import SwtpmFactory

pytestmark = pytest.mark.tpm

KMS_CRYPTO = str(Path(sys.executable).parent / "kms-crypto")


class TpmService:
    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def tpm_service(
    nats_server: NatsServer, swtpm_factory: SwtpmFactory, tmp_path: Path
) -> Iterator[TpmService]:
    """kms-crypto serving provider "tpm0e2e" from its own swtpm; stopped with SIGTERM."""
    tpm = swtpm_factory()
    auth = tmp_path / "key-auth"
    auth.write_bytes(AUTH_VALUE)
    auth.chmod(0o600)
    config = tmp_path / "tpm0.toml"
    config.write_text(
        'provider_id = "tpm0e2e"\n'
        f'nats_url = "{nats_server.url}"\n'
        "[tpm2]\n"
        f'tcti = "{tpm.tcti}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        f'key_auth_file = "{auth}"\n'
    )
    log = tmp_path / "kms-crypto.log"
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [KMS_CRYPTO, "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=dict(os.environ),
            start_new_session=True,
        )
    service = TpmService(proc, log)
    try:
        deadline = time.monotonic() + 20
        while not has_event(service.stderr(), "service_started"):
            assert proc.poll() is None, service.stderr()[-2000:]
            assert time.monotonic() < deadline, service.stderr()[-2000:]
            time.sleep(0.05)
        yield service
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, service.stderr()[-2000:]


async def test_kms_crypto_tpm2_over_nats(nats_server: NatsServer, tpm_service: TpmService) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        client = CryptoClient(nc, default_timeout=20)
        key_id = secrets.token_bytes(16)
        made = await client.generate_key(
            "tpm0e2e",
            crypto_pb2.GenerateKeyRequest(
                key_id=key_id,
                label="e2e/tpm",
                key_type=pb.KEY_TYPE_EC_P256,
                options=pb.KeyOptions(require_auth=True, pcr_indexes=[16]),
            ),
        )
        digest = hashlib.sha256(b"over the bus").digest()
        alg = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256
        signed = await client.sign(
            "tpm0e2e", crypto_pb2.SignRequest(key_id=key_id, algorithm=alg, data=digest)
        )
        assert verify_signature(made.public_key_der, alg, digest, signed.signature)

        nonce = secrets.token_bytes(16)
        att = await client.attest("tpm0e2e", crypto_pb2.AttestRequest(key_id=key_id, nonce=nonce))
        assert att.format == "tpm2"
        verify_certify(
            attestation=att.attestation,
            signature=att.signature,
            signature_algorithm=att.signature_algorithm,
            attestation_key_der=att.attestation_key_der,
            key_public_area=att.key_public_area,
            nonce=nonce,
            expected_public_key_der=made.public_key_der,
            expected_ak_der=att.attestation_key_der,
        )
        with pytest.raises(NotFound):
            await client.sign(
                "tpm0e2e",
                crypto_pb2.SignRequest(key_id=secrets.token_bytes(16), algorithm=alg, data=digest),
            )
        with pytest.raises(FailedPrecondition) as unsupported:
            await client.generate_key(
                "tpm0e2e",
                crypto_pb2.GenerateKeyRequest(
                    key_id=secrets.token_bytes(16),
                    label="ed",
                    key_type=pb.KEY_TYPE_ED25519,
                ),
            )
        assert unsupported.value.reason == "provider.key_type_unsupported"
    finally:
        await nc.close()
