"""JetStream KV buckets as the broker uses them: opened (or made on first start), and,
for the registries it answers from, followed into memory by a watcher.

The broker answers key and client lookups from memory, so a sign costs no registry
round trip; the watcher keeps that memory current with changes made by any replica.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from edgekms import kvread, kvstore
from edgekms.sealed import RecordSeal, SealedKV, TamperedRecord, sealed


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
    return await kvstore.open_kv(js, kvstore.spec_for(bucket, description, history, ttl or 0.0))


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

    async def start(self) -> None:
        self._kv = sealed(
            await open_bucket(
                self._js, self.bucket, description=self.description, replicas=self._replicas
            ),
            self.bucket,
            self._seal,
        )
        self._watch_task = asyncio.create_task(self._follow(), name=f"{self.bucket}-watch")
        await asyncio.wait_for(self._ready.wait(), timeout=10)

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
        entries, last = await kvread.snapshot(self._js, self.bucket)
        for count, entry in enumerate(entries, 1):
            self._admit(entry)
            if count % 512 == 0:
                # Each record's seal is verified here (CPU): let requests in between.
                await asyncio.sleep(0)
        self._ready.set()
        async for entry in kvread.follow(self._js, self.bucket, last):
            self._admit(entry)
