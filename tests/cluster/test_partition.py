"""A real partition: one of three nodes, each in its own network namespace, has its
cluster link cut while it keeps running and serving its own clients (tests.cluster.netns).

The small side must refuse writes with a typed UNAVAILABLE (`store.unavailable` from a
KV bucket: the CA's store, the broker's registries; `audit.unavailable` from the audit
writer) instead of acknowledging what it cannot replicate; the large side keeps taking
writes. After healing, the cut node catches up, and every write acknowledged on either
side is there exactly once, the audit chain whole (docs/cluster.md)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.kv import KeyValue

from ca_service.store import CAStore
from edgekms import audit, kvstore
from edgekms.errors import KMSError, Unavailable
from edgekms.subjects import CA_BUCKET, KEY_REGISTRY_BUCKET
from edgekms.v1 import ca_pb2
from tests.audit.helpers import stored, verify_stream
from tests.cluster.netns import NetnsCluster
from tests.conftest import SLOWDOWN

T = TypeVar("T")
SETTLE_ERRORS = (nats.errors.Error, nats.js.errors.Error, KMSError, TimeoutError, OSError)
# A write through the cut node waits this long for an acknowledgement that cannot come.
WRITE_TIMEOUT = 2.0


def _record(serial: int, who: str) -> ca_pb2.CertificateRecord:
    return ca_pb2.CertificateRecord(
        serial=f"{serial:X}",
        profile="server",
        requester=who,
        status=ca_pb2.CERTIFICATE_STATUS_VALID,
        certificate_der=b"placeholder",
        subject=f"CN={who}",
    )


def _serial() -> int:
    return secrets.randbits(63) | (1 << 62)


async def _until(what: str, call: Callable[[], Awaitable[T]], seconds: float = 60.0) -> T:
    """`call()`'s answer once it stops failing with a bus or KMS error (leaders are being
    elected, a node is catching up), within a generous deadline."""
    deadline = time.monotonic() + seconds * SLOWDOWN
    while True:
        try:
            return await call()
        except SETTLE_ERRORS:
            assert time.monotonic() < deadline, f"{what}: not within {seconds * SLOWDOWN:g}s"
            await asyncio.sleep(0.2)


async def _set_up(nc: Client) -> None:
    js = nc.jetstream(timeout=10)
    for bucket in (CA_BUCKET, KEY_REGISTRY_BUCKET):
        await kvstore.harden(js, kvstore.BUCKETS[bucket], replicas=3)
    await audit.harden_stream(js, ["ca"], replicas=3)


async def _caught_up(nc: Client, node: str) -> None:
    """Raise (to be polled) until every stream has `node` as a current replica with no
    lag, or as its leader."""
    js = nc.jetstream(timeout=5)
    for stream in (
        kvstore.stream_name(CA_BUCKET),
        kvstore.stream_name(KEY_REGISTRY_BUCKET),
        audit.writer_stream("ca"),
    ):
        info = await js.stream_info(stream)
        assert info.cluster is not None
        if info.cluster.leader == node:
            continue
        peers = {peer.name: peer for peer in info.cluster.replicas or []}
        peer = peers.get(node)
        if peer is None or not peer.current or (peer.lag or 0) > 0:
            raise TimeoutError(f"{stream}: {node} not caught up ({peer})")


@dataclass
class Side:
    """What one side of the partition was told: acknowledged serials, keys and audit
    hashes."""

    serials: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)

    async def write(
        self, store: CAStore, kv: KeyValue, writer: audit.AuditWriter, who: str
    ) -> None:
        record = _record(_serial(), who)
        await store.create_record(record)
        self.serials.append(record.serial)
        key = f"{who}.{secrets.token_hex(4)}"
        await kv.create(key, b"v")
        self.keys.append(key)
        appended = await writer.append("IssueCertificate", "ok", client=who, target=record.serial)
        self.hashes.append(appended.entry["hash"])


async def test_a_partitioned_node_refuses_writes_and_after_healing_nothing_is_lost(
    netns_cluster: NetnsCluster,
) -> None:
    cluster = netns_cluster
    admin = await cluster.connect(0, "setup", failover=True)
    await _set_up(admin)
    # Cut away the leader of the CA bucket: the harder case, it must step down rather
    # than acknowledge alone.
    info = await admin.jetstream(timeout=10).stream_info(kvstore.stream_name(CA_BUCKET))
    assert info.cluster is not None and info.cluster.leader
    cut = cluster.index_of(info.cluster.leader)
    stay = (cut + 1) % cluster.size
    await admin.close()

    small = await cluster.connect(cut, "small-side")
    large = await cluster.connect(stay, "large-side")
    small_js = small.jetstream(timeout=WRITE_TIMEOUT)
    large_js = large.jetstream(timeout=5)
    small_store = await CAStore.open(small_js)
    small_kv = await kvstore.open_kv(small_js, kvstore.BUCKETS[KEY_REGISTRY_BUCKET])
    small_writer = audit.AuditWriter(small_js, "ca", timeout=WRITE_TIMEOUT, replicas=3)
    large_store = await CAStore.open(large_js)
    large_kv = await kvstore.open_kv(large_js, kvstore.BUCKETS[KEY_REGISTRY_BUCKET])
    large_writer = audit.AuditWriter(large_js, "ca", timeout=5, replicas=3)

    acknowledged = Side()
    for _ in range(3):
        await acknowledged.write(small_store, small_kv, small_writer, "small")

    cluster.partition(cut)

    # The small side: every kind of write refused, typed, nothing acknowledged.
    refused_record = _record(_serial(), "small")
    with pytest.raises(Unavailable) as by_ca:
        await small_store.create_record(refused_record)
    assert by_ca.value.reason == "store.unavailable"
    assert by_ca.value.details["bucket"] == CA_BUCKET
    with pytest.raises(Unavailable) as by_registry:
        await small_kv.create("small.refused", b"v")
    assert by_registry.value.reason == "store.unavailable"
    with pytest.raises(Unavailable) as by_crl:
        await small_store.next_crl_number()
    assert by_crl.value.reason == "store.unavailable"
    with pytest.raises(Unavailable) as by_audit:
        await small_writer.append("Alone", "ok", target="refused")
    assert by_audit.value.reason == "audit.unavailable"

    # The large side keeps two of three copies: once its leaders are elected, it writes.
    await _until(
        "the large side writing",
        lambda: acknowledged.write(large_store, large_kv, large_writer, "large"),
    )
    for _ in range(4):
        await acknowledged.write(large_store, large_kv, large_writer, "large")
    # Still refused on the small side while cut (it has not quietly rejoined).
    with pytest.raises(Unavailable):
        await small_kv.create("small.refused2", b"v")

    cluster.heal(cut)
    await _until("the cut node catching up", lambda: _caught_up(large, cluster.name(cut)), 90)
    # The small side's clients write again through their own node.
    await _until(
        "the healed node writing",
        lambda: acknowledged.write(small_store, small_kv, small_writer, "small"),
    )

    # Everything acknowledged on either side is there, once; the chain verifies. Read
    # through the healed node.
    async def everything() -> tuple[list[str], list[str], list[str]]:
        js = small.jetstream(timeout=10)
        serials = [r.serial for r in await (await CAStore.open(js)).list_records()]
        kv = await kvstore.open_kv(js, kvstore.BUCKETS[KEY_REGISTRY_BUCKET])
        keys = list(await kv.keys())
        hashes = [
            entry["hash"]
            for _, raw, _ in await stored(js, audit.writer_stream("ca"))
            for entry in audit.parse_message(raw)
        ]
        return serials, keys, hashes

    serials, keys, hashes = await _until("reading everything back", everything)
    for wanted, present in (
        (acknowledged.serials, serials),
        (acknowledged.keys, keys),
        (acknowledged.hashes, hashes),
    ):
        counts = Counter(present)
        assert {item: counts[item] for item in wanted} == dict.fromkeys(wanted, 1)
    report = await _until("verifying the chain", lambda: verify_stream(small.jetstream(timeout=10)))
    assert report.ok, report.to_dict()
    await small.close()
    await large.close()
