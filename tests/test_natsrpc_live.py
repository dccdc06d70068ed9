"""edgekms.natsrpc.subscriptions_live against a real nats-server: a subscription made
on one connection answers a request from another as soon as the call returns.

With a single flush() this failed about once in a hundred tries (nats-py 2.16 writes
the flush's PING ahead of the queued SUB), so the loop runs long enough to see it.
"""

from __future__ import annotations

import nats
import pytest

from edgekms import natsrpc
from mgmt.natsserver import NatsServer

pytestmark = pytest.mark.timeout(120)


async def test_a_fresh_subscription_answers_at_once(nats_server: NatsServer) -> None:
    asker = await nats.connect(nats_server.url, allow_reconnect=False)
    try:
        for i in range(400):
            answerer = await nats.connect(nats_server.url, allow_reconnect=False)

            async def answer(msg: nats.aio.msg.Msg) -> None:
                await msg.respond(msg.data)

            await answerer.subscribe(f"live.{i}", queue="live", cb=answer)
            await natsrpc.subscriptions_live(answerer)
            reply = await asker.request(f"live.{i}", str(i).encode(), timeout=5)
            assert reply.data == str(i).encode()
            await answerer.close()
    finally:
        await asker.close()
