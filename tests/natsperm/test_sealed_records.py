"""Tampered registry and CA records are refused, not trusted (issue 11, item 3), against a
real nats-server with the stack's permission tables and hardened buckets.

The attackers are those of the issue: a process holding a bus identity that may write a
bucket (the broker's may write all of kms_keys and kms_clients) but not the record's
rightful writer's sealing key, or someone who edits a stored value's bytes. Each rewrite
is made with the identity's own bus grant, so the server accepts it; the reader (the
real broker registries, the CA's store and registry view, after a restart) must refuse it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js.client import JetStreamContext

from broker.clients import AccessGate, ClientRegistry
from broker.registry import KeyRegistry
from broker.throttle import FailureThrottle
from ca_service.store import CAStore
from edgekms import kvread
from edgekms.errors import FailedPrecondition, NotFound, Unauthenticated
from edgekms.identity import Identity
from edgekms.registry_record import RegistryKeys
from edgekms.sealed import WRITERS, CounterBook, RecordSeal, TamperedRecord, owner_of
from edgekms.v1 import ca_pb2, clients_pb2, sealed_pb2
from edgekms.v1 import common_pb2 as pb
from mgmt.sealkeys import RESEALED_MARKER, ensure_seal_keys, reseal_legacy
from tests.conftest import SLOWDOWN
from tests.natsperm.conftest import SecureBus, connected, hardened_bus

pytestmark = pytest.mark.timeout(120)

KEYS = {writer: Ed25519PrivateKey.generate() for writer in WRITERS}
PUBLIC = {writer: key.public_key() for writer, key in KEYS.items()}


def seal_of(writer: str, key: Ed25519PrivateKey | None = None) -> RecordSeal:
    """`writer`'s seal; with `key`, a forger's key claiming to be `writer`."""
    return RecordSeal(writer, key or KEYS[writer], PUBLIC)


@pytest.fixture(scope="module")
def seal_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBus]:
    with hardened_bus(tmp_path_factory.mktemp("sealbus")) as bus:
        yield bus


def _identity(name: str, serial: int) -> Identity:
    not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)
    return Identity(client=name, role="signer", serial=serial, not_after=not_after.isoformat())


def _forged_values(bucket: str, key: str, payload: bytes) -> dict[str, bytes]:
    """What an attacker with a bus identity but not the rightful key can store."""
    return {
        "unsealed": payload,
        "forged_key": seal_of("broker", Ed25519PrivateKey.generate()).seal(bucket, key, payload),
        "wrong_writer": seal_of("ca").seal(bucket, key, payload),
    }


FORGED_REASONS = {
    "unsealed": "record.unsealed",
    "forged_key": "record.seal_invalid",
    "wrong_writer": "record.writer_not_owner",
}


@pytest.mark.parametrize("forgery", sorted(FORGED_REASONS))
async def test_a_forged_client_record_cannot_undo_a_revocation(
    seal_bus: SecureBus, forgery: str
) -> None:
    name, serial = f"victim-{forgery.replace('_', '-')}", 0xA11CE + len(forgery)
    async with connected(seal_bus, "broker") as broker:
        js = broker.nc.jetstream(timeout=5)
        genuine = ClientRegistry(js, seal=seal_of("broker"))
        await genuine.start()
        try:
            revision = await genuine.reserve(name, "signer", "", "admin")
            record = clients_pb2.Client(name=name, role="signer", serial=f"{serial:x}")
            await genuine.activate(record, revision)
            await genuine.revoke(name, "admin")
        finally:
            await genuine.stop()
        # The attack, with the broker's own bus identity: the record back to ACTIVE and
        # the revocation entry deleted.
        raw = await js.key_value("kms_clients")
        undone = clients_pb2.Client(
            name=name,
            role="admin",
            serial=f"{serial:x}",
            status=clients_pb2.CLIENT_STATUS_ACTIVE,
        ).SerializeToString()
        value = _forged_values("kms_clients", f"client.{name}", undone)[forgery]
        await raw.put(f"client.{name}", value)
        await raw.delete(f"revoked.{serial:x}")
        # A fresh broker (after a restart) reads the bucket from scratch.
        fresh = ClientRegistry(js, seal=seal_of("broker"))
        await fresh.start()
        try:
            assert fresh.is_revoked(serial)
            assert fresh.get(name) is None
            gate = AccessGate(fresh, FailureThrottle())
            with pytest.raises(Unauthenticated) as refused:
                gate.admit(_identity(name, serial))
            assert refused.value.reason == "auth.revoked"
            # Whatever reads the record itself refuses it with a typed error.
            with pytest.raises(TamperedRecord) as tampered:
                await fresh.revoke(name, "admin")
            assert tampered.value.reason == FORGED_REASONS[forgery]
            with pytest.raises(TamperedRecord):
                await fresh.record_first_use(_identity(name, serial))
        finally:
            await fresh.stop()


async def test_a_live_broker_drops_a_client_record_tampered_while_it_runs(
    seal_bus: SecureBus,
) -> None:
    name, serial = "live-victim", 0xBEEF01
    async with connected(seal_bus, "broker") as broker:
        js = broker.nc.jetstream(timeout=5)
        clients = ClientRegistry(js, seal=seal_of("broker"))
        await clients.start()
        try:
            revision = await clients.reserve(name, "signer", "keys/*", "admin")
            await clients.activate(
                clients_pb2.Client(name=name, role="signer", serial=f"{serial:x}"), revision
            )
            assert clients.holder(f"{serial:x}") is not None
            raw = await js.key_value("kms_clients")
            widened = clients_pb2.Client(
                name=name, role="admin", serial=f"{serial:x}", key_pattern=""
            )
            widened.status = clients_pb2.CLIENT_STATUS_ACTIVE
            await raw.put(f"client.{name}", widened.SerializeToString())
            deadline = asyncio.get_running_loop().time() + 30
            while clients.get(name) is not None:
                assert asyncio.get_running_loop().time() < deadline, "tampering not seen"
                await asyncio.sleep(0.05)
            # The certificate has no holder any more; binding it reads the record: refused.
            assert clients.holder(f"{serial:x}") is None
            with pytest.raises(TamperedRecord):
                await AccessGate(clients, FailureThrottle()).bind(_identity(name, serial))
        finally:
            await clients.stop()


def _ca_key_record(name: str, public_key: bytes) -> pb.KeyRecord:
    return pb.KeyRecord(
        name=name,
        provider="hsm0",
        key_type=pb.KEY_TYPE_EC_P256,
        state=pb.KEY_STATE_ACTIVE,
        key_id=b"\x01" * 16,
        public_key_der=public_key,
        created_by="kms-ca",
    )


async def _nothing() -> None:
    return None


async def test_the_cas_key_record_rewritten_by_the_broker_is_refused(seal_bus: SecureBus) -> None:
    async with connected(seal_bus, "ca") as ca, connected(seal_bus, "broker") as broker:
        ca_registry = RegistryKeys(await _registry(ca, seal_of("ca")), "kms-ca", "ca.key_disabled")
        revision = await ca_registry.record(
            "ca/intermediate", "hsm0", pb.KEY_TYPE_EC_P256, b"\x01" * 16, b"genuine", _nothing
        )
        assert revision > 0
        assert (await ca_registry.require_active("ca/intermediate")).public_key_der == b"genuine"
        raw = await broker.nc.jetstream(timeout=5).key_value("kms_keys")
        genuine = (await raw.get("ca/intermediate")).value or b""
        swapped = _ca_key_record("ca/intermediate", b"attacker").SerializeToString()
        broker_seal = seal_of("broker")
        # Signed by the broker's genuine key, without the CA's record as origin.
        await raw.put("ca/intermediate", broker_seal.seal("kms_keys", "ca/intermediate", swapped))
        with pytest.raises(TamperedRecord) as refused:
            await ca_registry.require_active("ca/intermediate")
        assert refused.value.reason == "record.writer_not_owner"
        # With the CA's genuine record as origin, but other key material.
        await raw.put(
            "ca/intermediate",
            broker_seal.seal("kms_keys", "ca/intermediate", swapped, origin=genuine),
        )
        with pytest.raises(TamperedRecord) as refused:
            await ca_registry.require_active("ca/intermediate")
        assert refused.value.reason == "record.origin_mismatch"
        # The broker's view refuses it too: the key is not there to use.
        keys = KeyRegistry(broker.nc.jetstream(timeout=5), seal=broker_seal)
        await keys.start()
        try:
            with pytest.raises(NotFound):
                keys.get("ca/intermediate")
        finally:
            await keys.stop()


async def test_the_broker_may_still_disable_the_cas_key(seal_bus: SecureBus) -> None:
    """`kmsctl key disable ca/root` goes through the broker: an amendment that keeps the
    CA's key material, which the CA accepts and obeys."""
    async with connected(seal_bus, "ca") as ca, connected(seal_bus, "broker") as broker:
        ca_registry = RegistryKeys(await _registry(ca, seal_of("ca")), "kms-ca", "ca.key_disabled")
        await ca_registry.record(
            "ca/root", "hsm0", pb.KEY_TYPE_EC_P256, b"\x02" * 16, b"root-public", _nothing
        )
        keys = KeyRegistry(broker.nc.jetstream(timeout=5), seal=seal_of("broker"))
        await keys.start()
        try:
            record, changed = await keys.transition(
                "ca/root", (pb.KEY_STATE_ACTIVE,), pb.KEY_STATE_DISABLED
            )
            assert changed and record.state == pb.KEY_STATE_DISABLED
        finally:
            await keys.stop()
        with pytest.raises(FailedPrecondition) as disabled:
            await ca_registry.require_active("ca/root")
        assert disabled.value.reason == "ca.key_disabled"
        stored = sealed_pb2.SealedRecord()
        raw = await broker.nc.jetstream(timeout=5).key_value("kms_keys")
        stored.ParseFromString((await raw.get("ca/root")).value or b"")
        assert stored.writer == "broker" and stored.origin


async def test_a_byte_flipped_record_is_detected(seal_bus: SecureBus) -> None:
    async with connected(seal_bus, "broker") as broker:
        js = broker.nc.jetstream(timeout=5)
        keys = KeyRegistry(js, seal=seal_of("broker"))
        await keys.start()
        try:
            record = pb.KeyRecord(name="flip/target", provider="hsm0", key_type=pb.KEY_TYPE_EC_P256)
            revision = await keys.reserve(record)
            await keys.activate(record, revision)
            raw = await js.key_value("kms_keys")
            stored = bytearray((await raw.get("flip/target")).value or b"")
            envelope = sealed_pb2.SealedRecord()
            envelope.ParseFromString(bytes(stored))
            at = bytes(stored).index(envelope.payload) + 2  # inside the payload
            stored[at] ^= 0x01
            await raw.put("flip/target", bytes(stored))
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                try:
                    keys.get("flip/target")
                except NotFound:
                    break
                assert asyncio.get_running_loop().time() < deadline, "tampering not seen"
                await asyncio.sleep(0.05)
            with pytest.raises(TamperedRecord) as refused:
                await keys.transition("flip/target", (pb.KEY_STATE_ACTIVE,), pb.KEY_STATE_DISABLED)
            assert refused.value.reason == "record.seal_invalid"
        finally:
            await keys.stop()


async def test_a_tampered_certificate_record_is_refused_by_the_ca(seal_bus: SecureBus) -> None:
    async with connected(seal_bus, "ca") as ca:
        js = ca.nc.jetstream(timeout=5)
        store = await CAStore.open(js, seal=seal_of("ca"))
        record = ca_pb2.CertificateRecord(serial="5EA1", profile="server", requester="ops")
        await store.create_record(record)
        revoked, _ = await store.revoke(
            "5EA1", 1, datetime.datetime.now(datetime.UTC), "ops", "req-1"
        )
        assert revoked.status == ca_pb2.CERTIFICATE_STATUS_REVOKED
        # Un-revoke it by writing the record back as GOOD, unsealed, as the CA's identity.
        raw = await js.key_value("kms_ca")
        good = ca_pb2.CertificateRecord(
            serial="5EA1", profile="server", status=ca_pb2.CERTIFICATE_STATUS_VALID
        )
        await raw.put("cert.5EA1", good.SerializeToString())
        with pytest.raises(TamperedRecord) as refused:
            await store.get_record("5EA1")
        assert refused.value.reason == "record.unsealed"
        # The CRL is built from the list: fail closed rather than leave the serial out.
        with pytest.raises(TamperedRecord):
            await store.list_records()


async def _registry(conn: object, seal: RecordSeal) -> object:
    from edgekms.registry_record import registry_kv

    return await registry_kv(conn.nc, seal)  # type: ignore[attr-defined]


async def test_records_from_before_sealing_are_sealed_once_by_their_owners(
    seal_bus: SecureBus, tmp_path: Path
) -> None:
    keys = ensure_seal_keys(tmp_path / "secrets")
    marker = tmp_path / "secrets" / "seal" / RESEALED_MARKER
    options = {user: seal_bus.creds(user).connect_options() for user in ("broker", "ca")}
    old_key = _ca_key_record("ca/root", b"old-root").SerializeToString()
    old_client = clients_pb2.Client(name="legacy", role="admin", serial="1e9").SerializeToString()
    old_cert = ca_pb2.CertificateRecord(serial="1E9A", profile="device").SerializeToString()
    async with connected(seal_bus, "broker") as broker, connected(seal_bus, "ca") as ca:
        bjs, cjs = broker.nc.jetstream(timeout=5), ca.nc.jetstream(timeout=5)
        await (await bjs.key_value("kms_keys")).put("ca/root", old_key)
        await (await bjs.key_value("kms_clients")).put("client.legacy", old_client)
        await (await cjs.key_value("kms_ca")).put("cert.1E9A", old_cert)
        assert await reseal_legacy(seal_bus.url, options, keys, marker) >= 3
        assert marker.exists()
        reader = keys.seal("broker")
        for js, bucket, key, payload in (
            (bjs, "kms_keys", "ca/root", old_key),
            (bjs, "kms_clients", "client.legacy", old_client),
            (cjs, "kms_ca", "cert.1E9A", old_cert),
        ):
            stored = (await (await js.key_value(bucket)).get(key)).value or b""
            assert reader.open(bucket, key, stored) == payload
            envelope = sealed_pb2.SealedRecord()
            envelope.ParseFromString(stored)
            assert envelope.writer == owner_of(bucket, key)
        # Once only: an unsealed record written later stays refused.
        await (await bjs.key_value("kms_clients")).put("client.later", old_client)
        assert await reseal_legacy(seal_bus.url, options, keys, marker) == 0
        stored = (await (await bjs.key_value("kms_clients")).get("client.later")).value or b""
        with pytest.raises(TamperedRecord) as refused:
            reader.open("kms_clients", "client.later", stored)
        assert refused.value.reason == "record.unsealed"


def _policy(*roles: str) -> pb.KeyPolicy:
    return pb.KeyPolicy(
        rules=[pb.PolicyRule(roles=list(roles), operations=[pb.KEY_OPERATION_SIGN])]
    )


async def _older_genuine_value(js: JetStreamContext, key: str, policy: pb.KeyPolicy) -> bytes:
    """From the bucket's history: the broker's own sealed record of `key` that still
    carried `policy`, as an attacker with the broker's bus identity can read it."""
    for entry in await kvread.history(js, "kms_keys", key):
        envelope = sealed_pb2.SealedRecord()
        envelope.ParseFromString(entry.value or b"")
        record = pb.KeyRecord()
        record.ParseFromString(envelope.payload)
        if record.state == pb.KEY_STATE_ACTIVE and record.policy == policy:
            return bytes(entry.value or b"")
    raise AssertionError("no older record with that policy in the history")


@contextlib.asynccontextmanager
async def phase(what: str, seconds: float = 30.0) -> AsyncIterator[None]:
    """Bound one step of a long test, and on a hang say which step and where every task
    was: this test once waited out pytest-timeout under load with no trace of the step."""
    try:
        async with asyncio.timeout(seconds * SLOWDOWN):
            yield
    except TimeoutError:
        stacks = io.StringIO()
        for task in asyncio.all_tasks():
            task.print_stack(limit=8, file=stacks)
        raise AssertionError(
            f"{what}: no progress in {seconds * SLOWDOWN:g} s\n{stacks.getvalue()}"
        ) from None


@pytest.mark.timeout(400)
async def test_an_older_genuine_key_record_written_back_is_refused_live_and_after_a_restart(
    seal_bus: SecureBus, tmp_path: Path
) -> None:
    """Issue 11: a sealed record binds bucket and key but not a version, so the broker's
    bus identity could write a key's older, looser policy back. Now the record's counter
    is signed: the running broker's follower refuses it (record.replayed) and drops the
    key, and a broker started after the replay, with the counters it kept on disk
    (seal_counter_file), refuses it too. The looser policy never takes effect."""
    name = "replay/app"
    loose, strict = _policy("signer", "admin"), _policy("admin")
    book = tmp_path / "broker.counters"
    async with connected(seal_bus, "broker") as broker:
        js = broker.nc.jetstream(timeout=5)
        registry = KeyRegistry(
            js, seal=RecordSeal("broker", KEYS["broker"], PUBLIC, CounterBook(book))
        )
        async with phase("the live registry starts"):
            await registry.start()
        try:
            record = pb.KeyRecord(
                name=name, provider="hsm0", key_type=pb.KEY_TYPE_EC_P256, key_id=b"r" * 16
            )
            record.policy.CopyFrom(loose)
            async with phase("the key is made and its policy tightened"):
                revision = await registry.reserve(record)
                await registry.activate(record, revision)
                await registry.update_policy(name, strict)
            assert registry.get(name).policy == strict
            async with phase("the older record is read from the history and written back"):
                raw = await js.key_value("kms_keys")
                older = await _older_genuine_value(js, name, loose)
                await raw.put(name, older)  # the replay, with the broker's own bus grant
            deadline = asyncio.get_running_loop().time() + 30 * SLOWDOWN
            while True:
                try:
                    held = registry.get(name)
                except NotFound:
                    break  # dropped: neither policy is used, the key fails closed
                assert held.policy == strict, "the older, looser policy took effect"
                assert asyncio.get_running_loop().time() < deadline, "replay not refused"
                await asyncio.sleep(0.05)
            with pytest.raises(TamperedRecord) as refused:
                async with phase("an update over the replayed record"):
                    await registry.update_policy(name, strict)
            assert refused.value.reason == "record.replayed"
        finally:
            async with phase("the live registry stops"):
                await registry.stop()
            registry_seal = registry._seal
            assert registry_seal is not None
            registry_seal.counters.close()
        # A replay while the broker is down: the record written back again, then a fresh
        # broker with the counters it kept refuses it as it reads the bucket.
        async with phase("the record is written back while no broker runs"):
            await raw.put(name, older)
        fresh = KeyRegistry(
            js, seal=RecordSeal("broker", KEYS["broker"], PUBLIC, CounterBook(book))
        )
        async with phase("a fresh registry starts over the replayed record"):
            await fresh.start()
        try:
            with pytest.raises(NotFound):
                fresh.get(name)
            with pytest.raises(TamperedRecord) as refused:
                async with phase("a read of the replayed record"):
                    await fresh.kv.get(name)
            assert refused.value.reason == "record.replayed"
        finally:
            async with phase("the fresh registry stops"):
                await fresh.stop()
