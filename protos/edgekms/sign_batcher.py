"""Coalesce concurrent Signs to one provider into SignBatch requests, invisibly to callers.

Under load most of a Sign's cost is per bus message, not per signature: nats-server's
routing, the NATS clients on both sides, nats.micro's dispatch and the crypto service's
hand-off to a token thread. When many Signs to one provider are in flight at once,
sending them as one kms.crypto.<provider>.SignBatch message pays those costs once.

The policy adds no latency when there is nothing to share: per provider, while fewer
than `max_outstanding` requests are on the bus, a Sign is sent at once as a plain Sign
from the caller's own task. Only when that many are outstanding does a Sign wait in the
provider's queue; whenever a request completes, everything queued (up to `max_items`
items and `max_bytes` of data) goes out as the next batch, so the queue is drained by
the replies and never waits for a timer. A batch of one is still a plain Sign.

Each caller keeps its own deadline and its own cancellation: a caller that gives up
leaves the batch (its result, if it comes, is dropped); the batch's bus timeout is the
latest of its members' deadlines. An item's failure is that caller's typed error; a
failure of the whole batch (nobody answers, timeout, bus trouble) is raised to every
member as the same typed error a plain Sign would raise.
"""

# `timeout` is CryptoClient.sign's parameter, kept so the batcher is a drop-in.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

from edgekms.crypto_client import CryptoClient
from edgekms.errors import DeadlineExceeded, Internal, KMSError, from_proto
from edgekms.v1 import crypto_pb2

log = logging.getLogger(__name__)

# One request on the bus per provider: measured with bench.quick (SoftHSM P-256, 16 and
# 64 in flight, 2 cores), 1 used the least CPU per Sign in broker, crypto service and
# nats-server together (larger batches), 2 was within noise of it, 4 clearly worse.
DEFAULT_MAX_OUTSTANDING = 1
# A provider served by ONE worker thread (a TPM) idles while a batch's reply travels back
# and the next batch travels in; a second request on the bus keeps it busy. Learnt from
# the service's $SRV.PING metadata ("workers"); until that answer, the default applies.
SINGLE_WORKER_MAX_OUTSTANDING = 2
# Below the crypto service's limit (128), so the limit can move without breaking us.
DEFAULT_MAX_ITEMS = 64
# NATS max_payload on our bus is 128 KiB: half of it for the items' data leaves ample
# room for key ids, framing and headers.
DEFAULT_MAX_BYTES = 64 * 1024
# A Sign with more data than this (a large Ed25519 message) is sent alone, at once.
DEFAULT_MAX_ITEM_BYTES = 8 * 1024
# Never hand the bus a timeout it cannot meet (a member may be just about to expire).
MIN_BATCH_TIMEOUT = 0.05


@dataclass
class _Waiting:
    request: crypto_pb2.SignRequest
    deadline: float  # loop time
    future: asyncio.Future[crypto_pb2.SignResponse]


@dataclass
class _Lane:
    """One provider's queue and the number of its requests on the bus."""

    limit: int
    outstanding: int = 0
    queue: deque[_Waiting] = field(default_factory=deque)


def _copy(err: KMSError) -> KMSError:
    # One exception object raised in many tasks would collect all their tracebacks.
    return type(err)(err.reason, err.message, err.details)


def _expire(future: asyncio.Future[crypto_pb2.SignResponse], provider: str, timeout: float) -> None:
    if not future.done():
        future.set_exception(
            DeadlineExceeded(
                "provider.deadline",
                f"provider {provider!r} did not answer Sign within {timeout:g}s",
                {"provider": provider},
            )
        )


class SignBatcher:
    """`sign()` with CryptoClient.sign's signature; share one per event loop."""

    def __init__(
        self,
        client: CryptoClient,
        max_outstanding: int = DEFAULT_MAX_OUTSTANDING,
        max_items: int = DEFAULT_MAX_ITEMS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES,
        single_worker_max_outstanding: int | None = SINGLE_WORKER_MAX_OUTSTANDING,
    ) -> None:
        if max_outstanding < 1 or max_items < 1 or max_item_bytes > max_bytes:
            raise ValueError("max_outstanding and max_items must be positive, items fit a batch")
        self.client = client
        self.max_outstanding = max_outstanding
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_item_bytes = max_item_bytes
        # None: never ask the provider, every lane keeps max_outstanding.
        self.single_worker_max_outstanding = single_worker_max_outstanding
        self._lanes: dict[str, _Lane] = {}
        self._batches: set[asyncio.Task[None]] = set()

    async def sign(
        self, provider: str, req: crypto_pb2.SignRequest, timeout: float | None = None
    ) -> crypto_pb2.SignResponse:
        timeout = self.client.default_timeout if timeout is None else timeout
        if len(req.data) > self.max_item_bytes:
            return await self.client.sign(provider, req, timeout)
        lane = self._lanes.get(provider)
        if lane is None:
            lane = self._new_lane(provider)
        if lane.outstanding < lane.limit and not lane.queue:
            lane.outstanding += 1
            try:
                return await self.client.sign(provider, req, timeout)
            finally:
                lane.outstanding -= 1
                self._pump(provider, lane)
        loop = asyncio.get_running_loop()
        waiting = _Waiting(req, loop.time() + timeout, loop.create_future())
        lane.queue.append(waiting)
        self._pump(provider, lane)
        # The deadline fails the future itself and a cancellation of the caller cancels
        # it: either way the batch learns this member left (it is skipped if still
        # queued, ignored if sent). A bare timer, not asyncio.timeout: this runs per Sign.
        timer = loop.call_at(waiting.deadline, _expire, waiting.future, provider, timeout)
        try:
            return await waiting.future
        finally:
            timer.cancel()

    def lane_limit(self, provider: str) -> int:
        """How many requests this batcher keeps on the bus for `provider` at most."""
        lane = self._lanes.get(provider)
        return self.max_outstanding if lane is None else lane.limit

    def _new_lane(self, provider: str) -> _Lane:
        lane = self._lanes[provider] = _Lane(self.max_outstanding)
        if self.single_worker_max_outstanding is not None:
            task = asyncio.create_task(self._learn_limit(provider, lane))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
        return lane

    async def _learn_limit(self, provider: str, lane: _Lane) -> None:
        """Raise the lane's limit if the provider says it has one worker. Best effort:
        a provider that does not answer keeps the default (asked again never; a restart
        of the broker asks again)."""
        try:
            answer = await self.client.ping(provider)
        except Exception as exc:  # KMSError, or a client without ping: keep the default
            log.debug("event=sign_lane_ping_failed provider=%s error=%s", provider, exc)
            return
        metadata = answer.get("metadata")
        if not isinstance(metadata, dict) or metadata.get("workers") != "1":
            return
        assert self.single_worker_max_outstanding is not None
        lane.limit = max(lane.limit, self.single_worker_max_outstanding)
        log.info("event=sign_lane_limit provider=%s limit=%d", provider, lane.limit)
        self._pump(provider, lane)

    def _pump(self, provider: str, lane: _Lane) -> None:
        """Send queued Signs while the lane has room."""
        while lane.outstanding < lane.limit and lane.queue:
            batch = self._take(lane)
            if not batch:
                return
            lane.outstanding += 1
            task = asyncio.create_task(self._send(provider, lane, batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _take(self, lane: _Lane) -> list[_Waiting]:
        batch: list[_Waiting] = []
        size = 0
        while lane.queue and len(batch) < self.max_items:
            head = lane.queue[0]
            if head.future.done():  # its caller gave up
                lane.queue.popleft()
                continue
            if batch and size + len(head.request.data) > self.max_bytes:
                break
            lane.queue.popleft()
            batch.append(head)
            size += len(head.request.data)
        return batch

    async def _send(self, provider: str, lane: _Lane, batch: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        timeout = max(MIN_BATCH_TIMEOUT, max(w.deadline for w in batch) - loop.time())
        try:
            if len(batch) == 1:
                only = batch[0]
                response = await self.client.sign(provider, only.request, timeout)
                if not only.future.done():
                    only.future.set_result(response)
                return
            answer = await self.client.sign_batch(
                provider,
                crypto_pb2.SignBatchRequest(requests=[w.request for w in batch]),
                timeout,
            )
            if len(answer.results) != len(batch):
                raise Internal(
                    "wire.bad_response",
                    f"provider {provider!r} answered {len(answer.results)} of "
                    f"{len(batch)} batched Signs",
                    {"provider": provider},
                )
            for waiting, result in zip(batch, answer.results, strict=True):
                if waiting.future.done():
                    continue
                outcome = result.WhichOneof("outcome")
                if outcome == "signature":
                    waiting.future.set_result(crypto_pb2.SignResponse(signature=result.signature))
                elif outcome == "error":
                    waiting.future.set_exception(from_proto(result.error))
                else:
                    waiting.future.set_exception(
                        Internal(
                            "wire.bad_response",
                            f"provider {provider!r} sent an empty SignBatch result",
                            {"provider": provider},
                        )
                    )
        except KMSError as err:
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(_copy(err))
        except asyncio.CancelledError:
            for waiting in batch:
                waiting.future.cancel()
            raise
        except Exception:
            log.exception("event=sign_batch_crashed provider=%s items=%d", provider, len(batch))
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(
                        Internal("internal.error", "a batched Sign failed in the broker")
                    )
        finally:
            lane.outstanding -= 1
            self._pump(provider, lane)
