"""The ACME server (RFC 8555) of the mini-CA, served over HTTPS by the CA service.

Resources (all under <base>/acme/): `directory`, `new-nonce` (HEAD or GET), and by POST
with a JWS: `new-account`, `new-order`, `acct/<id>`, `order/<id>`, `authz/<id>`,
`chall/<authz>/<n>`, `finalize/<order>`, `cert/<order>`, `revoke-cert`, `key-change`.

Every POST is checked in the same order before it is acted on: content type, JWS shape,
algorithm, the protected `url` against the URL it was sent to, the nonce (single use,
ca_service.acme.nonces), then the key (`jwk` only for new-account and revoke-cert, `kid`
naming a valid account otherwise) and the signature. A refusal is a problem document
(ca_service.acme.problems) and changes nothing.

Certificates are issued by the CA's own `issue_plan` under the configured profile with
requester `acme:<account id>` and request id `acme-order-<order id>`: a normal record,
listed, revocable, in the CRL and OCSP, and idempotent, so a finalize interrupted by a
crash is completed by the next request that touches the order (the same serial, never a
second certificate, never a consumed order without one).

The server's own TLS certificate comes from the mini-CA (names from `[acme] names`), so
a client needs only the root that already sits in its trust store for nginx; its key is
made in this process and lives in memory (a temporary 0600 file exists only while the
TLS context loads it). It is renewed after two thirds of its life.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_service.acme import challenges, jws
from ca_service.acme.nonces import NoncePool
from ca_service.acme.problems import (
    PROBLEM_JSON,
    AccountDoesNotExist,
    AcmeProblem,
    AlreadyRevoked,
    BadCSR,
    BadRevocationReason,
    ExternalAccountRequired,
    Malformed,
    NotFoundResource,
    OrderNotReady,
    ServerInternal,
    TooLarge,
    Unauthorized,
    UnsupportedContact,
    WrongContentType,
    from_kms,
)
from ca_service.acme.settings import AcmeConfig
from ca_service.acme.state import (
    ACCOUNT,
    AUTHZ,
    EAB,
    ORDER,
    Account,
    AcmeStore,
    Authz,
    Challenge,
    EabKey,
    Order,
)
from ca_service.authority import CertificateAuthority
from ca_service.http import SPIFFE_BUNDLE_PATH, HttpServer, Request, Response, spiffe_bundle_handler
from ca_service.policy import load_csr, plan_from_csr
from ca_service.profiles import get_profile
from ca_service.servertls import keep_renewed, load_identity
from ca_service.store import parse_rfc3339, rfc3339
from edgekms import nameconstraints as constraints
from edgekms.errors import AlreadyExists, KMSError, Unavailable
from edgekms.v1 import ca_pb2

log = logging.getLogger(__name__)

JOSE_JSON = "application/jose+json"
PEM_CHAIN = "application/pem-certificate-chain"
AUTHZ_LIFETIME = datetime.timedelta(days=7)
ORDER_LIFETIME = datetime.timedelta(days=7)
MAX_CONTACTS = 10
_JWK_RESOURCES = ("new-account", "revoke-cert")
# RFC 5280 reasons a subscriber may give (RFC 8555 7.6): not caCompromise, not hold.
_REVOKE_REASONS = {
    0: ca_pb2.REVOCATION_REASON_UNSPECIFIED,
    1: ca_pb2.REVOCATION_REASON_KEY_COMPROMISE,
    3: ca_pb2.REVOCATION_REASON_AFFILIATION_CHANGED,
    4: ca_pb2.REVOCATION_REASON_SUPERSEDED,
    5: ca_pb2.REVOCATION_REASON_CESSATION_OF_OPERATION,
}
RETRY_AFTER = 1  # seconds, on pending orders and challenges being validated
SERVER_CERT_RETRY = 1.0  # a KV read per try while no CA exists yet
PRUNE_INTERVAL = 3600.0  # seconds between two passes over the orders (at most)
ORDERS_PAGE = 100  # order URLs per page of an account's `orders` list


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _new_id() -> str:
    return secrets.token_urlsafe(12)


class Authenticated:
    """A verified POST: its JWS, the payload object and the account (None with a jwk)."""

    def __init__(self, jws_: jws.JWS, payload: dict[str, Any], key: jws.PublicKey) -> None:
        self.jws = jws_
        self.payload = payload
        self.key = key
        self.account: Account | None = None

    @property
    def account_id(self) -> str:
        assert self.account is not None
        return self.account.id


class AcmeServer:
    def __init__(
        self,
        ca: CertificateAuthority,
        config: AcmeConfig,
        audit: Any = None,
    ) -> None:
        self.ca = ca
        self.config = config
        self.store = AcmeStore(ca.store.kv, ca.store.js, ca.store.bucket)
        self.nonces = NoncePool()
        self.audit = audit
        self.base = config.directory_base
        self._validations: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._tls: ssl.SSLContext | None = None
        self.http: HttpServer | None = None
        self._cert_task: asyncio.Task[None] | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self.server_cert: x509.Certificate | None = None
        self.ready = asyncio.Event()

    # ---- the listener and its certificate ------------------------------------------------

    async def start(self) -> None:
        """Listen as soon as the CA exists and has issued this server's certificate; until
        then (no `ca init` yet) keep trying in the background."""
        self._cert_task = asyncio.create_task(self._keep_certificate())
        self._prune_task = asyncio.create_task(self._keep_pruning())

    async def stop(self) -> None:
        for task in (self._cert_task, self._prune_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for task in list(self._validations.values()):
            task.cancel()
        if self.http is not None:
            await self.http.cleanup()

    async def _keep_certificate(self) -> None:
        await keep_renewed(
            self._load_server_certificate, self._open, SERVER_CERT_RETRY, "acme_waiting"
        )

    async def _open(self) -> None:
        assert self._tls is not None
        server = _AcmeHttp(self, self.config.max_body)
        await server.start(self.config.host, self.config.port, self._tls)
        self.http = server
        log.info(
            "event=acme_listening host=%s port=%d directory=%s",
            self.config.host,
            self.config.port,
            self.config.directory_url,
        )
        self.ready.set()

    async def _load_server_certificate(self) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for name in self.config.names:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                names.append(x509.DNSName(name))
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.config.names[0])])
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(key, hashes.SHA256())
        )
        profile = get_profile(self.ca.profiles, "https-server")
        plan = plan_from_csr(profile, load_csr(csr.public_bytes(serialization.Encoding.DER)))
        issued = await self.ca.issue_plan(plan, "acme:server")
        cert = x509.load_der_x509_certificate(issued.certificate_der)
        chain = b"".join(
            x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
            for d in [issued.certificate_der, issued.chain_der[0]]
        )
        # New handshakes use the new certificate; open connections keep theirs.
        self._tls = load_identity(self._tls, key, chain, "edgekms-acme-")
        self.server_cert = cert
        log.info("event=acme_server_certificate serial=%s", issued.record.serial)
        return cert

    # ---- plumbing ------------------------------------------------------------------------

    def url(self, *parts: str) -> str:
        return "/".join((self.base, "acme", *parts))

    def _json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> Response:
        response = Response(status, json.dumps(value).encode(), "application/json")
        response.headers.update(headers or {})
        return response

    def _problem(self, problem: AcmeProblem) -> Response:
        response = Response(problem.http_status, problem.body(), PROBLEM_JSON)
        if problem.acme_type == "badSignatureAlgorithm":
            doc = problem.document() | {"algorithms": list(jws.ALGORITHMS)}
            response.body = json.dumps(doc).encode()
        return response

    async def _audit(
        self, action: str, outcome: str, account: str, target: str, **details: str
    ) -> None:
        """Recorded before the change it describes; a log that cannot take it refuses
        the change (Unavailable, answered as serverInternal)."""
        if self.audit is None:
            return
        await self.audit.append(
            action,
            outcome,
            client=f"acme:{account}" if account else "acme",
            role="acme",
            target=target,
            details={k: v for k, v in details.items() if v},
        )

    async def handle(self, request: Request) -> Response:
        try:
            response = await self._dispatch(request)
        except AcmeProblem as problem:
            log.info(
                "event=acme_refused path=%s reason=%s type=%s",
                request.path,
                problem.reason,
                problem.acme_type,
            )
            response = self._problem(problem)
        except KMSError as exc:
            log.info("event=acme_refused path=%s reason=%s", request.path, exc.reason)
            response = self._problem(from_kms(exc))
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["Replay-Nonce"] = self.nonces.new()
        link = f'<{self.url("directory")}>;rel="index"'
        response.headers["Link"] = ", ".join(filter(None, (response.headers.get("Link"), link)))
        return response

    async def _dispatch(self, request: Request) -> Response:
        path = request.path
        if not path.startswith("/acme/"):
            raise NotFoundResource("acme.not_found", "no such resource")
        parts = path[len("/acme/") :].split("/")
        resource, rest = parts[0], parts[1:]
        method = "GET" if request.method == "HEAD" else request.method
        if resource == "directory" and method == "GET" and not rest:
            return self._json(200, self.directory())
        if resource == "new-nonce" and method == "GET" and not rest:
            return Response(200 if request.method == "HEAD" else 204, b"", "text/plain")
        if method != "POST":
            response = self._problem(
                Malformed("acme.method_not_allowed", f"{request.method} is not allowed here")
            )
            response.status = 405
            readable = resource in ("directory", "new-nonce")
            response.headers["Allow"] = "GET, HEAD" if readable else "POST"
            return response
        handlers: dict[str, Callable[[Authenticated, list[str]], Awaitable[Response]]] = {
            "new-account": self.new_account,
            "new-order": self.new_order,
            "acct": self.account_resource,
            "order": self.order_resource,
            "orders": self.orders_list,
            "authz": self.authz_resource,
            "chall": self.challenge_resource,
            "finalize": self.finalize,
            "cert": self.certificate,
            "revoke-cert": self.revoke,
            "key-change": self.key_change,
        }
        handler = handlers.get(resource)
        if handler is None:
            raise NotFoundResource("acme.not_found", "no such resource")
        auth = await self._authenticate(request, resource)
        return await handler(auth, rest)

    async def _authenticate(self, request: Request, resource: str) -> Authenticated:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != JOSE_JSON:
            raise WrongContentType("acme.content_type", f"POST bodies are {JOSE_JSON}")
        parsed = jws.parse(request.body)
        protected = parsed.protected
        if parsed.alg not in jws.ALGORITHMS:
            from ca_service.acme.problems import BadSignatureAlgorithm

            raise BadSignatureAlgorithm(
                "acme.alg_unsupported", f"JWS algorithms accepted: {', '.join(jws.ALGORITHMS)}"
            )
        if protected.get("url") != self.base + request.path:
            raise Unauthorized(
                "acme.url_mismatch", "the JWS url is not the URL this request was sent to"
            )
        self.nonces.consume(protected.get("nonce"))
        has_jwk, has_kid = "jwk" in protected, "kid" in protected
        if has_jwk == has_kid:
            raise Malformed("acme.jws_key_invalid", "the JWS needs exactly one of jwk and kid")
        if has_jwk:
            if resource not in _JWK_RESOURCES:
                raise Malformed("acme.jwk_not_allowed", "this request is signed with kid, not jwk")
            key = jws.load_jwk(protected["jwk"])
            jws.verify(parsed.alg, key, parsed.signing_input, parsed.signature)
            return Authenticated(parsed, parsed.payload_json(), key)
        account = await self._account_of_kid(protected["kid"])
        key = jws.load_jwk(account.jwk)
        jws.verify(parsed.alg, key, parsed.signing_input, parsed.signature)
        auth = Authenticated(parsed, parsed.payload_json(), key)
        auth.account = account
        return auth

    async def _account_of_kid(self, kid: Any) -> Account:
        prefix = self.url("acct") + "/"
        if not isinstance(kid, str) or not kid.startswith(prefix):
            raise AccountDoesNotExist("acme.account_unknown", "kid names no account of this CA")
        found = await self.store.get(ACCOUNT, kid[len(prefix) :], Account)
        if found is None or not _safe_id(kid[len(prefix) :]):
            raise AccountDoesNotExist("acme.account_unknown", "kid names no account of this CA")
        account = found[0]
        if account.status != "valid":
            raise Unauthorized("acme.account_deactivated", f"the account is {account.status}")
        return account

    # ---- directory and accounts ----------------------------------------------------------

    def directory(self) -> dict[str, Any]:
        return {
            "newNonce": self.url("new-nonce"),
            "newAccount": self.url("new-account"),
            "newOrder": self.url("new-order"),
            "revokeCert": self.url("revoke-cert"),
            "keyChange": self.url("key-change"),
            "meta": {
                "externalAccountRequired": self.config.eab_required,
                "website": self.base,
            },
        }

    def _account_json(self, account: Account) -> dict[str, Any]:
        value: dict[str, Any] = {
            "status": account.status,
            "contact": account.contact,
            "key": account.jwk,
            "createdAt": account.created_at,
            "orders": self.url("orders", account.id),
        }
        return value

    def _account_response(self, status: int, account: Account) -> Response:
        return self._json(
            status, self._account_json(account), {"Location": self.url("acct", account.id)}
        )

    async def new_account(self, auth: Authenticated, _: list[str]) -> Response:
        payload = auth.payload
        thumb = jws.thumbprint(auth.key)
        existing = await self.store.get_account_id(thumb)
        if existing:
            found = await self.store.get(ACCOUNT, existing, Account)
            if found is not None:
                return self._account_response(200, found[0])
        if payload.get("onlyReturnExisting") is True:
            raise AccountDoesNotExist("acme.account_unknown", "no account holds this key")
        contact = payload.get("contact", [])
        if not isinstance(contact, list) or len(contact) > MAX_CONTACTS:
            raise Malformed("acme.contact_invalid", f"contact is a list of at most {MAX_CONTACTS}")
        for entry in contact:
            if not isinstance(entry, str) or not entry.startswith("mailto:") or len(entry) > 256:
                raise UnsupportedContact("acme.contact_unsupported", "contacts are mailto: URLs")
        eab = await self._check_eab(auth, payload.get("externalAccountBinding"))
        account_id = existing or _new_id()
        account = Account(
            id=account_id,
            jwk=jws.jwk_of(auth.key),
            thumbprint=thumb,
            contact=list(contact),
            created_at=rfc3339(_now()),
            eab_kid=eab.kid if eab else "",
        )
        await self._audit("acme.new_account", "ok", account_id, account_id, eab=account.eab_kid)
        # The key's entry first: one account per key, whoever races. A crash before the
        # account record leaves the key naming an id with no record, which the next
        # new-account with that key fills in (`existing` above).
        if not existing and not await self.store.bind_key(thumb, account_id):
            other = await self.store.get_account_id(thumb)
            found = await self.store.get(ACCOUNT, other or "", Account) if other else None
            if found is None:
                raise ServerInternal("acme.state_changed", "the key was bound meanwhile: retry")
            return self._account_response(200, found[0])
        if eab is not None:
            await self._use_eab(eab, account_id)
        try:
            await self.store.create(ACCOUNT, account_id, account)
        except Exception as exc:  # created by a concurrent retry?
            if await self.store.get(ACCOUNT, account_id, Account) is None:
                raise ServerInternal("acme.store_failed", f"account not stored: {exc}") from None
        log.info("event=acme_account_created account=%s", account_id)
        return self._account_response(201, account)

    async def _check_eab(self, auth: Authenticated, binding: Any) -> EabKey | None:
        if binding is None:
            if self.config.eab_required:
                raise ExternalAccountRequired(
                    "acme.eab_required", "this CA needs an external account binding"
                )
            return None
        inner = jws.parse(json.dumps(binding).encode())
        if inner.alg not in ("HS256", "HS384", "HS512"):
            raise Malformed("acme.eab_invalid", "the binding is MACed with HS256/384/512")
        if inner.protected.get("url") != auth.jws.protected.get("url"):
            raise Unauthorized("acme.eab_invalid", "the binding names another URL")
        kid = inner.protected.get("kid")
        known = isinstance(kid, str) and _safe_id(kid)
        found = await self.store.get(EAB, str(kid), EabKey) if known else None
        if found is None or found[0].status != "valid":
            raise Unauthorized("acme.eab_unknown", "the binding's key is unknown, used or revoked")
        try:
            bound = jws.load_jwk(json.loads(inner.payload))
        except ValueError:
            raise Malformed("acme.eab_invalid", "the binding's payload is not a JWK") from None
        if jws.thumbprint(bound) != jws.thumbprint(auth.key):
            raise Unauthorized("acme.eab_invalid", "the binding names another account key")
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
        mac = hmac.new(
            jws.b64d(found[0].hmac_key, "eab key"), inner.signing_input, digest[inner.alg]
        ).digest()
        if not hmac.compare_digest(mac, inner.signature):
            raise Unauthorized("acme.eab_invalid", "the binding's MAC does not verify")
        return found[0]

    async def _use_eab(self, eab: EabKey, account_id: str) -> None:
        found = await self.store.get(EAB, eab.kid, EabKey)
        if found is None or found[0].status != "valid":
            raise Unauthorized("acme.eab_unknown", "the binding's key was used meanwhile")
        record, revision = found
        record.status, record.account = "used", account_id
        await self.store.update(EAB, eab.kid, record, revision)

    async def account_resource(self, auth: Authenticated, rest: list[str]) -> Response:
        assert auth.account is not None
        if len(rest) != 1 or rest[0] != auth.account.id:
            raise Unauthorized("acme.not_your_account", "kid and URL name different accounts")
        found = await self.store.get(ACCOUNT, auth.account.id, Account)
        assert found is not None
        account, revision = found
        payload = auth.payload
        if "contact" in payload:
            contact = payload["contact"]
            if (
                not isinstance(contact, list)
                or len(contact) > MAX_CONTACTS
                or not all(
                    isinstance(c, str) and c.startswith("mailto:") and len(c) <= 256
                    for c in contact
                )
            ):
                raise UnsupportedContact("acme.contact_unsupported", "contacts are mailto: URLs")
            account.contact = list(contact)
        if payload.get("status") == "deactivated":
            await self._audit("acme.deactivate_account", "ok", account.id, account.id)
            account.status = "deactivated"
        elif "status" in payload and payload["status"] != account.status:
            raise Malformed("acme.status_invalid", "an account can only be deactivated")
        if payload:
            await self.store.update(ACCOUNT, account.id, account, revision)
        return self._account_response(200, account)

    async def key_change(self, auth: Authenticated, _: list[str]) -> Response:
        account = auth.account
        assert account is not None
        inner = jws.parse(json.dumps(auth.payload).encode())
        if inner.alg not in jws.ALGORITHMS:
            raise Malformed("acme.key_change_invalid", "the inner JWS algorithm is not accepted")
        if "jwk" not in inner.protected or "kid" in inner.protected or "nonce" in inner.protected:
            raise Malformed("acme.key_change_invalid", "the inner JWS carries the new jwk only")
        if inner.protected.get("url") != auth.jws.protected.get("url"):
            raise Malformed("acme.key_change_invalid", "the inner JWS names another URL")
        new_key = jws.load_jwk(inner.protected["jwk"])
        jws.verify(inner.alg, new_key, inner.signing_input, inner.signature)
        body = inner.payload_json()
        if body.get("account") != self.url("acct", account.id):
            raise Malformed("acme.key_change_invalid", "the inner payload names another account")
        try:
            old = jws.thumbprint(jws.load_jwk(body.get("oldKey")))
        except AcmeProblem:
            raise Malformed("acme.key_change_invalid", "oldKey is not a key") from None
        if old != account.thumbprint:
            raise Malformed("acme.key_change_invalid", "oldKey is not the account's key")
        new = jws.thumbprint(new_key)
        holder = await self.store.get_account_id(new)
        if holder:
            response = self._problem(
                Malformed("acme.key_in_use", "another account holds the new key")
            )
            response.status = 409
            response.headers["Location"] = self.url("acct", holder)
            return response
        await self._audit("acme.key_change", "ok", account.id, account.id, new_key=new)
        found = await self.store.get(ACCOUNT, account.id, Account)
        assert found is not None
        record, revision = found
        if not await self.store.rebind_key(account.thumbprint, new, account.id):
            raise Malformed("acme.key_in_use", "another account took the new key meanwhile")
        record.jwk, record.thumbprint = jws.jwk_of(new_key), new
        await self.store.update(ACCOUNT, account.id, record, revision)
        return self._account_response(200, record)

    # ---- orders, authorizations, challenges ----------------------------------------------

    async def new_order(self, auth: Authenticated, _: list[str]) -> Response:
        payload = auth.payload
        idents = payload.get("identifiers")
        if not isinstance(idents, list) or not idents:
            raise Malformed("acme.identifiers_missing", "an order names its identifiers")
        from ca_service.acme.policy import MAX_IDENTIFIERS

        if len(idents) > MAX_IDENTIFIERS:
            raise Malformed("acme.too_many_identifiers", f"at most {MAX_IDENTIFIERS} per order")
        if payload.get("notBefore") or payload.get("notAfter"):
            raise Malformed("acme.validity_unsupported", "notBefore/notAfter are not supported")
        checked: list[tuple[str, str]] = []
        for ident in idents:
            allowed = self.config.policy.check(ident)
            if allowed not in checked:
                checked.append(allowed)
        now = _now()
        authzs: list[Authz] = []
        for kind, value in checked:
            kinds = challenges.TYPES
            authzs.append(
                Authz(
                    id=_new_id(),
                    account=auth.account_id,
                    identifier={"type": kind, "value": value},
                    expires=rfc3339(now + AUTHZ_LIFETIME),
                    challenges=[Challenge(t, secrets.token_urlsafe(32)) for t in kinds],
                )
            )
        order = Order(
            id=_new_id(),
            account=auth.account_id,
            identifiers=[{"type": k, "value": v} for k, v in checked],
            authzs=[a.id for a in authzs],
            expires=rfc3339(now + ORDER_LIFETIME),
            created_at=rfc3339(now),
        )
        # Authorizations first: an order is only ever stored with everything it names.
        for authz in authzs:
            await self.store.create(AUTHZ, authz.id, authz)
        await self.store.create(ORDER, order.id, order)
        # Indexed after the order exists: a crash between leaves an order the list does
        # not show (pruned in time all the same), never an index entry naming nothing.
        await self.store.index_order(order.account, order.id, order.created_at)
        log.info(
            "event=acme_order_created account=%s order=%s names=%s",
            auth.account_id,
            order.id,
            ",".join(v for _, v in checked),
        )
        return self._json(
            201, await self._order_json(order), {"Location": self.url("order", order.id)}
        )

    async def _keep_pruning(self) -> None:
        """Prune at start and then every PRUNE_INTERVAL (sooner for a short retention); a
        failed pass is logged and the next one tries again."""
        interval = max(1.0, min(PRUNE_INTERVAL, self.config.order_retention / 2))
        while True:
            try:
                await self.prune_orders()
            except Exception as exc:  # a bus hiccup must not end the task for good
                log.warning("event=acme_prune_failed error=%s", exc)
            await asyncio.sleep(interval)

    async def prune_orders(self, now: datetime.datetime | None = None) -> int:
        """Delete every order whose expiry lies more than `order_retention` in the past,
        with its authorizations (those first: an order is never left naming nothing it
        could be shown with; a pass cut short leaves an order that the next one deletes).
        An order being finalized (`processing`) is left to finish. Audited once per pass
        that deleted anything. Returns how many orders went."""
        cutoff = (now or _now()) - datetime.timedelta(seconds=self.config.order_retention)
        gone: list[Order] = []
        async for order in self.store.scan(ORDER, Order):
            if order.status == "processing" or parse_rfc3339(order.expires) > cutoff:
                continue
            gone.append(order)
        if not gone:
            return 0
        await self._audit(
            "acme.orders_pruned", "ok", "", "orders", count=str(len(gone)),
            expired_before=rfc3339(cutoff),
        )  # fmt: skip
        for order in gone:
            await self.store.unindex_order(order.account, order.id)
            for authz_id in order.authzs:
                await self.store.delete(AUTHZ, authz_id)
            await self.store.delete(ORDER, order.id)
        log.info("event=acme_orders_pruned count=%d expired_before=%s", len(gone), cutoff)
        return len(gone)

    async def orders_list(self, auth: Authenticated, rest: list[str]) -> Response:
        """RFC 8555 7.1.2.1: the account's orders, ORDERS_PAGE URLs a page, oldest
        first, invalid ones left out; `Link: <...>;rel="next"` names the next page
        (`/acme/orders/<account>/<cursor>`, the cursor the last order's position)."""
        if not rest or len(rest) > 2 or not _safe_id(rest[0]):
            raise NotFoundResource("acme.orders_unknown", "no such orders list")
        if rest[0] != auth.account_id:
            raise Unauthorized("acme.not_your_orders", "the list belongs to another account")
        after: tuple[str, str] = ("", "")
        if len(rest) == 2:
            created, sep, order_id = rest[1].partition("~")
            if not sep or not _safe_id(order_id) or len(created) > 40:
                raise Malformed("acme.cursor_invalid", "not a cursor of this list")
            after = (created, order_id)
        page: list[str] = []
        last: tuple[str, str] | None = None
        more = False
        for created, order_id in await self.store.account_orders(auth.account_id):
            if (created, order_id) <= after:
                continue
            if len(page) >= ORDERS_PAGE:
                more = True
                break
            last = (created, order_id)
            found = await self.store.get(ORDER, order_id, Order)
            if found is not None and await self._order_status(found[0]) != "invalid":
                page.append(self.url("order", order_id))
        headers = {}
        if more and last is not None:
            cursor = f"{last[0]}~{last[1]}"
            headers["Link"] = f'<{self.url("orders", auth.account_id, cursor)}>;rel="next"'
        return self._json(200, {"orders": page}, headers)

    async def _load_order(self, auth: Authenticated, rest: list[str]) -> tuple[Order, int]:
        if len(rest) != 1 or not _safe_id(rest[0]):
            raise NotFoundResource("acme.order_unknown", "no such order")
        found = await self.store.get(ORDER, rest[0], Order)
        if found is None:
            raise NotFoundResource("acme.order_unknown", "no such order")
        if found[0].account != auth.account_id:
            raise Unauthorized("acme.not_your_order", "the order belongs to another account")
        return found

    async def _order_status(self, order: Order) -> str:
        if order.status != "pending":
            return order.status
        if parse_rfc3339(order.expires) < _now():
            return "invalid"
        statuses = []
        for authz_id in order.authzs:
            found = await self.store.get(AUTHZ, authz_id, Authz)
            statuses.append(self._authz_status(found[0]) if found else "invalid")
        if any(s in ("invalid", "deactivated", "expired", "revoked") for s in statuses):
            return "invalid"
        return "ready" if all(s == "valid" for s in statuses) else "pending"

    def _authz_status(self, authz: Authz) -> str:
        if authz.status == "pending" and parse_rfc3339(authz.expires) < _now():
            return "expired"
        return authz.status

    async def _order_json(self, order: Order) -> dict[str, Any]:
        value: dict[str, Any] = {
            "status": await self._order_status(order),
            "expires": order.expires,
            "identifiers": order.identifiers,
            "authorizations": [self.url("authz", a) for a in order.authzs],
            "finalize": self.url("finalize", order.id),
        }
        if order.serial:
            value["certificate"] = self.url("cert", order.id)
        if order.error:
            value["error"] = order.error
        return value

    async def _order_response(self, order: Order) -> Response:
        body = await self._order_json(order)
        headers = {"Location": self.url("order", order.id)}
        if body["status"] in ("pending", "processing"):
            # RFC 8555 8.2: when to look again (a validation takes about a second).
            headers["Retry-After"] = str(RETRY_AFTER)
        return self._json(200, body, headers)

    async def order_resource(self, auth: Authenticated, rest: list[str]) -> Response:
        order, revision = await self._load_order(auth, rest)
        if order.status == "processing":
            order = await self._complete(order, revision)
        elif order.status == "pending":
            for authz_id in order.authzs:
                await self._resume_validations(authz_id)
        return await self._order_response(order)

    async def _load_authz(self, auth: Authenticated, authz_id: str) -> tuple[Authz, int]:
        found = await self.store.get(AUTHZ, authz_id, Authz) if _safe_id(authz_id) else None
        if found is None:
            raise NotFoundResource("acme.authz_unknown", "no such authorization")
        if found[0].account != auth.account_id:
            raise Unauthorized(
                "acme.not_your_authz", "the authorization belongs to another account"
            )
        return found

    def _challenge_json(self, authz: Authz, index: int) -> dict[str, Any]:
        chall = authz.challenges[index]
        value: dict[str, Any] = {
            "type": chall.type,
            "url": self.url("chall", authz.id, str(index)),
            "token": chall.token,
            "status": chall.status,
        }
        if chall.validated:
            value["validated"] = chall.validated
        if chall.error:
            value["error"] = chall.error
        return value

    def _authz_json(self, authz: Authz) -> dict[str, Any]:
        status = self._authz_status(authz)
        shown = list(range(len(authz.challenges)))
        if status == "valid":  # RFC 8555 7.1.4: the challenge that passed
            shown = [i for i in shown if authz.challenges[i].status == "valid"]
        return {
            "identifier": authz.identifier,
            "status": status,
            "expires": authz.expires,
            "challenges": [self._challenge_json(authz, i) for i in shown],
        }

    async def authz_resource(self, auth: Authenticated, rest: list[str]) -> Response:
        if len(rest) != 1:
            raise NotFoundResource("acme.authz_unknown", "no such authorization")
        authz, revision = await self._load_authz(auth, rest[0])
        if auth.payload.get("status") == "deactivated":
            if authz.status in ("pending", "valid"):
                authz.status = "deactivated"
                await self.store.update(AUTHZ, authz.id, authz, revision)
        elif auth.payload:
            raise Malformed("acme.status_invalid", "an authorization can only be deactivated")
        else:
            await self._resume_validations(authz.id)
        return self._json(200, self._authz_json(authz))

    async def challenge_resource(self, auth: Authenticated, rest: list[str]) -> Response:
        if len(rest) != 2 or not rest[1].isdigit():
            raise NotFoundResource("acme.challenge_unknown", "no such challenge")
        authz, revision = await self._load_authz(auth, rest[0])
        index = int(rest[1])
        if index >= len(authz.challenges):
            raise NotFoundResource("acme.challenge_unknown", "no such challenge")
        chall = authz.challenges[index]
        # An empty object asks for validation; POST-as-GET (empty payload) only reads.
        if auth.jws.payload == b"{}" or (auth.jws.payload and auth.payload == {}):
            if authz.status == "pending" and chall.status == "pending":
                if self._authz_status(authz) == "expired":
                    raise Malformed("acme.authz_expired", "the authorization has expired")
                chall.status = "processing"
                await self.store.update(AUTHZ, authz.id, authz, revision)
                self._start_validation(authz.id, index, auth.account_id)
        else:
            await self._resume_validations(authz.id)
        response = self._json(200, self._challenge_json(authz, index))
        response.headers["Link"] = f'<{self.url("authz", authz.id)}>;rel="up"'
        if chall.status == "processing":
            response.headers["Retry-After"] = str(RETRY_AFTER)
        return response

    async def _resume_validations(self, authz_id: str) -> None:
        """A challenge left `processing` by a CA that stopped mid-validation is taken
        up again by whoever looks at it next (nothing would otherwise finish it)."""
        found = await self.store.get(AUTHZ, authz_id, Authz)
        if found is None or found[0].status != "pending":
            return
        for index, chall in enumerate(found[0].challenges):
            if chall.status == "processing" and (authz_id, index) not in self._validations:
                self._start_validation(authz_id, index, found[0].account)

    def _start_validation(self, authz_id: str, index: int, account_id: str) -> None:
        key = (authz_id, index)
        if key in self._validations:
            return
        task = asyncio.create_task(self._validate(authz_id, index, account_id))
        self._validations[key] = task
        task.add_done_callback(lambda _: self._validations.pop(key, None))

    async def _validate(self, authz_id: str, index: int, account_id: str) -> None:
        try:
            found = await self.store.get(AUTHZ, authz_id, Authz)
            account = await self.store.get(ACCOUNT, account_id, Account)
            if found is None or account is None:
                return
            authz = found[0]
            chall = authz.challenges[index]
            expected = challenges.key_authorization(chall.token, account[0].thumbprint)
            problem = await challenges.validate(
                chall.type,
                authz.identifier["value"],
                chall.token,
                expected,
                self.config.http01_port,
                self.config.tlsalpn01_port,
                self.config.hosts,
            )
            outcome = "ok" if problem is None else problem.reason
            for _ in range(10):  # compare-and-set against other writers of the authz
                found = await self.store.get(AUTHZ, authz_id, Authz)
                if found is None:
                    return
                authz, revision = found
                chall = authz.challenges[index]
                if chall.status != "processing":
                    return
                if problem is None:
                    chall.status, chall.validated = "valid", rfc3339(_now())
                    if authz.status == "pending":
                        authz.status = "valid"
                else:
                    chall.status, chall.error = "invalid", problem.document()
                    if authz.status == "pending":
                        authz.status = "invalid"
                try:
                    await self._audit(
                        "acme.validate",
                        outcome,
                        account_id,
                        authz.identifier["value"],
                        challenge=chall.type,
                        authz=authz_id,
                    )
                    await self.store.update(AUTHZ, authz_id, authz, revision)
                except KMSError as exc:
                    if exc.reason == "acme.state_changed":
                        continue
                    raise
                break
            log.info(
                "event=acme_validated authz=%s type=%s name=%s outcome=%s",
                authz_id,
                chall.type,
                authz.identifier["value"],
                outcome,
            )
        except KMSError as exc:  # the bus or the audit log away: the next look resumes it
            log.warning("event=acme_validation_deferred authz=%s reason=%s", authz_id, exc.reason)

    # ---- finalize, certificate, revocation -----------------------------------------------

    def _csr_names(self, csr: x509.CertificateSigningRequest) -> set[tuple[str, str]]:
        names: set[tuple[str, str]] = set()
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names |= {("dns", n.lower()) for n in san.get_values_for_type(x509.DNSName)}
            names |= {("ip", str(a)) for a in san.get_values_for_type(x509.IPAddress)}
        except x509.ExtensionNotFound:
            pass
        except ValueError as exc:
            raise BadCSR("csr.malformed", f"unreadable extensions: {exc}") from None
        for attr in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = str(attr.value).lower()
            try:
                names.add(("ip", str(ipaddress.ip_address(value))))
            except ValueError:
                names.add(("dns", value))
        return names

    async def finalize(self, auth: Authenticated, rest: list[str]) -> Response:
        order, revision = await self._load_order(auth, rest)
        csr_b64 = str(auth.payload.get("csr", ""))
        der = jws.b64d(csr_b64, "csr")
        status = await self._order_status(order)
        if (status in ("processing", "valid") and order.csr == csr_b64) or (
            status == "valid" and order.serial and not order.csr
        ):
            # A retry of a finalize whose answer was lost, or that a crash interrupted.
            if status == "processing":
                order = await self._complete(order, revision)
            return await self._order_response(order)
        if status != "ready":
            raise OrderNotReady(
                "acme.order_not_ready", f"the order is {status}: it must be ready to finalize"
            )
        csr = load_csr(der)
        wanted = {(i["type"], i["value"]) for i in order.identifiers}
        if self._csr_names(csr) != wanted:
            raise BadCSR(
                "acme.csr_names_mismatch",
                "the CSR must name exactly the order's identifiers",
                {"order": ",".join(sorted(v for _, v in wanted))},
            )
        plan = plan_from_csr(get_profile(self.ca.profiles, self.config.profile), csr)
        issuer = await self.ca.issuer()
        # Refused now, before the order is consumed, rather than inside the issuance.
        constraints.check(constraints.of_certificate(issuer.cert), plan.subject, plan.san)
        await self._audit(
            "acme.finalize",
            "ok",
            auth.account_id,
            order.id,
            names=",".join(sorted(v for _, v in wanted)),
        )
        order.status, order.csr = "processing", csr_b64
        revision = await self.store.update(ORDER, order.id, order, revision)
        order = await self._complete(order, revision)
        return await self._order_response(order)

    async def _complete(self, order: Order, revision: int) -> Order:
        """Issue the certificate of a `processing` order (idempotently: the request id is
        the order's, so a second attempt finds the first one's record) and mark it
        valid. A failure the CA may recover from leaves the order processing for the
        next attempt; a refusal of the request itself makes it invalid."""
        csr = load_csr(jws.b64d(order.csr, "csr"))
        plan = plan_from_csr(get_profile(self.ca.profiles, self.config.profile), csr)
        try:
            issued = await self.ca.issue_plan(
                plan, f"acme:{order.account}", request_id=f"acme-order-{order.id}"
            )
        except (Unavailable, ServerInternal) as exc:
            raise ServerInternal(
                exc.reason, f"issuance did not finish, retry: {exc.message}"
            ) from None
        except KMSError as exc:
            if exc.reason.startswith(("csr.", "cert.")):
                order.status, order.error = "invalid", from_kms(exc).document()
                order.csr = ""
                with contextlib.suppress(KMSError):
                    await self.store.update(ORDER, order.id, order, revision)
            raise
        order.status, order.serial, order.csr = "valid", issued.record.serial, ""
        try:
            await self.store.update(ORDER, order.id, order, revision)
        except KMSError as exc:
            if exc.reason != "acme.state_changed":
                raise
            found = await self.store.get(ORDER, order.id, Order)
            if found is None:
                raise
            order = found[0]  # a concurrent completion got there first: same serial
        log.info(
            "event=acme_order_valid account=%s order=%s serial=%s",
            order.account,
            order.id,
            order.serial,
        )
        return order

    async def certificate(self, auth: Authenticated, rest: list[str]) -> Response:
        order, _ = await self._load_order(auth, rest)
        if order.status != "valid" or not order.serial:
            raise NotFoundResource("acme.certificate_unknown", "the order has no certificate yet")
        record, _ = await self.ca.store.get_record(order.serial)
        issuer_der = await self._issuer_der(record)
        pem = b"".join(
            x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
            for d in (record.certificate_der, issuer_der)
        )
        return Response(200, pem, PEM_CHAIN)

    async def _issuer_der(self, record: ca_pb2.CertificateRecord) -> bytes:
        for issuing in await self.ca.issuing_cas():
            if not record.issuer_key_id or issuing.key_id_hex == record.issuer_key_id:
                return issuing.cert.public_bytes(serialization.Encoding.DER)
        return (await self.ca.ca_certificates()).intermediate_certificate_der

    async def revoke(self, auth: Authenticated, _: list[str]) -> Response:
        der = jws.b64d(auth.payload.get("certificate"), "certificate")
        reason = auth.payload.get("reason", 0)
        if not isinstance(reason, int) or reason not in _REVOKE_REASONS:
            raise BadRevocationReason(
                "acme.revocation_reason_invalid", "reasons: 0, 1, 3, 4 or 5 (RFC 5280)"
            )
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise Malformed("acme.certificate_malformed", "certificate is not DER") from None
        serial = f"{cert.serial_number:X}"
        record = await self.ca.store.find_record(cert.serial_number)
        if record is None or record.certificate_der != der:
            raise NotFoundResource("acme.certificate_unknown", "this CA did not issue it")
        if auth.account is not None:
            if record.requester != f"acme:{auth.account.id}":
                raise Unauthorized(
                    "acme.not_your_certificate", "the certificate was issued to another account"
                )
            who = auth.account.id
        else:
            cert_key = cert.public_key()
            mine = isinstance(cert_key, jws.PublicKey) and jws.thumbprint(
                cert_key
            ) == jws.thumbprint(auth.key)
            if not mine:
                raise Unauthorized(
                    "acme.not_certificate_key", "the JWS key is not the certificate's key"
                )
            who = "certkey"
        if record.status == ca_pb2.CERTIFICATE_STATUS_REVOKED:
            raise AlreadyRevoked("cert.already_revoked", "the certificate is revoked already")
        await self._audit("acme.revoke", "ok", who, serial, reason=str(reason))
        try:
            await self.ca.revoke(
                ca_pb2.RevokeCertificateRequest(
                    serial=serial,
                    reason=_REVOKE_REASONS[reason],
                    requester=f"acme:{who}",
                    request_id=f"acme-revoke-{serial}",
                )
            )
        except AlreadyExists as exc:
            raise AlreadyRevoked(exc.reason, exc.message) from None
        except KMSError as exc:
            if exc.reason == "cert.already_revoked":
                raise AlreadyRevoked(exc.reason, exc.message) from None
            raise
        return Response(200, b"", "text/plain")


def _safe_id(text: str) -> bool:
    """Ids this server makes are URL-safe base64: nothing else reaches a KV key."""
    return 0 < len(text) <= 64 and all(c.isalnum() or c in "-_" for c in text)


class _AcmeHttp(HttpServer):
    """ca_service.http's server, speaking TLS, with every path handed to the ACME server
    and refusals of the HTTP layer (oversized bodies, slow or malformed heads) answered
    as problem documents."""

    def __init__(self, acme: AcmeServer, max_body: int) -> None:
        super().__init__({}, max_body)
        self.acme = acme
        # The SPIFFE bundle endpoint rides on this HTTPS listener (https_web profile):
        # the one place the CA already holds a server certificate its peers can check.
        self._spiffe_bundle = spiffe_bundle_handler(acme.ca)

    def refusal(self, status: int, reason: str) -> Response:
        problem = (
            TooLarge("acme.body_too_large", reason)
            if status == 413
            else Malformed("acme.http_malformed", reason)
        )
        response = self.acme._problem(problem)
        response.status = status
        response.headers["Replay-Nonce"] = self.acme.nonces.new()
        return response

    async def _respond(self, request: Request) -> Response:
        if request.path == SPIFFE_BUNDLE_PATH and request.method in ("GET", "HEAD"):
            response = await self._spiffe_bundle(request)
            response.headers.setdefault("Cache-Control", "no-store")
            return response
        return await self.acme.handle(request)
