"""The key registry on a real JetStream KV bucket: reservations and their takeover."""

from __future__ import annotations

import asyncio
import datetime
import time

import nats
import pytest

from broker.registry import KeyRegistry
from edgekms.errors import AlreadyExists, Unavailable
from edgekms.v1 import common_pb2 as pb
from mgmt.natsserver import NatsServer


def _record(name: str) -> pb.KeyRecord:
    return pb.KeyRecord(name=name, provider="hsm0", key_type=pb.KEY_TYPE_EC_P256, key_id=b"x" * 16)


async def test_stale_reservation_is_taken_over_once(nats_server: NatsServer) -> None:
    """A broker that died mid-create left a PENDING record: a fresh one is refused, a
    stale one is taken over, and of two racing takeovers exactly one wins."""
    nc = await nats.connect(nats_server.url)
    try:
        dead, alive = KeyRegistry(nc.jetstream()), KeyRegistry(nc.jetstream())
        await dead.start()
        await alive.start()
        await dead.reserve(_record("stale/one"))  # ...and then the broker died
        with pytest.raises(AlreadyExists):
            await alive.reserve(_record("stale/one"), stale_after=60)  # not stale yet
        # Let an hour pass for the dead broker's reservation.
        kv = await nc.jetstream().key_value("kms_keys")
        held = pb.KeyRecord()
        held.ParseFromString((await kv.get("stale/one")).value or b"")
        held.updated_at = (
            datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
        ).isoformat()
        await kv.put("stale/one", held.SerializeToString())
        results = await asyncio.gather(
            alive.reserve(_record("stale/one"), stale_after=60),
            alive.reserve(_record("stale/one"), stale_after=60),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == ["AlreadyExists", "int"]
        revision = next(r for r in results if isinstance(r, int))
        activated = await alive.activate(_record("stale/one"), revision)
        assert activated.state == pb.KEY_STATE_ACTIVE
        with pytest.raises(AlreadyExists):  # an ACTIVE key is never taken over
            await alive.reserve(_record("stale/one"), stale_after=0)
        await dead.stop()
        await alive.stop()
    finally:
        await nc.close()


class _SlowRegistry(KeyRegistry):
    """A registry whose every record costs CPU to admit, as a sealed record's Ed25519
    check does on a loaded board."""

    def apply(self, entry: object) -> None:
        time.sleep(0.001)
        super().apply(entry)


class _StuckRegistry(KeyRegistry):
    """A registry whose snapshot never delivers a record (a bus that stopped answering)."""

    async def _follow(self) -> None:
        await asyncio.Event().wait()


async def test_the_initial_snapshot_is_waited_for_as_long_as_it_moves(
    nats_server: NatsServer,
) -> None:
    """Issue 11's 50,000-record start: the wait has a stall limit, not a total one. Here
    admitting the records takes several stall limits in all, and the start succeeds."""
    count = 2000
    nc = await nats.connect(nats_server.url)
    try:
        writer = KeyRegistry(nc.jetstream())
        await writer.start()
        slots = asyncio.Semaphore(64)

        async def put(i: int) -> None:
            async with slots:
                record = _record(f"many/k{i}")
                record.state = pb.KEY_STATE_ACTIVE
                await writer.kv.put(record.name, record.SerializeToString())

        await asyncio.gather(*(put(i) for i in range(count)))
        await writer.stop()
        slow = _SlowRegistry(nc.jetstream())
        await slow.start(stall_timeout=0.3)
        assert slow.progress >= 2 * count  # every record read, then admitted
        assert len(slow.list("many/")) == count
        assert slow.get("many/k1999").name == "many/k1999"
        await slow.stop()
    finally:
        await nc.close()


async def test_a_stalled_snapshot_ends_the_start_with_a_typed_error(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        stuck = _StuckRegistry(nc.jetstream())
        with pytest.raises(Unavailable) as info:
            await stuck.start(stall_timeout=0.3)
        assert info.value.reason == "bus.snapshot_stalled"
        assert stuck._watch_task is not None
        await asyncio.gather(stuck._watch_task, return_exceptions=True)
        assert stuck._watch_task.cancelled()  # nothing left running
    finally:
        await nc.close()
