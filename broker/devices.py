"""The device registry and enrollment tokens, as records in the broker's kms_clients
bucket (sealed by the broker like the client records beside them):

    token.<id>            edgekms.v1.EnrollToken: a one-time token, its secret only hashed
    device.<name>         edgekms.v1.Device: an enrolled device, its group and status
    denied-group.<group>  edgekms.v1.DeniedGroup: a whole group refused

`DeviceBook` is the in-memory view the ClientRegistry's follower keeps current (every
broker replica sees a deny at once); the write helpers are compare-and-set on the
revision they read, so two replicas never both reserve a token or both deny a device.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import re
import secrets
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from edgekms.errors import InvalidArgument, Unavailable
from edgekms.v1 import enroll_pb2

TOKEN_PREFIX = "ekt1"  # noqa: S105 - a format tag, not a secret
TOKEN_RE = re.compile(r"^ekt1\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")
GROUP_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
KINDS = ("token", "device", "denied-group", "unlock")

ACTIVE = enroll_pb2.ENROLL_TOKEN_STATE_ACTIVE
RESERVED = enroll_pb2.ENROLL_TOKEN_STATE_RESERVED
USED = enroll_pb2.ENROLL_TOKEN_STATE_USED
REVOKED = enroll_pb2.ENROLL_TOKEN_STATE_REVOKED


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def stamp(when: datetime.datetime | None = None) -> str:
    return (when or now()).astimezone(datetime.UTC).isoformat(timespec="seconds")


def new_token() -> tuple[str, str, bytes]:
    """(id, the token string, SHA-256 of its secret): the string is shown once."""
    token_id = secrets.token_hex(8)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return token_id, f"{TOKEN_PREFIX}.{token_id}.{secret}", hashlib.sha256(secret.encode()).digest()


def parse_token(token: str) -> tuple[str, bytes]:
    """(id, SHA-256 of the secret) of a well-formed token; InvalidArgument otherwise."""
    match = TOKEN_RE.match(token.strip())
    if match is None:
        raise InvalidArgument(
            "enroll.token_malformed", "an enrollment token looks like ekt1.<16 hex>.<43 chars>"
        )
    return match.group(1), hashlib.sha256(match.group(2).encode()).digest()


def secret_matches(record: enroll_pb2.EnrollToken, digest: bytes) -> bool:
    return hmac.compare_digest(record.secret_sha256, digest)


def token_spent(record: enroll_pb2.EnrollToken, at: str | None = None) -> bool:
    """Used, revoked, or expired while never reserved."""
    if record.state in (USED, REVOKED):
        return True
    return record.state == ACTIVE and record.expires_at <= (at or stamp())


class DeviceBook:
    """Tokens, devices and denied groups, by key, as the bucket holds them."""

    def __init__(self) -> None:
        self.tokens: dict[str, enroll_pb2.EnrollToken] = {}
        self.devices: dict[str, enroll_pb2.Device] = {}
        self.denied_groups: set[str] = set()
        # EK identity (SHA-256 of its SPKI) -> the device enrolled with it.
        self.ek_owners: dict[bytes, str] = {}
        # "<device>.<volume>" -> its unlock secret (broker.unlock); removed ones dropped.
        self.unlocks: dict[str, enroll_pb2.UnlockSecret] = {}

    def put(self, device: enroll_pb2.Device) -> None:
        """Record `device`, keeping the EK index in step."""
        old = self.devices.get(device.name)
        if (
            old is not None
            and old.ek_sha256
            and old.ek_sha256 != device.ek_sha256
            and self.ek_owners.get(old.ek_sha256) == device.name
        ):
            del self.ek_owners[old.ek_sha256]
        self.devices[device.name] = device
        if device.ek_sha256:
            self.ek_owners[device.ek_sha256] = device.name

    def ek_owner(self, ek_sha256: bytes) -> str | None:
        return self.ek_owners.get(ek_sha256)

    def apply(self, kind: str, rest: str, entry: Any) -> None:
        gone = entry.operation in ("DEL", "PURGE") or not entry.value
        if kind == "token":
            if gone:
                self.tokens.pop(rest, None)
                return
            token = enroll_pb2.EnrollToken()
            token.ParseFromString(entry.value)
            if token.id == rest:
                self.tokens[rest] = token
        elif kind == "device":
            if gone:
                self.devices.pop(rest, None)
                return
            device = enroll_pb2.Device()
            device.ParseFromString(entry.value)
            if device.name == rest:
                self.put(device)
        elif kind == "unlock":
            secret = enroll_pb2.UnlockSecret()
            if not gone:
                secret.ParseFromString(entry.value)
            if gone or secret.removed or f"{secret.device}.{secret.volume}" != rest:
                self.unlocks.pop(rest, None)
            else:
                self.unlocks[rest] = secret
        elif kind == "denied-group":
            group = enroll_pb2.DeniedGroup()
            if not gone:
                group.ParseFromString(entry.value)
            if group.denied:
                self.denied_groups.add(rest)
            else:
                self.denied_groups.discard(rest)

    def refuse(self, kind: str, rest: str) -> None:
        """A record failing its seal: fail closed (a device or group counts as denied)."""
        if kind == "token":
            self.tokens.pop(rest, None)
        elif kind == "device":
            self.devices[rest] = enroll_pb2.Device(
                name=rest, status=enroll_pb2.DEVICE_STATUS_DENIED
            )
        elif kind == "denied-group":
            self.denied_groups.add(rest)
        elif kind == "unlock":
            self.unlocks.pop(rest, None)  # fail closed: nothing is released from it

    def is_denied(self, name: str) -> bool:
        device = self.devices.get(name)
        if device is None:
            return False
        return device.status == enroll_pb2.DEVICE_STATUS_DENIED or (
            bool(device.group) and device.group in self.denied_groups
        )


class DeviceStore:
    """Reads and compare-and-set writes of the records above (kv: the sealed bucket)."""

    def __init__(self, kv: Any, book: DeviceBook):
        self.kv = kv
        self.book = book

    async def _get(self, key: str, message: Any) -> int | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        message.ParseFromString(entry.value)
        return int(entry.revision)

    async def token(self, token_id: str) -> tuple[enroll_pb2.EnrollToken, int] | None:
        record = enroll_pb2.EnrollToken()
        revision = await self._get(f"token.{token_id}", record)
        return None if revision is None else (record, revision)

    async def device(self, name: str) -> tuple[enroll_pb2.Device, int] | None:
        record = enroll_pb2.Device()
        revision = await self._get(f"device.{name}", record)
        return None if revision is None else (record, revision)

    async def create_token(self, record: enroll_pb2.EnrollToken) -> None:
        await self.kv.create(f"token.{record.id}", record.SerializeToString())
        self.book.tokens[record.id] = record

    async def update_token(self, record: enroll_pb2.EnrollToken, revision: int) -> int:
        """Compare-and-set; Unavailable("enroll.token_busy") if someone else changed it."""
        try:
            new = await self.kv.update(
                f"token.{record.id}", record.SerializeToString(), last=revision
            )
        except KeyWrongLastSequenceError:
            raise Unavailable(
                "enroll.token_busy", "the token is being redeemed elsewhere; try again"
            ) from None
        self.book.tokens[record.id] = record
        return int(new)

    async def put_device(self, record: enroll_pb2.Device, revision: int | None) -> int:
        key = f"device.{record.name}"
        try:
            if revision is None:
                new = await self.kv.create(key, record.SerializeToString())
            else:
                new = await self.kv.update(key, record.SerializeToString(), last=revision)
        except KeyWrongLastSequenceError:
            raise Unavailable(
                "device.contended", f"device {record.name!r} is changing; try again"
            ) from None
        self.book.put(record)
        return int(new)

    async def set_group(self, group: str, denied: bool, by: str) -> None:
        record = enroll_pb2.DeniedGroup(group=group, denied=denied, denied_at=stamp(), denied_by=by)
        await self.kv.put(f"denied-group.{group}", record.SerializeToString())
        if denied:
            self.book.denied_groups.add(group)
        else:
            self.book.denied_groups.discard(group)

    async def unlock(self, device: str, volume: str) -> tuple[enroll_pb2.UnlockSecret, int] | None:
        record = enroll_pb2.UnlockSecret()
        revision = await self._get(f"unlock.{device}.{volume}", record)
        return None if revision is None else (record, revision)

    async def put_unlock(self, record: enroll_pb2.UnlockSecret, revision: int | None) -> int:
        """Create (revision None) or compare-and-set the volume's secret."""
        key = f"unlock.{record.device}.{record.volume}"
        try:
            if revision is None:
                new = await self.kv.create(key, record.SerializeToString())
            else:
                new = await self.kv.update(key, record.SerializeToString(), last=revision)
        except KeyWrongLastSequenceError:
            raise Unavailable(
                "unlock.contended", f"the secret of {record.volume!r} is changing; try again"
            ) from None
        rest = f"{record.device}.{record.volume}"
        if record.removed:
            self.book.unlocks.pop(rest, None)
        else:
            self.book.unlocks[rest] = record
        return int(new)
