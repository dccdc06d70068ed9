"""The SPIFFE trust domain in the mini-CA: its signing CA, registration entries, SVIDs.

Why here: the CA service already holds the root and talks to the token; a SPIFFE
signing CA is one more intermediate under that root (key `ca/spiffe`, EC P-256, in the
token), and the JWT-SVID key (`ca/spiffe-jwt`, ES256) is another token key. Nothing
private leaves the token; the SVID keys are made on the device (spiffe_agent), which
sends a CSR.

State in bucket kms_ca (sealed like every CA record):

    spiffe.config                        SpiffeState
    spiffe.entry.<node>.<entry id>       SpiffeEntry

An entry's KV key starts with its node, so one device's entries are read without the
others (a subject filter), and the entry for (node, SPIFFE ID) is one `get` when the
device asks for an SVID. SVIDs are not recorded per serial (they live an hour and are
never revoked: SPIFFE relies on short lifetimes); the broker's audit log has each one.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from ca_service import spiffe_bundle
from ca_service.builder import CAKey, build_intermediate, ca_name, random_serial, signing_hash
from ca_service.policy import PublicKey
from ca_service.store import parse_rfc3339, rfc3339
from edgekms import kvread
from edgekms import spiffe as sp
from edgekms.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KMSError,
    NotFound,
    PermissionDenied,
)
from edgekms.sealed import SealedKV
from edgekms.subjects import (
    SPIFFE_CA_KEY_NAME,
    SPIFFE_JWT_KEY_NAME,
    SPIFFE_MAX_GENERATION,
    spiffe_key_name,
)
from edgekms.v1 import ca_pb2
from edgekms.v1 import common_pb2 as pb

if TYPE_CHECKING:
    from ca_service.authority import CertificateAuthority

log = logging.getLogger(__name__)

CONFIG_KEY = "spiffe.config"
ENTRY_PREFIX = "spiffe.entry"
DEFAULT_CA_DAYS = 365
MAX_PAGE = 1000
MAX_AUDIENCES = 16
# An SVID starts this far in the past (a lagging clock), never more than a tenth of it.
BACKDATE = datetime.timedelta(seconds=30)
STATE_RECHECK_SECONDS = 5.0
MAX_FEDERATIONS = 64
# After a rotation the old key stays this long past the longest TTL of any entry: clocks
# and the agents' sync interval.
OVERLAP_MARGIN = 60
MAX_OVERLAP = sp.MAX_TTL + 86400
# A sweep of retired keys that failed (the token refusing) is not tried again sooner.
SWEEP_RETRY_SECONDS = 60.0


def node_token(node: str) -> str:
    """A device name as one KV key token: '.' (allowed in device names) becomes '=',
    which device names never hold."""
    return node.replace(".", "=")


def entry_key(node: str, eid: str) -> str:
    return f"{ENTRY_PREFIX}.{node_token(node)}.{eid}"


def _entry_place(key: str) -> tuple[str, str, str]:
    """(node, entry id, key) of an entry's KV key: its place in a listing."""
    token, _, eid = key[len(ENTRY_PREFIX) + 1 :].rpartition(".")
    return token.replace("=", "."), eid, key


@dataclass(frozen=True)
class _Endpoint:
    """Where a foreign bundle is read and how its endpoint is authenticated: `ca_pem`
    (https_web, empty: the system's roots) or `spiffe_id` (https_spiffe)."""

    url: str
    ca_pem: bytes
    spiffe_id: str


def _check_endpoint_id(td: str, text: str) -> str:
    """The https_spiffe endpoint's SPIFFE ID: a valid ID of the federated domain itself.
    The specification allows another domain's ID, but then the bootstrap bundle would
    be that domain's and the refresh would need it too; we keep one domain, one bundle."""
    if not text:
        raise InvalidArgument(
            "spiffe.endpoint_id_invalid", "https_spiffe needs the endpoint's SPIFFE ID"
        )
    parsed = sp.parse_id(text)
    if parsed.trust_domain != td:
        raise InvalidArgument(
            "spiffe.endpoint_id_invalid",
            f"the endpoint's SPIFFE ID must be in {td!r}, the domain federated",
            {"endpoint_spiffe_id": text[:200]},
        )
    return text


ENDPOINT_PATH = "/edgekms/bundle-endpoint"


def endpoint_spiffe_id(trust_domain: str) -> str:
    """The SPIFFE ID our `https_spiffe` bundle endpoint presents; peers configure it as
    their endpoint SPIFFE ID."""
    return f"spiffe://{trust_domain}{ENDPOINT_PATH}"


def _not_reserved(trust_domain: str, spiffe_id: str) -> None:
    """Our bundle endpoint's ID is the CA's own: an SVID of it, with a key a node holds,
    would let that node serve peers a bundle of its choosing over https_spiffe."""
    if spiffe_id == endpoint_spiffe_id(trust_domain):
        raise InvalidArgument(
            "spiffe.id_reserved",
            f"{spiffe_id} is the CA's own bundle endpoint's ID: no entry may have it",
            {"spiffe_id": spiffe_id},
        )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _spki(public: Any) -> bytes:
    return bytes(
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


class SpiffeAuthority:
    """The SPIFFE RPCs of the CA service (kms.ca.Spiffe*)."""

    def __init__(self, ca: CertificateAuthority):
        self.ca = ca
        self._state: tuple[ca_pb2.SpiffeState, int, float] | None = None
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeping = False
        self._sweep_after = 0.0  # after a failed sweep: not again before this (monotonic)

    # ---- the trust domain --------------------------------------------------------------

    async def _get_state(self) -> tuple[ca_pb2.SpiffeState, int] | None:
        try:
            entry = await self.ca.store.kv.get(CONFIG_KEY)
        except KeyNotFoundError:
            return None
        state = ca_pb2.SpiffeState()
        state.ParseFromString(entry.value)
        return state, int(entry.revision)

    async def state(self) -> ca_pb2.SpiffeState:
        cached = self._state
        if cached is not None and time.monotonic() - cached[2] < STATE_RECHECK_SECONDS:
            return cached[0]
        found = await self._get_state()
        if found is None:
            raise FailedPrecondition(
                "spiffe.not_initialized",
                "no SPIFFE trust domain yet: run `kmsctl spiffe init --trust-domain NAME`",
            )
        self._state = (found[0], found[1], time.monotonic())
        self._sweep_due(found[0])
        return found[0]

    async def init(self, req: ca_pb2.SpiffeInitRequest) -> ca_pb2.SpiffeInitResponse:
        td = sp.check_trust_domain(req.trust_domain)
        days = req.ca_validity_days or DEFAULT_CA_DAYS
        if not 1 <= days <= 3650:
            raise InvalidArgument("spiffe.validity_invalid", "the SPIFFE CA's days are 1..3650")
        ca = self.ca
        issuer = await ca.issuer()  # ca.not_initialized without a mini-CA
        if await self._get_state() is not None:
            raise AlreadyExists("spiffe.already_initialized", "a SPIFFE trust domain exists")
        provider = issuer.state.provider
        root_key = await ca.root_key()  # refused while ca/root is disabled
        new_keys = _NewKeys(ca, provider, td)
        try:
            ca_id, ca_pub_der = await new_keys.make(SPIFFE_CA_KEY_NAME)
            jwt_id, jwt_pub_der = await new_keys.make(SPIFFE_JWT_KEY_NAME)
            ca_public = serialization.load_der_public_key(ca_pub_der)
            assert isinstance(ca_public, PublicKey)
            cert = await asyncio.to_thread(
                functools.partial(build_intermediate, spiffe_id=f"spiffe://{td}"),
                root_key, issuer.root, ca_public, ca_name(f"SPIFFE {td}", "EdgeKMS"), days,
            )  # fmt: skip
            jwt_public = serialization.load_der_public_key(jwt_pub_der)
            assert isinstance(jwt_public, ec.EllipticCurvePublicKey)
            state = ca_pb2.SpiffeState(
                trust_domain=td,
                provider=provider,
                ca_key_id=ca_id,
                ca_certificate_der=cert.public_bytes(serialization.Encoding.DER),
                jwt_key_id=jwt_id,
                jwt_public_key_der=jwt_pub_der,
                jwt_kid=sp.jwt_kid(jwt_public),
                x509_authorities_der=[issuer.state.root_certificate_der],
                created_at=rfc3339(_now()),
                sequence=1,
            )
            try:
                await ca.store.kv.create(CONFIG_KEY, state.SerializeToString())
            except KeyWrongLastSequenceError:
                raise AlreadyExists(
                    "spiffe.already_initialized", "a SPIFFE trust domain exists"
                ) from None
        except BaseException:
            await new_keys.undo()  # nothing half-done: no key outlives a failed init
            raise
        self._state = None
        log.info("event=spiffe_initialized trust_domain=%s requester=%s", td, req.requester)
        return ca_pb2.SpiffeInitResponse(
            trust_domain=td, ca_certificate_der=state.ca_certificate_der, jwt_kid=state.jwt_kid
        )

    async def bundle(self, _: ca_pb2.SpiffeGetBundleRequest | None = None) -> ca_pb2.SpiffeBundle:
        state = await self.state()
        self._refresh_due(state)
        return _bundle(state)

    # ---- federation --------------------------------------------------------------------

    async def federate(self, req: ca_pb2.SpiffeFederateRequest) -> ca_pb2.SpiffeFederateResponse:
        td = sp.check_trust_domain(req.trust_domain)
        spiffe_bundle.check_url(req.bundle_url)
        if req.endpoint_ca_pem and (req.endpoint_spiffe_id or req.bootstrap_bundle):
            raise InvalidArgument(
                "spiffe.endpoint_profile_conflict",
                "--endpoint-ca (https_web) and --endpoint-spiffe-id/--bundle (https_spiffe) "
                "exclude each other",
            )
        if req.endpoint_ca_pem:
            try:
                x509.load_pem_x509_certificates(req.endpoint_ca_pem)
            except ValueError:
                raise InvalidArgument(
                    "spiffe.endpoint_ca_invalid", "the endpoint CA is not PEM certificates"
                ) from None
        authorities: list[bytes] = []
        if req.endpoint_spiffe_id or req.bootstrap_bundle:
            _check_endpoint_id(td, req.endpoint_spiffe_id)
            authorities = spiffe_bundle.parse_bootstrap(td, req.bootstrap_bundle)
        state = await self.state()
        if td == state.trust_domain:
            raise InvalidArgument("spiffe.trust_domain_own", "that is this KMS's trust domain")
        endpoint = _Endpoint(req.bundle_url, req.endpoint_ca_pem, req.endpoint_spiffe_id)
        federation = await self._read_foreign(td, endpoint, authorities)
        await self._store_federation(federation)
        log.info(
            "event=spiffe_federated trust_domain=%s url=%s profile=%s endpoint_id=%s "
            "sequence=%d requester=%s",
            td, req.bundle_url[:200], federation.endpoint_profile,
            federation.endpoint_spiffe_id, federation.sequence, req.requester,
        )  # fmt: skip
        return ca_pb2.SpiffeFederateResponse(federation=federation)

    async def _read_foreign(
        self, td: str, endpoint: _Endpoint, authorities: list[bytes]
    ) -> ca_pb2.SpiffeFederation:
        """Read and parse the bundle. `https_spiffe` authenticates the endpoint's SVID
        against `authorities` (the bootstrap bundle, then the last good one) and wants
        X.509 authorities in what it reads, or the next fetch could not be checked."""
        if endpoint.spiffe_id:
            data = await asyncio.to_thread(
                spiffe_bundle.fetch_spiffe, endpoint.url, authorities, endpoint.spiffe_id
            )
        else:
            data = await asyncio.to_thread(spiffe_bundle.fetch, endpoint.url, endpoint.ca_pem)
        federation = spiffe_bundle.parse(td, data)
        if endpoint.spiffe_id and not federation.x509_authorities_der:
            raise InvalidArgument(
                "spiffe.bundle_invalid",
                "an https_spiffe endpoint's bundle needs X.509 authorities to check the next "
                "fetch with",
            )
        federation.bundle_url = endpoint.url
        federation.endpoint_ca_pem = endpoint.ca_pem
        federation.endpoint_profile = (
            spiffe_bundle.HTTPS_SPIFFE if endpoint.spiffe_id else spiffe_bundle.HTTPS_WEB
        )
        federation.endpoint_spiffe_id = endpoint.spiffe_id
        federation.refreshed_at = rfc3339(_now())
        return federation

    async def _store_federation(
        self, federation: ca_pb2.SpiffeFederation, refresh: bool = False
    ) -> None:
        """Add or replace a federation; a background refresh (`refresh`) only replaces,
        so one finishing after `unfederate` does not bring the domain back."""
        for _ in range(10):
            found = await self._get_state()
            if found is None:
                raise FailedPrecondition("spiffe.not_initialized", "no SPIFFE trust domain yet")
            state, revision = found
            if refresh and all(
                f.trust_domain != federation.trust_domain for f in state.federations
            ):
                return
            kept = [f for f in state.federations if f.trust_domain != federation.trust_domain]
            if len(kept) >= MAX_FEDERATIONS:
                raise FailedPrecondition(
                    "spiffe.too_many_federations", f"at most {MAX_FEDERATIONS} trust domains"
                )
            del state.federations[:]
            state.federations.extend([*kept, federation])
            state.sequence += 1
            try:
                await self.ca.store.kv.update(CONFIG_KEY, state.SerializeToString(), last=revision)
            except KeyWrongLastSequenceError:
                continue
            self._state = None
            return
        raise FailedPrecondition("spiffe.state_changed", "the trust domain kept changing")

    def _refresh_due(self, state: ca_pb2.SpiffeState) -> None:
        """Start (in the background) a re-read of each foreign bundle past its hint."""
        now = _now()
        for f in state.federations:
            age = (now - parse_rfc3339(f.refreshed_at)).total_seconds() if f.refreshed_at else 1e9
            if age < f.refresh_hint_seconds or f.trust_domain in self._refreshing:
                continue
            self._refreshing.add(f.trust_domain)
            task = asyncio.create_task(self._refresh(f))
            self._tasks.add(task)  # a strong reference: the loop keeps only a weak one
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(functools.partial(_forget, self._refreshing, f.trust_domain))

    async def _refresh(self, old: ca_pb2.SpiffeFederation) -> None:
        try:
            endpoint = _Endpoint(old.bundle_url, old.endpoint_ca_pem, old.endpoint_spiffe_id)
            # https_spiffe: the last good bundle authenticates this fetch (a peer that
            # rotates publishes its new authority before its endpoint's SVID uses it).
            new = await self._read_foreign(
                old.trust_domain, endpoint, list(old.x509_authorities_der)
            )
            if (list(new.x509_authorities_der), new.jwks) == (
                list(old.x509_authorities_der),
                old.jwks,
            ):
                new.sequence = old.sequence  # unchanged: keep ours without a new sequence
            await self._store_federation(new, refresh=True)
            log.info("event=spiffe_federation_refreshed trust_domain=%s", old.trust_domain)
        except KMSError as exc:
            log.warning(
                "event=spiffe_federation_refresh_failed trust_domain=%s reason=%s",
                old.trust_domain, exc.reason,
            )  # fmt: skip

    async def unfederate(
        self, req: ca_pb2.SpiffeUnfederateRequest
    ) -> ca_pb2.SpiffeFederateResponse:
        """Stop trusting a foreign domain: its bundle leaves the next bundle read."""
        td = sp.check_trust_domain(req.trust_domain)
        for _ in range(10):
            found = await self._get_state()
            if found is None:
                raise FailedPrecondition("spiffe.not_initialized", "no SPIFFE trust domain yet")
            state, revision = found
            gone = [f for f in state.federations if f.trust_domain == td]
            if not gone:
                raise NotFound(
                    "spiffe.federation_not_found",
                    f"not federated with {td!r}",
                    {"trust_domain": td},
                )
            kept = [f for f in state.federations if f.trust_domain != td]
            del state.federations[:]
            state.federations.extend(kept)
            state.sequence += 1
            try:
                await self.ca.store.kv.update(CONFIG_KEY, state.SerializeToString(), last=revision)
            except KeyWrongLastSequenceError:
                continue
            self._state = None
            log.info("event=spiffe_unfederated trust_domain=%s requester=%s", td, req.requester)
            return ca_pb2.SpiffeFederateResponse(federation=gone[0])
        raise FailedPrecondition("spiffe.state_changed", "the trust domain kept changing")

    # ---- rotation ----------------------------------------------------------------------

    async def _default_overlap(self, jwt: bool) -> int:
        """The longest lifetime an SVID of the rotated kind may have now, plus a margin:
        every SVID the old key signed has expired by then."""
        entries = await self._entries(f"{ENTRY_PREFIX}.>")
        if jwt:
            longest = max((e.jwt_ttl_seconds or sp.DEFAULT_JWT_TTL for e, _ in entries), default=0)
            longest = max(longest, sp.DEFAULT_JWT_TTL)
        else:
            longest = max((e.ttl_seconds or sp.DEFAULT_X509_TTL for e, _ in entries), default=0)
            longest = max(longest, sp.DEFAULT_X509_TTL)
        return int(longest) + OVERLAP_MARGIN

    async def rotate(self, req: ca_pb2.SpiffeRotateRequest) -> ca_pb2.SpiffeRotateResponse:
        """New signing CA and/or JWT key in the token; the old ones retire, the JWT key
        staying in the bundle until drop_at. Nothing half-done: on any failure the new
        keys are destroyed and forgotten and the state is as it was."""
        if not (req.x509 or req.jwt):
            raise InvalidArgument(
                "spiffe.rotate_nothing", "rotate the X.509 CA, the JWT key or both"
            )
        if req.overlap_set and req.overlap_seconds > MAX_OVERLAP:
            raise InvalidArgument(
                "spiffe.overlap_invalid", f"the overlap is at most {MAX_OVERLAP} seconds"
            )
        days = req.ca_validity_days or DEFAULT_CA_DAYS
        if not 1 <= days <= 3650:
            raise InvalidArgument("spiffe.validity_invalid", "the SPIFFE CA's days are 1..3650")
        ca = self.ca
        found = await self._get_state()
        if found is None:
            raise FailedPrecondition(
                "spiffe.not_initialized",
                "no SPIFFE trust domain yet: run `kmsctl spiffe init --trust-domain NAME`",
            )
        state, revision = found
        generation = max(state.generation, 1) + 1
        if generation > SPIFFE_MAX_GENERATION:
            raise FailedPrecondition(
                "spiffe.generations_exhausted", f"at most {SPIFFE_MAX_GENERATION} generations"
            )
        issuer = await ca.issuer()
        root_key = await ca.root_key() if req.x509 else None  # refused while ca/root is off
        provider = state.provider
        now = _now()
        new_keys = _NewKeys(ca, provider, state.trust_domain)
        retired: list[ca_pb2.SpiffeRetiredKey] = []
        try:
            if req.x509:
                assert root_key is not None
                overlap = (
                    req.overlap_seconds if req.overlap_set else await self._default_overlap(False)
                )
                label = spiffe_key_name(False, generation)
                key_id, public_der = await new_keys.make(label)
                public = serialization.load_der_public_key(public_der)
                assert isinstance(public, PublicKey)
                cert = await asyncio.to_thread(
                    functools.partial(
                        build_intermediate, spiffe_id=f"spiffe://{state.trust_domain}"
                    ),
                    root_key, issuer.root, public,
                    ca_name(f"SPIFFE {state.trust_domain} {generation}", "EdgeKMS"), days,
                )  # fmt: skip
                retired.append(
                    ca_pb2.SpiffeRetiredKey(
                        jwt=False,
                        key_label=state.ca_key_label or SPIFFE_CA_KEY_NAME,
                        key_id=state.ca_key_id,
                        ca_certificate_der=state.ca_certificate_der,
                        retired_at=rfc3339(now),
                        drop_at=rfc3339(now + datetime.timedelta(seconds=overlap)),
                    )
                )
                state.ca_key_id = key_id
                state.ca_certificate_der = cert.public_bytes(serialization.Encoding.DER)
                state.ca_key_label = label
            if req.jwt:
                overlap = (
                    req.overlap_seconds if req.overlap_set else await self._default_overlap(True)
                )
                label = spiffe_key_name(True, generation)
                key_id, public_der = await new_keys.make(label)
                jwt_public = serialization.load_der_public_key(public_der)
                assert isinstance(jwt_public, ec.EllipticCurvePublicKey)
                retired.append(
                    ca_pb2.SpiffeRetiredKey(
                        jwt=True,
                        key_label=state.jwt_key_label or SPIFFE_JWT_KEY_NAME,
                        key_id=state.jwt_key_id,
                        public_key_der=state.jwt_public_key_der,
                        jwt_kid=state.jwt_kid,
                        retired_at=rfc3339(now),
                        drop_at=rfc3339(now + datetime.timedelta(seconds=overlap)),
                    )
                )
                state.jwt_key_id = key_id
                state.jwt_public_key_der = public_der
                state.jwt_kid = sp.jwt_kid(jwt_public)
                state.jwt_key_label = label
            # Retired keys past their overlap stay listed until the sweep has destroyed
            # them in the token (_sweep_retired); the bundle already leaves them out.
            state.retired.extend(retired)
            state.generation = generation
            state.sequence += 1
            try:
                await ca.store.kv.update(CONFIG_KEY, state.SerializeToString(), last=revision)
            except KeyWrongLastSequenceError:
                raise FailedPrecondition(
                    "spiffe.state_changed", "the trust domain changed meanwhile: try again"
                ) from None
        except BaseException:
            await new_keys.undo()  # nothing half-done: no new key outlives a failure
            log.warning(
                "event=spiffe_rotate_failed trust_domain=%s generation=%d requester=%s",
                state.trust_domain, generation, req.requester,
            )  # fmt: skip
            raise
        self._state = None
        for r in retired:
            log.info(
                "event=spiffe_rotated trust_domain=%s kind=%s generation=%d old_key=%s "
                "drop_at=%s requester=%s",
                state.trust_domain, "jwt" if r.jwt else "x509", generation, r.key_label,
                r.drop_at, req.requester,
            )  # fmt: skip
        return ca_pb2.SpiffeRotateResponse(
            generation=generation,
            ca_certificate_der=state.ca_certificate_der,
            jwt_kid=state.jwt_kid,
            retired=retired,
        )

    def _sweep_due(self, state: ca_pb2.SpiffeState) -> None:
        """Start (in the background) the destruction of retired keys past drop_at."""
        now = _now()
        if self._sweeping or time.monotonic() < self._sweep_after:
            return
        if not any(parse_rfc3339(r.drop_at) <= now for r in state.retired):
            return
        self._sweeping = True
        task = asyncio.create_task(self._sweep_retired())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._swept)

    def _swept(self, _: object) -> None:
        self._sweeping = False

    async def _sweep_retired(self) -> None:
        """Destroy in the token each retired key whose overlap has passed, mark its
        registry record destroyed, then drop it from spiffe.config.

        Why: a rotated-out key signs nothing more (the X.509 SVIDs it signed chain to
        the root through the old CA certificate; the JWT-SVIDs it signed have expired by
        drop_at), so keeping it only keeps something to steal, and a rotation meant for
        a key thought compromised should end with that key gone. The token is asked
        first and strictly: a key it cannot destroy now stays listed and is tried again
        at the next sweep; the state is compare-and-set, so one CA instance of several
        drops the records (destroying twice is harmless: a missing key is fine)."""
        ca = self.ca
        try:
            for _ in range(10):
                found = await self._get_state()
                if found is None:
                    return
                state, revision = found
                now = _now()
                due = [r for r in state.retired if parse_rfc3339(r.drop_at) <= now]
                if not due:
                    return
                for r in due:
                    await ca.keys.destroy(state.provider, r.key_id, strict=True)
                    if ca.registry is not None:
                        await ca.registry.mark_destroyed(r.key_label)
                kept = [r for r in state.retired if parse_rfc3339(r.drop_at) > now]
                del state.retired[:]
                state.retired.extend(kept)
                try:
                    await ca.store.kv.update(CONFIG_KEY, state.SerializeToString(), last=revision)
                except KeyWrongLastSequenceError:
                    continue
                self._state = None
                for r in due:
                    log.info(
                        "event=spiffe_retired_key_destroyed trust_domain=%s kind=%s key=%s "
                        "drop_at=%s",
                        state.trust_domain, "jwt" if r.jwt else "x509", r.key_label, r.drop_at,
                    )  # fmt: skip
                return
        except KMSError as exc:
            self._sweep_after = time.monotonic() + SWEEP_RETRY_SECONDS
            log.warning("event=spiffe_retired_sweep_failed reason=%s", exc.reason)
        except Exception as exc:  # the bus away: tried again at a later sweep
            self._sweep_after = time.monotonic() + SWEEP_RETRY_SECONDS
            log.warning("event=spiffe_retired_sweep_failed reason=%s", type(exc).__name__)

    # ---- entries -----------------------------------------------------------------------

    async def create_entry(
        self, req: ca_pb2.SpiffeCreateEntryRequest
    ) -> ca_pb2.SpiffeEntryResponse:
        parsed = sp.parse_id(req.spiffe_id, require_path=True)
        node = sp.check_node(req.node)
        selectors = sp.check_selectors(list(req.selectors))
        sp.check_ttl(req.ttl_seconds)
        sp.check_ttl(req.jwt_ttl_seconds, "JWT ttl")
        state = await self.state()
        if parsed.trust_domain != state.trust_domain:
            raise InvalidArgument(
                "spiffe.trust_domain_mismatch",
                f"this KMS's trust domain is {state.trust_domain!r}, not {parsed.trust_domain!r}",
                {"trust_domain": parsed.trust_domain},
            )
        spiffe_id = str(parsed)
        _not_reserved(state.trust_domain, spiffe_id)
        entry = ca_pb2.SpiffeEntry(
            entry_id=sp.entry_id(node, spiffe_id),
            spiffe_id=spiffe_id,
            node=node,
            selectors=selectors,
            ttl_seconds=req.ttl_seconds or sp.DEFAULT_X509_TTL,
            jwt_ttl_seconds=req.jwt_ttl_seconds or sp.DEFAULT_JWT_TTL,
            created_at=rfc3339(_now()),
            created_by=req.requester,
        )
        try:
            await self.ca.store.kv.create(
                entry_key(node, entry.entry_id), entry.SerializeToString()
            )
        except KeyWrongLastSequenceError:
            raise AlreadyExists(
                "spiffe.entry_exists",
                f"{spiffe_id} has an entry for node {node!r} already: delete it first",
                {"entry_id": entry.entry_id},
            ) from None
        log.info(
            "event=spiffe_entry_created entry_id=%s spiffe_id=%s node=%s requester=%s",
            entry.entry_id, spiffe_id, node, req.requester,
        )  # fmt: skip
        return ca_pb2.SpiffeEntryResponse(entry=entry)

    async def _entries(self, keys: str) -> list[tuple[ca_pb2.SpiffeEntry, int]]:
        store = self.ca.store
        entries, _ = await kvread.snapshot(store.js, store.bucket, keys)
        out = []
        for raw in entries:
            if not raw.value or kvread.is_removal(raw):
                continue
            opened = store.kv.open_entry(raw) if isinstance(store.kv, SealedKV) else raw
            entry = ca_pb2.SpiffeEntry()
            entry.ParseFromString(opened.value or b"")
            out.append((entry, int(raw.revision or 0)))
        return out

    async def _find(self, eid: str) -> tuple[ca_pb2.SpiffeEntry, int]:
        if not (len(eid) == 32 and all(c in "0123456789abcdef" for c in eid)):
            raise InvalidArgument("spiffe.entry_id_invalid", "an entry id is 32 hex digits")
        found = await self._entries(f"{ENTRY_PREFIX}.*.{eid}")
        if not found:
            raise NotFound("spiffe.entry_not_found", f"no entry {eid}", {"entry_id": eid})
        return found[0]

    async def get_entry(self, req: ca_pb2.SpiffeGetEntryRequest) -> ca_pb2.SpiffeEntryResponse:
        return ca_pb2.SpiffeEntryResponse(entry=(await self._find(req.entry_id))[0])

    async def list_entries(
        self, req: ca_pb2.SpiffeListEntriesRequest
    ) -> ca_pb2.SpiffeListEntriesResponse:
        size = req.page_size or MAX_PAGE
        if size > MAX_PAGE:
            raise InvalidArgument("spiffe.page_size_invalid", f"at most {MAX_PAGE} a page")
        keys = (
            f"{ENTRY_PREFIX}.{node_token(sp.check_node(req.node))}.>"
            if req.node
            else f"{ENTRY_PREFIX}.>"
        )
        # The keys alone say each entry's place in the order (node, entry id): read them
        # without values, then get and unseal only this page's entries. Reading every
        # value for every page made a listing of 50,000 entries 50 full reads, each
        # near the broker's 10 s ceiling on a busy board.
        store = self.ca.store
        order = sorted(
            _entry_place(k) for k in await kvread.live_keys(store.js, store.bucket, keys)
        )
        after = req.page_token
        if after:
            order = [p for p in order if f"{p[0]}.{p[1]}" > after]
        chosen = order[:size]
        limit = asyncio.Semaphore(64)

        async def read(key: str) -> ca_pb2.SpiffeEntry | None:
            async with limit:
                try:
                    raw = await store.kv.get(key)
                except KeyNotFoundError:
                    return None  # deleted since the keys were read
            if not raw.value:
                return None
            entry = ca_pb2.SpiffeEntry()
            entry.ParseFromString(raw.value)
            return entry

        found = await asyncio.gather(*(read(key) for _, _, key in chosen))
        page = [e for e in found if e is not None]
        token = f"{chosen[-1][0]}.{chosen[-1][1]}" if len(order) > size else ""
        return ca_pb2.SpiffeListEntriesResponse(entries=page, next_page_token=token)

    async def delete_entry(
        self, req: ca_pb2.SpiffeDeleteEntryRequest
    ) -> ca_pb2.SpiffeEntryResponse:
        entry, revision = await self._find(req.entry_id)
        try:
            await self.ca.store.kv.delete(entry_key(entry.node, entry.entry_id), last=revision)
        except KeyWrongLastSequenceError:
            raise FailedPrecondition(
                "spiffe.entry_changed", "the entry changed meanwhile: try again"
            ) from None
        log.info(
            "event=spiffe_entry_deleted entry_id=%s spiffe_id=%s node=%s requester=%s",
            entry.entry_id, entry.spiffe_id, entry.node, req.requester,
        )  # fmt: skip
        return ca_pb2.SpiffeEntryResponse(entry=entry)

    async def _entry_for(self, node: str, spiffe_id: str) -> ca_pb2.SpiffeEntry:
        """The entry that lets `node` hold `spiffe_id`; PermissionDenied otherwise (one
        answer for "no such entry" and "another node's entry": a device learns nothing
        about other nodes)."""
        sp.check_node(node)
        canonical = str(sp.parse_id(spiffe_id, require_path=True))
        try:
            raw = await self.ca.store.kv.get(entry_key(node, sp.entry_id(node, canonical)))
        except KeyNotFoundError:
            raise _not_entitled(node, canonical) from None
        entry = ca_pb2.SpiffeEntry()
        entry.ParseFromString(raw.value)
        if entry.node != node or entry.spiffe_id != canonical:
            raise _not_entitled(node, canonical)
        return entry

    # ---- SVIDs -------------------------------------------------------------------------

    def _ca_key(self, state: ca_pb2.SpiffeState, cert: x509.Certificate) -> CAKey:
        return self.ca.keys.signing_key(state.provider, state.ca_key_id, _spki(cert.public_key()))

    async def sign_x509(
        self, req: ca_pb2.SpiffeSignX509SvidRequest
    ) -> ca_pb2.SpiffeSignX509SvidResponse:
        state = await self.state()
        _not_reserved(state.trust_domain, req.spiffe_id)
        entry = await self._entry_for(req.node, req.spiffe_id)
        public = _csr_key(req.csr)
        await self.ca._require_active(state.ca_key_label or SPIFFE_CA_KEY_NAME)
        ca_cert = x509.load_der_x509_certificate(state.ca_certificate_der)
        key = self._ca_key(state, ca_cert)
        ttl = datetime.timedelta(seconds=entry.ttl_seconds or sp.DEFAULT_X509_TTL)
        cert = await asyncio.to_thread(build_svid, key, ca_cert, public, entry.spiffe_id, ttl)
        log.info(
            "event=spiffe_x509_svid_signed spiffe_id=%s node=%s serial=%X not_after=%s",
            entry.spiffe_id, req.node, cert.serial_number, cert.not_valid_after_utc.isoformat(),
        )  # fmt: skip
        return ca_pb2.SpiffeSignX509SvidResponse(
            certificate_der=cert.public_bytes(serialization.Encoding.DER),
            intermediates_der=[state.ca_certificate_der],
            bundle=_bundle(state),
        )

    async def sign_endpoint_svid(
        self, public: PublicKey, ttl: datetime.timedelta
    ) -> tuple[x509.Certificate, bytes]:
        """The X509-SVID of our own bundle endpoint (`https_spiffe`,
        spiffe://<td>/edgekms/bundle-endpoint), with the signing CA's certificate that
        chains it to the bundle. No registration entry: it is the CA's own identity, its
        key made in the CA process, never requested by a node."""
        state = await self.state()
        await self.ca._require_active(state.ca_key_label or SPIFFE_CA_KEY_NAME)
        ca_cert = x509.load_der_x509_certificate(state.ca_certificate_der)
        key = self._ca_key(state, ca_cert)
        spiffe_id = endpoint_spiffe_id(state.trust_domain)
        cert = await asyncio.to_thread(build_svid, key, ca_cert, public, spiffe_id, ttl)
        log.info(
            "event=spiffe_endpoint_svid_signed spiffe_id=%s serial=%X not_after=%s",
            spiffe_id, cert.serial_number, cert.not_valid_after_utc.isoformat(),
        )  # fmt: skip
        return cert, state.ca_certificate_der

    async def sign_jwt(
        self, req: ca_pb2.SpiffeSignJwtSvidRequest
    ) -> ca_pb2.SpiffeSignJwtSvidResponse:
        state = await self.state()
        entry = await self._entry_for(req.node, req.spiffe_id)
        audience = list(req.audience)
        if not audience or len(audience) > MAX_AUDIENCES:
            raise InvalidArgument(
                "spiffe.audience_invalid", f"a JWT-SVID needs 1..{MAX_AUDIENCES} audiences"
            )
        for aud in audience:
            if not aud or len(aud) > 256:
                raise InvalidArgument("spiffe.audience_invalid", "an audience is 1..256 chars")
        await self.ca._require_active(state.jwt_key_label or SPIFFE_JWT_KEY_NAME)
        now = int(time.time())
        expires = now + (entry.jwt_ttl_seconds or sp.DEFAULT_JWT_TTL)
        header = {"alg": "ES256", "kid": state.jwt_kid, "typ": "JWT"}
        claims: dict[str, Any] = {
            "sub": entry.spiffe_id,
            "aud": audience,
            "exp": expires,
            "iat": now,
        }
        signing_input = sp.jwt_signing_input(header, claims)
        key = self.ca.keys.signing_key(state.provider, state.jwt_key_id, state.jwt_public_key_der)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        der = await asyncio.to_thread(key.sign, signing_input, ec.ECDSA(hashes.SHA256()))
        token = f"{signing_input.decode()}.{sp.b64url(sp.der_to_jose(der))}"
        log.info(
            "event=spiffe_jwt_svid_signed spiffe_id=%s node=%s audiences=%d",
            entry.spiffe_id, req.node, len(audience),
        )  # fmt: skip
        return ca_pb2.SpiffeSignJwtSvidResponse(
            token=token, expires_at=rfc3339(datetime.datetime.fromtimestamp(expires, datetime.UTC))
        )


class _NewKeys:
    """The keys one `spiffe init` or `spiffe rotate` makes in the token (EC P-256), each
    recorded in the key registry as the CA's; `undo` destroys and forgets all of them,
    so a failure half-way leaves nothing behind."""

    def __init__(self, ca: CertificateAuthority, provider: str, trust_domain: str) -> None:
        self.ca = ca
        self.provider = provider
        self.trust_domain = trust_domain
        self.made: list[bytes] = []
        self.recorded: dict[str, int] = {}

    async def make(self, label: str) -> tuple[bytes, bytes]:
        """(key id, SubjectPublicKeyInfo DER) of a new key named `label`."""
        ca, provider = self.ca, self.provider
        key_id, public_der = await ca.keys.generate(provider, label, pb.KEY_TYPE_EC_P256)
        self.made.append(key_id)
        if ca.registry is not None:

            async def destroy() -> None:  # the registry's own undo when recording fails
                self.made.remove(key_id)
                await ca.keys.destroy(provider, key_id)

            self.recorded[label] = await ca.registry.record(
                label, provider, pb.KEY_TYPE_EC_P256, key_id, public_der, destroy,
                {"purpose": label, "trust_domain": self.trust_domain},
            )  # fmt: skip
        return key_id, public_der

    async def undo(self) -> None:
        for key_id in list(self.made):
            await self.ca.keys.destroy(self.provider, key_id)
        if self.ca.registry is not None:
            for label, revision in self.recorded.items():
                await self.ca.registry.forget(label, revision)


def _forget(refreshing: set[str], td: str, _: object) -> None:
    refreshing.discard(td)


def _not_entitled(node: str, spiffe_id: str) -> PermissionDenied:
    return PermissionDenied(
        "spiffe.not_entitled",
        f"no entry gives {spiffe_id[:120]} to node {node!r}",
        {"node": node, "spiffe_id": spiffe_id[:120]},
    )


def _bundle(state: ca_pb2.SpiffeState) -> ca_pb2.SpiffeBundle:
    public = serialization.load_der_public_key(state.jwt_public_key_der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    keys = [sp.jwk_of(public, state.jwt_kid, "jwt-svid")]
    # A rotated-out JWT key validates the tokens it signed until its drop_at.
    now = _now()
    for old in state.retired:
        if old.jwt and parse_rfc3339(old.drop_at) > now:
            old_public = serialization.load_der_public_key(old.public_key_der)
            assert isinstance(old_public, ec.EllipticCurvePublicKey)
            keys.append(sp.jwk_of(old_public, old.jwt_kid, "jwt-svid"))
    jwks = {"keys": keys}
    return ca_pb2.SpiffeBundle(
        trust_domain=state.trust_domain,
        x509_authorities_der=list(state.x509_authorities_der),
        jwks=json.dumps(jwks, separators=(",", ":")).encode(),
        sequence=state.sequence,
        signing_ca_der=state.ca_certificate_der,
        federated=[
            ca_pb2.SpiffeBundle(
                trust_domain=f.trust_domain,
                x509_authorities_der=list(f.x509_authorities_der),
                jwks=f.jwks,
                sequence=f.sequence,
            )
            for f in state.federations
        ],
    )


def _csr_key(csr_der: bytes) -> PublicKey:
    """The CSR's public key, once its self-signature proves the requester holds it."""
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except ValueError:
        raise InvalidArgument("csr.malformed", "the CSR is not PKCS#10 DER") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature):
        valid = False
    if not valid:
        raise InvalidArgument("csr.signature_invalid", "the CSR's signature does not verify")
    public = csr.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name not in ("secp256r1", "secp384r1"):
            raise InvalidArgument("spiffe.key_unsupported", "EC keys are P-256 or P-384")
    elif isinstance(public, rsa.RSAPublicKey):
        if public.key_size < 2048:
            raise InvalidArgument("spiffe.key_unsupported", "RSA keys need 2048 bits at least")
    elif not isinstance(public, ed25519.Ed25519PublicKey):
        raise InvalidArgument("spiffe.key_unsupported", "EC, RSA or Ed25519 keys only")
    return public


def build_svid(
    ca_key: CAKey,
    ca_cert: x509.Certificate,
    public: PublicKey,
    spiffe_id: str,
    ttl: datetime.timedelta,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """An X.509-SVID as the X509-SVID specification has it: exactly one URI SAN (the
    SPIFFE ID), CA:FALSE, digitalSignature (keyEncipherment too for RSA), no keyCertSign
    or cRLSign, serverAuth + clientAuth; ending no later than its CA."""
    now = now or _now()
    backdate = min(BACKDATE, ttl / 10)
    not_before = now - backdate
    not_after = min(not_before + ttl, ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise FailedPrecondition("spiffe.ca_expired", "the SPIFFE signing CA has expired")
    is_rsa = isinstance(public, rsa.RSAPublicKey)
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EdgeKMS")]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return builder.sign(ca_key, signing_hash(ca_key))
