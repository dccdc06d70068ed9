"""Device enrollment and the device registry: `EnrollmentService` on the broker's
enrollment listener (server-only TLS: the device has no client certificate yet) and
`DeviceService` on the mutual TLS listener (administrators).

Enrollment redeems a one-time token (broker.devices) for a client certificate from the
internal CA, in an order that never loses a token to a crash (docs/security.md,
"Enrollment"):

1. reserve: the token goes ACTIVE -> RESERVED for this request id, for RESERVE_LEASE
   (compare-and-set: one redeemer wins);
2. issue: the client name is reserved, the certificate signed in the token;
3. store: device.<name> is written with the certificate, then the client record;
4. consume: the token goes RESERVED -> USED.

A failure before 3 puts the token back (ACTIVE); a broker killed before 3 leaves it
RESERVED until the lease runs out (or its retry, same request id, comes), then usable
again; killed after 3, the retry finds the device record and gets the same certificate,
and step 4 is done then (a redeem with any other request id does step 4 too, and is
refused: the token is spent once a certificate was stored for it). Refusals count
against the caller's address and the token (broker.throttle: 5 in 60 s, then backoff),
and every attempt is audited.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import Message
from nats.aio.client import Client as NATS

from broker import unlock
from broker.attest import ChallengeBook, ManufacturerCAs, check_evidence
from broker.audit_service import AuditScope, note, retarget
from broker.clients import ClientRegistry, ClientService, serial_hex
from broker.devices import (
    ACTIVE,
    GROUP_RE,
    RESERVED,
    REVOKED,
    USED,
    DeviceStore,
    new_token,
    parse_token,
    secret_matches,
    stamp,
    token_spent,
)
from broker.devices import now as _now
from broker.keys import Context, IdentityCache, require_usable, rpc
from broker.paging import page_by_name
from broker.throttle import FailureThrottle
from broker.wire import Malformed
from edgekms import natsrpc, tpmcred
from edgekms.audit import AuditWriter
from edgekms.client_certs import INTERNAL_CA_KEY
from edgekms.crypto_client import CryptoClient
from edgekms.errors import (
    ERROR_METADATA_KEY,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    KMSError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from edgekms.identity import CLIENT_NAME_RE, Identity
from edgekms.logs import fields
from edgekms.sans import ADDRESS_KINDS, other_value, san_strings
from edgekms.subjects import ca_subject
from edgekms.v1 import ca_pb2, clients_pb2, enroll_pb2, enroll_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T", bound=Message)
R = TypeVar("R")

RESERVE_LEASE = datetime.timedelta(seconds=60)
DEFAULT_TTL = 3600
MAX_TTL = 7 * 86400
MAX_SANS = 16
MAX_REQUEST_ID = 128
DEFAULT_DENY_BATCH = 200
MAX_DENY_BATCH = 1000
CA_TIMEOUT = 10.0

# What a token's profile makes of the device: its role and the keys it may use
# ({name} is the device's name). Only EC keys are made on devices (P-256 or P-384).
PROFILES: dict[str, dict[str, Any]] = {
    "device": {
        "role": "signer",
        "key_pattern": "devices/{name}/*",
        "curves": ("secp256r1", "secp384r1"),
    },
}


def _peer_host(context: Context) -> str:
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


def _check_san(value: str) -> str:
    kind, _, name = value.partition(":")
    if kind == "dns" and 0 < len(name) <= 253 and all(c.isalnum() or c in ".-*" for c in name):
        return f"dns:{name.lower()}"
    if kind == "ip":
        try:
            return f"ip:{ipaddress.ip_address(name)}"
        except ValueError:
            pass
    raise InvalidArgument("enroll.san_invalid", f"{value[:80]!r}: give dns:NAME or ip:ADDR")


def _csr_names(csr: x509.CertificateSigningRequest) -> tuple[list[str], list[str]]:
    cns = [str(a.value) for a in csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return cns, []
    return cns, san_strings(ext, kinds=ADDRESS_KINDS, lower_dns=True, other=other_value)


class EnrollmentService(enroll_pb2_grpc.EnrollmentServiceServicer):
    """Token + CSR -> client certificate, for callers without a certificate."""

    def __init__(
        self,
        clients: ClientRegistry,
        issuer: ClientService,
        store: DeviceStore,
        broker_port: int,
        server_name: str,
        audit: AuditWriter | None,
        throttle: FailureThrottle | None = None,
        ek_cas: ManufacturerCAs | None = None,
        challenges: ChallengeBook | None = None,
        crypto: CryptoClient | None = None,
    ):
        # The KeyService's crypto client (ordinary key class): unlock secrets are
        # decrypted with ordinary KMS keys, not the internal CA's class.
        self.crypto = crypto
        self.ek_cas = ek_cas or ManufacturerCAs([])
        # `is None`, not `or`: an empty book is falsy (it has a length).
        self.challenges = challenges if challenges is not None else ChallengeBook()
        self.clients = clients
        self.issuer = issuer
        self.store = store
        self.broker_port = broker_port
        self.server_name = server_name
        self.audit = audit
        # Guesses at one token: 5 a minute; from one address (many devices may share
        # one behind NAT): 30 a minute. Then backoff, doubling (broker.throttle).
        self.throttle = throttle or FailureThrottle(max_failures=5, window=60.0)
        self.peer_throttle = FailureThrottle(max_failures=30, window=60.0)

    async def Enroll(
        self, request: enroll_pb2.EnrollRequest, context: Context
    ) -> enroll_pb2.EnrollResponse:
        started = time.perf_counter()
        response = await self._guarded("Enroll", request, context, self._enroll)
        log.info(
            "device enrolled",
            extra=fields(
                device=response.client.name,
                serial=response.client.serial,
                ms=round((time.perf_counter() - started) * 1000, 1),
            ),
        )
        return response

    async def BeginAttestation(
        self, request: enroll_pb2.BeginAttestationRequest, context: Context
    ) -> enroll_pb2.AttestationChallenge:
        return await self._guarded("BeginAttestation", request, context, self._begin)

    async def _guarded(
        self,
        method: str,
        request: Any,
        context: Context,
        body: Callable[[Any, str, bytes, AuditScope, str], Awaitable[R]],
        *,
        with_token: bool = True,
    ) -> R:
        """Throttle, audit and error mapping shared by the enrollment listener's RPCs."""
        scope = AuditScope.for_request(self.audit, method, request)
        scope.details = {"peer": _peer_host(context)}
        bound = scope.bind()
        peer = "peer:" + _peer_host(context)
        subjects: list[str] = []
        try:
            self.peer_throttle.check(peer)
            if isinstance(request, Malformed):
                raise InvalidArgument(
                    "request.malformed", f"{method}: the request is not a {method} request"
                )
            if with_token:
                token_id, digest = parse_token(request.token)
                scope.details["token_id"] = token_id
                subjects.append("token:" + token_id)
                self.throttle.check(subjects[-1])
            else:
                # Unlock: no token. Refusals count against the address only: counting
                # them against the device would let anyone on the LAN keep it from
                # unlocking by sending bad answers in its name.
                token_id, digest = "", b""
                scope.target = f"{request.device[:80]}/{request.volume[:80]}"
            response = await body(request, token_id, digest, scope, peer)
            failure = await scope.settle(None)
            if failure is not None:
                raise failure
        except KMSError as err:
            # Wrong, spent or malformed tokens count, and so do refused TPM evidence
            # (guessing at challenges); a CSR the token refuses does not.
            if (
                isinstance(err, Unauthenticated)
                or err.reason == "enroll.token_malformed"
                or (
                    err.reason.startswith(("attest.", "unlock.", "enroll.denied"))
                    and err.reason != "attest.throttled"
                )
            ):
                self.peer_throttle.failed(peer)
                for subject in subjects:
                    self.throttle.failed(subject)
            err = (await scope.settle(err)) or err
            log.warning(
                "enrollment refused",
                extra=fields(method=method, reason=err.reason, **scope.details),
            )
            context.set_trailing_metadata(
                ((ERROR_METADATA_KEY, err.to_proto().SerializeToString()),)
            )
            await context.abort(err.grpc_status, f"{err.reason}: {err.message}")
            raise
        except Exception:
            log.exception("unexpected error", extra=fields(method=method))
            internal: KMSError = Internal("internal.error", "the broker failed unexpectedly")
            internal = (await scope.settle(internal)) or internal
            context.set_trailing_metadata(
                ((ERROR_METADATA_KEY, internal.to_proto().SerializeToString()),)
            )
            await context.abort(internal.grpc_status, internal.reason)
            raise
        finally:
            AuditScope.unbind(bound)
        return response

    async def BeginUnlock(
        self, request: enroll_pb2.BeginUnlockRequest, context: Context
    ) -> enroll_pb2.UnlockChallenge:
        async def body(
            request: enroll_pb2.BeginUnlockRequest, _t: str, _d: bytes, scope: AuditScope, peer: str
        ) -> enroll_pb2.UnlockChallenge:
            answer = unlock.begin(self.clients.devices, self.challenges, request, peer)
            scope.details["challenge"] = answer.challenge_id
            return answer

        return await self._guarded("BeginUnlock", request, context, body, with_token=False)

    async def Unlock(
        self, request: enroll_pb2.UnlockRequest, context: Context
    ) -> enroll_pb2.UnlockResponse:
        return await self._guarded("Unlock", request, context, self._unlock, with_token=False)

    async def _unlock(
        self,
        request: enroll_pb2.UnlockRequest,
        _token_id: str,
        _digest: bytes,
        scope: AuditScope,
        peer: str,
    ) -> enroll_pb2.UnlockResponse:
        unlock.check_names(request.device, request.volume)
        scope.details["challenge"] = request.challenge_id[:64]
        challenge = self.challenges.take(
            request.challenge_id, f"unlock:{request.device}.{request.volume}"
        )
        book = self.clients.devices
        device = unlock.attested_device(book, request.device)
        secret = book.unlocks.get(f"{request.device}.{request.volume}")
        if secret is None:
            raise NotFound("unlock.not_found", "the volume's secret was removed")
        scope.details["ek_sha256"] = device.ek_sha256.hex()
        if device.ek_sha256 != challenge.ek_sha256 or device.ek_sha256 != secret.ek_sha256:
            raise PermissionDenied(
                "unlock.ek_mismatch", "the device's TPM is not the one the secret is for"
            )
        unlock.verify_quote(device, secret, challenge.nonce, request.quote, request.signature)
        unlock.check_window(secret)
        record = self.issuer.registry.get(secret.key_name)
        require_usable(record)
        provider, decrypt = unlock.decrypt_request(secret, record)
        if self.crypto is None:
            raise FailedPrecondition("unlock.unavailable", "this broker cannot decrypt")
        answer = await self.crypto.decrypt(provider, decrypt, timeout=CA_TIMEOUT)
        scope.details["generation"] = str(secret.generation)
        return unlock.wrap_for_device(device, answer.plaintext, request.challenge_id)

    async def _live_token(self, token_id: str, digest: bytes) -> enroll_pb2.EnrollToken:
        """The token, if its secret matches and it may still be redeemed."""
        found = await self.store.token(token_id)
        if found is None or not secret_matches(found[0], digest):
            raise Unauthenticated("enroll.token_invalid", "no such enrollment token")
        token = found[0]
        if token.state == USED:
            raise Unauthenticated("enroll.token_used", "this enrollment token was used already")
        if token.state == REVOKED:
            raise Unauthenticated("enroll.token_revoked", "this enrollment token was revoked")
        if token.expires_at <= stamp():
            raise Unauthenticated(
                "enroll.token_expired", f"the token expired at {token.expires_at}"
            )
        self._check_not_denied(token)
        return token

    def _check_not_denied(self, token: enroll_pb2.EnrollToken) -> None:
        if self.clients.devices.is_denied(token.name) or (
            token.group and token.group in self.clients.devices.denied_groups
        ):
            raise PermissionDenied("enroll.denied", f"device {token.name!r} is denied")

    def _check_ek_free(self, ek_sha256: bytes, name: str) -> None:
        """A denied device's EK is refused under any name; an EK is one device's."""
        book = self.clients.devices
        owner = book.ek_owner(ek_sha256)
        if owner is None:
            return
        if book.is_denied(owner):
            raise PermissionDenied("enroll.denied", f"this TPM is device {owner!r}, denied")
        if owner != name:
            raise PermissionDenied(
                "attest.ek_in_use", f"this TPM is enrolled already as device {owner!r}"
            )

    async def _begin(
        self,
        request: enroll_pb2.BeginAttestationRequest,
        token_id: str,
        digest: bytes,
        scope: AuditScope,
        peer: str,
    ) -> enroll_pb2.AttestationChallenge:
        token = await self._live_token(token_id, digest)
        scope.target = token.name
        self.challenges.ration(peer)
        checked = check_evidence(
            request.ek_certificate,
            request.ek_public,
            request.ak_public,
            token.ek_sha256,
            self.ek_cas,
        )
        scope.details["ek_sha256"] = checked.ek_sha256.hex()
        self._check_ek_free(checked.ek_sha256, token.name)
        challenge = self.challenges.issue(
            token.id, checked.ek_sha256, request.ak_public, request.ek_public
        )
        blob, secret = tpmcred.make_credential(checked.ek, challenge.nonce, checked.ak.name)
        scope.details["challenge"] = challenge.id
        expires = _now() + datetime.timedelta(seconds=self.challenges.ttl)
        return enroll_pb2.AttestationChallenge(
            challenge_id=challenge.id,
            credential_blob=blob,
            encrypted_secret=secret,
            expires_at=stamp(expires),
        )

    def _check_attested(
        self, request: enroll_pb2.EnrollRequest, token: enroll_pb2.EnrollToken, scope: AuditScope
    ) -> tuple[object, bytes, bytes, bytes, dict[int, bytes]]:
        """(device public key, EK identity, AK public area) of a TPM-attested request:
        the challenge is this token's, unused and alive, its nonce came back (so the AK
        is in the EK's TPM), and that AK certified the device key over the nonce."""
        challenge = self.challenges.take(request.challenge_id, token.id)
        scope.details["ek_sha256"] = challenge.ek_sha256.hex()
        if not hmac.compare_digest(request.activated_nonce, challenge.nonce):
            raise FailedPrecondition(
                "attest.nonce_mismatch",
                "the nonce is not the challenge's: the AK is not in that EK's TPM",
            )
        self._check_ek_free(challenge.ek_sha256, token.name)
        ak = tpmcred.parse_public(challenge.ak_public, "the AK's TPMT_PUBLIC")
        key = tpmcred.verify_certify(
            ak,
            request.certify_info,
            request.certify_signature,
            request.key_public,
            challenge.nonce,
        )
        profile = PROFILES[token.profile]
        if (
            not isinstance(key.key, ec.EllipticCurvePublicKey)
            or key.key.curve.name not in profile["curves"]
        ):
            raise PermissionDenied(
                "enroll.key_not_allowed",
                f"profile {token.profile} allows EC P-256 or P-384 keys only",
            )
        pcr_values: dict[int, bytes] = {}
        if request.pcr_quote:
            pcr_values = unlock.verify_enrollment_pcrs(
                ak,
                request.pcr_quote,
                request.pcr_quote_signature,
                list(request.pcr_values),
                challenge.nonce,
            )
        return key.key, challenge.ek_sha256, challenge.ak_public, challenge.ek_public, pcr_values

    def _response(self, device: enroll_pb2.Device) -> enroll_pb2.EnrollResponse:
        cert = x509.load_der_x509_certificate(device.certificate_der)
        return enroll_pb2.EnrollResponse(
            client=self.clients.get(device.name),
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            ca_certificate_pem=self.issuer._ca_pem(),
            broker_port=self.broker_port,
            server_name=self.server_name,
        )

    async def _finish(self, token: enroll_pb2.EnrollToken, revision: int, serial: str) -> None:
        if token.state != USED:
            token.state = USED
            token.used_at = stamp()
            token.serial = serial
            await self.store.update_token(token, revision)

    async def _enroll(
        self,
        request: enroll_pb2.EnrollRequest,
        token_id: str,
        digest: bytes,
        scope: AuditScope,
        peer: str,
    ) -> enroll_pb2.EnrollResponse:
        if not request.request_id or len(request.request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(
                "enroll.request_id_invalid",
                f"an enrollment needs a request_id of 1 to {MAX_REQUEST_ID} characters",
            )
        found = await self.store.token(token_id)
        if found is None or not secret_matches(found[0], digest):
            raise Unauthenticated("enroll.token_invalid", "no such enrollment token")
        token, revision = found
        scope.target = token.name
        existing = await self.store.device(token.name)
        ours = existing is not None and (existing[0].token_id, existing[0].request_id) == (
            token.id,
            request.request_id,
        )
        if existing is not None and ours and existing[0].certificate_der:
            # Stored by this request before (a lost answer, a killed broker): finish.
            await self._finish(token, revision, existing[0].serial)
            return self._response(existing[0])
        if (
            existing is not None
            and existing[0].token_id == token.id
            and existing[0].certificate_der
        ):
            # Stored for this token by another request whose broker died before step 4:
            # the token is spent. Consume it now, so it is never redeemed twice; that
            # request's retry still gets its certificate (above).
            await self._finish(token, revision, existing[0].serial)
            raise Unauthenticated("enroll.token_used", "this enrollment token was used already")
        if token.state == USED:
            raise Unauthenticated("enroll.token_used", "this enrollment token was used already")
        if token.state == REVOKED:
            raise Unauthenticated("enroll.token_revoked", "this enrollment token was revoked")
        at = stamp()
        if token.expires_at <= at:
            raise Unauthenticated(
                "enroll.token_expired", f"the token expired at {token.expires_at}"
            )
        if (
            token.state == RESERVED
            and token.request_id != request.request_id
            and token.reserved_until > at
        ):
            raise FailedPrecondition(
                "enroll.token_busy", "another enrollment is redeeming this token; try later"
            )
        self._check_not_denied(token)
        profile = PROFILES[token.profile]
        ek_sha256 = ak_public = ek_public = b""
        pcr_values: dict[int, bytes] = {}
        if request.challenge_id:
            public_key, ek_sha256, ak_public, ek_public, pcr_values = self._check_attested(
                request, token, scope
            )
        elif token.attest or token.ek_sha256:
            raise PermissionDenied(
                "enroll.attestation_required",
                "this token is redeemed only by a TPM-attested enrollment (kmsctl enroll --attest)",
            )
        else:
            public_key = self._check_csr(request.csr, token, profile)
        # 1. reserve
        token.state = RESERVED
        token.request_id = request.request_id
        token.reserved_until = stamp(_now() + RESERVE_LEASE)
        revision = await self.store.update_token(token, revision)
        try:
            by = f"enroll:{token.id}"
            role, pattern = profile["role"], str(profile["key_pattern"]).format(name=token.name)
            client_revision = await self.clients.reserve(token.name, role, pattern, by)
            try:
                # 2. issue
                lifetime = datetime.timedelta(days=825)
                cert = await self.issuer._issue(
                    token.name, role, public_key, datetime.datetime.now(datetime.UTC) + lifetime
                )
                serial = serial_hex(cert.serial_number)
                # 3. store
                device = enroll_pb2.Device(
                    name=token.name,
                    group=token.group,
                    profile=token.profile,
                    serial=serial,
                    token_id=token.id,
                    request_id=request.request_id,
                    enrolled_at=stamp(),
                    status=enroll_pb2.DEVICE_STATUS_ACTIVE,
                    certificate_der=cert.public_bytes(serialization.Encoding.DER),
                    sans=list(token.sans),
                    ek_sha256=ek_sha256,
                    ak_public=ak_public,
                    ek_public=ek_public,
                    pcr_values=pcr_values,
                )
                await self.store.put_device(device, existing[1] if existing else None)
            except BaseException:
                await self.clients.release(token.name, client_revision)
                raise
            record = clients_pb2.Client(
                name=token.name,
                role=role,
                key_pattern=pattern,
                serial=serial,
                not_before=stamp(cert.not_valid_before_utc),
                not_after=stamp(cert.not_valid_after_utc),
                created_at=stamp(),
                created_by=by,
            )
            await self.clients.activate(record, client_revision)
        except BaseException:
            stored = await self.store.device(token.name)
            if stored is None or stored[0].token_id != token.id:
                # Nothing stored: the token is usable again.
                token.state = ACTIVE
                token.request_id = ""
                token.reserved_until = ""
                try:
                    await self.store.update_token(token, revision)
                except KMSError:
                    log.warning("token release failed", extra=fields(token_id=token.id))
            raise
        # 4. consume
        await self._finish(token, revision, serial)
        scope.details["serial"] = serial
        return self._response(device)

    def _check_csr(
        self,
        csr_bytes: bytes,
        token: enroll_pb2.EnrollToken,
        profile: dict[str, Any],
    ) -> object:
        try:
            if csr_bytes.lstrip().startswith(b"-----BEGIN"):
                csr = x509.load_pem_x509_csr(csr_bytes)
            else:
                csr = x509.load_der_x509_csr(csr_bytes)
            valid = csr.is_signature_valid
        except Exception:
            raise InvalidArgument(
                "enroll.csr_invalid", "the CSR is not PEM or DER PKCS#10"
            ) from None
        if not valid:
            raise InvalidArgument("enroll.csr_invalid", "the CSR's signature does not verify")
        key = csr.public_key()
        if (
            not isinstance(key, ec.EllipticCurvePublicKey)
            or key.curve.name not in profile["curves"]
        ):
            raise PermissionDenied(
                "enroll.key_not_allowed",
                f"profile {token.profile} allows EC P-256 or P-384 keys only",
            )
        cns, sans = _csr_names(csr)
        if any(cn != token.name for cn in cns):
            raise PermissionDenied(
                "enroll.name_not_allowed", f"the token is for {token.name!r}, the CSR names {cns}"
            )
        extra = [s for s in sans if s not in token.sans]
        if extra:
            raise PermissionDenied(
                "enroll.name_not_allowed", f"the token does not allow {', '.join(extra)[:200]}"
            )
        return key


class _UnlockAdmin:
    """DeviceService's unlock-secret RPCs (mixed in below)."""

    clients: ClientRegistry
    store: DeviceStore

    @rpc("PutUnlockSecret")
    async def PutUnlockSecret(
        self, request: enroll_pb2.PutUnlockSecretRequest, context: Context, identity: Identity
    ) -> enroll_pb2.UnlockSecret:
        given = request.secret
        unlock.check_names(given.device, given.volume)
        retarget(f"{given.device}/{given.volume}")
        note(replace=str(request.replace).lower(), key=given.key_name[:128])
        device = self.clients.devices.devices.get(given.device)
        if device is None or not device.ek_sha256:
            raise FailedPrecondition(
                "unlock.device_unattested",
                f"device {given.device!r} did not enroll with its TPM (kmsctl enroll --attest)",
            )
        existing = await self.store.unlock(given.device, given.volume)
        unlock.new_secret_exists(existing, request.replace)
        record = enroll_pb2.UnlockSecret()
        record.CopyFrom(given)
        if request.replace and existing is not None:
            old = existing[0]
            record.generation = old.generation + 1
            if not record.pcrs:  # rotate keeps the policy unless given anew
                record.pcrs[:] = list(old.pcrs)
                record.pcr_digest = old.pcr_digest
                record.not_before, record.not_after = old.not_before, old.not_after
        else:
            record.generation = 1
        record.ek_sha256 = device.ek_sha256
        if record.pcrs and not record.pcr_digest:
            # The known-good values quoted at enrollment make the digest.
            record.pcr_digest = unlock.digest_from_recorded(device, list(record.pcrs))
        record.created_at = stamp()
        record.created_by = identity.client
        record.removed = False
        record.last_released_at = ""
        unlock.check_policy(record)
        await self.store.put_unlock(record, existing[1] if existing else None)
        return _unlock_summary(record)

    @rpc("ListUnlockSecrets")
    async def ListUnlockSecrets(
        self, request: enroll_pb2.ListUnlockSecretsRequest, context: Context, identity: Identity
    ) -> enroll_pb2.ListUnlockSecretsResponse:
        book = self.clients.devices.unlocks
        selected = (
            book[k] for k in sorted(book) if not request.device or book[k].device == request.device
        )
        page, token = page_by_name(
            selected, lambda s: f"{s.device}.{s.volume}", request.page_size, request.page_token
        )
        return enroll_pb2.ListUnlockSecretsResponse(
            secrets=[_unlock_summary(s) for s in page], next_page_token=token
        )

    @rpc("GetUnlockSecret")
    async def GetUnlockSecret(
        self, request: enroll_pb2.GetUnlockSecretRequest, context: Context, identity: Identity
    ) -> enroll_pb2.UnlockSecret:
        found = self.clients.devices.unlocks.get(f"{request.device}.{request.volume}")
        if found is None:
            raise NotFound("unlock.not_found", "no such unlock secret")
        return _unlock_summary(found)

    @rpc("RemoveUnlockSecret")
    async def RemoveUnlockSecret(
        self, request: enroll_pb2.GetUnlockSecretRequest, context: Context, identity: Identity
    ) -> enroll_pb2.UnlockSecret:
        unlock.check_names(request.device, request.volume)
        retarget(f"{request.device}/{request.volume}")
        existing = await self.store.unlock(request.device, request.volume)
        if existing is None or existing[0].removed:
            raise NotFound("unlock.not_found", "no such unlock secret")
        record = enroll_pb2.UnlockSecret(
            device=request.device,
            volume=request.volume,
            removed=True,
            generation=existing[0].generation,
            created_at=stamp(),
            created_by=identity.client,
        )
        await self.store.put_unlock(record, existing[1])
        return _unlock_summary(existing[0])


def _unlock_summary(secret: enroll_pb2.UnlockSecret) -> enroll_pb2.UnlockSecret:
    """What administrators see: the policy, never the ciphertext."""
    out = enroll_pb2.UnlockSecret()
    out.CopyFrom(secret)
    out.ClearField("ciphertext")
    return out


class DeviceService(_UnlockAdmin, enroll_pb2_grpc.DeviceServiceServicer):
    """Enrollment tokens and the device registry, for administrators."""

    def __init__(
        self,
        nc: NATS,
        clients: ClientRegistry,
        issuer: ClientService,
        store: DeviceStore,
        identities: IdentityCache,
        audit: AuditWriter | None,
    ):
        self.nc = nc
        self.clients = clients
        self.issuer = issuer
        self.store = store
        self.identities = identities  # read by the `rpc` wrapper
        self.audit = audit

    def _ca_fingerprint(self) -> str:
        ca = self.issuer._ca_certificate(self.issuer.registry.get(INTERNAL_CA_KEY).public_key_der)
        return hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()

    @rpc("CreateEnrollToken")
    async def CreateEnrollToken(
        self, request: enroll_pb2.CreateEnrollTokenRequest, context: Context, identity: Identity
    ) -> enroll_pb2.CreateEnrollTokenResponse:
        if not CLIENT_NAME_RE.match(request.name):
            raise InvalidArgument(
                "enroll.name_invalid",
                f"device name {request.name[:80]!r} must match {CLIENT_NAME_RE.pattern}",
            )
        if request.profile not in PROFILES:
            raise InvalidArgument(
                "enroll.profile_unknown",
                f"profile {request.profile[:40]!r} is not one of {', '.join(PROFILES)}",
            )
        if request.group and not GROUP_RE.match(request.group):
            raise InvalidArgument("enroll.group_invalid", f"group must match {GROUP_RE.pattern}")
        if len(request.sans) > MAX_SANS:
            raise InvalidArgument("enroll.san_invalid", f"at most {MAX_SANS} SANs")
        sans = [_check_san(s) for s in request.sans]
        ttl = request.ttl_seconds or DEFAULT_TTL
        if not 60 <= ttl <= MAX_TTL:
            raise InvalidArgument("enroll.ttl_invalid", "a token lives 1 minute to 7 days")
        if self.clients.devices.is_denied(request.name) or (
            request.group and request.group in self.clients.devices.denied_groups
        ):
            raise FailedPrecondition("enroll.denied", f"device {request.name!r} is denied")
        if request.ek_sha256 and len(request.ek_sha256) != 32:
            raise InvalidArgument(
                "enroll.ek_invalid", "an EK is registered by its SHA-256 (32 bytes)"
            )
        owner = self.clients.devices.ek_owner(request.ek_sha256) if request.ek_sha256 else None
        if owner is not None and owner != request.name:
            raise FailedPrecondition(
                "attest.ek_in_use", f"this EK is enrolled already as device {owner!r}"
            )
        token_id, token_string, digest = new_token()
        record = enroll_pb2.EnrollToken(
            attest=request.attest or bool(request.ek_sha256),
            ek_sha256=request.ek_sha256,
            id=token_id,
            name=request.name,
            profile=request.profile,
            sans=sans,
            group=request.group,
            state=ACTIVE,
            secret_sha256=digest,
            created_at=stamp(),
            created_by=identity.client,
            expires_at=stamp(_now() + datetime.timedelta(seconds=ttl)),
        )
        fingerprint = self._ca_fingerprint()
        await self.store.create_token(record)
        log.info(
            "enrollment token created",
            extra=fields(token_id=token_id, device=request.name, by=identity.client),
        )
        return enroll_pb2.CreateEnrollTokenResponse(
            token=_public(record), token_string=token_string, ca_fingerprint=fingerprint
        )

    @rpc("ListEnrollTokens")
    async def ListEnrollTokens(
        self, request: enroll_pb2.ListEnrollTokensRequest, context: Context, identity: Identity
    ) -> enroll_pb2.ListEnrollTokensResponse:
        at = stamp()
        tokens = [
            _public(self.clients.devices.tokens[k])
            for k in sorted(self.clients.devices.tokens)
            if request.include_spent or not token_spent(self.clients.devices.tokens[k], at)
        ]
        page, token = page_by_name(tokens, lambda t: t.id, request.page_size, request.page_token)
        return enroll_pb2.ListEnrollTokensResponse(tokens=page, next_page_token=token)

    @rpc("RevokeEnrollToken")
    async def RevokeEnrollToken(
        self, request: enroll_pb2.RevokeEnrollTokenRequest, context: Context, identity: Identity
    ) -> enroll_pb2.EnrollToken:
        found = await self.store.token(request.id) if len(request.id) == 16 else None
        if found is None:
            raise NotFound("enroll.token_not_found", f"no enrollment token {request.id[:20]!r}")
        token, revision = found
        if token.state == USED:
            raise FailedPrecondition("enroll.token_used", "the token was used already")
        if token.state != REVOKED:
            token.state = REVOKED
            token.revoked_at = stamp()
            token.revoked_by = identity.client
            await self.store.update_token(token, revision)
        return _public(token)

    @rpc("ListDevices")
    async def ListDevices(
        self, request: enroll_pb2.ListDevicesRequest, context: Context, identity: Identity
    ) -> enroll_pb2.ListDevicesResponse:
        book = self.clients.devices
        names = sorted(book.devices)
        selected = (
            book.devices[n]
            for n in names
            if (not request.group or book.devices[n].group == request.group)
            and (not request.denied_only or book.is_denied(n))
        )
        page, token = page_by_name(
            selected, lambda d: d.name, request.page_size, request.page_token
        )
        return enroll_pb2.ListDevicesResponse(
            devices=[_summary(d, book.is_denied(d.name)) for d in page], next_page_token=token
        )

    @rpc("GetDevice")
    async def GetDevice(
        self, request: enroll_pb2.GetDeviceRequest, context: Context, identity: Identity
    ) -> enroll_pb2.Device:
        device = self.clients.devices.devices.get(request.name)
        if device is None:
            raise NotFound("device.not_found", f"no device named {request.name[:80]!r}")
        return _summary(device, self.clients.devices.is_denied(device.name))

    @rpc("DenyDevices")
    async def DenyDevices(
        self, request: enroll_pb2.DenyDevicesRequest, context: Context, identity: Identity
    ) -> enroll_pb2.DenyDevicesResponse:
        if bool(request.name) == bool(request.group):
            raise InvalidArgument("device.deny_target", "give exactly one of a name or a group")
        if request.batch > MAX_DENY_BATCH:
            raise InvalidArgument("device.batch_invalid", f"a batch is at most {MAX_DENY_BATCH}")
        book = self.clients.devices
        if request.name:
            if request.name not in book.devices:
                raise NotFound("device.not_found", f"no device named {request.name[:80]!r}")
            names = [request.name]
            total = 1
            rest: list[str] = []
        else:
            if not GROUP_RE.match(request.group):
                raise InvalidArgument(
                    "enroll.group_invalid", f"group must match {GROUP_RE.pattern}"
                )
            # The group first: every member is refused from here on, before the batches.
            if request.group not in book.denied_groups:
                await self.store.set_group(request.group, True, identity.client)
            members = sorted(n for n, d in book.devices.items() if d.group == request.group)
            total = len(members)
            pending = [n for n in members if not request.cursor or n > request.cursor]
            size = request.batch or DEFAULT_DENY_BATCH
            names, rest = pending[:size], pending[size:]
        revoked = 0
        for name in names:
            revoked += await self._deny_one(name, identity.client)
        log.warning(
            "devices denied",
            extra=fields(
                group=request.group, device=request.name, count=len(names), by=identity.client
            ),
        )
        return enroll_pb2.DenyDevicesResponse(
            devices_denied=len(names),
            certificates_revoked=revoked,
            next_cursor=names[-1] if rest and names else "",
            devices_total=total,
        )

    async def _deny_one(self, name: str, by: str) -> int:
        """Mark the device denied (refused at once), then revoke its client certificate
        and every valid mini-CA certificate it requested. Safe to repeat."""
        found = await self.store.device(name)
        if found is None:
            return 0
        device, revision = found
        if device.status != enroll_pb2.DEVICE_STATUS_DENIED or device.revocations_done:
            device.status = enroll_pb2.DEVICE_STATUS_DENIED
            device.denied_at = stamp()
            device.denied_by = by
            device.revocations_done = False
            revision = await self.store.put_device(device, revision)
        revoked = 0
        current = self.clients.get(name)
        serials = {device.serial} | ({current.serial} if current and current.serial else set())
        for serial in sorted(s for s in serials if s):
            await self.clients.revoke_serial(serial, by)
            revoked += 1
        revoked += await self._revoke_ca_certificates(name, by)
        device.revocations_done = True
        await self.store.put_device(device, revision)
        return revoked

    async def _revoke_ca_certificates(self, requester: str, by: str) -> int:
        count = 0
        listing = ca_pb2.ListCertificatesRequest(
            requester=requester, state=ca_pb2.CERTIFICATE_STATE_VALID, page_size=1000
        )
        serials: list[str] = []
        while True:
            page = await self._ca("ListCertificates", listing, ca_pb2.ListCertificatesResponse)
            serials += [r.serial for r in page.records]
            if not page.next_page_token:
                break
            listing.page_token = page.next_page_token
        for serial in serials:
            try:
                await self._ca(
                    "RevokeCertificate",
                    ca_pb2.RevokeCertificateRequest(
                        serial=serial,
                        reason=ca_pb2.REVOCATION_REASON_PRIVILEGE_WITHDRAWN,
                        requester=by,
                        request_id=f"deny:{requester}:{serial}",
                    ),
                    ca_pb2.RevokeCertificateResponse,
                )
            except FailedPrecondition as err:
                if err.reason != "cert.already_revoked":
                    raise
            count += 1
        return count

    async def _ca(self, method: str, request: Any, response_type: type[T]) -> T:
        return await natsrpc.request(
            self.nc,
            ca_subject(method),
            request,
            response_type,
            CA_TIMEOUT,
            service="the CA service",
            reason_prefix="ca",
        )

    @rpc("AllowDevices")
    async def AllowDevices(
        self, request: enroll_pb2.AllowDevicesRequest, context: Context, identity: Identity
    ) -> enroll_pb2.AllowDevicesResponse:
        if bool(request.name) == bool(request.group):
            raise InvalidArgument("device.deny_target", "give exactly one of a name or a group")
        if request.group:
            if not GROUP_RE.match(request.group):
                raise InvalidArgument(
                    "enroll.group_invalid", f"group must match {GROUP_RE.pattern}"
                )
            await self.store.set_group(request.group, False, identity.client)
            count = sum(
                1 for d in self.clients.devices.devices.values() if d.group == request.group
            )
            return enroll_pb2.AllowDevicesResponse(devices_allowed=count)
        found = await self.store.device(request.name)
        if found is None:
            raise NotFound("device.not_found", f"no device named {request.name[:80]!r}")
        device, revision = found
        if device.status == enroll_pb2.DEVICE_STATUS_DENIED:
            device.status = enroll_pb2.DEVICE_STATUS_ACTIVE
            device.denied_at = ""
            device.denied_by = ""
            await self.store.put_device(device, revision)
        return enroll_pb2.AllowDevicesResponse(devices_allowed=1)


def _public(token: enroll_pb2.EnrollToken) -> enroll_pb2.EnrollToken:
    out = enroll_pb2.EnrollToken()
    out.CopyFrom(token)
    out.ClearField("secret_sha256")
    return out


def _summary(device: enroll_pb2.Device, denied: bool) -> enroll_pb2.Device:
    out = enroll_pb2.Device()
    out.CopyFrom(device)
    out.ClearField("certificate_der")
    # The TPM areas and PCR values stay in the registry: listings of 50,000 devices
    # carry the EK identity only.
    out.ClearField("ek_public")
    out.ClearField("ak_public")
    out.ClearField("pcr_values")
    if denied:
        out.status = enroll_pb2.DEVICE_STATUS_DENIED
    return out
