"""The key registry on a real JetStream KV bucket: reservations and their takeover."""

from __future__ import annotations

import asyncio
import datetime

import nats
import pytest

from broker.registry import KeyRegistry
from edgekms.errors import AlreadyExists
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
