"""A SignBatch whose items' decisions cannot be stored returns no signature (issue 19:
"each item audited as its own Sign, durable before results return"), on a real broker,
crypto service, token and nats-server."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import nats

from edgekms import errors
from edgekms.audit import parse_message, stream_config, writer_stream
from edgekms.v1 import common_pb2 as pb
from tests.e2e.conftest import Parts

BROKER = writer_stream("broker")
ECDSA256 = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256


def _js(parts: Parts, action: Any) -> Any:
    async def run() -> Any:
        nc = await nats.connect(parts.nats.url)
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(run())


async def _entries(js: Any, after: int = 0) -> list[dict[str, Any]]:
    """Every entry stored after sequence `after`, batches opened."""
    info = await js.stream_info(BROKER)
    out: list[dict[str, Any]] = []
    for seq in range(max(int(info.state.first_seq), after + 1), int(info.state.last_seq) + 1):
        msg = await js.get_msg(BROKER, seq)
        out.extend(parse_message(msg.data))
    return out


def test_a_batch_whose_decisions_cannot_be_stored_returns_no_signature(parts: Parts) -> None:
    with parts.client(timeout=30) as client:
        client.create_key("fc/batch", "ec-p256")
        digests = [hashlib.sha256(f"item {i}".encode()).digest() for i in range(20)]

        # The store takes a lone entry (the call's own SignBatch entry, a unary Sign)
        # but no message of several: the items' decisions, stored together, are refused.
        async def narrow(js: Any) -> None:
            await js.delete_stream(BROKER)
            config = stream_config("broker")
            config.max_msg_size = 2048
            await js.add_stream(config)

        _js(parts, narrow)
        results = client.sign_digests([("fc/batch", ECDSA256, d) for d in digests])
        assert len(results) == 20
        for result in results:
            assert isinstance(result, errors.Unavailable), result
            assert result.reason == "audit.unavailable"
        stored = _js(parts, _entries)
        assert [e["action"] for e in stored] == ["SignBatch"]  # no item recorded as signed
        # A lone decision still fits: the broker is not wedged by the failed group.
        assert client.sign("fc/batch", b"unary after")

        async def restore(js: Any) -> None:
            await js.delete_stream(BROKER)
            await js.add_stream(stream_config("broker"))

        _js(parts, restore)
        again = client.sign_digests([("fc/batch", ECDSA256, d) for d in digests])
        assert all(isinstance(r, bytes) for r in again), again
        signs = [e for e in _js(parts, _entries) if e["action"] == "Sign"]
        assert [e["outcome"] for e in signs] == ["ok"] * 20


def test_a_batch_of_one_is_recorded_like_a_unary_sign(parts: Parts) -> None:
    with parts.client(timeout=30) as client:
        client.create_key("fc/one", "ec-p256")
        before = int(_js(parts, lambda js: js.stream_info(BROKER)).state.last_seq)
        digest = hashlib.sha256(b"one").digest()
        results = client.sign_digests([("fc/one", ECDSA256, digest)])
        assert isinstance(results[0], bytes)

        entries = _js(parts, lambda js: _entries(js, before))
        assert [e["action"] for e in entries] == ["Sign", "SignBatch"]
        sign = entries[0]
        assert sign["target"] == "fc/one" and sign["outcome"] == "ok"
        assert sign["details"]["algorithm"] == "signature_algorithm_ecdsa_sha256"
        assert sign["details"]["via"] == f"SignBatch:{entries[1]['request_id']}"
