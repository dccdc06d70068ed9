"""Devices as JetStream leaf nodes: their audit at the hub, a cut uplink, what a device may do.

Real nats-servers on loopback (tests/fleet/conftest.py): a hub and two devices, each
device in its own JetStream domain. Each device appends to its own audit chain locally
(edgekms.audit.AuditWriter, as its crypto service does); the hub's KMS_FLEET_<ID> stream
sources it over the leaf connection, and edgekms.fleet.verify_device checks it there.
"""

from __future__ import annotations

import asyncio
import json

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from edgekms.audit import AuditWriter, parse_entry, stored_form, writer_stream
from edgekms.errors import InvalidArgument, NotFound
from edgekms.fleet import (
    SOURCE_HEADER,
    deliver_prefix,
    fleet_stream,
    source_device,
    verify_device,
)
from tests.fleet.conftest import DEVICES, HUB_DOMAIN, Fleet, until

pytestmark = pytest.mark.asyncio


async def hub_messages(hub: Client, device: str) -> int:
    info = await hub.jetstream(timeout=2).stream_info(fleet_stream(device))
    return int(info.state.messages)


async def start_writers(
    fleet: Fleet, hub: Client
) -> tuple[dict[str, Client], dict[str, AuditWriter]]:
    """Each device's audit writer on its own nats-server, and the hub sourcing it."""
    clients = {d: await fleet.connect_device(d) for d in DEVICES}
    writers = {d: AuditWriter(clients[d].jetstream(), f"crypto-{d}") for d in DEVICES}
    for writer in writers.values():
        await writer.ensure_stream()
    for device in DEVICES:
        await source_device(hub.jetstream(), device, [f"crypto-{device}"])
    return clients, writers


async def test_device_audit_reaches_the_hub_and_catches_up_after_a_cut(
    fleet: Fleet, hub: Client
) -> None:
    clients, writers = await start_writers(fleet, hub)
    try:
        heads = {}
        for device in DEVICES:
            for i in range(5):
                done = await writers[device].append("Sign", "ok", target=f"{device}-key-{i}")
            heads[device] = done.entry["hash"]
        for device in DEVICES:

            async def five(device: str = device) -> bool:
                return await hub_messages(hub, device) == 5

            await until(five, what=f"the hub's copy of {device}'s audit")
            report = await verify_device(hub.jetstream(), device)
            assert report.ok, report.to_dict()
            assert report.entries == 5
            assert report.heads == {f"crypto-{device}": heads[device]}

        # The uplink goes: the hub is down. Device a keeps signing, and recording it.
        await hub.close()
        fleet.stop_hub()
        for i in range(5, 25):
            done = await writers["a"].append("Sign", "ok", target=f"a-key-{i}")
        head = done.entry["hash"]
        local = await clients["a"].jetstream().stream_info(writer_stream("crypto-a"))
        assert local.state.messages == 25

        fleet.start_hub()
        back = await fleet.connect_hub()
        try:

            async def caught_up() -> bool:
                return await hub_messages(back, "a") == 25

            await until(caught_up, what="device a's audit to catch up at the hub")
            report = await verify_device(back.jetstream(), "a")
            assert report.ok, report.to_dict()
            assert report.entries == 25
            assert report.heads == {"crypto-a": head}
            # Device b, which wrote nothing meanwhile, is as it was.
            assert (await verify_device(back.jetstream(), "b")).entries == 5
        finally:
            await back.close()
    finally:
        for nc in clients.values():
            await nc.close()


async def test_an_entry_forged_at_the_hub_is_detected(fleet: Fleet, hub: Client) -> None:
    clients, writers = await start_writers(fleet, hub)
    try:
        for i in range(3):
            await writers["a"].append("Sign", "ok", target=f"key-{i}")
        js = hub.jetstream()

        async def three() -> bool:
            return await hub_messages(hub, "a") == 3

        await until(three, what="the hub's copy of a's audit")
        # Someone with the hub's JetStream API gives the copy a subject and stores an
        # altered entry in it. nats-server refuses a publish that claims a source...
        stream = fleet_stream("a")
        real = await js.get_msg(stream, 3)
        assert real.data is not None
        entry = parse_entry(real.data)  # the long form, whatever the format stored
        entry["target"] = "key-forged"
        forged = json.dumps(stored_form(entry), sort_keys=True, separators=(",", ":")).encode()
        info = await js.stream_info(stream)
        info.config.subjects = ["kms.audit.crypto-a"]
        await js.update_stream(info.config)
        with pytest.raises(nats.js.errors.BadRequestError):
            await js.publish(
                "kms.audit.crypto-a",
                forged,
                headers={SOURCE_HEADER: (real.headers or {})[SOURCE_HEADER]},
            )
        # ... so the forged entry goes in without one: its hash gives it away, and it is
        # named as stored at the hub rather than sourced from the device.
        await js.publish("kms.audit.crypto-a", forged)
        report = await verify_device(js, "a")
        assert not report.ok
        kinds = {p.kind for p in report.problems}
        assert {"hash_mismatch", "unsourced"} <= kinds, report.to_dict()
        # A well-formed copy of a real entry, replayed at the hub, is caught as well.
        await js.publish("kms.audit.crypto-a", real.data)
        report = await verify_device(js, "a")
        replayed = [p for p in report.problems if p.seq == 5]
        assert {p.kind for p in replayed} == {"prev_mismatch", "unsourced"}, report.to_dict()
    finally:
        for nc in clients.values():
            await nc.close()


async def test_verify_refuses_an_unknown_or_invalid_device(hub: Client) -> None:
    with pytest.raises(NotFound) as unknown:
        await verify_device(hub.jetstream(), "nobody")
    assert unknown.value.reason == "fleet.device_unknown"
    with pytest.raises(InvalidArgument) as invalid:
        await verify_device(hub.jetstream(), "A.>")
    assert invalid.value.reason == "fleet.device_invalid"


async def test_a_device_reads_no_other_device_and_writes_nothing_of_the_hub(
    fleet: Fleet, hub: Client
) -> None:
    clients, writers = await start_writers(fleet, hub)
    a = clients["a"]
    try:
        # Device a listens where device b's audit flows into the hub.
        sniffed: list[bytes] = []

        async def sniff(msg: Msg) -> None:
            sniffed.append(msg.data)

        await a.subscribe(f"{deliver_prefix('b')}.>", cb=sniff)
        await a.subscribe("kms.audit.crypto-b", cb=sniff)
        await a.flush()
        for i in range(3):
            await writers["b"].append("Sign", "ok", target=f"b-key-{i}")

        async def three() -> bool:
            return await hub_messages(hub, "b") == 3

        await until(three, what="the hub's copy of b's audit")

        # ... and asks the hub's JetStream for b's copy, by every API path.
        hub_js = a.jetstream(domain=HUB_DOMAIN, timeout=2)
        # (nats.py turns "no responders" into ServiceUnavailableError here.)
        with pytest.raises((nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError)):
            await hub_js.stream_info(fleet_stream("b"))
        for subject in (
            f"$JS.{HUB_DOMAIN}.API.DIRECT.GET.{fleet_stream('b')}",
            f"$JS.{HUB_DOMAIN}.API.STREAM.MSG.GET.{fleet_stream('b')}",
        ):
            with pytest.raises((nats.errors.NoRespondersError, nats.errors.TimeoutError)):
                await a.request(subject, b'{"seq":1}', timeout=2)

        # Device a tries to write into the hub: a bucket, b's sourcing, b's JetStream.
        seen: list[tuple[str, bytes]] = []

        async def watch(msg: Msg) -> None:
            seen.append((msg.subject, msg.data))

        await hub.subscribe(">", cb=watch)
        await hub.flush()

        # The hub's interest reaches device a's server over the leaf connection some time
        # after the flush: until a permitted publish arrives, a forbidden one could be
        # dropped for want of interest rather than refused, and prove nothing.
        async def interest() -> bool:
            await a.publish("kms.ca.GetCRL", b"from-a-probe")
            await a.flush()
            return any(data == b"from-a-probe" for _, data in seen)

        await until(interest, what="the hub's interest to reach device a")
        forbidden = (
            "$KV.kms_keys.evil",
            "$KV.kms_ca.evil",
            f"{deliver_prefix('b')}.S.forged",
            "$JS.dev-b.API.STREAM.DELETE.KMS_AUDIT_CRYPTO-B",
            "kms.ca.IssueCertificate",
            "kms.audit.broker",
            "kms.crypto.hsm0.Sign",
        )
        for subject in forbidden:
            await a.publish(subject, b"from-a")
        # One connection carries them in order: once this allowed one is at the hub,
        # anything before it that was let through would be there too.
        await a.publish("kms.ca.GetCRL", b"from-a-marker")
        await a.flush()

        async def marker() -> bool:
            return any(data == b"from-a-marker" for _, data in seen)

        await until(marker, what="device a's permitted publish to reach the hub")
        leaked = [subject for subject, data in seen if data == b"from-a"]
        assert leaked == []
        # Only a's own publish below, seen on a's own server, ever showed up there.
        assert set(sniffed) <= {b"from-a"}
        # b's chain at the hub is untouched by all this.
        report = await verify_device(hub.jetstream(), "b")
        assert report.ok and report.entries == 3, report.to_dict()
    finally:
        for nc in clients.values():
            await nc.close()


async def test_a_device_reaches_the_hubs_ca_reads_only(fleet: Fleet, hub: Client) -> None:
    """The CA's chain and CRL are reachable from a device across the leaf connection,
    answered on the device's own inbox; its shared state-changing operations are not
    (a device asks for certificates on its own kms.ca.device.<id> subject, where the CA
    applies the hub's registry: tests/fleet/test_hub_ca.py)."""
    heard: list[str] = []

    async def ca(msg: Msg) -> None:
        # A stand-in for the CA service's endpoints on kms.ca.<Operation>: what is under
        # test is which requests reach it across the leaf and whether answers get back.
        heard.append(msg.subject)
        await msg.respond(b"answer:" + msg.subject.encode())

    await hub.subscribe("kms.ca.>", cb=ca)
    await hub.flush()
    device = await fleet.connect_device("a")
    try:

        async def answered() -> bool:
            reply = await device.request("kms.ca.GetCACertificates", b"", timeout=2)
            return reply.data == b"answer:kms.ca.GetCACertificates"

        await until(answered, what="the hub's CA subjects to be reachable from device a")
        reply = await device.request("kms.ca.GetCRL", b"", timeout=2)
        assert reply.data == b"answer:kms.ca.GetCRL"
        for operation in ("IssueCertificate", "RevokeCertificate", "Init", "SpiffeSignX509Svid"):
            with pytest.raises((nats.errors.NoRespondersError, nats.errors.TimeoutError)):
                await device.request(f"kms.ca.{operation}", b"", timeout=2)
        assert set(heard) == {"kms.ca.GetCACertificates", "kms.ca.GetCRL"}
    finally:
        await device.close()


async def test_messages_on_a_devices_deliver_subject_do_not_enter_its_copy(
    fleet: Fleet, hub: Client
) -> None:
    """Answers are published to whatever reply subject a request names: a device could
    ask the hub's CA something with another device's sourcing deliver subject as its
    reply. Whatever lands there without the sourcing consumer's own metadata is not
    stored in that device's copy."""
    clients, writers = await start_writers(fleet, hub)
    # Anyone on the hub allowed to listen sees the subject b's entries arrive on.
    subjects: set[str] = set()

    async def deliveries(msg: Msg) -> None:
        subjects.add(msg.subject)

    await hub.subscribe(f"{deliver_prefix('b')}.>", cb=deliveries)
    await hub.flush()
    try:
        for i in range(2):
            await writers["b"].append("Sign", "ok", target=f"b-key-{i}")

        async def two() -> bool:
            return await hub_messages(hub, "b") == 2 and bool(subjects)

        await until(two, what="the hub's copy of b's audit")
        stored = await hub.jetstream().get_msg(fleet_stream("b"), 1)
        for subject in subjects:
            await hub.publish(subject, b"junk")
            await hub.publish(subject, stored.data or b"", reply="kms.ca.reply")
        await hub.flush()
        await writers["b"].append("Sign", "ok", target="b-key-2")

        async def three() -> bool:
            return await hub_messages(hub, "b") == 3

        await until(three, what="b's next real entry at the hub")
        report = await verify_device(hub.jetstream(), "b")
        assert report.ok and report.entries == 3, report.to_dict()
    finally:
        for nc in clients.values():
            await nc.close()


async def test_device_audit_reaches_the_hub_over_tls(tls_fleet: Fleet) -> None:
    """The same sourcing with the leaf connections over TLS, each device checking the
    hub's certificate against the bus CA."""
    fleet = tls_fleet
    assert fleet.tls is not None
    hub = await fleet.connect_hub()
    assert "tls://" in fleet.device_config("a").render()
    assert "cert_file" in fleet.hub_config().render()
    clients, writers = await start_writers(fleet, hub)
    try:
        for device in DEVICES:
            await writers[device].append("Sign", "ok", target=f"{device}-key")
        for device in DEVICES:

            async def one(device: str = device) -> bool:
                return await hub_messages(hub, device) == 1

            await until(one, what=f"{device}'s audit at the hub over TLS")
            report = await verify_device(hub.jetstream(), device)
            assert report.ok and report.entries == 1, report.to_dict()
        # The hub's leaf listener demands TLS of anyone connecting (its INFO says so
        # before anything else), so the devices' links above were TLS.
        reader, writer = await asyncio.open_connection("127.0.0.1", fleet.leaf_port)
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.close()
        assert line.startswith(b"INFO ")
        assert json.loads(line[5:])["tls_required"] is True
    finally:
        for nc in clients.values():
            await nc.close()
        await hub.close()


async def test_sourcing_a_device_again_adds_writers_and_drops_none(
    fleet: Fleet, hub: Client
) -> None:
    js = hub.jetstream()
    await source_device(js, "a", ["crypto-a"])
    await source_device(js, "a", ["crypto-a", "broker"])
    await source_device(js, "a", ["crypto-a"])  # names fewer: nothing is dropped
    info = await js.stream_info(fleet_stream("a"))
    names = {s.name for s in info.config.sources or []}
    assert names == {writer_stream("crypto-a"), writer_stream("broker")}
    assert not info.config.subjects


async def test_the_hub_cannot_reach_a_devices_crypto_subjects(fleet: Fleet, hub: Client) -> None:
    """Keys stay on their device: a responder on the device's crypto subject answers
    processes on the device, and nothing sent from the hub reaches it."""
    device = await fleet.connect_device("a")
    heard: list[str] = []

    async def crypto(msg: Msg) -> None:
        heard.append(msg.subject)
        await msg.respond(b"signed")

    try:
        await device.subscribe("kms.crypto.deva.>", cb=crypto)
        await device.flush()
        local = await device.request("kms.crypto.deva.Sign", b"", timeout=5)
        assert local.data == b"signed"
        with pytest.raises((nats.errors.NoRespondersError, nats.errors.TimeoutError)):
            await hub.request("kms.crypto.deva.Sign", b"", timeout=2)
        assert heard == ["kms.crypto.deva.Sign"]
    finally:
        await device.close()
