"""A fleet device asks the hub's CA for certificates across its leaf connection.

The hub runs a real kms-crypto on the session's SoftHSM token and a real CA service with
its fleet path (ca_service.fleet), on the hub's bus; the hub's operator registers
devices a and b in the device registry (edgekms.fleet_ca). A process on device a asks,
through its own nats-server, on its own kms.ca.device.a.IssueCertificate: it gets its
registered names, nothing of b's, nothing once disabled or removed, and a typed
UNAVAILABLE with the uplink down. Every answer is in the CA's audit chain at the hub,
naming the device (docs/cluster.md, "Fleet").
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from nats.aio.client import Client

from ca_service.authority import CertificateAuthority
from ca_service.builder import CaUrls
from ca_service.config import CAConfigError, load_serve_config
from ca_service.fleet import AUDIT_ACTION, DeviceCA
from ca_service.service import CAService, add_ca_service, serve
from ca_service.signer import KMSKeyBackend
from ca_service.store import CAStore
from edgekms import natsrpc
from edgekms.audit import AuditWriter, audit_subject, parse_message, writer_stream
from edgekms.crypto_client import CryptoClient
from edgekms.errors import DeadlineExceeded, InvalidArgument, PermissionDenied, Unavailable
from edgekms.fleet_ca import (
    DeviceRecord,
    DeviceRegistry,
    device_ca_subject,
    device_inbox,
    request_certificate,
    subject_device,
)
from edgekms.subjects import ca_subject
from edgekms.v1 import ca_pb2
from edgekms.v1 import common_pb2 as pb
from mgmt.natsserver import free_port
from tests.conftest import SLOWDOWN, TokenInfo
from tests.crypto.conftest import CryptoProcess
from tests.fleet.conftest import ADMIN, Fleet, until
from tests.fleet.test_leaf_ca import PROVIDER, crypto_on_hub, init_hub_ca

A_NAME = "a.fleet.test"
B_NAME = "b.fleet.test"


def csr(common_name: str, *dns: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.PEM)


def issue_request(
    common_name: str, *dns: str, profile: str = "https-server"
) -> ca_pb2.IssueCertificateRequest:
    return ca_pb2.IssueCertificateRequest(
        csr=csr(common_name, *dns),
        profile=profile,
        request_id=secrets.token_hex(8),
        # Written over by the CA: the device is who its subject says.
        requester="admin",
    )


@dataclass
class HubCA:
    fleet: Fleet
    hub: Client
    device: Client
    store: CAStore
    registry: DeviceRegistry
    crypto: CryptoProcess
    service: CAService
    ca: CertificateAuthority
    # Entries the fixture's own probes left (skipped by audit_entries).
    audit_start: int = 0

    async def audit_entries(self) -> list[dict[str, Any]]:
        """The entries of the CA's audit chain at the hub since the fixture was ready."""
        js = self.hub.jetstream()
        info = await js.stream_info(writer_stream("ca"))
        entries: list[dict[str, Any]] = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(writer_stream("ca"), seq)
            assert msg.subject == audit_subject("ca")
            entries.extend(parse_message(msg.data or b""))
        return entries[self.audit_start :]

    async def records(self) -> int:
        return len(await self.store.list_records())


@pytest.fixture
async def hub_ca(fleet: Fleet, softhsm_token: TokenInfo, tmp_path: Path) -> AsyncIterator[HubCA]:
    crypto = crypto_on_hub(fleet, softhsm_token, tmp_path / "crypto")
    hub = await fleet.connect_hub()
    device = await fleet.connect_device("a")
    service = None
    ca = None
    try:
        js = hub.jetstream()
        store = await CAStore.open(js, "kms_ca_hubca")
        ca = CertificateAuthority(
            store,
            KMSKeyBackend(CryptoClient(hub, default_timeout=30.0), asyncio.get_running_loop()),
            urls=CaUrls.from_base("http://127.0.0.1:1"),
        )
        audit = AuditWriter(js, "ca")
        await audit.ensure_stream()
        registry = await DeviceRegistry.open(js)
        await registry.put(DeviceRecord("a", (f"dns:{A_NAME}",), ("https-server",)))
        await registry.put(DeviceRecord("b", (f"dns:{B_NAME}",), ("https-server",)))
        service = await add_ca_service(hub, ca, fleet=DeviceCA(ca, js, audit))
        await init_hub_ca(hub, "EdgeKMS Hub CA")

        async def device_reaches_the_ca() -> bool:
            # The device's own subject is reachable once the leaf carries the CA's
            # interest: a typed answer (here the refusal of an empty CSR) proves it.
            probe = ca_pb2.IssueCertificateRequest(request_id="probe", profile="https-server")
            try:
                await request_certificate(device, "a", probe, timeout=5)
            except InvalidArgument as exc:
                assert exc.reason == "csr.malformed"
                return True
            except (Unavailable, DeadlineExceeded):
                return False
            return False

        await until(device_reaches_the_ca, what="the hub CA's device subject from device a")
        made = HubCA(fleet, hub, device, store, registry, crypto, service, ca)
        made.audit_start = len(await made.audit_entries())
        yield made
    finally:
        try:
            if ca is not None:
                await ca.crl_jobs.stop()
            if service is not None:
                await service.stop()
            await device.close()
            await hub.close()
        finally:
            # Stopped whatever happened above: never left running after the test.
            assert crypto.stop() == 0, crypto.stderr()[-2000:]


@pytest.mark.asyncio
async def test_a_device_gets_a_certificate_for_its_registered_name(hub_ca: HubCA) -> None:
    request = issue_request(A_NAME, A_NAME)
    response = await request_certificate(hub_ca.device, "a", request, timeout=30)
    cert = x509.load_der_x509_certificate(response.certificate_der)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [A_NAME]
    issuer = x509.load_der_x509_certificate(response.chain_der[0])
    assert cert.issuer == issuer.subject
    cert.verify_directly_issued_by(issuer)
    assert response.record.requester == "fleet:a"

    stored = await hub_ca.records()
    # A retry of the same request id answers the same certificate and stores nothing.
    again = await request_certificate(hub_ca.device, "a", request, timeout=30)
    assert again.record.serial == response.record.serial
    assert await hub_ca.records() == stored

    issued = [
        e
        for e in await hub_ca.audit_entries()
        if e["action"] == AUDIT_ACTION and e["outcome"] == "ok"
    ]
    assert [e["target"] for e in issued] == [response.record.serial] * 2
    assert all(e["actor"]["client"] == "fleet:a" and e["details"]["device"] == "a" for e in issued)
    assert issued[0]["request_id"] == request.request_id


async def denials(hub_ca: HubCA, device: str) -> list[str]:
    """The reasons of the CA's audited refusals of `device`'s requests."""
    return [
        e["details"]["reason"]
        for e in await hub_ca.audit_entries()
        if e["action"] == AUDIT_ACTION
        and e["outcome"] == "denied"
        and e["actor"]["client"] == f"fleet:{device}"
        and e["details"]["device"] == device
    ]


@pytest.mark.asyncio
async def test_a_device_gets_nothing_that_is_not_its_own(hub_ca: HubCA) -> None:
    before = await hub_ca.records()
    # Device b's name, through a's own subject: refused by the CA's registry check.
    with pytest.raises(PermissionDenied) as other_name:
        await request_certificate(hub_ca.device, "a", issue_request(B_NAME, B_NAME), timeout=30)
    assert other_name.value.reason == "device.name_not_allowed"
    # Its own name in the SAN but b's as the CN.
    with pytest.raises(PermissionDenied) as other_cn:
        await request_certificate(hub_ca.device, "a", issue_request(B_NAME, A_NAME), timeout=30)
    assert other_cn.value.reason == "device.name_not_allowed"
    assert await hub_ca.records() == before
    assert await denials(hub_ca, "a") == ["device.name_not_allowed"] * 2
    assert await denials(hub_ca, "b") == []


@pytest.mark.asyncio
async def test_a_profile_the_registry_does_not_allow_is_refused(hub_ca: HubCA) -> None:
    before = await hub_ca.records()
    with pytest.raises(PermissionDenied) as profile:
        await request_certificate(
            hub_ca.device, "a", issue_request(A_NAME, A_NAME, profile="vpn-client"), timeout=30
        )
    assert profile.value.reason == "device.profile_not_allowed"
    assert await hub_ca.records() == before
    assert await denials(hub_ca, "a") == ["device.profile_not_allowed"]


@pytest.mark.asyncio
async def test_a_request_without_a_request_id_is_refused(hub_ca: HubCA) -> None:
    request = ca_pb2.IssueCertificateRequest(csr=csr(A_NAME, A_NAME), profile="https-server")
    with pytest.raises(InvalidArgument) as local:
        await request_certificate(hub_ca.device, "a", request, timeout=30)
    assert local.value.reason == "fleet.request_id_invalid"
    # Sent raw, past the device-side check: the CA refuses it too.
    with pytest.raises(InvalidArgument) as at_ca:
        await natsrpc.request(
            hub_ca.device,
            device_ca_subject("a", "IssueCertificate"),
            request,
            ca_pb2.IssueCertificateResponse,
            30,
            service="the hub's CA",
            reason_prefix="hub_ca",
        )
    assert at_ca.value.reason == "fleet.request_id_invalid"
    assert await denials(hub_ca, "a") == ["fleet.request_id_invalid"]


@pytest.mark.asyncio
async def test_a_device_is_refused_on_another_devices_subject(hub_ca: HubCA) -> None:
    before = await hub_ca.records()
    audit_before = len(await hub_ca.audit_entries())
    # b's subject, from a: nats-server does not carry it across a's leaf connection.
    # Nor the shared issuing subject, which trusts whoever reaches it.
    for subject in (device_ca_subject("b", "IssueCertificate"), ca_subject("IssueCertificate")):
        with pytest.raises((nats.errors.NoRespondersError, nats.errors.TimeoutError)):
            await hub_ca.device.request(
                subject, issue_request(B_NAME, B_NAME).SerializeToString(), timeout=3
            )
    # The same request from the hub (where b's subject is reachable, here with b's
    # inbox) is answered, so the refusal above is the leaf grant's, not a missing
    # endpoint.
    as_b = await nats.connect(
        f"nats://127.0.0.1:{hub_ca.fleet.hub_port}",
        user=ADMIN,
        password=hub_ca.fleet.passwords[ADMIN],
        inbox_prefix=device_inbox("b"),
    )
    try:
        answered = await request_certificate(as_b, "b", issue_request(B_NAME, B_NAME))
    finally:
        await as_b.close()
    assert answered.record.requester == "fleet:b"
    assert await hub_ca.records() == before + 1
    entries = (await hub_ca.audit_entries())[audit_before:]
    assert [e["actor"]["client"] for e in entries] == ["fleet:b"]


@pytest.mark.asyncio
async def test_a_disabled_or_removed_device_is_refused(hub_ca: HubCA) -> None:
    await hub_ca.registry.set_enabled("a", False)
    with pytest.raises(PermissionDenied) as disabled:
        await request_certificate(hub_ca.device, "a", issue_request(A_NAME, A_NAME), timeout=30)
    assert disabled.value.reason == "fleet.device_disabled"

    await hub_ca.registry.set_enabled("a", True)
    await request_certificate(hub_ca.device, "a", issue_request(A_NAME, A_NAME), timeout=30)

    await hub_ca.registry.remove("a")
    with pytest.raises(PermissionDenied) as removed:
        await request_certificate(hub_ca.device, "a", issue_request(A_NAME, A_NAME), timeout=30)
    assert removed.value.reason == "fleet.device_unknown"
    assert await denials(hub_ca, "a") == ["fleet.device_disabled", "fleet.device_unknown"]


@pytest.mark.asyncio
async def test_no_uplink_is_unavailable_and_the_uplink_back_serves_again(hub_ca: HubCA) -> None:
    hub_ca.fleet.stop_hub()
    try:
        refusal: list[Unavailable] = []

        async def unavailable() -> bool:
            try:
                await request_certificate(
                    hub_ca.device, "a", issue_request(A_NAME, A_NAME), timeout=2 * SLOWDOWN
                )
            except Unavailable as exc:
                refusal.append(exc)
                return True
            except DeadlineExceeded:
                return False
            return False

        await until(unavailable, what="UNAVAILABLE from device a with the hub down")
        assert refusal[-1].reason == "hub_ca.unavailable"
        assert refusal[-1].details.get("device") == "a"
    finally:
        hub_ca.fleet.start_hub()

        async def hub_back() -> bool:
            return bool(hub_ca.hub.is_connected)

        await until(hub_back, what="the hub's admin connection back after the restart")

    issued: list[ca_pb2.IssueCertificateResponse] = []

    async def issued_again() -> bool:
        try:
            issued.append(
                await request_certificate(
                    hub_ca.device, "a", issue_request(A_NAME, A_NAME), timeout=5 * SLOWDOWN
                )
            )
        except (Unavailable, DeadlineExceeded):
            return False
        return True

    await until(issued_again, what="a certificate for device a after the uplink returned")
    assert issued[-1].record.requester == "fleet:a"


@pytest.mark.asyncio
async def test_the_ca_answers_a_device_only_on_its_inbox(hub_ca: HubCA) -> None:
    """A request names the subject its answer is published on: a device naming a hub
    KV key ($KV.kms_fleet_devices.b: device b's registry record) would have the CA
    write its answer there. The CA answers only on inboxes (a device: its own)."""
    kv = await hub_ca.hub.jetstream().key_value("kms_fleet_devices")
    before = (await kv.get("b")).revision
    target = "$KV.kms_fleet_devices.b"
    request = issue_request(A_NAME, A_NAME).SerializeToString()
    await hub_ca.device.publish(device_ca_subject("a", "IssueCertificate"), request, reply=target)
    # Another device's inbox is not this device's either.
    await hub_ca.device.publish(
        device_ca_subject("a", "IssueCertificate"), request, reply="_INBOX_b.stolen"
    )
    await hub_ca.device.publish(ca_subject("GetCACertificates"), b"", reply=target)

    async def both_dropped() -> bool:
        return await denials(hub_ca, "a") == ["fleet.reply_invalid"] * 2

    await until(both_dropped, what="the CA to drop device a's misdirected requests")
    # Answered on an inbox, in order behind the misdirected read on the same subject.
    answer = await hub_ca.device.request(
        ca_subject("GetCACertificates"),
        ca_pb2.GetCACertificatesRequest().SerializeToString(),
        timeout=10 * SLOWDOWN,
    )
    assert answer.data
    assert (await kv.get("b")).revision == before
    assert await registry_record(hub_ca, "b") == DeviceRecord(
        "b", (f"dns:{B_NAME}",), ("https-server",)
    )


async def registry_record(hub_ca: HubCA, device: str) -> DeviceRecord | None:
    return await hub_ca.registry.get(device)


def test_registry_records_and_subjects_are_checked() -> None:
    """Pure logic: what the operator may record, and which subjects name a device."""
    with pytest.raises(InvalidArgument) as name:
        DeviceRecord("a", ("email:ops@fleet.test",), ("https-server",))
    assert name.value.reason == "fleet.names_invalid"
    with pytest.raises(InvalidArgument) as profile:
        DeviceRecord("a", (f"dns:{A_NAME}",), ("broker",))
    assert profile.value.reason == "fleet.profile_invalid"
    with pytest.raises(InvalidArgument) as device:
        DeviceRecord("A*", (f"dns:{A_NAME}",), ())
    assert device.value.reason == "fleet.device_invalid"
    for raw in (b"{", b"[]", b'{"device": "a", "names": "x", "profiles": [], "enabled": true}'):
        with pytest.raises(InvalidArgument) as unreadable:
            DeviceRecord.from_json(raw)
        assert unreadable.value.reason == "fleet.record_invalid"
    record = DeviceRecord("a", (f"dns:{A_NAME}", "ip:10.0.0.7"), ("https-server", "vpn-client"))
    assert DeviceRecord.from_json(record.to_json()) == record
    assert subject_device("kms.ca.device.a.IssueCertificate") == "a"
    for subject in ("kms.ca.IssueCertificate", "kms.ca.device.A.IssueCertificate", "x.y.z.a.b"):
        with pytest.raises(InvalidArgument):
            subject_device(subject)


def write_ca_config(directory: Path, fleet: Fleet, extra: str) -> Path:
    """A ca.toml for a CA on the hub's bus as the hub's admin."""
    directory.mkdir(parents=True, exist_ok=True)
    password = directory / "admin.password"
    password.write_text(fleet.passwords[ADMIN])
    password.chmod(0o600)
    config = directory / "ca.toml"
    config.write_text(
        f'nats_url = "nats://127.0.0.1:{fleet.hub_port}"\n'
        f'http_listen = "127.0.0.1:{free_port()}"\n'
        f'nats_user = "{ADMIN}"\n'
        'nats_password_file = "admin.password"\n'
        f"{extra}\n"
    )
    return config


def test_the_ca_config_takes_fleet(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "unused")
    assert load_serve_config(write_ca_config(tmp_path / "on", fleet, "fleet = true")).fleet
    assert not load_serve_config(write_ca_config(tmp_path / "off", fleet, "")).fleet
    with pytest.raises(CAConfigError, match="fleet must be true or false"):
        load_serve_config(write_ca_config(tmp_path / "bad", fleet, 'fleet = "yes"'))


@pytest.mark.asyncio
async def test_the_ca_service_serves_fleet_devices_from_its_config(
    fleet: Fleet, softhsm_token: TokenInfo, tmp_path: Path
) -> None:
    """`kmsctl ca serve` with `fleet = true`: the same path, wired by the service."""
    crypto = crypto_on_hub(fleet, softhsm_token, tmp_path / "crypto")
    hub = await fleet.connect_hub()
    device = await fleet.connect_device("a")
    stop = asyncio.Event()
    config = load_serve_config(write_ca_config(tmp_path / "ca", fleet, "fleet = true"))
    served = asyncio.create_task(serve(config, stop))
    try:
        registry = await DeviceRegistry.open(hub.jetstream())
        await registry.put(DeviceRecord("a", (f"dns:{A_NAME}",), ("https-server",)))
        init = ca_pb2.InitCARequest(
            provider=PROVIDER,
            key_type=pb.KEY_TYPE_EC_P256,
            common_name="EdgeKMS Hub CA (served)",
            disable_root=True,
        )

        async def initialised() -> bool:
            if served.done():
                served.result()  # the service died: its error, not a timeout
            try:
                await natsrpc.request(
                    hub,
                    ca_subject("Init"),
                    init,
                    ca_pb2.InitCAResponse,
                    60,
                    service="the CA service",
                    reason_prefix="ca",
                )
            except Unavailable:
                return False  # not subscribed yet
            return True

        await until(initialised, what="the served CA to answer Init")
        issued: list[ca_pb2.IssueCertificateResponse] = []
        request = issue_request(A_NAME, A_NAME)

        async def certificate() -> bool:
            try:
                issued.append(await request_certificate(device, "a", request, timeout=10))
            except (Unavailable, DeadlineExceeded):
                return False
            return True

        await until(certificate, what="device a's certificate from the served CA")
        assert issued[-1].record.requester == "fleet:a"
        assert not served.done()
    finally:
        try:
            stop.set()
            await asyncio.wait_for(served, 30 * SLOWDOWN)
            await device.close()
            await hub.close()
        finally:
            assert crypto.stop() == 0, crypto.stderr()[-2000:]
