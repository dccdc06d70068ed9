"""Key-registry records for keys that management code generates itself (the internal
CA's key in the ceremony, the mini-CA's root and intermediate), written straight to the
`kms_keys` bucket the broker follows.

The broker's KeyService makes a key as reserve -> generate -> activate. Code that
generates through the crypto service directly cannot reserve first without the broker,
so it records after generation, with create-if-absent: whoever loses a race (or finds
the name taken) destroys the key it just made, and exactly one key is ever recorded
under a name. Keys recorded here are then managed like any other (`kmsctl key disable
ca/root`), and their owners ask `require_active` before they sign, so a disabled record
means the key is not used.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from edgekms.errors import AlreadyExists, FailedPrecondition, NotFound
from edgekms.sealed import RecordSeal, sealed
from edgekms.subjects import KEY_REGISTRY_BUCKET
from edgekms.v1 import common_pb2 as pb

log = logging.getLogger(__name__)


def _stamp() -> str:
    # The same form as broker.registry.now(): RFC 3339, UTC, whole seconds.
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


async def registry_kv(nc: Any, seal: RecordSeal | None = None) -> Any:
    """The registry bucket, created as the broker creates it when nobody has yet; with
    `seal`, records are signed as its writer and verified on read (edgekms.sealed)."""
    from edgekms import kvstore

    kv = await kvstore.open_kv(nc.jetstream(), kvstore.BUCKETS[KEY_REGISTRY_BUCKET])
    return sealed(kv, KEY_REGISTRY_BUCKET, seal)


def admin_only_policy() -> pb.KeyPolicy:
    """Administrators may read the public key; nobody signs with it through the broker
    (the key's owner signs through the crypto service)."""
    return pb.KeyPolicy(
        rules=[pb.PolicyRule(roles=["admin"], operations=[pb.KEY_OPERATION_GET_PUBLIC_KEY])]
    )


def new_key_record(
    *,
    name: str,
    provider: str,
    key_type: pb.KeyType.ValueType,
    key_id: bytes,
    public_key_der: bytes,
    created_by: str,
    labels: Mapping[str, str] | None = None,
    policy: pb.KeyPolicy | None = None,
) -> pb.KeyRecord:
    stamp = _stamp()
    return pb.KeyRecord(
        name=name,
        provider=provider,
        key_type=key_type,
        state=pb.KEY_STATE_ACTIVE,
        key_id=key_id,
        public_key_der=public_key_der,
        created_at=stamp,
        updated_at=stamp,
        created_by=created_by,
        labels=dict(labels or {}),
        policy=policy if policy is not None else admin_only_policy(),
    )


async def read_key_record(kv: Any, name: str) -> tuple[pb.KeyRecord, int] | None:
    """(record, revision), or None when the name is free (absent or deleted)."""
    try:
        entry = await kv.get(name)
    except KeyNotFoundError:
        return None
    if not entry.value:
        return None
    record = pb.KeyRecord()
    record.ParseFromString(entry.value)
    return record, int(entry.revision or 0)


async def record_generated_key(
    kv: Any, record: pb.KeyRecord, destroy: Callable[[], Awaitable[None]]
) -> int:
    """Create `record` if its name is free and return its revision. If the name is taken
    (AlreadyExists "key.exists") or the write fails, `destroy` removes the key the
    caller just generated, so no unrecorded key stays in the token."""
    try:
        try:
            revision = int(await kv.create(record.name, record.SerializeToString()))
        except KeyWrongLastSequenceError:
            raise AlreadyExists(
                "key.exists", f"a key named {record.name!r} exists in the registry"
            ) from None
    except BaseException:
        await destroy()
        raise
    log.info(
        "event=registry_key_recorded name=%s provider=%s revision=%d",
        record.name,
        record.provider,
        revision,
    )
    return revision


async def forget_key_record(kv: Any, name: str, revision: int) -> None:
    """Undo record_generated_key for a key being rolled back (only that revision)."""
    with contextlib.suppress(KeyWrongLastSequenceError, KeyNotFoundError):
        await kv.delete(name, last=revision)


async def set_key_state(kv: Any, name: str, revision: int, state: pb.KeyState.ValueType) -> int:
    """Compare-and-set the state of a record this code just wrote."""
    found = await read_key_record(kv, name)
    if found is None or found[1] != revision:
        raise FailedPrecondition("key.contended", f"key {name!r} changed meanwhile")
    record = found[0]
    record.state = state
    record.updated_at = _stamp()
    return int(await kv.update(name, record.SerializeToString(), last=revision))


async def mark_key_destroyed(kv: Any, name: str) -> bool:
    """Record that the owner destroyed `name`'s key in the token (compare-and-set,
    retried if the record moves meanwhile); False when there is no such record or it
    says destroyed already. The record stays, so the name is never reused."""
    for _ in range(5):
        found = await read_key_record(kv, name)
        if found is None or found[0].state == pb.KEY_STATE_DESTROYED:
            return False
        try:
            await set_key_state(kv, name, found[1], pb.KEY_STATE_DESTROYED)
        except (FailedPrecondition, KeyWrongLastSequenceError):
            continue
        log.info("event=registry_key_destroyed name=%s", name)
        return True
    raise FailedPrecondition("key.contended", f"key {name!r} kept changing")


async def require_active(kv: Any, name: str, reason: str) -> pb.KeyRecord:
    """The record of `name` if it is ACTIVE; FailedPrecondition `reason` if it is
    disabled or destroyed, NotFound if the registry does not know it."""
    found = await read_key_record(kv, name)
    if found is None or found[0].state == pb.KEY_STATE_PENDING:
        raise NotFound("key.not_found", f"the key registry has no key {name!r}")
    record = found[0]
    if record.state != pb.KEY_STATE_ACTIVE:
        state = pb.KeyState.Name(record.state).removeprefix("KEY_STATE_").lower()
        raise FailedPrecondition(
            reason, f"key {name!r} is {state} in the key registry", {"state": state}
        )
    return record


class RegistryKeys:
    """The registry as a key's owner sees it (the mini-CA for ca/root and
    ca/intermediate): record what it generated, roll that back, and ask before signing."""

    def __init__(self, kv: Any, created_by: str, disabled_reason: str) -> None:
        self.kv = kv
        self.created_by = created_by
        self.disabled_reason = disabled_reason

    @classmethod
    async def open(
        cls, nc: Any, created_by: str, disabled_reason: str, seal: RecordSeal | None = None
    ) -> RegistryKeys:
        return cls(await registry_kv(nc, seal), created_by, disabled_reason)

    async def record(
        self,
        name: str,
        provider: str,
        key_type: pb.KeyType.ValueType,
        key_id: bytes,
        public_key_der: bytes,
        destroy: Callable[[], Awaitable[None]],
        labels: Mapping[str, str] | None = None,
    ) -> int:
        record = new_key_record(
            name=name,
            provider=provider,
            key_type=key_type,
            key_id=key_id,
            public_key_der=public_key_der,
            created_by=self.created_by,
            labels=labels,
        )
        return await record_generated_key(self.kv, record, destroy)

    async def forget(self, name: str, revision: int) -> None:
        await forget_key_record(self.kv, name, revision)

    async def set_state(self, name: str, revision: int, state: pb.KeyState.ValueType) -> int:
        return await set_key_state(self.kv, name, revision, state)

    async def require_active(self, name: str) -> pb.KeyRecord:
        return await require_active(self.kv, name, self.disabled_reason)

    async def mark_destroyed(self, name: str) -> bool:
        return await mark_key_destroyed(self.kv, name)


__all__ = [
    "RegistryKeys",
    "admin_only_policy",
    "forget_key_record",
    "mark_key_destroyed",
    "new_key_record",
    "read_key_record",
    "record_generated_key",
    "registry_kv",
    "require_active",
    "set_key_state",
]
