"""The key registry: a JetStream KV bucket of KeyRecord messages, keyed by key name.

The broker routes every request by it, so reads must not cost a round trip: a watcher
keeps an in-memory copy current (a disable made by another broker replica is seen here
within milliseconds). Writes go to the bucket with compare-and-set on the revision, so
two brokers cannot both create one name or race a state change.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import re
from collections.abc import Callable
from typing import Any

from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from broker.buckets import FollowedBucket
from edgekms.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from edgekms.logs import fields
from edgekms.sealed import RecordSeal, TamperedRecord
from edgekms.subjects import KEY_REGISTRY_BUCKET
from edgekms.v1 import common_pb2 as pb

log = logging.getLogger(__name__)

KEY_NAME_RE = re.compile(r"^[a-z0-9]+(?:[/._-][a-z0-9]+)*$")
MAX_KEY_NAME = 128


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def check_key_name(name: str) -> None:
    if not name:
        raise InvalidArgument("key.name_missing", "a key name is required")
    if len(name) > MAX_KEY_NAME or not KEY_NAME_RE.match(name):
        raise InvalidArgument(
            "key.name_invalid",
            f"key name {name[:140]!r} must be lower-case [a-z0-9] segments joined by "
            f"'/', '.', '_' or '-', at most {MAX_KEY_NAME} characters",
        )


class KeyRegistry(FollowedBucket):
    """Names to KeyRecords. `start()` loads the bucket and follows it."""

    bucket = KEY_REGISTRY_BUCKET
    description = "EdgeKMS key registry: KeyRecord by key name"

    def __init__(self, js: JetStreamContext, replicas: int = 1, seal: RecordSeal | None = None):
        super().__init__(js, replicas, seal)
        self._records: dict[str, tuple[pb.KeyRecord, int]] = {}

    def apply(self, entry: Any) -> None:
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            self._records.pop(entry.key, None)
            return
        record = pb.KeyRecord()
        record.ParseFromString(entry.value)
        current = self._records.get(entry.key)
        if current is None or current[1] < entry.revision:
            self._records[entry.key] = (record, entry.revision)

    def refuse(self, entry: Any, err: TamperedRecord) -> None:
        # A key whose record is not genuine is not used: NotFound until its owner
        # writes it again.
        self._records.pop(entry.key, None)

    def get(self, name: str) -> pb.KeyRecord:
        """The record as last seen; NotFound if absent or only a pending reservation."""
        check_key_name(name)
        found = self._records.get(name)
        if found is None or found[0].state == pb.KEY_STATE_PENDING:
            raise NotFound("key.not_found", f"no key named {name!r}")
        return found[0]

    def list(self, prefix: str = "", include_destroyed: bool = False) -> list[pb.KeyRecord]:
        out = []
        for name in sorted(self._records):
            record = self._records[name][0]
            if not name.startswith(prefix) or record.state == pb.KEY_STATE_PENDING:
                continue
            if record.state == pb.KEY_STATE_DESTROYED and not include_destroyed:
                continue
            out.append(record)
        return out

    async def reserve(self, record: pb.KeyRecord, stale_after: float = 180.0) -> int:
        """Take the name with a PENDING record; AlreadyExists if anyone holds it.

        A PENDING record older than `stale_after` seconds (longer than any generation
        may take) was left by a broker that died mid-create: it is taken over, by
        compare-and-set, so of several retries exactly one wins. The token object the
        dead broker may have made is orphaned (no record points at it), never used.
        """
        check_key_name(record.name)
        record.state = pb.KEY_STATE_PENDING
        record.created_at = record.updated_at = now()
        payload = record.SerializeToString()
        try:
            revision = await self.kv.create(record.name, payload)
        except KeyWrongLastSequenceError:
            revision = await self._take_over_stale(record.name, payload, stale_after)
        self._records[record.name] = (record, revision)
        return revision

    async def _take_over_stale(self, name: str, payload: bytes, stale_after: float) -> int:
        exists = AlreadyExists("key.exists", f"a key named {name!r} exists")
        try:
            entry = await self.kv.get(name)
        except KeyNotFoundError:
            raise exists from None  # deleted meanwhile: let the caller retry plainly
        held = pb.KeyRecord()
        held.ParseFromString(entry.value or b"")
        age = datetime.datetime.now(datetime.UTC) - datetime.datetime.fromisoformat(
            held.updated_at or held.created_at or now()
        )
        if held.state != pb.KEY_STATE_PENDING or age.total_seconds() < stale_after:
            raise exists
        assert entry.revision is not None
        try:
            revision = await self.kv.update(name, payload, last=entry.revision)
        except KeyWrongLastSequenceError:
            raise exists from None  # another retry took it first
        log.warning("took over a stale reservation", extra=fields(key=name, age=age.seconds))
        return revision

    async def activate(self, record: pb.KeyRecord, revision: int) -> pb.KeyRecord:
        record.state = pb.KEY_STATE_ACTIVE
        record.updated_at = now()
        new_revision = await self.kv.update(record.name, record.SerializeToString(), last=revision)
        self._records[record.name] = (record, new_revision)
        return record

    async def release(self, name: str, revision: int) -> None:
        """Drop a reservation whose key could not be made (nothing half-done stays)."""
        with contextlib.suppress(KeyWrongLastSequenceError, KeyNotFoundError):
            await self.kv.delete(name, last=revision)
        self._records.pop(name, None)

    async def update_policy(self, name: str, policy: pb.KeyPolicy) -> pb.KeyRecord:
        """Replace a key's policy (CAS on the stored revision); NotFound if absent."""

        def edit(record: pb.KeyRecord) -> bool:
            record.policy.CopyFrom(policy)
            return True

        return (await self._change(name, edit))[0]

    async def rotate(
        self, name: str, from_version: int, key_id: bytes, public_key_der: bytes
    ) -> pb.KeyRecord:
        """Make (key_id, public_key_der) the key's version from_version + 1, keeping the
        current one in previous_versions (its public key dropped: only decryption uses
        it). FailedPrecondition key.contended if another rotation came first."""

        def edit(record: pb.KeyRecord) -> bool:
            if record.state != pb.KEY_STATE_ACTIVE:
                state = pb.KeyState.Name(record.state).removeprefix("KEY_STATE_").lower()
                raise FailedPrecondition(
                    f"key.{state}", f"key {name!r} is {state}", {"state": state}
                )
            current = record.version or 1
            if current != from_version:
                raise FailedPrecondition(
                    "key.contended", f"key {name!r} was rotated meanwhile; try again"
                )
            record.previous_versions.append(
                pb.KeyVersion(
                    version=current,
                    key_id=record.key_id,
                    created_at=record.version_created_at or record.created_at,
                )
            )
            record.version = current + 1
            record.key_id = key_id
            record.public_key_der = public_key_der
            record.version_created_at = now()
            return True

        return (await self._change(name, edit))[0]

    async def transition(
        self, name: str, allowed_from: tuple[int, ...], to: int
    ) -> tuple[pb.KeyRecord, bool]:
        """Move a key to state `to` (CAS on the stored revision).

        Returns (record, changed); changed is False when it was already in `to`.
        """

        def edit(record: pb.KeyRecord) -> bool:
            if record.state == to:
                return False
            if record.state not in allowed_from:
                state = pb.KeyState.Name(record.state).removeprefix("KEY_STATE_").lower()
                raise FailedPrecondition(
                    f"key.{state}", f"key {name!r} is {state}", {"state": state}
                )
            record.state = to  # type: ignore[assignment]
            return True

        return await self._change(name, edit)

    async def _change(
        self, name: str, edit: Callable[[pb.KeyRecord], bool]
    ) -> tuple[pb.KeyRecord, bool]:
        """Read the stored record, let `edit` change it (False: nothing to change; it may
        raise to refuse), and store it compare-and-set on the revision read, reading
        again if someone else changed it meanwhile. NotFound if absent or only reserved."""
        check_key_name(name)
        for _ in range(5):
            try:
                entry = await self.kv.get(name)
            except KeyNotFoundError:
                raise NotFound("key.not_found", f"no key named {name!r}") from None
            record = pb.KeyRecord()
            record.ParseFromString(entry.value or b"")
            if record.state == pb.KEY_STATE_PENDING:
                raise NotFound("key.not_found", f"no key named {name!r}")
            if not edit(record):
                return record, False
            record.updated_at = now()
            try:
                assert entry.revision is not None
                revision = await self.kv.update(
                    name, record.SerializeToString(), last=entry.revision
                )
            except KeyWrongLastSequenceError:
                continue  # someone else changed it meanwhile: read again
            self._records[name] = (record, revision)
            return record, True
        raise FailedPrecondition("key.contended", f"key {name!r} is changing; try again")
