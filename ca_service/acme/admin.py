"""The administrators' side of ACME, on kms.ca.<RPC> like the rest of the CA (through the
broker, which checks the role and writes `requester`): accounts list, external account
binding keys (create, list, revoke), the name policy.

Listings page by id (the last id of a page is the next page's token), so 50,000
accounts come a page at a time; a page is built from one read of the `acme.acct.*`
(or `acme.eab.*`) keys.
"""

from __future__ import annotations

import base64
import datetime
import secrets
from typing import Any

from ca_service.acme.jws import load_jwk
from ca_service.acme.state import ACCOUNT, EAB, Account, AcmeStore, EabKey
from ca_service.store import rfc3339
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


class AcmeAdmin:
    """The RPC handlers; `server` is None when the CA runs without an [acme] table."""

    def __init__(self, store: AcmeStore | None, server: Any = None) -> None:
        self.store = store
        self.server = server

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
        found = sorted(
            [a async for a in self._store().scan(ACCOUNT, Account) if a.id > req.page_token],
            key=lambda a: a.id,
        )
        page = found[:size]
        return ca_pb2.ListAcmeAccountsResponse(
            accounts=[account_message(a) for a in page],
            next_page_token=page[-1].id if len(found) > size else "",
        )

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
        found = sorted(
            [e async for e in self._store().scan(EAB, EabKey) if e.kid > req.page_token],
            key=lambda e: e.kid,
        )
        page = found[:size]
        return ca_pb2.ListAcmeEabResponse(
            keys=[eab_message(e) for e in page],
            next_page_token=page[-1].kid if len(found) > size else "",
        )

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
