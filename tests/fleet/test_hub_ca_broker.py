"""A client on a fleet device asks its own broker for a certificate over gRPC, and the
broker (`hub_ca_device = "a"`, broker.hub_ca) gets it from the hub's CA across the leaf.

The hub: a real CA with its fleet path and kms-crypto (tests/fleet/test_hub_ca.py's
fixture). Device a: its own kms-crypto on its own SoftHSM token, the ceremony and a
kms-broker process, all on the device's nats-server (tests/e2e's Parts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from cryptography import x509

from broker.config import ConfigError, load_config
from broker.hub_ca import hub_request_id
from edgekms.errors import DeadlineExceeded, FailedPrecondition, PermissionDenied, Unavailable
from tests.conftest import make_token
from tests.e2e.conftest import Parts
from tests.fleet.conftest import until

# hub_ca: the hub's CA fixture, shared with test_hub_ca.py.
from tests.fleet.test_hub_ca import A_NAME, B_NAME, HubCA, csr, hub_ca  # noqa: F401


@dataclass
class DeviceParts(Parts):
    broker_extra: ClassVar[str] = 'hub_ca_device = "a"\n'


@pytest.fixture
def device_broker(hub_ca: HubCA, tmp_path: Path) -> Iterator[DeviceParts]:  # noqa: F811
    """Device a's crypto service, ceremony and broker on the device's nats-server."""
    server = hub_ca.fleet.devices["a"]
    assert server is not None
    root = tmp_path / "device-a"
    root.mkdir()
    parts = DeviceParts(root, server, make_token(root / "softhsm"))
    try:
        parts.start_crypto()
        parts.ceremony()
        parts.start_broker()
        yield parts
    finally:
        parts.stop_all()


@pytest.mark.asyncio
async def test_a_device_client_gets_a_hub_certificate_through_its_broker(
    hub_ca: HubCA,  # noqa: F811 - the fixture imported above
    device_broker: DeviceParts,
) -> None:
    client = device_broker.client(timeout=30)
    request = csr(A_NAME, A_NAME)
    try:
        issued = await asyncio.to_thread(
            client.issue_certificate, "https-server", request, request_id="r-1"
        )
        cert = x509.load_der_x509_certificate(issued.certificate_der)
        hub_chain = await asyncio.to_thread(client.get_ca_certificates)
        issuer = x509.load_der_x509_certificate(hub_chain.intermediate_certificate_der)
        cert.verify_directly_issued_by(issuer)
        assert "EdgeKMS Hub CA" in issuer.subject.rfc4514_string()
        assert issued.record.requester == "fleet:a"
        # Recorded at the hub, not on the device.
        hub_serials = [r.serial for r in await hub_ca.store.list_records()]
        assert issued.record.serial in hub_serials
        # A retry (same CSR, same id) is the same certificate.
        again = await asyncio.to_thread(
            client.issue_certificate, "https-server", request, request_id="r-1"
        )
        assert again.record.serial == issued.record.serial

        with pytest.raises(PermissionDenied) as other:
            await asyncio.to_thread(
                client.issue_certificate, "https-server", csr(B_NAME, B_NAME), request_id="r-2"
            )
        assert other.value.reason == "device.name_not_allowed"
        with pytest.raises(FailedPrecondition) as listing:
            await asyncio.to_thread(client.list_certificates)
        assert listing.value.reason == "fleet.hub_ca_method"

        hub_ca.fleet.stop_hub()
        try:
            refusals: list[Unavailable] = []

            async def unavailable() -> bool:
                try:
                    await asyncio.to_thread(
                        client.issue_certificate, "https-server", csr(A_NAME, A_NAME)
                    )
                except Unavailable as exc:
                    refusals.append(exc)
                    return True
                except DeadlineExceeded:
                    return False
                return False

            await until(unavailable, what="UNAVAILABLE through device a's broker, hub down")
            assert refusals[-1].reason == "hub_ca.unavailable"
        finally:
            hub_ca.fleet.start_hub()

            async def hub_back() -> bool:
                return bool(hub_ca.hub.is_connected)

            await until(hub_back, what="the hub's admin connection back after the restart")
    finally:
        client.close()


def test_hub_request_ids_are_per_local_client() -> None:
    """Pure logic: the hub keys a device's certificates by the device and the request
    id, so the device's broker gives each local client its own ids there."""
    assert hub_request_id("svc-1", "r-1") == hub_request_id("svc-1", "r-1")
    assert hub_request_id("svc-1", "r-1") != hub_request_id("svc-2", "r-1")
    assert hub_request_id("svc-1", "") != hub_request_id("svc-1", "")
    assert 0 < len(hub_request_id("svc-1", "x" * 128)) <= 128


@pytest.mark.parametrize(
    "value",
    ['"A*"', '"a.b"', "7", '"' + "a" * 33 + '"'],
    ids=["upper", "dot", "number", "too-long"],
)
def test_a_bad_hub_ca_device_is_refused(tmp_path: Path, value: str) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(
        'listen = "127.0.0.1:8443"\nnats_url = "nats://127.0.0.1:4222"\n'
        'default_provider = "hsm0"\nproviders = ["hsm0"]\n'
        f"hub_ca_device = {value}\n"
        '[tls]\ncert = "b.crt"\nkey = "b.key"\nclient_ca = "ca.crt"\n'
    )
    with pytest.raises(ConfigError, match="'hub_ca_device' must be a device id"):
        load_config(config)
    config.write_text(config.read_text().replace(f"hub_ca_device = {value}", 'hub_ca_device = "a"'))
    assert load_config(config).hub_ca_device == "a"
