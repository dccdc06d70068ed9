"""JetStream KV buckets as the broker uses them: opened (or made on first start), and,
for the registries it answers from, followed into memory by a watcher.

The broker answers key and client lookups from memory, so a sign costs no registry
round trip; the watcher keeps that memory current with changes made by any replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from edgekms import kvread, kvstore
from edgekms.errors import Unavailable
from edgekms.logs import fields
from edgekms.sealed import RecordSeal, SealedKV, TamperedRecord, sealed

log = logging.getLogger(__name__)

# How long the initial snapshot may go without a single record before start() gives up.
SNAPSHOT_STALL_S = 10.0


async def open_bucket(
    js: JetStreamContext,
    bucket: str,
    *,
    description: str,
    history: int = 5,
    replicas: int = 1,
    ttl: float | None = None,
) -> KeyValue:
    """The bucket, created if it does not exist yet: with the stack's settings for it
    (edgekms.kvstore: no rollups, no purge or delete), else with these."""
    return await kvstore.open_kv(
        js, kvstore.spec_for(bucket, description, history, ttl or 0.0), replicas
    )


class FollowedBucket:
    """A bucket mirrored in memory. Subclasses say how an entry changes their view
    (`apply`); `start()` returns once the initial snapshot is in."""

    bucket: str
    description: str

    def __init__(self, js: JetStreamContext, replicas: int = 1, seal: RecordSeal | None = None):
        self._js = js
        self._replicas = replicas
        self._seal = seal
        self._kv: KeyValue | SealedKV | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        # Entries of the initial snapshot read from the bus plus those verified and
        # applied: what start() watches move.
        self.progress = 0

    async def start(self, stall_timeout: float = SNAPSHOT_STALL_S) -> None:
        """Open the bucket and return once its initial snapshot is in memory.

        The wait has no fixed length, only a stall limit: a bucket of 50,000 sealed
        records takes tens of seconds to read and verify on a loaded 2-core board (a
        fixed 10 s made such a broker fail every start and be restarted forever), so
        the start goes on as long as records keep coming and fails (Unavailable,
        bus.snapshot_stalled) once none has for `stall_timeout` seconds, or at once
        with the reader's own error."""
        self._kv = sealed(
            await open_bucket(
                self._js, self.bucket, description=self.description, replicas=self._replicas
            ),
            self.bucket,
            self._seal,
        )
        self._watch_task = asyncio.create_task(self._follow(), name=f"{self.bucket}-watch")
        seen = -1
        started = time.monotonic()
        while not self._ready.is_set():
            if self._watch_task.done():
                self._watch_task.result()  # its error, if it failed
                break
            if self.progress == seen:
                self._watch_task.cancel()
                raise Unavailable(
                    "bus.snapshot_stalled",
                    f"{self.bucket}: no record for {stall_timeout:g} s after "
                    f"{self.progress} entries of the initial snapshot",
                )
            seen = self.progress
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout=stall_timeout)
        log.info(
            "bucket loaded",
            extra=fields(
                bucket=self.bucket,
                entries=self.progress // 2,
                seconds=round(time.monotonic() - started, 2),
            ),
        )

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task

    @property
    def kv(self) -> KeyValue | SealedKV:
        """The bucket (edgekms.sealed.SealedKV when sealing: what is read is verified)."""
        assert self._kv is not None, f"{self.bucket} not started"
        return self._kv

    def apply(self, entry: Any) -> None:
        """Fold one watched entry (a put, a delete or a purge) into the view."""
        raise NotImplementedError

    def refuse(self, entry: Any, err: TamperedRecord) -> None:
        """A watched entry failed its seal (already logged): forget the key, so that
        whatever needed it fails closed. Subclasses may keep more (revocations)."""
        raise NotImplementedError

    def _admit(self, entry: Any) -> None:
        if isinstance(self._kv, SealedKV):
            try:
                entry = self._kv.open_entry(entry)
            except TamperedRecord as err:
                self.refuse(entry, err)
                return
        self.apply(entry)

    async def _follow(self) -> None:
        # Not KeyValue.watch(): its end-of-snapshot marker can come before the snapshot
        # (see edgekms.kvread), and the broker would answer from a partial view.
        entries: list[Any] = []

        def read(entry: Any) -> None:
            entries.append(entry)
            self.progress += 1

        _, last = await kvread.snapshot(self._js, self.bucket, each=read)
        for count, entry in enumerate(entries, 1):
            self._admit(entry)
            self.progress += 1
            if count % 512 == 0:
                # Each record's seal is verified here (CPU): let requests in between.
                await asyncio.sleep(0)
        entries.clear()
        self._ready.set()
        async for entry in kvread.follow(self._js, self.bucket, last):
            self._admit(entry)
