"""A cluster node always runs in the JetStream domain "hub" (mgmt.stack, so that any
node may take fleet devices' leaf connections, docs/cluster.md "A hub that is a
cluster"). Clusters made before had no domain: their stores must come back whole when
restarted with one. Three real nats-server nodes, an R3 stream and an R3 KV bucket
written without a domain, the whole cluster stopped and started in domain "hub"."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
import nats.js.api
import nats.js.errors

from mgmt.uplink import HUB_DOMAIN
from tests.cluster.conftest import Cluster
from tests.conftest import SLOWDOWN

T = TypeVar("T")


async def _polled(call: Callable[[], Awaitable[T]], seconds: float = 60.0) -> T:
    """`call` until it answers: an R3 stream just made, or after a whole-cluster restart,
    has no leader for a moment (a busy two-core machine)."""
    deadline = time.monotonic() + seconds * SLOWDOWN
    while True:
        try:
            return await call()
        except (nats.errors.Error, nats.js.errors.Error):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def test_a_cluster_store_made_without_a_domain_is_whole_in_domain_hub(
    cluster: Cluster,
) -> None:
    await cluster.wait_ready()
    nc = await cluster.connect()
    try:
        js = nc.jetstream(timeout=10 * SLOWDOWN)
        await _polled(lambda: js.add_stream(name="OLD", subjects=["old.>"], num_replicas=3))
        for i in range(5):
            await _polled(lambda i=i: js.publish("old.x", f"m{i}".encode()))  # type: ignore[misc]
        kv = await _polled(
            lambda: js.create_key_value(nats.js.api.KeyValueConfig(bucket="old_kv", replicas=3))
        )
        await _polled(lambda: kv.put("k", b"v1"))
    finally:
        await nc.close()

    cluster.stop_all()
    cluster.domain = HUB_DOMAIN
    cluster.start_all()
    await cluster.wait_ready()

    nc = await cluster.connect(first=1)
    try:
        js = nc.jetstream(timeout=10 * SLOWDOWN)
        info = await _polled(lambda: js.stream_info("OLD"))
        assert info.state.messages == 5 and info.config.num_replicas == 3
        assert (await _polled(lambda: js.get_msg("OLD", 5))).data == b"m4"
        await _polled(lambda: js.publish("old.x", b"after"))
        kv = await _polled(lambda: js.key_value("old_kv"))
        assert (await _polled(lambda: kv.get("k"))).value == b"v1"
        await _polled(lambda: kv.put("k", b"v2"))
        assert (await kv.get("k")).value == b"v2"
        # The same stream through the domain's API, as a leaf device's sourcing sees it.
        hub = nc.jetstream(timeout=10 * SLOWDOWN, domain=HUB_DOMAIN)
        assert (await _polled(lambda: hub.stream_info("OLD"))).state.messages == 6
        answer = await nc.request(f"$JS.{HUB_DOMAIN}.API.INFO", b"", timeout=10 * SLOWDOWN)
        assert json.loads(answer.data)["domain"] == HUB_DOMAIN
    finally:
        await nc.close()
