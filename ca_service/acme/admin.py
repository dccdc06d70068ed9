"""The administrators' side of ACME, on kms.ca.<RPC> like the rest of the CA (through the
broker, which checks the role and writes `requester`): accounts list, external account
binding keys (create, list, revoke), the name policy.

Listings page by id (the last id of a page is the next page's token), so 50,000
accounts come a page at a time. Pages are served from an index in memory of the
`acme.acct.*` (and `acme.eab.*`) records, brought up to date before each page with the
changes since it was last read (edgekms.kvread.snapshot with `after`, as the
certificate catalog does): listing 50,000 accounts reads the bucket once, not once per
page.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import secrets
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from ca_service.acme.jws import load_jwk
from ca_service.acme.state import ACCOUNT, EAB, PREFIX, Account, AcmeStore, EabKey, decode
from ca_service.store import rfc3339
from edgekms import kvread
from edgekms.errors import FailedPrecondition, InvalidArgument, NotFound
from edgekms.v1 import ca_pb2

DEFAULT_PAGE, MAX_PAGE = 100, 1000
MAX_NOTE = 256


def _page_size(requested: int) -> int:
    if requested > MAX_PAGE:
        raise InvalidArgument("list.page_size_invalid", f"page_size is at most {MAX_PAGE}")
    return requested or DEFAULT_PAGE


def _key_type(jwk: dict[str, str]) -> str:
    try:
        key = load_jwk(jwk)
    except Exception:
        return "unknown"
    if jwk.get("kty") == "EC":
        return f"EC {jwk.get('crv')}"
    return f"RSA {getattr(key, 'key_size', 0)}"


def account_message(account: Account) -> ca_pb2.AcmeAccount:
    return ca_pb2.AcmeAccount(
        id=account.id,
        status=account.status,
        contact=account.contact,
        thumbprint=account.thumbprint,
        created_at=account.created_at,
        eab_kid=account.eab_kid,
        key_type=_key_type(account.jwk),
    )


def eab_message(eab: EabKey) -> ca_pb2.AcmeEab:
    return ca_pb2.AcmeEab(
        kid=eab.kid,
        status=eab.status,
        created_at=eab.created_at,
        created_by=eab.created_by,
        account=eab.account,
        note=eab.note,
    )


M = TypeVar("M", bound=Message)


class _Index(Generic[M]):
    """Records of one kind as listing messages, by id, caught up before each use."""

    def __init__(self, store: AcmeStore, kind: str, make: Callable[[bytes], M]) -> None:
        self.store, self.kind, self.make = store, kind, make
        self.items: dict[str, M] = {}
        self.revision = 0
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        prefix = f"{PREFIX}{self.kind}."

        def apply(raw: Any) -> None:
            entry = self.store.open(raw)
            ident = entry.key[len(prefix) :]
            if kvread.is_removal(entry) or not entry.value:
                self.items.pop(ident, None)
            else:
                self.items[ident] = self.make(entry.value)

        async with self._lock:
            _, last = await kvread.snapshot(
                self.store.js, self.store.bucket, f"{prefix}>", after=self.revision, each=apply
            )
            self.revision = max(self.revision, last)

    async def page(self, token: str, size: int) -> tuple[list[M], str]:
        await self.refresh()
        ids = sorted(i for i in self.items if i > token)
        chosen = ids[:size]
        return [self.items[i] for i in chosen], chosen[-1] if len(ids) > size else ""


class AcmeAdmin:
    """The RPC handlers; `server` is None when the CA runs without an [acme] table."""

    def __init__(self, store: AcmeStore | None, server: Any = None) -> None:
        self.store = store
        self.server = server
        self._accounts: _Index[ca_pb2.AcmeAccount] | None = None
        self._eabs: _Index[ca_pb2.AcmeEab] | None = None
        if store is not None:
            self._accounts = _Index(
                store, ACCOUNT, lambda raw: account_message(decode(Account, raw))
            )
            self._eabs = _Index(store, EAB, lambda raw: eab_message(decode(EabKey, raw)))

    def _store(self) -> AcmeStore:
        if self.store is None:
            raise FailedPrecondition(
                "acme.disabled", "this CA serves no ACME: start it with `kmsctl up --acme`"
            )
        return self.store

    async def list_accounts(
        self, req: ca_pb2.ListAcmeAccountsRequest
    ) -> ca_pb2.ListAcmeAccountsResponse:
        size = _page_size(req.page_size)
        self._store()
        assert self._accounts is not None
        page, token = await self._accounts.page(req.page_token, size)
        return ca_pb2.ListAcmeAccountsResponse(accounts=page, next_page_token=token)

    async def create_eab(self, req: ca_pb2.CreateAcmeEabRequest) -> ca_pb2.CreateAcmeEabResponse:
        if len(req.note) > MAX_NOTE:
            raise InvalidArgument(
                "acme.eab_note_invalid", f"notes are at most {MAX_NOTE} characters"
            )
        store = self._store()
        kid, key = secrets.token_urlsafe(12), secrets.token_bytes(32)
        eab = EabKey(
            kid=kid,
            hmac_key=base64.urlsafe_b64encode(key).rstrip(b"=").decode(),
            created_at=rfc3339(datetime.datetime.now(datetime.UTC)),
            created_by=req.requester,
            note=req.note,
        )
        if self.server is not None:
            await self.server._audit("acme.eab_create", "ok", "", kid, by=req.requester)
        await store.create(EAB, kid, eab)
        return ca_pb2.CreateAcmeEabResponse(eab=eab_message(eab), hmac_key=key)

    async def list_eab(self, req: ca_pb2.ListAcmeEabRequest) -> ca_pb2.ListAcmeEabResponse:
        size = _page_size(req.page_size)
        self._store()
        assert self._eabs is not None
        page, token = await self._eabs.page(req.page_token, size)
        return ca_pb2.ListAcmeEabResponse(keys=page, next_page_token=token)

    async def revoke_eab(self, req: ca_pb2.RevokeAcmeEabRequest) -> ca_pb2.RevokeAcmeEabResponse:
        store = self._store()
        ok = 0 < len(req.kid) <= 64 and all(c.isalnum() or c in "-_" for c in req.kid)
        found = await store.get(EAB, req.kid, EabKey) if ok else None
        if found is None:
            raise NotFound("acme.eab_unknown", f"no external account binding key {req.kid!r}")
        eab, revision = found
        if eab.status == "valid":
            if self.server is not None:
                await self.server._audit("acme.eab_revoke", "ok", "", eab.kid, by=req.requester)
            eab.status = "revoked"
            await store.update(EAB, eab.kid, eab, revision)
        # A used key bound its account already: revoking it changes nothing (deactivate
        # the account instead); a revoked one stays revoked. Either way: its state.
        return ca_pb2.RevokeAcmeEabResponse(eab=eab_message(eab))

    async def policy(self, _: ca_pb2.GetAcmePolicyRequest) -> ca_pb2.GetAcmePolicyResponse:
        if self.server is None:
            return ca_pb2.GetAcmePolicyResponse(enabled=False)
        config = self.server.config
        names = config.policy.to_json()
        return ca_pb2.GetAcmePolicyResponse(
            enabled=True,
            directory_url=config.directory_url,
            dns=names["dns"],
            ip=names["ip"],
            eab_required=config.eab_required,
            http01_port=config.http01_port,
            tlsalpn01_port=config.tlsalpn01_port,
            profile=config.profile,
        )
