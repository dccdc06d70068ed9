"""Registry and CA state only their owner can change (issue 11, item 3), against a real
nats-server with the stack's permission tables, its buckets made the way `kmsctl up`
makes them (edgekms.kvstore, by the supervisor's setup grant, then withdrawn).

The attacks of the issue: a rollup wipe of kms_keys as the CA's user; a plain update
removing a user key's policy as the CA's user; the broker's user undoing revocations in
kms_clients. Each must be refused by the server, with the state unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import nats.errors
import nats.js.errors
import pytest

from edgekms import kvstore
from edgekms.v1 import common_pb2 as pb
from mgmt.natsserver import NatsServer
from tests.natsperm.conftest import (
    Conn,
    SecureBus,
    connected,
    hardened_bus,
)

pytestmark = pytest.mark.timeout(90)

ROLLUP_NOT_PERMITTED = 10111
JS_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def state_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBus]:
    with hardened_bus(tmp_path_factory.mktemp("statebus")) as bus:
        yield bus


def _record(name: str, with_policy: bool = True) -> bytes:
    record = pb.KeyRecord(name=name, provider="hsm0", state=pb.KEY_STATE_ACTIVE)
    if with_policy:
        record.policy.rules.add(clients=["backup-job"], operations=[pb.KEY_OPERATION_SIGN])
    return record.SerializeToString()


async def refused_publish(conn: Conn, subject: str, payload: bytes = b"x") -> None:
    js = conn.nc.jetstream(timeout=JS_TIMEOUT)
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await js.publish(subject, payload)
    await conn.violation(f'publish to "{subject}"')


async def rollup_refused(conn: Conn, subject: str) -> None:
    """The identity may write the subject, but the stream takes no rollup."""
    js = conn.nc.jetstream(timeout=5)
    with pytest.raises(nats.js.errors.APIError) as info:
        await js.publish(subject, b"", headers={"Nats-Rollup": "all"})
    assert info.value.err_code == ROLLUP_NOT_PERMITTED


async def test_rollup_wipe_of_the_key_registry_as_the_ca_is_refused(state_bus: SecureBus) -> None:
    async with connected(state_bus, "broker") as broker, connected(state_bus, "ca") as ca:
        keys = await broker.nc.jetstream(timeout=5).key_value("kms_keys")
        await keys.put("owners/wipe-target", _record("owners/wipe-target"))
        await rollup_refused(ca, "$KV.kms_keys.ca/root")  # its own key: still no rollup
        await refused_publish(ca, "$KV.kms_keys.owners/wipe-target")
        await rollup_refused(broker, "$KV.kms_keys.owners/wipe-target")
        entry = await keys.get("owners/wipe-target")
        assert entry.value == _record("owners/wipe-target")


async def test_the_ca_cannot_rewrite_a_user_keys_record(state_bus: SecureBus) -> None:
    async with connected(state_bus, "broker") as broker, connected(state_bus, "ca") as ca:
        keys = await broker.nc.jetstream(timeout=5).key_value("kms_keys")
        await keys.put("owners/policy", _record("owners/policy"))
        # The plain update of the issue: the same record without its policy.
        await refused_publish(ca, "$KV.kms_keys.owners/policy", _record("owners/policy", False))
        # A delete marker is a publish on the same subject: refused as well.
        ca_keys = await ca.nc.jetstream(timeout=JS_TIMEOUT).key_value("kms_keys")
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await ca_keys.delete("owners/policy")
        record = pb.KeyRecord()
        record.ParseFromString((await keys.get("owners/policy")).value or b"")
        assert list(record.policy.rules[0].clients) == ["backup-job"]
        # Its own records it may still write.
        revision = await ca_keys.put("ca/intermediate", _record("ca/intermediate"))
        assert revision > 0


async def test_the_broker_cannot_undo_revocations(state_bus: SecureBus) -> None:
    async with connected(state_bus, "broker") as broker:
        clients = await broker.nc.jetstream(timeout=5).key_value("kms_clients")
        await clients.put("revoked.abc123", b"mallory")
        await rollup_refused(broker, "$KV.kms_clients.client.mallory")
        with pytest.raises(nats.js.errors.APIError) as info:
            await clients.purge("revoked.abc123")  # a rollup of the one key
        assert info.value.err_code == ROLLUP_NOT_PERMITTED
        for api in ("STREAM.PURGE", "STREAM.DELETE", "STREAM.UPDATE", "STREAM.MSG.DELETE"):
            subject = f"$JS.API.{api}.KV_kms_clients"
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await broker.nc.request(subject, b"{}", timeout=JS_TIMEOUT)
            await broker.violation(f'publish to "{subject}"')
        assert (await clients.get("revoked.abc123")).value == b"mallory"


async def test_the_supervisor_loses_its_setup_grant(state_bus: SecureBus) -> None:
    async with connected(state_bus, "kmsctl") as kmsctl:
        for subject in (
            "$JS.API.STREAM.UPDATE.KV_kms_keys",
            "$JS.API.STREAM.UPDATE.KMS_AUDIT",
            "$JS.API.STREAM.UPDATE.KMS_AUDIT_CA",
            "$KV.kms_keys.edgekms/internal-ca",
        ):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await kmsctl.nc.request(subject, b"{}", timeout=JS_TIMEOUT)
            await kmsctl.violation(f'publish to "{subject}"')


async def test_every_stack_stream_is_hardened(state_bus: SecureBus) -> None:
    async with connected(state_bus, "broker") as broker:
        js = broker.nc.jetstream(timeout=5)
        streams = ("KV_kms_keys", "KV_kms_clients", "KV_kms_requests")
        audit = (
            "KMS_AUDIT_BROKER",
            "KMS_AUDIT_CA",
            "KMS_AUDIT_CRYPTO-HSM0",
            "KMS_AUDIT_CRYPTO-TPM0",
        )
        for name in streams:
            config = (await js.stream_info(name)).config
            assert kvstore.is_hardened(config), name
            assert not config.allow_msg_ttl, name
        # An audit stream refuses deletes, rollups and TTLs like a bucket, but allows
        # purge from the front: the archiver's, behind a signed checkpoint, and granted on
        # the bus to the broker alone (docs/security.md, "Retention").
        for name in audit:
            config = (await js.stream_info(name)).config
            assert config.deny_delete and not config.allow_rollup_hdrs, name
            assert not config.allow_msg_ttl, name
            assert not config.deny_purge, name


async def test_a_bucket_an_older_version_made_is_hardened(nats_server: NatsServer) -> None:
    """nats-py's own buckets allow rollups: `harden` (run by `kmsctl up`) turns them off."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream(timeout=5)
        kv = await js.create_key_value(bucket="owners_old", history=5)
        await kv.put("k", b"v")
        spec = kvstore.BucketSpec("owners_old", "an older bucket")
        assert await kvstore.harden(js, spec)
        assert not await kvstore.harden(js, spec)  # once is enough
        with pytest.raises(nats.js.errors.APIError) as info:
            await js.publish("$KV.owners_old.x", b"", headers={"Nats-Rollup": "all"})
        assert info.value.err_code == ROLLUP_NOT_PERMITTED
        assert (await kv.get("k")).value == b"v"
        await js.delete_stream("KV_owners_old")  # deny_delete is about messages, not this
    finally:
        await nc.close()
