"""The CA's operations (init, issue, renew, revoke, list, CRL, OCSP) over its store and
its keys, as the NATS service and the HTTP side both need them.

Signing runs on worker threads (the key's sign() blocks on the crypto service); every
certificate's record is stored before the certificate is returned, and every refusal is
a typed error raised before anything is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_service import hierarchy
from ca_service import ocsp as ocsp_mod
from ca_service.builder import (
    CAKey,
    CaUrls,
    build_intermediate,
    build_root,
    ca_name,
    key_id_hex,
    random_serial,
    serial_hex,
)
from ca_service.catalog import Catalog
from ca_service.crl import CRL_VALIDITY, REASON_FLAGS, EntryCache, Revocation, build_crl
from ca_service.crlstore import CRLJobs, CRLStore
from ca_service.hierarchy import IssuingCA
from ca_service.leafsign import LeafSigner
from ca_service.listing import Query
from ca_service.policy import IssuePlan, PublicKey, load_csr, make_plan, plan_from_csr
from ca_service.profiles import BUILTIN_PROFILES, Profile, get_profile
from ca_service.signer import KeyBackend
from ca_service.store import CAStore, parse_rfc3339, rfc3339
from edgekms import nameconstraints as constraints
from edgekms.algorithms import KEY_TYPES
from edgekms.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    KMSError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from edgekms.renewal_proof import verify_renewal
from edgekms.subjects import PROVIDER_ID_RE
from edgekms.v1 import ca_pb2
from edgekms.v1 import common_pb2 as pb

log = logging.getLogger(__name__)

ROOT_LABEL = hierarchy.ROOT_LABEL
INTERMEDIATE_LABEL = hierarchy.INTERMEDIATE_LABEL
# How long a CA replica trusts its cached view of the CA state: another replica may
# have rotated or revoked the intermediate meanwhile.
ISSUER_RECHECK_SECONDS = 5.0
# The CRL is rebuilt when less than this is left before its nextUpdate.
CRL_REFRESH_MARGIN = datetime.timedelta(days=3)
_REQUESTER_MAX = 256
# Serials a prune names in its answer (it may remove many more).
_PRUNE_NAMED = 100
_PRUNE_MAX_DAYS = 36500
# How long a listing waits for the catalog to catch up before answering Unavailable:
# below the broker's 10 s deadline for CA calls.
CATALOG_WAIT = 6.0
# How long GetCRL and /crl wait for a CRL build in progress.
CRL_WAIT = 7.0


def request_serial(secret: bytes, requester: str, request_id: str) -> int:
    """The serial for one requester's request id: 128 bits of HMAC-SHA256 keyed with the
    intermediate's key id (never published in a certificate), so serials stay
    unpredictable to requesters and a retry of the same request lands on the same one."""
    mac = hmac.new(secret, f"{requester}\0{request_id}".encode(), hashlib.sha256).digest()
    return int.from_bytes(mac[:16], "big") or 1


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _same_request(stored: ca_pb2.CertificateRecord, fresh: ca_pb2.CertificateRecord) -> bool:
    """Whether a retry asks for what the stored certificate certifies: the same profile,
    subject, names, lifetime and public key (the stored one's dates are from its own
    issuance, so the lifetime is compared, not the dates)."""

    def lifetime(r: ca_pb2.CertificateRecord) -> datetime.timedelta:
        return parse_rfc3339(r.not_after) - parse_rfc3339(r.not_before)

    def spki(r: ca_pb2.CertificateRecord) -> bytes:
        return (
            x509.load_der_x509_certificate(r.certificate_der)
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    return (
        (stored.profile, stored.subject, list(stored.sans), stored.renewed_from)
        == (fresh.profile, fresh.subject, list(fresh.sans), fresh.renewed_from)
        and lifetime(stored) == lifetime(fresh)
        and spki(stored) == spki(fresh)
    )


class CAKeyRegistry(Protocol):
    """The key registry as the CA uses it (edgekms.registry_record.RegistryKeys): its keys
    are recorded there, so `kmsctl key disable ca/root` reaches the CA too."""

    async def record(
        self,
        name: str,
        provider: str,
        key_type: pb.KeyType.ValueType,
        key_id: bytes,
        public_key_der: bytes,
        destroy: Callable[[], Awaitable[None]],
        labels: Mapping[str, str] | None = None,
    ) -> int: ...

    async def forget(self, name: str, revision: int) -> None: ...

    async def set_state(self, name: str, revision: int, state: pb.KeyState.ValueType) -> int: ...

    async def require_active(self, name: str) -> pb.KeyRecord: ...

    async def mark_destroyed(self, name: str) -> bool: ...


@dataclass
class _Issuer:
    state: ca_pb2.CAState
    cert: x509.Certificate
    root: x509.Certificate
    key: CAKey
    # The same key for leaves, signed on the event loop (ca_service.leafsign).
    leaf: LeafSigner
    revision: int = 0
    loaded_at: float = 0.0

    @property
    def label(self) -> str:
        """The current intermediate's name in the key registry."""
        return hierarchy.current_label(self.state)

    @property
    def key_id_hex(self) -> str:
        return key_id_hex(self.cert)

    @property
    def revoked(self) -> bool:
        return f"{self.cert.serial_number:X}" in hierarchy.revoked_serials(self.state)


class CertificateAuthority:
    def __init__(
        self,
        store: CAStore,
        keys: KeyBackend,
        profiles: dict[str, Profile] | None = None,
        urls: CaUrls = CaUrls(),  # noqa: B008 - frozen dataclass
        new_serial: Callable[[], int] = random_serial,
        registry: CAKeyRegistry | None = None,
        crl_validity: datetime.timedelta = CRL_VALIDITY,
    ):
        self.store = store
        # How long each intermediate CRL is good for (ca.toml crl_lifetime), and how much
        # of it may be left before it is rebuilt: never more than half, so a CRL of
        # minutes (devices whose agent keeps crl-verify files fresh) is rebuilt in time.
        self.crl_validity = crl_validity
        self.crl_refresh_margin = min(CRL_REFRESH_MARGIN, crl_validity / 2)
        self.registry = registry
        self.keys = keys
        self.profiles = dict(profiles or BUILTIN_PROFILES)
        self.urls = urls
        self._new_serial = new_serial
        self._issuer: _Issuer | None = None
        # Listing and CRLs read the in-memory catalog, not the whole bucket.
        self.catalog = Catalog(store.js, store.bucket, store.open_entry)
        self.crls = CRLStore(store.kv)
        self.crl_jobs = CRLJobs(self._build_crl)
        self._crl_entries = EntryCache()
        self._crl_lock = asyncio.Lock()
        self._catching_up: asyncio.Task[None] | None = None

    # ---- the CA itself -------------------------------------------------------------------

    async def init(self, req: ca_pb2.InitCARequest) -> ca_pb2.InitCAResponse:
        if not PROVIDER_ID_RE.match(req.provider):
            raise InvalidArgument("ca.provider_invalid", f"{req.provider!r} is not a provider id")
        if req.key_type not in KEY_TYPES:
            raise InvalidArgument("key.type_unknown", "choose the CA key type")
        if KEY_TYPES[req.key_type].family == "rsa" and KEY_TYPES[req.key_type].bits < 2048:
            raise InvalidArgument("ca.weak_key", "RSA CA keys need 2048 bits at least")
        if not req.common_name.strip():
            raise InvalidArgument("ca.name_missing", "the CA needs a common name")
        root_days = req.root_validity_days or 7300
        int_days = req.intermediate_validity_days or 1825
        if not 1 <= int_days < root_days <= 36500:
            raise InvalidArgument(
                "ca.validity_invalid", "the intermediate must end before the root"
            )
        name_constraints = constraints.build(req.name_constraints)
        if await self.store.get_state() is not None:
            raise AlreadyExists("ca.already_initialized", "this CA exists already")

        made: list[bytes] = []
        recorded: dict[str, int] = {}
        signed: list[str] = []  # KV keys of what the root signed: removed on failure

        async def record(label: str, key_id: bytes, public_der: bytes) -> None:
            if self.registry is None:
                return

            async def destroy() -> None:
                made.remove(key_id)
                await self.keys.destroy(req.provider, key_id)

            recorded[label] = await self.registry.record(
                label, req.provider, req.key_type, key_id, public_der, destroy, {"purpose": label}
            )

        try:
            root_id, root_pub = await self.keys.generate(req.provider, ROOT_LABEL, req.key_type)
            made.append(root_id)
            await record(ROOT_LABEL, root_id, root_pub)
            int_id, int_pub = await self.keys.generate(
                req.provider, INTERMEDIATE_LABEL, req.key_type
            )
            made.append(int_id)
            await record(INTERMEDIATE_LABEL, int_id, int_pub)
            await self._require_active(ROOT_LABEL)
            root_key = self.keys.signing_key(req.provider, root_id, root_pub)
            int_public = serialization.load_der_public_key(int_pub)
            assert isinstance(int_public, PublicKey)
            org = req.organization.strip()
            cn = req.common_name.strip()
            root = await asyncio.to_thread(build_root, root_key, ca_name(cn, org), root_days)
            inter = await asyncio.to_thread(
                build_intermediate,
                root_key,
                root,
                int_public,
                ca_name(f"{cn} Issuing CA", org),
                int_days,
                name_constraints=name_constraints,
                urls=self.urls,
            )
            state = ca_pb2.CAState(
                provider=req.provider,
                key_type=req.key_type,
                root_key_id=root_id,
                intermediate_key_id=int_id,
                root_certificate_der=_der(root),
                intermediate_certificate_der=_der(inter),
                root_key_disabled=req.disable_root,
                created_at=rfc3339(_now()),
            )
            # Signed now, while the root is in use: the root key may be disabled next.
            signed += [hierarchy.root_crl_key(root), *hierarchy.ocsp_cache_keys(state)]
            await hierarchy.build_root_crl(self.store, root_key, root, state)
            if req.disable_root and self.registry is not None:
                recorded[ROOT_LABEL] = await self.registry.set_state(
                    ROOT_LABEL, recorded[ROOT_LABEL], pb.KEY_STATE_DISABLED
                )
            await self.store.create_state(state)
        except BaseException:
            for key in signed:  # this root's CRL and OCSP answers (no other root's)
                with contextlib.suppress(Exception):
                    await self.store.kv.delete(key)
            for key_id in list(made):  # nothing half-done: the keys go with the failed init
                await self.keys.destroy(req.provider, key_id)
            if self.registry is not None:
                for label, revision in recorded.items():
                    await self.registry.forget(label, revision)
            raise
        log.info(
            "event=ca_initialized provider=%s root_disabled=%s", req.provider, req.disable_root
        )
        await self.rebuild_crl()
        return ca_pb2.InitCAResponse(
            root_certificate_der=state.root_certificate_der,
            intermediate_certificate_der=state.intermediate_certificate_der,
        )

    def forget_issuer(self) -> None:
        """Drop the cached CA state (after a rotation or revocation here)."""
        self._issuer = None

    async def issuer(self) -> _Issuer:
        cached = self._issuer
        if cached is not None and time.monotonic() - cached.loaded_at > ISSUER_RECHECK_SECONDS:
            found = await self.store.get_state()
            if found is None or found[1] != cached.revision:
                self._issuer = None
            else:
                cached.loaded_at = time.monotonic()
        if self._issuer is None:
            found = await self.store.get_state()
            if found is None:
                raise FailedPrecondition("ca.not_initialized", "no CA yet: run `kmsctl ca init`")
            state, revision = found
            cert = x509.load_der_x509_certificate(state.intermediate_certificate_der)
            root = x509.load_der_x509_certificate(state.root_certificate_der)
            public_der = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            key = self.keys.signing_key(state.provider, state.intermediate_key_id, public_der)
            leaf = self.keys.leaf_signer(state.provider, state.intermediate_key_id, public_der)
            self._issuer = _Issuer(state, cert, root, key, leaf, revision, time.monotonic())
        return self._issuer

    async def issuing_cas(self) -> list[IssuingCA]:
        """Every intermediate that signs: the current one first, then retired ones."""
        issuer = await self.issuer()
        return hierarchy.issuing_cas(issuer.state, self.keys.signing_key)

    async def _require_active(self, label: str) -> None:
        """Refuse (FailedPrecondition ca.key_disabled) to sign with a CA key that the key
        registry does not hold ACTIVE: the administrator's switch for the CA's keys."""
        if self.registry is not None:
            await self.registry.require_active(label)

    async def root_key(self) -> CAKey:
        """The root's signing key, for signing the next intermediate. Refused while the
        registry has ca/root disabled (or, without a registry, after `--disable-root`)."""
        issuer = await self.issuer()
        state = issuer.state
        if self.registry is not None:
            await self._require_active(ROOT_LABEL)
        elif state.root_key_disabled:
            raise FailedPrecondition("ca.key_disabled", "the root key is disabled")
        return self.keys.signing_key(
            state.provider,
            state.root_key_id,
            issuer.root.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )

    async def ca_certificates(self) -> ca_pb2.GetCACertificatesResponse:
        issuer = await self.issuer()
        return ca_pb2.GetCACertificatesResponse(
            root_certificate_der=issuer.state.root_certificate_der,
            intermediate_certificate_der=issuer.state.intermediate_certificate_der,
            retired_intermediates_der=[r.certificate_der for r in reversed(issuer.state.retired)],
        )

    async def rotate(self, req: ca_pb2.RotateCARequest) -> ca_pb2.RotateCAResponse:
        return await hierarchy.rotate(self, req)

    async def revoke_intermediate(
        self, req: ca_pb2.RevokeIntermediateRequest
    ) -> ca_pb2.RevokeIntermediateResponse:
        return await hierarchy.revoke_intermediate(self, req)

    async def root_crl(self) -> ca_pb2.GetCRLResponse:
        return await hierarchy.current_root_crl(self)

    def list_profiles(self) -> ca_pb2.ListProfilesResponse:
        return ca_pb2.ListProfilesResponse(
            profiles=[
                ca_pb2.ProfileInfo(
                    name=p.name,
                    description=p.description,
                    max_validity_days=p.max_validity_days,
                    default_validity_seconds=int(p.default_validity.total_seconds()),
                    max_validity_seconds=int(p.max_validity.total_seconds()),
                    key_types=sorted(p.key_types),
                    extended_key_usages=p.eku_names(),
                )
                for p in sorted(self.profiles.values(), key=lambda p: p.name)
            ]
        )

    # ---- certificates --------------------------------------------------------------------

    async def _issue_plan(
        self, plan: IssuePlan, requester: str, renewed_from: str = "", request_id: str = ""
    ) -> ca_pb2.IssueCertificateResponse:
        if len(requester) > _REQUESTER_MAX:
            raise InvalidArgument("cert.requester_invalid", "requester name is too long")
        issuer = await self.issuer()
        # Before anything is signed: a name the intermediate may not certify is refused
        # here, not left for the relying party's verifier to catch.
        constraints.check(constraints.of_certificate(issuer.cert), plan.subject, plan.san)
        if issuer.revoked:
            raise FailedPrecondition(
                "ca.intermediate_revoked",
                "the issuing intermediate is revoked: `kmsctl ca rotate` makes a new one",
            )
        await self._require_active(issuer.label)
        urls = self.urls.for_issuer(issuer.key_id_hex)

        async def make(serial: int) -> ca_pb2.CertificateRecord:
            cert, der = await issuer.leaf.build(issuer.cert, plan, serial, urls)
            return ca_pb2.CertificateRecord(
                serial=serial_hex(serial),
                profile=plan.profile.name,
                requester=requester,
                status=ca_pb2.CERTIFICATE_STATUS_VALID,
                certificate_der=der,
                subject=plan.subject.rfc4514_string(),
                sans=plan.san_list,
                not_before=rfc3339(cert.not_valid_before_utc),
                not_after=rfc3339(cert.not_valid_after_utc),
                issued_at=rfc3339(_now()),
                renewed_from=renewed_from,
                key_type=plan.key_type,
                request_id=request_id,
                issuer_key_id=issuer.key_id_hex,
            )

        from ca_service.store import store_with_fresh_serial

        if request_id:
            record = await self._issue_once(issuer, make, requester, request_id)
        else:
            record = await store_with_fresh_serial(self.store, make, self._new_serial)
        self.catalog.note(record)
        if renewed_from:
            old = await self.store.mark_superseded(renewed_from, record.serial)
            if old is not None:
                self.catalog.note(old)
        log.info(
            "event=ca_issued serial=%s profile=%s requester=%s sans=%s",
            record.serial,
            record.profile,
            requester,
            ",".join(record.sans),
        )
        return ca_pb2.IssueCertificateResponse(
            record=record,
            certificate_der=record.certificate_der,
            chain_der=[
                issuer.state.intermediate_certificate_der,
                issuer.state.root_certificate_der,
            ],
        )

    async def _issue_once(
        self,
        issuer: _Issuer,
        make: Callable[[int], Awaitable[ca_pb2.CertificateRecord]],
        requester: str,
        request_id: str,
    ) -> ca_pb2.CertificateRecord:
        """Issue under the serial the request id determines, so that a retry whose first
        attempt was stored but never answered (a CA, bus or broker killed in between)
        finds that record instead of making a second certificate: the create-if-absent
        of cert.<serial> is the one place that decides. The record is not read first:
        a first attempt (nearly every call) costs one KV write and no read, and a retry
        pays a signature that is never stored or returned, then reads what the first
        attempt stored."""
        serial = request_serial(issuer.state.intermediate_key_id, requester, request_id)
        record = await make(serial)
        try:
            await self.store.create_record(record)
            return record
        except AlreadyExists:
            pass  # a first attempt (or a concurrent retry) stored it: answer with that one
        existing = await self.store.find_record(serial)
        if existing is None:
            # Stored and then pruned in between: impossible for a fresh record (it
            # would have to be long expired); refuse rather than sign a second one.
            raise Internal("cert.serial_exhausted", "could not store the certificate")
        if existing.request_id != request_id or existing.requester != requester:
            raise Internal("cert.serial_exhausted", "request serial collision")
        if not _same_request(existing, record):
            # The broker stores no claim for an issuance (broker.ca_forward): this is
            # where another request under a used id is refused.
            raise InvalidArgument(
                "request.id_reused",
                "request id already used for a different IssueCertificate request",
                {"serial": existing.serial},
            )
        log.info("event=ca_issue_replayed serial=%s", existing.serial)
        return existing

    async def issue_plan(
        self, plan: IssuePlan, requester: str, request_id: str = ""
    ) -> ca_pb2.IssueCertificateResponse:
        """Issue what a checked plan describes (the ACME server's finalize and its own
        TLS certificate): the same path as IssueCertificate, record stored first, and
        with `request_id` the same certificate for every retry."""
        return await self._issue_plan(plan, requester, request_id=request_id)

    async def issue(self, req: ca_pb2.IssueCertificateRequest) -> ca_pb2.IssueCertificateResponse:
        profile = get_profile(self.profiles, req.profile)
        plan = plan_from_csr(profile, load_csr(req.csr), req.validity_days, req.validity_seconds)
        return await self._issue_plan(plan, req.requester, request_id=req.request_id)

    async def renew(self, req: ca_pb2.RenewCertificateRequest) -> ca_pb2.IssueCertificateResponse:
        old, _ = await self.store.get_record(req.serial)
        if old.status == ca_pb2.CERTIFICATE_STATUS_REVOKED:
            raise FailedPrecondition(
                "cert.revoked", f"certificate {old.serial} is revoked: issue a new one"
            )
        profile = get_profile(self.profiles, old.profile)
        cert = x509.load_der_x509_certificate(old.certificate_der)
        public = cert.public_key()
        assert isinstance(public, PublicKey)
        try:
            san: x509.SubjectAlternativeName | None = cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except x509.ExtensionNotFound:
            san = None
        plan = make_plan(
            profile, cert.subject, public, san, req.validity_days, req.validity_seconds
        )
        return await self._issue_plan(
            plan, req.requester or old.requester, old.serial, request_id=req.request_id
        )

    async def renew_held(
        self, req: ca_pb2.RenewHeldCertificateRequest
    ) -> ca_pb2.IssueCertificateResponse:
        """Renewal by the holder, proved by possession of the certified key (the CSR's
        self-signature, plus the old key's signature for a new key). The new certificate
        is stored first, then the old one is revoked with reason superseded: a crash in
        between leaves the old one valid, and the retry (same request id) finds the stored
        certificate (its serial comes from the request id) and finishes."""
        if not req.request_id or len(req.request_id) > 128:
            raise InvalidArgument(
                "renew.request_id_invalid", "a renewal needs a request_id of 1 to 128 characters"
            )
        try:
            held = x509.load_der_x509_certificate(req.certificate_der)
        except ValueError:
            raise InvalidArgument(
                "renew.certificate_invalid", "certificate_der is not a DER certificate"
            ) from None
        old, _ = await self.store.get_record(serial_hex(held.serial_number))
        if old.certificate_der != req.certificate_der:
            raise InvalidArgument(
                "renew.certificate_unknown", "this CA did not issue this certificate"
            )
        retry = (
            old.status == ca_pb2.CERTIFICATE_STATUS_REVOKED
            and old.revocation_reason == ca_pb2.REVOCATION_REASON_SUPERSEDED
            and (old.revocation_request_id, old.revoked_by) == (req.request_id, req.requester)
        )
        if not retry and old.superseded_by and old.status != ca_pb2.CERTIFICATE_STATUS_REVOKED:
            # Stored by this very request before a crash kept it from revoking the old one?
            newer = await self.store.find_record(int(old.superseded_by, 16))
            retry = newer is not None and (newer.request_id, newer.renewed_from) == (
                req.request_id,
                old.serial,
            )
        if not retry:
            if old.status == ca_pb2.CERTIFICATE_STATUS_REVOKED:
                superseded = old.revocation_reason == ca_pb2.REVOCATION_REASON_SUPERSEDED
                raise FailedPrecondition(
                    "cert.superseded" if superseded else "cert.revoked",
                    f"certificate {old.serial} is revoked: it cannot be renewed",
                    {"serial": old.serial},
                )
            if old.superseded_by:
                raise FailedPrecondition(
                    "cert.superseded",
                    f"certificate {old.serial} was renewed as {old.superseded_by} already",
                    {"serial": old.serial},
                )
            if held.not_valid_after_utc <= _now():
                raise FailedPrecondition(
                    "cert.expired",
                    f"certificate {old.serial} expired at {old.not_after}: issue a new one",
                    {"serial": old.serial},
                )
        csr = load_csr(req.csr)
        csr_der = csr.public_bytes(serialization.Encoding.DER)
        old_public = held.public_key()
        new_public = csr.public_key()
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if new_public.public_bytes(serialization.Encoding.DER, spki) != old_public.public_bytes(
            serialization.Encoding.DER, spki
        ) and not verify_renewal(old_public, csr_der, req.old_key_signature):
            raise PermissionDenied(
                "renew.proof_invalid",
                "a new key needs the old key's signature over the request",
                {"serial": old.serial},
            )
        if not isinstance(new_public, PublicKey):
            raise InvalidArgument(
                "csr.key_type_not_allowed", f"{type(new_public).__name__} keys are not certified"
            )
        profile = get_profile(self.profiles, old.profile)
        try:
            san: x509.SubjectAlternativeName | None = held.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except x509.ExtensionNotFound:
            san = None
        days, seconds = req.validity_days, req.validity_seconds
        if not days and not seconds:
            lifetime = held.not_valid_after_utc - held.not_valid_before_utc
            seconds = int(min(lifetime, profile.max_validity).total_seconds())
        plan = make_plan(profile, held.subject, new_public, san, days, seconds)
        # Issued under the original requester: a device's certificates stay its own (a
        # deny of the device revokes them), whoever presents the proof.
        response = await self._issue_plan(
            plan, old.requester or req.requester, old.serial, request_id=req.request_id
        )
        number = await self.store.next_crl_number()
        record, _ = await self.store.revoke(
            old.serial,
            ca_pb2.REVOCATION_REASON_SUPERSEDED,
            _now(),
            req.requester,
            req.request_id,
            number,
        )
        self.catalog.note(record)
        self.crl_jobs.want(record.revocation_crl_number or number)
        log.info(
            "event=ca_renewed_by_holder old=%s new=%s requester=%s",
            old.serial,
            response.record.serial,
            req.requester,
        )
        return response

    async def get(self, req: ca_pb2.GetCertificateRequest) -> ca_pb2.GetCertificateResponse:
        record, _ = await self.store.get_record(req.serial)
        return ca_pb2.GetCertificateResponse(record=record)

    async def list(self, req: ca_pb2.ListCertificatesRequest) -> ca_pb2.ListCertificatesResponse:
        """One page of records (ca_service.listing), filters checked before anything is read."""
        query = Query.parse(req, _now())  # a bad filter or token: refused before any read
        await self._catch_up()
        return self.catalog.page(query)

    async def _catch_up(self) -> None:
        """Bring the catalog up to date, or say the CA is still reading its records: the
        first read of 50,000 records takes seconds, longer than a caller's deadline on
        a loaded machine, so it goes on in the background and the caller retries
        (Unavailable is retried by KMSClient)."""
        if self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.create_task(self.catalog.refresh())
        try:
            await asyncio.wait_for(asyncio.shield(self._catching_up), CATALOG_WAIT)
        except TimeoutError:
            raise Unavailable(
                "ca.catalog_loading",
                f"the CA is still reading its certificate records ({len(self.catalog)} so "
                "far); try again in a few seconds",
            ) from None

    async def prune(self, req: ca_pb2.PruneCertificatesRequest) -> ca_pb2.PruneCertificatesResponse:
        """Remove the records of certificates that expired more than `older_than_days`
        ago. An expired certificate fails verification on its dates alone, so no CRL
        needs its entry (RFC 5280 3.3 lets a CRL drop it); a revoked certificate that has
        not expired is never pruned, whatever its age."""
        if not 1 <= req.older_than_days <= _PRUNE_MAX_DAYS:
            raise InvalidArgument(
                "prune.retention_invalid",
                f"the retention period must be 1 to {_PRUNE_MAX_DAYS} days",
            )
        await self.issuer()  # a CA must exist
        horizon = rfc3339(_now() - datetime.timedelta(days=req.older_than_days))
        await self._catch_up()
        doomed = self.catalog.expired_before(horizon)
        response = ca_pb2.PruneCertificatesResponse()
        if req.dry_run:
            response.pruned = len(doomed)
            response.serials.extend(r.serial for r in doomed[:_PRUNE_NAMED])
            return response
        revoked_gone = False
        for summary in doomed:
            record = await self.store.remove_expired(summary.serial, horizon)
            if record is None:
                continue  # changed since it was listed (or gone already)
            self.catalog.forget(record.serial)
            response.pruned += 1
            if len(response.serials) < _PRUNE_NAMED:
                response.serials.append(record.serial)
            revoked_gone |= record.status == ca_pb2.CERTIFICATE_STATUS_REVOKED
        log.info(
            "event=ca_pruned count=%d older_than_days=%d requester=%s",
            response.pruned,
            req.older_than_days,
            req.requester,
        )
        if revoked_gone:  # the next CRL leaves their entries out
            response.crl_number = await self.store.next_crl_number()
            self.crl_jobs.want(response.crl_number)
        return response

    async def revoke(
        self, req: ca_pb2.RevokeCertificateRequest
    ) -> ca_pb2.RevokeCertificateResponse:
        if req.reason != ca_pb2.REVOCATION_REASON_UNSPECIFIED and req.reason not in REASON_FLAGS:
            raise InvalidArgument(
                "revoke.reason_unknown", f"unknown revocation reason {req.reason}"
            )
        await self.issuer()  # a CA must exist
        # Checked before the revocation is stored: it must reach a CRL this CA can sign,
        # the one of the intermediate that issued it (the current or a retired one).
        existing, _ = await self.store.get_record(req.serial)
        issuing = await self._issuing_ca_of(existing)
        await self._require_active(issuing.label)
        if issuing.retired:
            # A retired intermediate issues no more: its CRL is rebuilt at once.
            record, _ = await self.store.revoke(
                req.serial, req.reason, _now(), req.requester, req.request_id
            )
            self.catalog.note(record)
            crl = await self.rebuild_issuer_crl(issuing)
            return ca_pb2.RevokeCertificateResponse(record=record, crl_number=crl.crl_number)
        # The CRL that lists it is built in the background (ca_service.crlstore.CRLJobs): its
        # number is reserved first and kept with the revocation, one KV update each
        # however many certificates are revoked. A number reserved by a revocation that
        # then fails is skipped (CRL numbers may skip).
        number = await self.store.next_crl_number()
        record, revoked_now = await self.store.revoke(
            req.serial, req.reason, _now(), req.requester, req.request_id, number
        )
        self.catalog.note(record)
        if not revoked_now and record.revocation_crl_number:
            # A retry whose first attempt revoked (and whose answer was lost): the same
            # answer. That attempt wanted its CRL built, or died first, and then the
            # build every start makes lists it.
            number = record.revocation_crl_number
        self.crl_jobs.want(number)
        log.info(
            "event=ca_revoke serial=%s requester=%s crl=%d", record.serial, req.requester, number
        )
        return ca_pb2.RevokeCertificateResponse(record=record, crl_number=number)

    async def _issuing_ca_of(self, record: ca_pb2.CertificateRecord) -> IssuingCA:
        issuer = await self.issuer()
        first = hierarchy.first_key_id(issuer.state)
        cas = await self.issuing_cas()
        for issuing in cas:
            if hierarchy.belongs_to(record, issuing.key_id_hex, first):
                return issuing
        raise FailedPrecondition(
            "cert.issuer_retired",
            f"certificate {record.serial} came from an intermediate that is no longer kept",
        )

    # ---- CRL and OCSP --------------------------------------------------------------------

    async def rebuild_crl(self) -> ca_pb2.GetCRLResponse:
        """The current intermediate's CRL: built and stored now under a new number; the
        current CRL after that."""
        await self._build_crl(await self.store.next_crl_number())
        return await self.current_crl()

    async def rebuild_issuer_crl(self, issuing: IssuingCA) -> ca_pb2.GetCRLResponse:
        """One intermediate's CRL (the certificates it issued that are revoked), rebuilt
        and stored: the current one's in chunks (ca_service.crlstore), a retired one's, which
        stops growing when it retires, in one record beside it (ca_service.hierarchy)."""
        if not issuing.retired:
            return await self.rebuild_crl()
        issuer = await self.issuer()
        await self._require_active(issuing.label)
        number = await self.store.next_crl_number()
        first = hierarchy.first_key_id(issuer.state)
        revoked = [
            Revocation(int(r.serial, 16), parse_rfc3339(r.revoked_at), r.revocation_reason)
            for r in await self.store.list_records()
            if r.status == ca_pb2.CERTIFICATE_STATUS_REVOKED
            and hierarchy.belongs_to(r, issuing.key_id_hex, first)
        ]
        crl = await asyncio.to_thread(
            build_crl, issuing.key, issuing.cert, revoked, number, validity=self.crl_validity
        )
        next_update = crl.next_update_utc
        assert next_update is not None
        response = ca_pb2.GetCRLResponse(
            crl_der=crl.public_bytes(serialization.Encoding.DER),
            crl_number=number,
            next_update=rfc3339(next_update),
        )
        key = hierarchy.issuer_crl_key(issuing.key_id_hex)
        await self.store.store_crl(response, key)
        log.info(
            "event=ca_crl_built number=%d revoked=%d issuer=%s",
            number,
            len(revoked),
            issuing.key_id_hex,
        )
        current = await self.store.get_crl(key)
        return current or response

    async def _build_crl(self, number: int) -> None:
        async with self._crl_lock:
            issuer = await self.issuer()
            issuing = (await self.issuing_cas())[0]
            await self._require_active(issuing.label)
            await self.catalog.refresh()
            first = hierarchy.first_key_id(issuer.state)
            mine = issuing.key_id_hex
            revoked = [
                (r.serial, r.revoked_at, r.reason)
                for r in self.catalog.revoked()
                if (r.issuer_key_id or first) == mine
            ]

            def encode() -> tuple[bytes, datetime.datetime]:
                # All in a worker thread: parsing and encoding 50,000 entries on the event
                # loop held up every request for seconds while a CRL was built.
                crl = build_crl(
                    issuing.key,
                    issuing.cert,
                    [],
                    number,
                    validity=self.crl_validity,
                    entries=self._crl_entries.entries(revoked),
                )
                next_update = crl.next_update_utc
                assert next_update is not None
                return crl.public_bytes(serialization.Encoding.DER), next_update

            started = time.monotonic()
            der, next_update = await asyncio.to_thread(encode)
            built = time.monotonic()
            await self.crls.publish(number, rfc3339(next_update), der, len(revoked))
            log.info(
                "event=ca_crl_built number=%d revoked=%d bytes=%d build_ms=%.0f store_ms=%.0f",
                number,
                len(revoked),
                len(der),
                (built - started) * 1e3,
                (time.monotonic() - built) * 1e3,
            )

    async def issuer_crl(self, key_id: str) -> ca_pb2.GetCRLResponse:
        """The CRL of intermediate `key_id` (upper-case hex SKI), current or retired,
        rebuilt when missing or close to its nextUpdate."""
        for issuing in await self.issuing_cas():
            if issuing.key_id_hex == key_id.upper():
                if not issuing.retired:
                    return await self.current_crl()
                crl = await self.store.get_crl(hierarchy.issuer_crl_key(issuing.key_id_hex))
                if crl is None or parse_rfc3339(crl.next_update) - _now() < self.crl_refresh_margin:
                    crl = await self.rebuild_issuer_crl(issuing)
                return crl
        raise NotFound("ca.intermediate_unknown", f"no intermediate {key_id!r} signs here")

    async def refresh(self) -> None:
        """The service's periodic care: retired intermediates whose certificates have
        all expired are dropped, every remaining CRL and the root's kept fresh."""
        issuer = await self.issuer()  # no CA yet: nothing to care for
        if issuer.state.retired:  # the whole record list only when it can matter
            await hierarchy.drop_spent_retired(self, await self.store.list_records())
        await self.current_crl()
        for issuing in (await self.issuing_cas())[1:]:
            await self.issuer_crl(issuing.key_id_hex)
        await self.root_crl()

    async def current_crl(self) -> ca_pb2.GetCRLResponse:
        """The whole current CRL (for /crl), rebuilt first when it is missing or close to
        its nextUpdate, and after the revocations this CA has taken so far (waiting at
        most CRL_WAIT for a build in progress: past that, the stored CRL, whose number
        says which revocations it holds)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.crl_jobs.settled()), CRL_WAIT)
        found = await self.crls.current()
        if found is None or parse_rfc3339(found[0].next_update) - _now() < self.crl_refresh_margin:
            await self._build_crl(await self.store.next_crl_number())
            found = await self.crls.current()
            if found is None:
                raise Internal("crl.missing", "the CRL was built but cannot be read back")
        meta, der = found
        return ca_pb2.GetCRLResponse(
            crl_der=der,
            crl_number=meta.crl_number,
            next_update=meta.next_update,
            total_size=meta.total_size,
            sha256=meta.sha256,
        )

    async def crl_chunk(self, req: ca_pb2.GetCRLRequest) -> ca_pb2.GetCRLResponse:
        """GetCRL on the bus: one chunk of the current CRL (ca_service.crlstore)."""
        if req.offset == 0 and not req.crl_number:
            await self.current_crl()  # fresh, and with this CA's revocations in it
        response = await self.crls.chunk(req)
        response.pending = self.crl_jobs.busy
        return response

    async def ocsp(self, request_der: bytes) -> bytes:
        """A DER OCSP response for a DER request; never raises for bad requests."""
        try:
            issuer = await self.issuer()
            cas = await self.issuing_cas()
        except KMSError:
            return ocsp_mod.unsuccessful(x509.ocsp.OCSPResponseStatus.INTERNAL_ERROR)
        # Which of our CAs the query names: an intermediate (about a leaf) or the root
        # (about an intermediate).
        signers: list[tuple[x509.Certificate, str | None]] = [(c.cert, c.label) for c in cas]
        signers.append((issuer.root, None))
        query: ocsp_mod.OCSPQuery | None = None
        error: ocsp_mod.BadOCSPRequest | None = None
        for cert, label in signers:
            try:
                query = ocsp_mod.parse_request(request_der, cert)
            except ocsp_mod.BadOCSPRequest as exc:
                error = exc
                if exc.status != x509.ocsp.OCSPResponseStatus.UNAUTHORIZED:
                    break
                continue
            signer_cert, signer_label = cert, label
            break
        if query is None:
            assert error is not None
            return ocsp_mod.unsuccessful(error.status)
        if signer_label is None:
            return await self._ocsp_for_intermediate(issuer, query)
        issuing = next(c for c in cas if c.label == signer_label)
        record = await self.store.find_record(query.serial)
        state: ocsp_mod.CertState | None = None
        if record is not None and hierarchy.belongs_to(
            record, issuing.key_id_hex, hierarchy.first_key_id(issuer.state)
        ):
            revoked = record.status == ca_pb2.CERTIFICATE_STATUS_REVOKED
            state = ocsp_mod.CertState(
                parse_rfc3339(record.revoked_at) if revoked else None, record.revocation_reason
            )
        try:
            await self._require_active(issuing.label)
            return await asyncio.to_thread(
                ocsp_mod.build_response, issuing.key, signer_cert, query, state
            )
        except KMSError as exc:
            log.warning("event=ca_ocsp_sign_failed reason=%s", exc.reason)
            return ocsp_mod.unsuccessful(x509.ocsp.OCSPResponseStatus.TRY_LATER)

    async def _ocsp_for_intermediate(self, issuer: _Issuer, query: ocsp_mod.OCSPQuery) -> bytes:
        """The root's answer about one of its intermediates: good while known and not
        revoked, revoked with time and reason, unknown for any other serial. Signed
        live while ca/root is enabled; while it is disabled, the answer the root signed
        ahead of time (ca_service.hierarchy, no nonce), else tryLater."""
        serial = f"{query.serial:X}"
        state = hierarchy.intermediate_states(issuer.state).get(serial)
        try:
            try:
                root_key = await self.root_key()
            except FailedPrecondition:
                presigned = await hierarchy.presigned_intermediate_ocsp(
                    self.store, serial, query.hash_algorithm
                )
                if presigned is not None:
                    return presigned
                raise
            return await asyncio.to_thread(
                ocsp_mod.build_response, root_key, issuer.root, query, state
            )
        except KMSError as exc:
            log.warning("event=ca_ocsp_sign_failed reason=%s", exc.reason)
            return ocsp_mod.unsuccessful(x509.ocsp.OCSPResponseStatus.TRY_LATER)


__all__ = ["CertificateAuthority"]
