"""IdempotencyStore on a real nats-server: a failed attempt releases its claim, and
concurrent attempts with one id do the work once."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

from broker.idempotency import IdempotencyStore
from edgekms.errors import NotFound, Unavailable
from edgekms.identity import Identity
from edgekms.v1 import keys_pb2
from mgmt.natsserver import NatsServer


async def test_failure_releases_and_concurrent_retry_waits(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    store = IdempotencyStore(nc.jetstream(), bucket=f"req_{uuid.uuid4().hex[:8]}")
    await store.start()
    who = Identity(client="unit", role="admin", serial=1, not_after="")
    request = keys_pb2.DisableKeyRequest(name="k", request_id="r1")
    calls = 0

    async def fails() -> keys_pb2.Key:
        raise NotFound("key.not_found", "no")

    with pytest.raises(NotFound):
        await store.run(who, "DisableKey", request, keys_pb2.Key, fails)

    gate = asyncio.Event()

    async def slow() -> keys_pb2.Key:
        nonlocal calls
        calls += 1
        await gate.wait()
        return keys_pb2.Key(name="k")

    first = asyncio.create_task(store.run(who, "DisableKey", request, keys_pb2.Key, slow, 30))
    await asyncio.sleep(0.2)
    with pytest.raises(Unavailable) as caught:
        await store.run(who, "DisableKey", request, keys_pb2.Key, slow, 30)
    assert caught.value.reason == "request.in_progress"
    gate.set()
    assert (await first).name == "k"
    assert (await store.run(who, "DisableKey", request, keys_pb2.Key, slow)).name == "k"
    assert calls == 1
    await nc.close()
