"""ACME's state in the CA's own bucket (`kms_ca`), under keys of its own:

    acme.acct.<id>          Account: key (JWK), thumbprint, status, contacts
    acme.key.<thumbprint>   the account id a key belongs to (create-if-absent: one
                            account per key, and `onlyReturnExisting` finds it)
    acme.order.<id>         Order: identifiers, authorizations, status, CSR, serial
    acme.authz.<id>         Authorization with its challenges
    acme.eab.<kid>          External account binding key (HMAC), made by an admin
    acme.ordidx.<acct>.<order id>  an account's order (value: its creation time), so
                            the account's `orders` list reads that account's keys only

Values are JSON (sealed by the CA like every record of the bucket, edgekms.sealed), and
every change is compare-and-set on the revision read, so two CA replicas, or a retry
racing a first attempt, never both win. Only the CA's bus identity may write the bucket
(mgmt.natsauth), and orders and accounts outlive a restart of the CA.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from edgekms import kvread
from edgekms.errors import FailedPrecondition

ACCOUNT, KEY, ORDER, AUTHZ, EAB, ORDER_INDEX = "acct", "key", "order", "authz", "eab", "ordidx"
PREFIX = "acme."


@dataclass
class Account:
    id: str
    jwk: dict[str, str]
    thumbprint: str
    status: str = "valid"  # valid | deactivated | revoked
    contact: list[str] = field(default_factory=list)
    created_at: str = ""
    eab_kid: str = ""


@dataclass
class Challenge:
    type: str
    token: str
    status: str = "pending"  # pending | processing | valid | invalid
    validated: str = ""
    error: dict[str, Any] = field(default_factory=dict)


@dataclass
class Authz:
    id: str
    account: str
    identifier: dict[str, str]
    expires: str
    status: str = "pending"  # pending | valid | invalid | deactivated
    challenges: list[Challenge] = field(default_factory=list)


@dataclass
class Order:
    id: str
    account: str
    identifiers: list[dict[str, str]]
    authzs: list[str]
    expires: str
    created_at: str = ""
    # Stored status: pending (authorizations decide ready/invalid on read), processing
    # (a CSR was accepted and is being issued), valid (serial set), invalid.
    status: str = "pending"
    csr: str = ""  # base64url DER, kept from finalize until the certificate is stored
    serial: str = ""
    error: dict[str, Any] = field(default_factory=dict)


@dataclass
class EabKey:
    kid: str
    hmac_key: str  # base64url
    created_at: str
    created_by: str = ""
    status: str = "valid"  # valid | used | revoked
    account: str = ""
    note: str = ""


T = TypeVar("T", Account, Authz, Order, EabKey)


def decode(kind: type[T], raw: bytes) -> T:
    data = json.loads(raw)
    if kind is Authz:
        data["challenges"] = [Challenge(**c) for c in data.get("challenges", [])]
    return kind(**data)


class AcmeStore:
    """Typed get / create / compare-and-set over the CA bucket's `acme.*` keys."""

    def __init__(self, kv: Any, js: Any, bucket: str) -> None:
        self.kv = kv
        self.js = js
        self.bucket = bucket

    @staticmethod
    def key(kind: str, ident: str) -> str:
        return f"{PREFIX}{kind}.{ident}"

    async def get(self, kind: str, ident: str, cls: type[T]) -> tuple[T, int] | None:
        try:
            entry = await self.kv.get(self.key(kind, ident))
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        return decode(cls, entry.value), int(entry.revision)

    async def create(self, kind: str, ident: str, value: T) -> int:
        """Create-if-absent; raises nats' KeyWrongLastSequenceError when it exists."""
        return int(await self.kv.create(self.key(kind, ident), _encode(value)))

    async def update(self, kind: str, ident: str, value: T, revision: int) -> int:
        try:
            return int(await self.kv.update(self.key(kind, ident), _encode(value), last=revision))
        except KeyWrongLastSequenceError:
            raise FailedPrecondition(
                "acme.state_changed", f"the {kind} changed meanwhile: try again"
            ) from None

    async def index_order(self, account: str, order_id: str, created_at: str) -> None:
        await self.kv.put(self.key(ORDER_INDEX, f"{account}.{order_id}"), created_at.encode())

    async def unindex_order(self, account: str, order_id: str) -> None:
        await self.kv.delete(self.key(ORDER_INDEX, f"{account}.{order_id}"))

    async def account_orders(self, account: str) -> list[tuple[str, str]]:
        """(created_at, order id) of every order indexed for `account`, oldest first;
        one read of that account's index keys, not of every order."""
        prefix = f"{PREFIX}{ORDER_INDEX}.{account}."
        entries, _ = await kvread.snapshot(self.js, self.bucket, f"{prefix}>")
        found: list[tuple[str, str]] = []
        for raw in entries:
            if not raw.value or kvread.is_removal(raw):
                continue
            entry = self.open(raw)
            if entry.value:
                found.append((entry.value.decode(), str(raw.key)[len(prefix) :]))
        return sorted(found)

    async def delete(self, kind: str, ident: str) -> None:
        """Remove a record (a delete marker; scan and get skip it)."""
        await self.kv.delete(self.key(kind, ident))

    async def get_account_id(self, thumbprint: str) -> str | None:
        try:
            entry = await self.kv.get(self.key(KEY, thumbprint))
        except KeyNotFoundError:
            return None
        return entry.value.decode() if entry.value else None

    async def bind_key(self, thumbprint: str, account_id: str) -> bool:
        """Name `account_id` as the holder of the key; False if another holds it."""
        try:
            await self.kv.create(self.key(KEY, thumbprint), account_id.encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def rebind_key(self, old: str, new: str, account_id: str) -> bool:
        """Key rollover: the new key names the account (create-if-absent), then the old
        key's entry is emptied (a later use of it is an unknown account)."""
        if not await self.bind_key(new, account_id):
            return False
        entry = await self.kv.get(self.key(KEY, old))
        await self.kv.update(self.key(KEY, old), b"", last=entry.revision)
        return True

    def open(self, raw: Any) -> Any:
        """A raw bucket entry with its seal checked and taken off (edgekms.sealed)."""
        return self.kv.open_entry(raw) if hasattr(self.kv, "open_entry") else raw

    async def scan(self, kind: str, cls: type[T]) -> AsyncIterator[T]:
        """Every record of one kind, read as the catalog reads (edgekms.kvread)."""
        entries, _ = await kvread.snapshot(self.js, self.bucket, f"{PREFIX}{kind}.>")
        for raw in entries:
            if not raw.value or kvread.is_removal(raw):
                continue
            entry = self.open(raw)
            if entry.value:
                yield decode(cls, entry.value)


def _encode(value: Any) -> bytes:
    return json.dumps(dataclasses.asdict(value), separators=(",", ":"), sort_keys=True).encode()
