"""When a test's NATS cluster is ready: JetStream answers through every live node, and
the meta group knows every one of them.

Answering is not yet knowing every peer: until the meta group has all of them, a stream
with a copy on each is refused (BucketNotFound / insufficient resources right after the
start), so the check ends by making one such stream and dropping it."""

from __future__ import annotations

import asyncio
import secrets
import time

import nats
import nats.errors
import nats.js.api
import nats.js.errors

from tests.conftest import SLOWDOWN

_FAILOVER = (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError)


async def wait_cluster_ready(urls: list[str | None], seconds: float = 60.0) -> None:
    """`urls`: each node's client URL, None for a node that is down (its copy is not
    asked for)."""
    deadline = time.monotonic() + seconds * SLOWDOWN
    live = [url for url in urls if url is not None]
    for url in live:
        while True:
            try:
                nc = await nats.connect(url, connect_timeout=2)
                try:
                    await nc.jetstream(timeout=2).account_info()
                    break
                finally:
                    await nc.close()
            except _FAILOVER:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    tag = secrets.token_hex(3)
    probe = nats.js.api.StreamConfig(
        name=f"READY_{tag}", subjects=[f"ready.{tag}"], num_replicas=len(live)
    )
    while True:
        try:
            nc = await nats.connect(live[0], connect_timeout=2)
            try:
                js = nc.jetstream(timeout=5)
                await js.add_stream(probe)
                await js.delete_stream(probe.name or "")
                return
            finally:
                await nc.close()
        except _FAILOVER:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
