"""A service whose bus connection closes for good exits, so its supervisor restarts it
(issue 11 item 2). Against a real nats-server: the connection is closed the way the
issue saw it, by the server itself after a message over max_payload (nats-py does not
reconnect after such an -ERR), and the service must notice and leave."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import nats
import nats.aio.client
import pytest

from ca_service.service import ServeConfig, serve
from edgekms import natsrpc
from edgekms.errors import Unavailable
from edgekms.v1 import ca_pb2
from mgmt.natsserver import NatsServer, free_port

pytestmark = pytest.mark.timeout(120)


async def _overflow(nc: nats.aio.client.Client) -> None:
    """A message the server refuses after the client's own size check: the payload
    fits max_payload, payload plus headers does not, and the server closes with -ERR."""
    await nc.publish("overflow.test", b"x" * (nc.max_payload - 16), headers={"Pad": "y" * 256})
    await nc.flush(timeout=5) if nc.is_connected else None


async def _wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 30.0
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_bus_watch_sees_the_server_close_the_connection(ca_nats: NatsServer) -> None:
    watch = natsrpc.BusWatch("a test service")
    nc = await nats.connect(
        ca_nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, **watch.options()
    )
    try:
        assert not watch.lost.is_set()
        with contextlib.suppress(nats.errors.Error):  # the flush may see it go
            await _overflow(nc)
        await _wait(watch.lost.is_set, "the closed connection was not reported")
        assert nc.is_closed, "nats-py did not reconnect: the service must exit instead"
        # The -ERR or the reset that follows it, whichever nats-py read first.
        assert watch.last_error
        error = watch.error()
        assert isinstance(error, Unavailable) and error.reason == "bus.lost"
    finally:
        if not nc.is_closed:
            await nc.close()


async def test_an_orderly_close_is_not_a_loss(ca_nats: NatsServer) -> None:
    watch = natsrpc.BusWatch("a test service")
    nc = await nats.connect(ca_nats.url, **watch.options())
    watch.stopping()
    await nc.drain()
    await asyncio.sleep(0)  # let nats-py run its closed callback
    await _wait(lambda: nc.is_closed, "drain did not close")
    assert not watch.lost.is_set()


async def test_ca_service_exits_when_its_connection_is_closed(
    ca_nats: NatsServer, ca_crypto: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kmsctl ca serve` before the fix stayed alive answering nothing; now serve()
    raises Unavailable("bus.lost"), its entry point exits 8, and kmsctl up restarts it."""
    connections: list[nats.aio.client.Client] = []
    real_connect = natsrpc.connect

    async def connect(url: str, **options: Any) -> nats.aio.client.Client:
        nc = await real_connect(url, **options)
        connections.append(nc)
        return nc

    monkeypatch.setattr(natsrpc, "connect", connect)
    port = free_port()
    bucket = "kms_ca_busloss"
    task = asyncio.create_task(
        serve(ServeConfig(nats_url=ca_nats.url, http_port=port, bucket=bucket))
    )
    probe = await nats.connect(ca_nats.url)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                await probe.request(
                    "kms.ca.ListProfiles", ca_pb2.ListProfilesRequest().SerializeToString(), 1
                )
                break
            except nats.errors.Error:
                assert time.monotonic() < deadline and not task.done(), "CA did not start"
                await asyncio.sleep(0.1)
        (ca_nc,) = connections
        with contextlib.suppress(nats.errors.Error):
            await _overflow(ca_nc)
        with pytest.raises(Unavailable) as lost:
            await asyncio.wait_for(task, 30)
        assert lost.value.reason == "bus.lost"
    finally:
        if not task.done():
            task.cancel()
        await probe.jetstream().delete_key_value(bucket)
        await probe.close()
