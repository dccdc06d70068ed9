"""Reading a JetStream KV bucket whole, exactly: a snapshot, and a follower after it.

nats-py's `KeyValue.watch()` marks the end of its initial replay with a `None` that can
come too early (nats-io/nats.py#842): it compares the consumer's pending count with the
messages the client has *processed*, so a value already on the wire but not yet handed
to the callback is missed. A listing then comes back short (the CA's certificate list,
and with it the CRL), and a follower reports ready before it holds the whole bucket.

A pull consumer has no such race: the server delivers nothing until asked, so its
pending count right after creation is exactly what the snapshot has to read, and each
fetched message says how many are still to come. `snapshot()` reads that way;
`follow()` then continues with an ordered push consumer from the revision after the
last one the snapshot saw, so no change between the two is lost or applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from edgekms.errors import Unavailable

# The header names nats-py's KV uses; a server-placed marker (TTL, purge) says why.
_KV_OP = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"
_MARKER_OPS = {"MaxAge": "PURGE", "Purge": "PURGE", "Remove": "DEL"}
_FETCH_BATCH = 1024
_STATUS = "Status"  # the header nats-py gives a JetStream status message (404, 408, ...)
_FETCH_WAIT_S = 5.0
# Pull rounds in a row that deliver nothing while the consumer says entries are pending
# before a read gives up (each round waits up to 2 x _FETCH_WAIT_S for a first message).
_IDLE_ROUNDS = 3
# A snapshot consumer left behind by a crashed reader goes away on its own.
_INACTIVE_S = 30.0


def _stream(bucket: str) -> str:
    return f"KV_{bucket}"


def _prefix(bucket: str) -> str:
    return f"$KV.{bucket}."


def _entry(bucket: str, msg: Msg) -> KeyValue.Entry:
    headers = msg.headers or {}
    operation = headers.get(_KV_OP)
    if operation is None and _MARKER_REASON in headers:
        operation = _MARKER_OPS.get(headers[_MARKER_REASON], "DEL")
    meta = msg.metadata
    return KeyValue.Entry(
        bucket=bucket,
        key=msg.subject[len(_prefix(bucket)) :],
        value=msg.data,
        revision=meta.sequence.stream,
        delta=meta.num_pending,
        created=None,
        operation=operation,
    )


def is_removal(entry: KeyValue.Entry) -> bool:
    """A delete or purge marker: the key has no value any more."""
    return entry.operation in ("DEL", "PURGE")


async def snapshot(
    js: JetStreamContext,
    bucket: str,
    keys: str = ">",
    after: int = 0,
    each: Callable[[KeyValue.Entry], None] | None = None,
) -> tuple[list[KeyValue.Entry], int]:
    """The latest entry of every key matching `keys` (delete markers included; see
    `is_removal`), in revision order, and the highest revision read (0 for none).

    With `after` (a previous call's highest revision), every change since then instead,
    in order: applied one by one to what that call returned, they bring it up to date,
    so an in-memory index of a large bucket catches up by reading only what changed.

    With `each`, every entry goes to it as it arrives and the list comes back empty: a
    bucket of 50,000 certificates is then never held whole, values and all, at once."""
    policy = (
        {"deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": after + 1}
        if after
        else {"deliver_policy": api.DeliverPolicy.LAST_PER_SUBJECT}
    )
    return await _read(js, bucket, keys, policy, each)


async def live_keys(js: JetStreamContext, bucket: str, keys: str = ">") -> list[str]:
    """The keys matching `keys` that hold a value now (delete markers left out), in
    revision order, read without their values: the server sends headers only, so a
    listing that needs one page of a 50,000-key bucket does not fetch, and the caller
    does not unseal, the other 49,000 values."""
    policy = {"deliver_policy": api.DeliverPolicy.LAST_PER_SUBJECT, "headers_only": True}
    entries, _ = await _read(js, bucket, keys, policy, None)
    return [e.key for e in entries if not is_removal(e)]


async def history(js: JetStreamContext, bucket: str, key: str) -> list[KeyValue.Entry]:
    """Every revision of `key` the bucket still holds, oldest first (delete markers
    included). KeyValue.history() rides the same watcher as watch(): when its one end
    marker is lost (its callback times out waiting for the consumer's info on a busy
    machine) it waits forever."""
    entries, _ = await _read(js, bucket, key, {"deliver_policy": api.DeliverPolicy.ALL}, None)
    return entries


async def _read(
    js: JetStreamContext,
    bucket: str,
    keys: str,
    policy: dict[str, Any],
    each: Callable[[KeyValue.Entry], None] | None,
) -> tuple[list[KeyValue.Entry], int]:
    stream = _stream(bucket)
    info = await js.add_consumer(
        stream,
        api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            mem_storage=True,
            inactive_threshold=_INACTIVE_S,
            filter_subject=_prefix(bucket) + keys,
            **policy,  # type: ignore[arg-type]
        ),
    )
    reader = _BatchReader(bucket, each)
    nc = js._nc  # the connection the context publishes on
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=reader.deliver, pending_msgs_limit=4 * _FETCH_BATCH)
    try:
        reader.remaining = info.num_pending or 0
        idle = 0
        while reader.remaining > 0:
            await reader.ask(nc, f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{info.name}", inbox)
            if reader.error is not None:
                raise reader.error
            if reader.got:
                idle = 0
                continue
            # Purged under us since the count was taken: ask the server again. A
            # consumer that still has messages pending but delivers none, round after
            # round, is a typed failure rather than a reader waiting forever.
            pending = (await js.consumer_info(stream, info.name)).num_pending or 0
            idle = idle + 1 if pending and pending == reader.remaining else 0
            if idle >= _IDLE_ROUNDS:
                raise Unavailable(
                    "bus.read_stalled",
                    f"{bucket}: {pending} entries pending and none delivered",
                    {"bucket": bucket},
                )
            reader.remaining = pending
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, info.name)
    return reader.entries, reader.last


class _BatchReader:
    """The snapshot's reading side: one pull request for up to _FETCH_BATCH messages at
    a time, each message handled in the subscription's callback as it arrives. nats-py's
    own `fetch` awaits every message separately (a task and a timer each), which made
    reading 50,000 certificate records take seconds longer than the bus needs."""

    def __init__(self, bucket: str, each: Callable[[KeyValue.Entry], None] | None) -> None:
        self.bucket = bucket
        self.each = each
        self.entries: list[KeyValue.Entry] = []
        self.last = 0
        self.remaining = 0
        self.got = 0
        self._wanted = 0
        self._done = asyncio.Event()
        # What `each` raised: the reading stops and snapshot() raises it, so an entry the
        # caller refused (a tampered record) is never silently left out of what it built.
        self.error: Exception | None = None

    async def ask(self, nc: Any, subject: str, inbox: str) -> None:
        """Request the next batch and wait until it is in (or the server says there is
        no more); a batch that stops making progress for _FETCH_WAIT_S is given up."""
        self.got, self._wanted = 0, min(self.remaining, _FETCH_BATCH)
        self._done.clear()
        request = {"batch": self._wanted, "expires": int(_FETCH_WAIT_S * 1e9)}
        await nc.publish(subject, json.dumps(request).encode(), reply=inbox)
        while not self._done.is_set():
            before = self.got
            try:
                await asyncio.wait_for(self._done.wait(), _FETCH_WAIT_S * 2)
            except TimeoutError:
                if self.got == before:
                    return  # the caller asks the server how many are left
        # A status (no messages, request expired) or the whole batch: either way, done.

    async def deliver(self, msg: Msg) -> None:
        if msg.headers and _STATUS in msg.headers and not msg.data:
            self._done.set()
            return
        if self.error is not None:
            return
        entry = _entry(self.bucket, msg)
        if self.each is None:
            self.entries.append(entry)
        else:
            try:
                self.each(entry)
            except Exception as exc:
                self.error = exc
                self.remaining = 0
                self._done.set()
                return
        self.got += 1
        self.last = max(self.last, entry.revision or 0)
        self.remaining = entry.delta or 0
        if self.got >= self._wanted or self.remaining == 0:
            self._done.set()


async def follow(
    js: JetStreamContext, bucket: str, after: int, keys: str = ">"
) -> AsyncGenerator[KeyValue.Entry, None]:
    """Every change to keys matching `keys` after revision `after` (a snapshot's
    `last`), in order, for as long as the caller iterates; the subscription goes away
    when the iteration ends or is cancelled."""
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def deliver(msg: Msg) -> None:
        queue.put_nowait(msg)

    config = (
        api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1
        )
        if after
        else api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
    )
    sub = await js.subscribe(
        _prefix(bucket) + keys,
        stream=_stream(bucket),
        cb=deliver,
        ordered_consumer=True,
        config=config,
        inactive_threshold=_INACTIVE_S,
    )
    try:
        while True:
            yield _entry(bucket, await queue.get())
    finally:
        # The server would drop the consumer once idle; deleting it says so at once.
        name: str | None = None
        with contextlib.suppress(Exception):
            name = (await sub.consumer_info()).name
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if name is not None:
            with contextlib.suppress(Exception):
                await js.delete_consumer(_stream(bucket), name)
