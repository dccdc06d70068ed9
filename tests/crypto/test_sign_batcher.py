"""edgekms.sign_batcher against a real kms-crypto process on SoftHSM: concurrent Signs
share bus messages and still each get their own correct signature, one Sign at a time
stays a plain Sign, a missing service fails every caller with the plain Sign's error,
and one caller's deadline or cancellation leaves the others untouched."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import nats.aio.client
import pytest

from edgekms.algorithms import verify_signature
from edgekms.crypto_client import CryptoClient
from edgekms.errors import DeadlineExceeded, Unavailable
from edgekms.sign_batcher import SignBatcher
from edgekms.subjects import crypto_service_name
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2
from tests.crypto.conftest import CryptoFactory, CryptoProcess

ECDSA = pb.SIGNATURE_ALGORITHM_ECDSA_SHA256


def _digest(i: int) -> bytes:
    return hashlib.sha256(f"batched {i}".encode()).digest()


async def _key(client: CryptoClient, provider: str) -> tuple[bytes, bytes]:
    made = await client.generate_key(
        provider,
        crypto_pb2.GenerateKeyRequest(
            key_id=secrets.token_bytes(16), label="batcher", key_type=pb.KEY_TYPE_EC_P256
        ),
        timeout=60,
    )
    return made.key_id, made.public_key_der


async def _requests(nc: nats.aio.client.Client, provider: str) -> dict[str, int]:
    """num_requests per endpoint, from the service's own $SRV.STATS answer."""
    msg = await nc.request(f"$SRV.STATS.{crypto_service_name(provider)}", b"", timeout=5)
    stats = json.loads(msg.data)
    return {e["name"]: int(e["num_requests"]) for e in stats["endpoints"]}


@contextmanager
def _frozen(proc: CryptoProcess) -> Iterator[None]:
    """The service stops answering (its requests wait at the bus) until the block ends."""
    assert proc.process is not None
    os.kill(proc.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(proc.process.pid, signal.SIGCONT)


async def test_concurrent_signs_share_messages_and_each_verifies(
    crypto_factory: CryptoFactory, client: CryptoClient, nc: nats.aio.client.Client
) -> None:
    crypto_factory("hsmbatch")
    key_id, der = await _key(client, "hsmbatch")
    batcher = SignBatcher(client, max_outstanding=2)
    n = 120
    results = await asyncio.gather(
        *(
            batcher.sign(
                "hsmbatch", crypto_pb2.SignRequest(key_id=key_id, algorithm=ECDSA, data=_digest(i))
            )
            for i in range(n)
        )
    )
    for i, result in enumerate(results):
        assert verify_signature(der, ECDSA, _digest(i), result.signature), i
    counts = await _requests(nc, "hsmbatch")
    assert counts["SignBatch"] >= 1
    assert counts["Sign"] + counts["SignBatch"] < n, counts


async def test_one_at_a_time_stays_a_plain_sign(
    crypto_factory: CryptoFactory, client: CryptoClient, nc: nats.aio.client.Client
) -> None:
    crypto_factory("hsmsolo")
    key_id, der = await _key(client, "hsmsolo")
    batcher = SignBatcher(client, max_outstanding=1)
    for i in range(5):
        request = crypto_pb2.SignRequest(key_id=key_id, algorithm=ECDSA, data=_digest(i))
        signed = await batcher.sign("hsmsolo", request)
        assert verify_signature(der, ECDSA, _digest(i), signed.signature)
    counts = await _requests(nc, "hsmsolo")
    assert (counts["Sign"], counts["SignBatch"]) == (5, 0)


async def test_a_stopped_service_fails_every_caller_as_unavailable(
    crypto_factory: CryptoFactory, client: CryptoClient
) -> None:
    proc = crypto_factory("hsmgone")
    key_id, _ = await _key(client, "hsmgone")
    proc.stop()
    batcher = SignBatcher(client, max_outstanding=1)
    outcomes = await asyncio.gather(
        *(
            batcher.sign(
                "hsmgone",
                crypto_pb2.SignRequest(key_id=key_id, algorithm=ECDSA, data=_digest(i)),
                timeout=5,
            )
            for i in range(20)
        ),
        return_exceptions=True,
    )
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert {o.reason for o in outcomes if isinstance(o, Unavailable)} == {"provider.unavailable"}
    # Each caller got an exception of its own (not one object shared by all).
    assert len({id(o) for o in outcomes}) == len(outcomes)


async def test_a_short_deadline_expires_without_failing_the_others(
    crypto_factory: CryptoFactory, client: CryptoClient
) -> None:
    proc = crypto_factory("hsmslow")
    key_id, der = await _key(client, "hsmslow")
    batcher = SignBatcher(client, max_outstanding=1)

    def sign(i: int, timeout: float) -> asyncio.Task[crypto_pb2.SignResponse]:
        request = crypto_pb2.SignRequest(key_id=key_id, algorithm=ECDSA, data=_digest(i))
        return asyncio.create_task(batcher.sign("hsmslow", request, timeout=timeout))

    with _frozen(proc):
        first = sign(0, 20)  # on the bus, unanswered while the service is frozen
        await asyncio.sleep(0.05)
        queued = [sign(i, 20) for i in range(1, 6)]
        short = sign(6, 0.3)  # queued behind `first`, gives up while still queued
        more = [sign(i, 20) for i in range(7, 10)]
        cancelled = sign(10, 20)
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(DeadlineExceeded) as info:
            await short
        assert info.value.reason == "provider.deadline"
        with pytest.raises(asyncio.CancelledError):
            await cancelled
    others = [first, *queued, *more]
    results = await asyncio.wait_for(asyncio.gather(*others), 20)
    for i, result in zip([0, 1, 2, 3, 4, 5, 7, 8, 9], results, strict=True):
        assert verify_signature(der, ECDSA, _digest(i), result.signature), i


async def test_a_caller_leaving_an_in_flight_batch_leaves_the_rest(
    crypto_factory: CryptoFactory, client: CryptoClient, nc: nats.aio.client.Client
) -> None:
    """Two callers leave a SignBatch that is already on the bus, one by its deadline and
    one by cancellation; the other members still get their signatures.

    Nothing here races the service: it is frozen before anything is sent, so no answer
    can come early. `first` takes the lane's one slot as a plain Sign and the rest
    queue behind it; cancelling `first` frees the slot and the queue goes out as one
    SignBatch, which a plain subscription on the bus sees (with every member in it)
    before anyone leaves. Only after both have left is the service let go."""
    proc = crypto_factory("hsmleave")
    key_id, der = await _key(client, "hsmleave")
    batcher = SignBatcher(client, max_outstanding=1, single_worker_max_outstanding=None)
    seen: list[crypto_pb2.SignBatchRequest] = []

    async def watch(msg: Any) -> None:
        batch = crypto_pb2.SignBatchRequest()
        batch.ParseFromString(msg.data)
        seen.append(batch)

    watcher = await nc.subscribe("kms.crypto.hsmleave.SignBatch", cb=watch)
    await nc.flush()

    def sign(i: int, timeout: float) -> asyncio.Task[crypto_pb2.SignResponse]:
        request = crypto_pb2.SignRequest(key_id=key_id, algorithm=ECDSA, data=_digest(i))
        return asyncio.create_task(batcher.sign("hsmleave", request, timeout=timeout))

    try:
        with _frozen(proc):
            first = sign(0, 120)  # the lane's one slot: a plain Sign nobody answers
            await asyncio.sleep(0)
            batch = [sign(i, 120) for i in range(1, 5)]
            short = sign(5, 10)  # leaves by its deadline, while in the batch
            leaving = sign(6, 120)  # leaves by cancellation, while in the batch
            for _ in range(200):  # queued behind `first`
                await asyncio.sleep(0)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            deadline = asyncio.get_running_loop().time() + 60
            while not seen:
                assert asyncio.get_running_loop().time() < deadline, "no SignBatch was sent"
                await asyncio.sleep(0.05)
            assert [r.data for r in seen[0].requests] == [_digest(i) for i in range(1, 7)]
            assert not short.done() and not leaving.done()  # both were on the bus
            leaving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaving
            with pytest.raises(DeadlineExceeded) as info:
                await short
            assert info.value.reason == "provider.deadline"
        results = await asyncio.wait_for(asyncio.gather(*batch), 60)
    finally:
        await watcher.unsubscribe()
    for i, result in enumerate(results, start=1):
        assert verify_signature(der, ECDSA, _digest(i), result.signature), i
    assert len(seen) == 1  # the members that stayed were not sent again


async def test_a_single_worker_provider_gets_a_second_request_on_the_bus(
    crypto_factory: CryptoFactory, client: CryptoClient
) -> None:
    # A provider with one token thread (a TPM) says so in its $SRV.PING metadata; the
    # batcher then keeps two requests on the bus so that thread never waits for one.
    crypto_factory("hsmone", sessions=1)
    crypto_factory("hsmfour", sessions=4)
    batcher = SignBatcher(client)
    keys = {p: await _key(client, p) for p in ("hsmone", "hsmfour")}
    assert (await client.ping("hsmone"))["metadata"]["workers"] == "1"
    assert (await client.ping("hsmfour"))["metadata"]["workers"] == "4"
    for provider, (key_id, _) in keys.items():
        request = crypto_pb2.SignRequest(key_id=key_id, algorithm=ECDSA, data=_digest(0))
        await batcher.sign(provider, request)
    for _ in range(100):
        if batcher.lane_limit("hsmone") == 2:
            break
        await asyncio.sleep(0.05)
    assert batcher.lane_limit("hsmone") == 2
    assert batcher.lane_limit("hsmfour") == 1
    key_id, der = keys["hsmone"]
    results = await asyncio.gather(
        *(
            batcher.sign(
                "hsmone", crypto_pb2.SignRequest(key_id=key_id, algorithm=ECDSA, data=_digest(i))
            )
            for i in range(40)
        )
    )
    for i, result in enumerate(results):
        assert verify_signature(der, ECDSA, _digest(i), result.signature), i


async def test_without_asking_every_lane_keeps_the_default(
    crypto_factory: CryptoFactory, client: CryptoClient
) -> None:
    crypto_factory("hsmlone", sessions=1)
    key_id, _ = await _key(client, "hsmlone")
    batcher = SignBatcher(client, single_worker_max_outstanding=None)
    request = crypto_pb2.SignRequest(key_id=key_id, algorithm=ECDSA, data=_digest(0))
    await batcher.sign("hsmlone", request)
    await asyncio.sleep(0.3)
    assert batcher.lane_limit("hsmlone") == 1
