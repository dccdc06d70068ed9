"""A device reaches the hub's real CA service across its leaf connection, reads only.

The hub runs a real kms-crypto on the session's SoftHSM token and a CA service (as in
tests/ca/), both on the hub's bus as its admin; a process on device a asks for the CA's
chain through its own nats-server, and gets it on its own inbox. The shared issuing
subject is not in the device's grant: the request reaches nothing (a device asks on its
own per-device subject instead: tests/fleet/test_hub_ca.py; docs/cluster.md, "Fleet").
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import nats.errors
import pytest
from cryptography import x509
from nats.aio.client import Client

from ca_service.authority import CertificateAuthority
from ca_service.builder import CaUrls
from ca_service.service import add_ca_service
from ca_service.signer import KMSKeyBackend
from ca_service.store import CAStore
from edgekms.crypto_client import CryptoClient
from edgekms.subjects import ca_subject
from edgekms.v1 import ca_pb2
from edgekms.v1 import common_pb2 as pb
from tests.conftest import TokenInfo
from tests.crypto.conftest import CryptoProcess, write_config
from tests.fleet.conftest import ADMIN, Fleet, until

pytestmark = pytest.mark.asyncio
PROVIDER = "hubhsm"


async def init_hub_ca(hub: Client, common_name: str) -> None:
    """The hub CA's Init over the bus (intermediate in PROVIDER's token, no root kept)."""
    init = ca_pb2.InitCARequest(
        provider=PROVIDER,
        key_type=pb.KEY_TYPE_EC_P256,
        common_name=common_name,
        organization="EdgeKMS Tests",
        disable_root=True,
    )
    done = await hub.request(ca_subject("Init"), init.SerializeToString(), timeout=60)
    assert not (done.headers or {}).get("Nats-Service-Error-Code"), done.data[:200]


def crypto_on_hub(fleet: Fleet, token: TokenInfo, directory: Path) -> CryptoProcess:
    """kms-crypto on the hub's bus, logged in as the hub's admin."""
    password_file = directory / "admin.password"
    directory.mkdir(parents=True, exist_ok=True)
    password_file.write_text(fleet.passwords[ADMIN])
    os.chmod(password_file, 0o600)
    config = write_config(directory, PROVIDER, f"nats://127.0.0.1:{fleet.hub_port}", token)
    lines = config.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("nats_url")) + 1
    lines[at:at] = [f'nats_user = "{ADMIN}"', f'nats_password_file = "{password_file}"']
    config.write_text("\n".join(lines) + "\n")
    return CryptoProcess(config, token, directory / "stderr").start()


async def test_a_device_gets_the_hub_cas_chain_over_its_leaf(
    fleet: Fleet, softhsm_token: TokenInfo, tmp_path: Path
) -> None:
    crypto = crypto_on_hub(fleet, softhsm_token, tmp_path / "crypto")
    hub = await fleet.connect_hub()
    device = await fleet.connect_device("a")
    service = None
    ca = None
    try:
        store = await CAStore.open(hub.jetstream(), "kms_ca_fleet")
        ca = CertificateAuthority(
            store,
            KMSKeyBackend(CryptoClient(hub, default_timeout=30.0), asyncio.get_running_loop()),
            urls=CaUrls.from_base("http://127.0.0.1:1"),
        )
        service = await add_ca_service(hub, ca)
        await init_hub_ca(hub, "EdgeKMS Fleet Test CA")

        answers: list[ca_pb2.GetCACertificatesResponse] = []

        async def chain_from_device() -> bool:
            msg = await device.request(
                ca_subject("GetCACertificates"),
                ca_pb2.GetCACertificatesRequest().SerializeToString(),
                timeout=5,
            )
            response = ca_pb2.GetCACertificatesResponse()
            response.ParseFromString(msg.data)
            answers.append(response)
            return bool(response.intermediate_certificate_der)

        await until(chain_from_device, what="the hub CA's chain on device a")
        issuer = x509.load_der_x509_certificate(answers[-1].intermediate_certificate_der)
        assert "EdgeKMS Fleet Test CA" in issuer.subject.rfc4514_string()

        # The shared issuing subject trusts whoever reaches it: not in the device's grant.
        before = len(await store.list_records())
        with pytest.raises((nats.errors.NoRespondersError, nats.errors.TimeoutError)):
            await device.request(
                ca_subject("IssueCertificate"),
                ca_pb2.IssueCertificateRequest().SerializeToString(),
                timeout=3,
            )
        assert len(await store.list_records()) == before
    finally:
        if ca is not None:
            await ca.crl_jobs.stop()
        if service is not None:
            await service.stop()
        await device.close()
        await hub.close()
        assert crypto.stop() == 0, crypto.stderr()[-2000:]
