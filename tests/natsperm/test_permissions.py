"""Each bus identity against a real nats-server: what its job needs works, the rest is
refused by the server (publish, subscribe, JetStream), replies included."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat

import nats
import nats.errors
import pytest
from nats.js.api import StreamConfig

from edgekms import kvread, natsrpc
from edgekms.algorithms import MAX_MESSAGE_SIZE
from edgekms.audit import stream_config
from edgekms.fleet_ca import FLEET_DEVICES_BUCKET, DeviceRegistry
from mgmt.natsauth import BUS_MAX_PAYLOAD, BusCredentials, inbox_prefix
from tests.natsperm.conftest import Conn, SecureBus, connected

pytestmark = pytest.mark.timeout(60)

JS_TIMEOUT = 0.3


async def refused_publish(conn: Conn, subject: str) -> None:
    await conn.nc.publish(subject, b"x")
    await conn.nc.flush()
    await conn.violation(f'publish to "{subject}"')


async def refused_subscribe(conn: Conn, subject: str) -> nats.aio.subscription.Subscription:
    sub = await conn.nc.subscribe(subject)
    await conn.nc.flush()
    await conn.violation(f'subscription to "{subject}"')
    return sub


async def refused_js(conn: Conn, api_subject: str) -> None:
    """A JetStream API call on a subject outside the identity's grant gets no answer."""
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await conn.nc.request(api_subject, b"", timeout=JS_TIMEOUT)
    await conn.violation(f'publish to "{api_subject}"')


async def answer(conn: Conn, subject: str, reply: bytes = b"ok") -> None:
    async def handler(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(reply)

    await conn.nc.subscribe(subject, cb=handler)
    await natsrpc.subscriptions_live(conn.nc)


async def nothing_arrives(sub: nats.aio.subscription.Subscription) -> None:
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=0.3)


# --- connecting ---------------------------------------------------------------------


def test_server_config_holds_hashes_not_passwords(secure_bus: SecureBus) -> None:
    conf = secure_bus.server.conf_path.read_text()
    assert stat.S_IMODE(os.stat(secure_bus.server.conf_path).st_mode) == 0o600
    for user, path in secure_bus.passwords.items():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert path.read_text().strip() not in conf, user
    assert conf.count('"$2b$') == len(secure_bus.identities)
    # An empty allow list would mean "everything": it must never be written.
    assert '"allow": []' not in conf


async def test_wrong_password_is_refused(secure_bus: SecureBus, tmp_path: object) -> None:
    options = secure_bus.creds("broker").connect_options()
    options["password"] = "not-the-password"
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(secure_bus.url, allow_reconnect=False, connect_timeout=3, **options)


async def test_no_credentials_is_refused(secure_bus: SecureBus) -> None:
    tls = BusCredentials(ca_file=secure_bus.tls.ca_cert).connect_options()
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(secure_bus.url, allow_reconnect=False, connect_timeout=3, **tls)


async def test_bus_requires_tls_from_the_bus_ca(secure_bus: SecureBus) -> None:
    options = secure_bus.creds("broker").connect_options()
    options["tls"] = ssl.create_default_context()  # the system CAs do not know the bus CA
    with pytest.raises(Exception):  # noqa: B017 - whichever layer reports it, no connection
        await nats.connect(secure_bus.url, allow_reconnect=False, connect_timeout=3, **options)
    options.pop("tls")
    plain = secure_bus.url.replace("tls://", "nats://")
    with pytest.raises(Exception):  # noqa: B017
        await nats.connect(plain, allow_reconnect=False, connect_timeout=3, **options)


async def test_max_payload_fits_the_largest_message(secure_bus: SecureBus) -> None:
    async with connected(secure_bus, "broker") as broker:
        assert broker.nc.max_payload == BUS_MAX_PAYLOAD
        assert BUS_MAX_PAYLOAD > MAX_MESSAGE_SIZE + 1024
        async with connected(secure_bus, "crypto-hsm0") as crypto:
            await answer(crypto, "kms.crypto.hsm0.Sign")
            reply = await broker.nc.request(
                "kms.crypto.hsm0.Sign", b"m" * (MAX_MESSAGE_SIZE + 1024), timeout=5
            )
            assert reply.data == b"ok"
        with pytest.raises(nats.errors.MaxPayloadError):
            await broker.nc.publish("kms.crypto.hsm0.Sign", b"m" * (BUS_MAX_PAYLOAD + 1))


# --- crypto service -------------------------------------------------------------------


async def test_crypto_service_answers_only_its_own_subjects(secure_bus: SecureBus) -> None:
    async with (
        connected(secure_bus, "broker") as broker,
        connected(secure_bus, "crypto-hsm0") as hsm0,
    ):
        await answer(hsm0, "kms.crypto.hsm0.>", b"from-hsm0")
        reply = await broker.nc.request("kms.crypto.hsm0.Sign", timeout=5)
        assert reply.data == b"from-hsm0"
        # Listening on another provider's subjects, or all of them, is refused ...
        other = await refused_subscribe(hsm0, "kms.crypto.tpm0.>")
        everything = await refused_subscribe(hsm0, "kms.crypto.>")
        # ... and really hears nothing when the broker asks tpm0.
        await broker.nc.publish("kms.crypto.tpm0.Sign", b"secret digest")
        await broker.nc.flush()
        await nothing_arrives(other)
        await nothing_arrives(everything)
        assert not broker.errors


async def test_crypto_service_publishes_nothing_but_replies(secure_bus: SecureBus) -> None:
    """Replies, and audit entries under its own writer name only."""
    async with connected(secure_bus, "crypto-hsm0") as hsm0:
        await refused_publish(hsm0, "kms.crypto.tpm0.Sign")
        await refused_publish(hsm0, "kms.crypto.hsm0.Sign")
        await refused_publish(hsm0, "kms.ca.IssueCertificate")
        await refused_publish(hsm0, "kms.audit.crypto")
        await refused_publish(hsm0, "kms.audit.broker")
        await refused_publish(hsm0, "kms.audit.crypto-tpm0")
        await refused_publish(hsm0, f"{inbox_prefix('broker')}.forged")


async def test_a_reply_may_be_sent_once(secure_bus: SecureBus) -> None:
    async with (
        connected(secure_bus, "broker") as broker,
        connected(secure_bus, "crypto-hsm0") as hsm0,
    ):
        sub = await hsm0.nc.subscribe("kms.crypto.hsm0.Attest")
        await natsrpc.subscriptions_live(hsm0.nc)
        inbox = broker.nc.new_inbox()
        replies = await broker.nc.subscribe(inbox)
        await natsrpc.subscriptions_live(broker.nc)
        await broker.nc.publish("kms.crypto.hsm0.Attest", b"", reply=inbox)
        request = await sub.next_msg(timeout=2)
        assert request.reply.startswith(inbox_prefix("broker") + ".")
        await hsm0.nc.publish(request.reply, b"first")
        await hsm0.nc.flush()
        assert (await replies.next_msg(timeout=2)).data == b"first"
        await refused_publish(hsm0, request.reply)
        await nothing_arrives(replies)


async def test_crypto_service_has_no_jetstream(secure_bus: SecureBus) -> None:
    """Only its own audit stream's head (stream info, direct get) for its own entries."""
    async with connected(secure_bus, "crypto-hsm0") as hsm0:
        await refused_js(hsm0, "$JS.API.INFO")
        await refused_js(hsm0, "$JS.API.STREAM.PURGE.KMS_AUDIT")
        await refused_js(hsm0, "$JS.API.STREAM.PURGE.KMS_AUDIT_CRYPTO-HSM0")
        await refused_js(hsm0, "$JS.API.CONSUMER.CREATE.KMS_AUDIT_CRYPTO-HSM0")
        await refused_js(hsm0, "$JS.API.STREAM.INFO.KMS_AUDIT_BROKER")
        await refused_js(hsm0, "$JS.API.STREAM.CREATE.KMS_AUDIT_BROKER")
        await refused_js(hsm0, "$JS.API.STREAM.INFO.KV_kms_keys")
        await refused_js(hsm0, "$JS.API.STREAM.CREATE.KV_crypto")
        await refused_publish(hsm0, "$KV.kms_keys.ca/root")


async def test_nats_micro_discovery_works_for_own_service(secure_bus: SecureBus) -> None:
    import nats.micro

    async with (
        connected(secure_bus, "crypto-tpm0") as tpm0,
        connected(secure_bus, "broker") as broker,
    ):
        service = await nats.micro.add_service(tpm0.nc, name="kms-crypto-tpm0", version="0.1.0")
        await natsrpc.subscriptions_live(tpm0.nc)
        try:
            reply = await broker.nc.request("$SRV.PING.kms-crypto-tpm0", timeout=5)
            assert b"kms-crypto-tpm0" in reply.data
            assert not tpm0.errors
        finally:
            await service.stop()
        # Posing as another provider's service is refused.
        await refused_subscribe(tpm0, "$SRV.PING.kms-crypto-hsm0")


# --- replies are private -------------------------------------------------------------


async def test_nobody_reads_another_identitys_replies(secure_bus: SecureBus) -> None:
    async with (
        connected(secure_bus, "kmsctl") as kmsctl,
        connected(secure_bus, "broker") as broker,
        connected(secure_bus, "ca") as ca,
        connected(secure_bus, "crypto-hsm0") as hsm0,
    ):
        spies = [
            await refused_subscribe(broker, f"{inbox_prefix('kmsctl')}.>"),
            await refused_subscribe(broker, "_INBOX.>"),
            await refused_subscribe(ca, "_INBOX.>"),
            await refused_subscribe(hsm0, f"{inbox_prefix('kmsctl')}.>"),
            await refused_subscribe(kmsctl, f"{inbox_prefix('broker')}.>"),
            await refused_subscribe(broker, ">"),
        ]
        await answer(ca, "$SRV.PING.kms-ca", b"pong")
        reply = await kmsctl.nc.request("$SRV.PING.kms-ca", timeout=5)
        assert reply.data == b"pong"
        assert reply.subject.startswith(inbox_prefix("kmsctl") + ".")
        for spy in spies:
            await nothing_arrives(spy)


# --- broker ----------------------------------------------------------------------------


async def test_broker_owns_its_buckets_and_nothing_else(secure_bus: SecureBus) -> None:
    async with connected(secure_bus, "broker") as broker:
        js = broker.nc.jetstream(timeout=5)
        kv = await js.create_key_value(bucket="kms_keys", history=5)
        await kv.put("natsperm/broker", b"1")
        assert (await kv.get("natsperm/broker")).value == b"1"
        # How the broker follows its registries (edgekms.kvread): a pull snapshot, then
        # an ordered push consumer.
        await kv.put("natsperm.before", b"1")
        entries, last = await kvread.snapshot(js, "kms_keys", "natsperm.>")
        assert [e.key for e in entries] == ["natsperm.before"]
        changes = kvread.follow(js, "kms_keys", last, "natsperm.>")
        following = asyncio.ensure_future(anext(changes))
        await kv.put("natsperm.watched", b"2")
        entry = await asyncio.wait_for(following, 3)
        assert (entry.key, entry.value) == ("natsperm.watched", b"2")
        await changes.aclose()
        info = await js.account_info()
        assert info.streams >= 1
        await refused_js(broker, "$JS.API.STREAM.INFO.KV_kms_ca")
        await refused_js(broker, "$JS.API.STREAM.CREATE.EVIL")
        await refused_js(broker, "$JS.API.STREAM.DELETE.KV_kms_keys")
        await refused_js(broker, "$JS.API.STREAM.PURGE.KV_kms_keys")
        await refused_js(broker, "$JS.API.STREAM.LIST")
        await refused_publish(broker, "$KV.kms_ca.serial/01")
        assert (await js.stream_info("KV_kms_keys")).config.name == "KV_kms_keys"


async def test_creating_foreign_streams_is_refused_for_everyone(secure_bus: SecureBus) -> None:
    for user in ("broker", "ca", "kmsctl", "crypto-hsm0"):
        async with connected(secure_bus, user) as conn:
            js = conn.nc.jetstream(timeout=JS_TIMEOUT)
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await js.add_stream(StreamConfig(name="EXFIL", subjects=["kms.crypto.>"]))
            await conn.violation('publish to "$JS.API.STREAM.CREATE.EXFIL"')


async def test_broker_does_not_listen_to_requests(secure_bus: SecureBus) -> None:
    async with (
        connected(secure_bus, "broker") as broker,
        connected(secure_bus, "ca") as ca,
    ):
        sniff = await refused_subscribe(broker, "kms.crypto.>")
        await refused_subscribe(broker, "kms.ca.>")
        await refused_subscribe(broker, "kms.audit.>")
        await ca.nc.publish("kms.crypto.hsm0.Sign", b"digest")
        await ca.nc.flush()
        await nothing_arrives(sniff)


# --- CA service ------------------------------------------------------------------------


async def test_ca_signs_only_through_its_own_provider(secure_bus: SecureBus) -> None:
    async with (
        connected(secure_bus, "ca") as ca,
        connected(secure_bus, "crypto-hsm0") as hsm0,
        connected(secure_bus, "crypto-tpm0") as tpm0,
    ):
        await answer(hsm0, "kms.crypto.hsm0.>", b"hsm0")
        await answer(tpm0, "kms.crypto.tpm0.>", b"tpm0")
        for op in ("GenerateKey", "GetPublicKey", "Sign", "DestroyKey"):
            reply = await ca.nc.request(f"kms.crypto.hsm0.ca.{op}", timeout=5)
            assert reply.data == b"hsm0"
        for subject in (
            "kms.crypto.tpm0.ca.Sign",
            "kms.crypto.hsm0.ListKeys",
            # The user keys' and the internal CA's subjects (issue 11, item 1).
            "kms.crypto.hsm0.Sign",
            "kms.crypto.hsm0.internal.Sign",
        ):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await ca.nc.request(subject, b"", timeout=0.5)
            await ca.violation(f'publish to "{subject}"')


async def test_ca_answers_its_subjects_and_keeps_its_bucket(secure_bus: SecureBus) -> None:
    async with (
        connected(secure_bus, "ca") as ca,
        connected(secure_bus, "broker") as broker,
    ):
        await answer(ca, "kms.ca.>", b"certificate")
        reply = await broker.nc.request("kms.ca.IssueCertificate", b"csr", timeout=5)
        assert reply.data == b"certificate"
        js = ca.nc.jetstream(timeout=5)
        kv = await js.create_key_value(bucket="kms_ca", history=5)
        await kv.put("natsperm.ca", b"state")
        assert (await kv.get("natsperm.ca")).value == b"state"
        entries, _ = await kvread.snapshot(js, "kms_ca", "natsperm.>")  # listing records
        assert [(e.key, e.value) for e in entries] == [("natsperm.ca", b"state")]
        await refused_js(ca, "$JS.API.STREAM.INFO.KV_kms_clients")
        await refused_js(ca, "$JS.API.STREAM.INFO.KV_kms_requests")
        await refused_subscribe(ca, "kms.crypto.hsm0.>")
        await refused_publish(ca, "kms.ca.IssueCertificate")


async def test_audit_stream_write_is_limited_to_its_writers(secure_bus: SecureBus) -> None:
    async with (
        connected(secure_bus, "broker") as broker,
        connected(secure_bus, "kmsctl") as kmsctl,
    ):
        js = broker.nc.jetstream(timeout=5)
        await js.add_stream(stream_config("broker"))
        ack = await js.publish("kms.audit.broker", b"entry")
        assert ack.stream == "KMS_AUDIT_BROKER"
        await refused_publish(kmsctl, "kms.audit.broker")
        await refused_js(kmsctl, "$JS.API.STREAM.INFO.KMS_AUDIT_BROKER")
        await refused_js(broker, "$JS.API.STREAM.DELETE.KMS_AUDIT_BROKER")
        await refused_js(broker, "$JS.API.STREAM.MSG.DELETE.KMS_AUDIT_BROKER")
        await refused_js(broker, "$JS.API.STREAM.UPDATE.KMS_AUDIT_BROKER")
        # A writer may make only its own stream.
        await refused_js(broker, "$JS.API.STREAM.CREATE.KMS_AUDIT_CA")
        await asyncio.sleep(0)


async def test_ca_reads_the_fleet_registry_and_cannot_write_it(secure_bus: SecureBus) -> None:
    """A hub's CA looks up a device's record (ca_service.fleet) and may not change it:
    the operator's word on what a device may certify is not the CA's to edit."""
    async with connected(secure_bus, "ca") as ca:
        js = ca.nc.jetstream(timeout=5)
        # Allowed to look: the bucket does not exist on this bus, and the answer says so
        # (a grant without the read would get no answer and a violation instead).
        assert await DeviceRegistry.existing(js) is None
        assert not [e for e in ca.errors if "permissions violation" in e.lower()]
        await refused_publish(ca, f"$KV.{FLEET_DEVICES_BUCKET}.a")
        await refused_js(ca, f"$JS.API.STREAM.CREATE.KV_{FLEET_DEVICES_BUCKET}")
