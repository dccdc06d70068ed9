"""The gRPC KeyService and SystemService: authenticate, authorize, look up, route.

Every method follows one path: who is calling (client certificate), may that role call
this method, does the key exist and is it usable, does its policy allow it, is the
request well-formed; then the request goes over NATS to the crypto service holding the
key. KMSErrors anywhere on that path become the matching gRPC status with the typed
Error in the trailing metadata.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import nats.errors
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker import sign_many
from broker.archiver import Archiver
from broker.audit_service import (
    AuditScope,
    note,
    record_alongside,
    record_before_change,
    retarget,
)
from broker.authz import check_key_policy, check_method, check_policy_rules
from broker.config import BrokerConfig
from broker.idempotency import IdempotencyStore, idempotent
from broker.paging import page_by_name
from broker.registry import KeyRegistry, check_key_name
from broker.wire import Malformed
from edgekms import envelope, natsrpc
from edgekms.algorithms import (
    check_aad,
    check_encrypt_request,
    check_sign_request,
    check_usage,
    key_type_info,
    key_usage,
)
from edgekms.audit import WARN_FRACTION, AuditWriter, StreamUsage, audit_streams
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
from edgekms.identity import Identity, identity_from_certificate
from edgekms.logs import fields
from edgekms.sign_batcher import SignBatcher
from edgekms.subjects import CA_SERVICE_NAME
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2, enroll_pb2, keys_pb2, keys_pb2_grpc

if TYPE_CHECKING:
    from broker.clients import AccessGate

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, Context, Identity], Awaitable[Resp]]


# Keys EdgeKMS keeps for itself (the internal CA): their policy cannot be changed.
RESERVED_PREFIX = "edgekms/"

# Labels are for people and scripts; the limits keep a record far below the bus's
# max_payload, where an oversized one used to fail its KV write as INTERNAL.
MAX_LABELS = 32
MAX_LABEL_VALUE = 256
LABEL_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,62}$")


def check_labels(labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument("key.labels_invalid", f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not LABEL_KEY_RE.match(key):
            raise InvalidArgument(
                "key.labels_invalid",
                f"label name {key[:70]!r} must match {LABEL_KEY_RE.pattern}",
                {"label": key[:70]},
            )
        if len(value) > MAX_LABEL_VALUE:
            raise InvalidArgument(
                "key.labels_invalid",
                f"label {key!r}: values are at most {MAX_LABEL_VALUE} characters",
                {"label": key},
            )


class IdentityCache:
    """Parsing a certificate per request is waste on the hot path: remember by PEM."""

    def __init__(self, size: int = 1024, gate: AccessGate | None = None):
        self._size = size
        self._cache: dict[bytes, Identity] = {}
        # Throttling, revocation, expiry and key patterns (broker.clients); None in
        # brokers assembled without a client registry.
        self.gate = gate

    @staticmethod
    def caller_certificate(context: Context) -> x509.Certificate:
        """The certificate the caller's mutual TLS connection presented (identify() has
        admitted it before any handler runs)."""
        pem = IdentityCache._pem(context)
        if pem is None:
            raise Unauthenticated("auth.no_certificate", "no client certificate")
        return x509.load_pem_x509_certificate(pem)

    @staticmethod
    def _pem(context: Context) -> bytes | None:
        pems = list(context.auth_context().get("x509_pem_cert") or [])
        return pems[0] if pems else None

    async def identify(
        self, context: Context, scope: AuditScope | None = None, method: str = ""
    ) -> Identity:
        """Who is calling, admitted (not throttled, revoked or expired) and on record.

        The certificate is read before the gate's checks and handed to `scope` at once, so
        that a throttled or revoked caller is audited under the name and role its
        certificate carries rather than with an empty actor.
        """
        pem = self._pem(context)
        if pem is None:
            raise Unauthenticated("auth.no_certificate", "no client certificate")
        identity = self._cache.get(pem)
        if identity is None:
            if self.gate is not None:
                # Before parsing: a certificate that never parses is throttled too.
                self.gate.before_identify(pem)
            identity = identity_from_certificate(x509.load_pem_x509_certificate(pem))
            if len(self._cache) >= self._size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[pem] = identity
            if scope is not None:
                scope.identity = identity
        else:
            if scope is not None:
                scope.identity = identity
            if self.gate is not None:
                self.gate.before_identify(pem)
        if self.gate is not None:
            self.gate.admit(identity, method)
            await self.gate.bind(identity)
        return identity

    def device(self, identity: Identity) -> enroll_pb2.Device | None:
        """The caller's device record, if it enrolled as a device (broker.devices) and its
        certificate carries the role its enrollment gave; None for every other client."""
        if self.gate is None:
            return None
        return self.gate.device(identity)

    def check_scope(self, identity: Identity, method: str, request: Any) -> None:
        if self.gate is not None:
            self.gate.check_scope(identity, method, request)

    def key_allowed(self, identity: Identity, name: str) -> bool:
        return self.gate is None or self.gate.key_allowed(identity, name)

    def failed(self, context: Context, identity: Identity | None, err: KMSError) -> None:
        """Count a refusal against whoever asked (see broker.throttle)."""
        if self.gate is not None:
            self.gate.failed(self._pem(context), identity, err)


def rpc(method: str) -> Callable[[Handler[Req, Resp]], Any]:
    """Wrap a servicer method: identify, check the role, map KMSErrors, log the outcome."""

    def wrap(handler: Handler[Req, Resp]) -> Any:
        @functools.wraps(handler)
        async def run(self: Any, request: Req, context: Context) -> Resp:
            started = time.perf_counter()
            identity: Identity | None = None
            # Every decision is audited before its answer leaves (broker/audit_service.py).
            scope = AuditScope.for_request(getattr(self, "audit", None), method, request)
            bound = scope.bind()
            try:
                identity = await self.identities.identify(context, scope, method)
                check_method(identity, method, self.identities.device(identity) is not None)
                if isinstance(request, Malformed):
                    raise InvalidArgument(
                        "request.malformed", f"{method}: the request is not a {request.expected}"
                    )
                self.identities.check_scope(identity, method, request)
                response = await handler(self, request, context, identity)
                failure = await scope.settle(None)
                if failure is not None:
                    raise failure
            except KMSError as err:
                self.identities.failed(context, identity, err)
                err = (await scope.settle(err)) or err
                _log_outcome(method, identity, request, started, err)
                context.set_trailing_metadata(
                    ((ERROR_METADATA_KEY, err.to_proto().SerializeToString()),)
                )
                await context.abort(err.grpc_status, f"{err.reason}: {err.message}")
                raise  # abort() raises; this keeps type checkers sure we never fall through
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
            _log_outcome(method, identity, request, started, None)
            return response

        return run

    return wrap


def _log_outcome(
    method: str, identity: Identity | None, request: Any, started: float, err: KMSError | None
) -> None:
    if err is None and not log.isEnabledFor(logging.INFO):
        return  # per call on the hot path: skip building a line nobody keeps
    entry = {
        "method": method,
        "client": identity.client if identity else None,
        "role": identity.role if identity else None,
        "key": getattr(request, "name", None) or None,
        "ms": round((time.perf_counter() - started) * 1000, 2),
        "outcome": "ok" if err is None else err.reason,
    }
    if err is None:
        log.info("request", extra=fields(**entry))
    else:
        log.warning("request refused", extra=fields(**entry, code=err.code_name))


def _state_name(state: int) -> str:
    return pb.KeyState.Name(state).removeprefix("KEY_STATE_").lower()  # type: ignore[arg-type]


def require_usable(record: pb.KeyRecord) -> None:
    if record.state != pb.KEY_STATE_ACTIVE:
        state = _state_name(record.state)
        raise FailedPrecondition(
            f"key.{state}", f"key {record.name!r} is {state}", {"state": state}
        )


# Versions one key may have: each rotation keeps the one before, and the record must stay
# far below the bus's max_payload. A key rotated this often wants replacing instead.
MAX_KEY_VERSIONS = 256


def require_signing(record: pb.KeyRecord) -> None:
    if key_usage(record.key_type, record.options.usage) != pb.KEY_USAGE_SIGN_VERIFY:
        raise InvalidArgument(
            "key.usage_mismatch",
            f"key {record.name!r} is for encryption; it cannot sign or verify",
            {"usage": "encrypt-decrypt"},
        )


def version_key_id(record: pb.KeyRecord, version: int) -> bytes:
    """The provider handle of one version of the key; NotFound for a version it never had."""
    if version == (record.version or 1):
        return record.key_id
    for kept in record.previous_versions:
        if kept.version == version:
            return kept.key_id
    raise NotFound(
        "key.version_not_found",
        f"key {record.name!r} has no version {version} (current: {record.version or 1})",
        {"version": str(version), "current": str(record.version or 1)},
    )


def to_key(record: pb.KeyRecord) -> keys_pb2.Key:
    return keys_pb2.Key(
        name=record.name,
        provider=record.provider,
        key_type=record.key_type,
        state=record.state,
        policy=record.policy,
        options=record.options,
        created_at=record.created_at,
        updated_at=record.updated_at,
        created_by=record.created_by,
        labels=record.labels,
        key_id=record.key_id.hex(),
        version=record.version or 1,
    )


def usage_detail(usage: StreamUsage) -> str:
    """ "12% of 2.0 GiB (5,120 of 20,000,000 messages)", led by FULL or warning."""
    limit = f"{usage.max_bytes / 1024**3:.1f} GiB" if usage.max_bytes > 0 else "no limit"
    quota = f"{usage.max_msgs:,}" if usage.max_msgs > 0 else "no limit"
    text = (
        f"{usage.fraction:.0%} of {limit} ({usage.bytes:,} bytes, "
        f"{usage.messages:,} of {quota} messages)"
    )
    if usage.full:
        return f"FULL, its appends refused with audit.full: {text}"
    if usage.fraction >= WARN_FRACTION:
        return f"warning, nearly full: {text}"
    return text


def archive_status(archiver: Archiver) -> keys_pb2.ComponentStatus:
    """The archiver's line: where it archives and the window it keeps, or a warning
    naming the typed reason its last round failed (records stay in their stream, which
    fills towards audit.full until archiving catches up)."""
    window = f"window {archiver.policy.window_fraction:.0%} of each stream's limit"
    err = archiver.last_error
    if err is not None:
        detail = f"warning, archiving behind: {err.reason}: {err.message} ({window})"
    else:
        detail = f"to {archiver.archive_dir}, {window}"
    return keys_pb2.ComponentStatus(name="audit/archive", ok=True, detail=detail)


class KeyService(keys_pb2_grpc.KeyServiceServicer):
    def __init__(
        self,
        config: BrokerConfig,
        registry: KeyRegistry,
        crypto: CryptoClient,
        identities: IdentityCache,
        audit: AuditWriter | None = None,
        idempotency: IdempotencyStore | None = None,
    ):
        self.config = config
        self.registry = registry
        self.crypto = crypto
        # Concurrent Signs to one provider share bus messages (edgekms/sign_batcher.py);
        # each is still authorised and audited here as its own call.
        self.signer = SignBatcher(crypto)
        self.identities = identities
        self.audit = audit
        # Retried state changes (same request_id) are done once (broker/idempotency.py).
        self.idempotency = idempotency

    def _timeout(self, context: Context, ceiling: float) -> float:
        """The NATS deadline: the configured ceiling, cut to what the caller has left."""
        remaining = context.time_remaining()
        if remaining is None:
            return ceiling
        return max(0.05, min(ceiling, remaining - 0.05))

    @rpc("CreateKey")
    @idempotent("CreateKey", keys_pb2.Key)
    async def CreateKey(
        self,
        request: keys_pb2.CreateKeyRequest,
        context: Context,
        identity: Identity,
    ) -> keys_pb2.Key:
        check_key_name(request.name)
        if request.name.startswith(RESERVED_PREFIX):
            raise InvalidArgument(
                "key.reserved", f"names under {RESERVED_PREFIX!r} belong to EdgeKMS itself"
            )
        if request.key_type == pb.KEY_TYPE_UNSPECIFIED:
            raise InvalidArgument("key.type_missing", "a key type is required")
        key_type_info(request.key_type)
        check_usage(request.key_type, request.options.usage)
        provider = request.provider or self.config.default_provider
        if provider not in self.config.providers:
            raise InvalidArgument(
                "provider.unknown",
                f"no provider {provider!r}; this broker knows {', '.join(self.config.providers)}",
            )
        for index in request.options.pcr_indexes:
            if index > 23:
                raise InvalidArgument("key.pcr_invalid", f"PCR index {index} is out of range")
        if len(request.options.pcr_indexes) > 24:
            raise InvalidArgument("key.pcr_invalid", "at most 24 PCR indexes")
        check_labels(request.labels)
        if request.policy.rules:
            # Policies are the administrators' (UpdateKeyPolicy is admin-only); a policy
            # set at creation must not be a way around that, nor around its checks.
            if identity.role != "admin":
                raise PermissionDenied(
                    "authz.policy_admin_only",
                    "only administrators set key policies; create the key without one",
                    {"role": identity.role},
                )
            check_policy_rules(request.policy, request.key_type)
        record = pb.KeyRecord(
            name=request.name,
            provider=provider,
            key_type=request.key_type,
            key_id=secrets.token_bytes(16),
            policy=request.policy,
            options=request.options,
            created_by=identity.client,
            labels=request.labels,
        )
        # A reservation outlives any generation only if its broker died: then take it.
        # Taken before the decision is recorded: a name in use is refused with one entry
        # (key.exists), not an "ok" followed by the refusal. The reservation is no key
        # yet, and is released if the entry cannot be stored.
        revision = await self.registry.reserve(record, self.config.generate_timeout + 30)
        try:
            await record_before_change(provider=provider)
            generated = await self.crypto.generate_key(
                provider,
                crypto_pb2.GenerateKeyRequest(
                    key_id=record.key_id,
                    label=record.name,
                    key_type=record.key_type,
                    options=record.options,
                ),
                timeout=self._timeout(context, self.config.generate_timeout),
            )
            record.public_key_der = generated.public_key_der
            record = await self.registry.activate(record, revision)
        except BaseException:
            await self.registry.release(record.name, revision)
            raise
        return to_key(record)

    @rpc("GetKey")
    async def GetKey(
        self, request: keys_pb2.GetKeyRequest, context: Context, identity: Identity
    ) -> keys_pb2.Key:
        return to_key(self.registry.get(request.name))

    @rpc("ListKeys")
    async def ListKeys(
        self,
        request: keys_pb2.ListKeysRequest,
        context: Context,
        identity: Identity,
    ) -> keys_pb2.ListKeysResponse:
        records = self.registry.list(request.prefix, request.include_destroyed)
        allowed = (r for r in records if self.identities.key_allowed(identity, r.name))
        page, next_token = page_by_name(
            allowed, lambda r: r.name, request.page_size, request.page_token
        )
        return keys_pb2.ListKeysResponse(keys=[to_key(r) for r in page], next_page_token=next_token)

    @rpc("GetPublicKey")
    async def GetPublicKey(
        self,
        request: keys_pb2.GetPublicKeyRequest,
        context: Context,
        identity: Identity,
    ) -> keys_pb2.PublicKey:
        record = self.registry.get(request.name)
        check_key_policy(identity, record, pb.KEY_OPERATION_GET_PUBLIC_KEY)
        if record.state == pb.KEY_STATE_DESTROYED:
            require_usable(record)
        if not record.public_key_der:
            raise FailedPrecondition(
                "key.no_public_key", f"key {record.name!r} is symmetric: it has no public key"
            )
        pem = (
            serialization.load_der_public_key(record.public_key_der)
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )
        return keys_pb2.PublicKey(
            name=record.name, key_type=record.key_type, der=record.public_key_der, pem=pem
        )

    @rpc("Sign")
    async def Sign(
        self, request: keys_pb2.SignRequest, context: Context, identity: Identity
    ) -> keys_pb2.SignResponse:
        return await self._sign(request, context, identity, alongside=True)

    async def _sign(
        self,
        request: keys_pb2.SignRequest,
        context: Context,
        identity: Identity,
        alongside: bool = False,
    ) -> keys_pb2.SignResponse:
        """One Sign after its caller is admitted: the same checks for a unary call and for
        every item of a batch or a stream (broker/sign_many.py). `alongside`: the unary
        call's audit entry is stored while the token signs (record_alongside), once every
        check has passed; sign_many audits its items its own way."""
        record = self.registry.get(request.name)
        require_usable(record)
        check_key_policy(identity, record, pb.KEY_OPERATION_SIGN, request.algorithm)
        require_signing(record)
        check_sign_request(record.key_type, request.algorithm, request.data)
        signing = self.signer.sign(
            record.provider,
            crypto_pb2.SignRequest(
                key_id=record.key_id, algorithm=request.algorithm, data=request.data
            ),
            timeout=self._timeout(context, self.config.sign_timeout),
        )
        if alongside:
            response = await record_alongside(signing, "the signature")
        else:
            response = await signing
        return keys_pb2.SignResponse(
            signature=response.signature, algorithm=request.algorithm, key_name=record.name
        )

    @rpc("SignBatch")
    async def SignBatch(
        self, request: keys_pb2.SignBatchRequest, context: Context, identity: Identity
    ) -> keys_pb2.SignBatchResponse:
        return await sign_many.sign_batch(self, request, context, identity)

    async def SignStream(
        self, requests: AsyncIterator[keys_pb2.SignRequest | Malformed], context: Context
    ) -> AsyncIterator[keys_pb2.SignStreamResponse]:
        # grpc.aio serves a bidirectional method only from an async generator function.
        async for response in sign_many.sign_stream(self, requests, context):
            yield response

    @rpc("Verify")
    async def Verify(
        self, request: keys_pb2.VerifyRequest, context: Context, identity: Identity
    ) -> keys_pb2.VerifyResponse:
        record = self.registry.get(request.name)
        require_usable(record)
        check_key_policy(identity, record, pb.KEY_OPERATION_VERIFY, request.algorithm)
        require_signing(record)
        check_sign_request(record.key_type, request.algorithm, request.data)
        if not request.signature:
            raise InvalidArgument("verify.signature_missing", "no signature to verify")
        response = await self.crypto.verify(
            record.provider,
            crypto_pb2.VerifyRequest(
                key_id=record.key_id,
                algorithm=request.algorithm,
                data=request.data,
                signature=request.signature,
            ),
            timeout=self._timeout(context, self.config.sign_timeout),
        )
        return keys_pb2.VerifyResponse(valid=response.valid)

    async def _transition(
        self, identity: Identity, name: str, operation: int, allowed: tuple[int, ...], to: int
    ) -> keys_pb2.Key:
        record = self.registry.get(name)
        check_key_policy(identity, record, operation)  # type: ignore[arg-type]
        # Refused before the decision is recorded, so the entry says the refusal, once
        # (the registry checks again on the stored record, for a change meanwhile).
        if record.state != to and record.state not in allowed:
            state = _state_name(record.state)
            raise FailedPrecondition(f"key.{state}", f"key {name!r} is {state}", {"state": state})
        await record_before_change(state=_state_name(to))
        updated, changed = await self.registry.transition(name, allowed, to)
        if changed:
            log.info(
                "key state changed",
                extra=fields(key=name, state=_state_name(to), client=identity.client),
            )
        return to_key(updated)

    @rpc("DisableKey")
    @idempotent("DisableKey", keys_pb2.Key)
    async def DisableKey(
        self,
        request: keys_pb2.DisableKeyRequest,
        context: Context,
        identity: Identity,
    ) -> keys_pb2.Key:
        return await self._transition(
            identity,
            request.name,
            pb.KEY_OPERATION_DISABLE,
            (pb.KEY_STATE_ACTIVE,),
            pb.KEY_STATE_DISABLED,
        )

    @rpc("EnableKey")
    @idempotent("EnableKey", keys_pb2.Key)
    async def EnableKey(
        self,
        request: keys_pb2.EnableKeyRequest,
        context: Context,
        identity: Identity,
    ) -> keys_pb2.Key:
        return await self._transition(
            identity,
            request.name,
            pb.KEY_OPERATION_ENABLE,
            (pb.KEY_STATE_DISABLED,),
            pb.KEY_STATE_ACTIVE,
        )

    @rpc("DestroyKey")
    @idempotent("DestroyKey", keys_pb2.Key)
    async def DestroyKey(
        self,
        request: keys_pb2.DestroyKeyRequest,
        context: Context,
        identity: Identity,
    ) -> keys_pb2.Key:
        record = self.registry.get(request.name)
        check_key_policy(identity, record, pb.KEY_OPERATION_DESTROY)
        if record.state == pb.KEY_STATE_DESTROYED:
            return to_key(record)
        if record.name.startswith(RESERVED_PREFIX):
            raise FailedPrecondition(
                "key.reserved", f"{record.name!r} holds EdgeKMS together and cannot be destroyed"
            )
        await record_before_change(state="destroyed")
        # NotFound: already gone from the token (a destroy that failed halfway): finish it.
        # Every version goes: a destroyed key decrypts nothing any more.
        for key_id in [record.key_id, *(v.key_id for v in record.previous_versions)]:
            with contextlib.suppress(NotFound):
                await self.crypto.destroy_key(
                    record.provider,
                    crypto_pb2.DestroyKeyRequest(key_id=key_id),
                    timeout=self._timeout(context, self.config.sign_timeout),
                )
        return await self._transition(
            identity,
            request.name,
            pb.KEY_OPERATION_DESTROY,
            (pb.KEY_STATE_ACTIVE, pb.KEY_STATE_DISABLED),
            pb.KEY_STATE_DESTROYED,
        )

    @rpc("UpdateKeyPolicy")
    @idempotent("UpdateKeyPolicy", keys_pb2.Key)
    async def UpdateKeyPolicy(
        self,
        request: keys_pb2.UpdateKeyPolicyRequest,
        context: Context,
        identity: Identity,
    ) -> keys_pb2.Key:
        record = self.registry.get(request.name)
        if record.name.startswith(RESERVED_PREFIX):
            raise FailedPrecondition(
                "key.reserved",
                f"key {record.name!r} belongs to EdgeKMS itself; its policy is fixed",
            )
        if record.state == pb.KEY_STATE_DESTROYED:
            require_usable(record)
        check_policy_rules(request.policy, record.key_type)
        updated = await self.registry.update_policy(request.name, request.policy)
        log.info(
            "key policy changed",
            extra=fields(key=request.name, rules=len(request.policy.rules), client=identity.client),
        )
        return to_key(updated)

    @rpc("AttestKey")
    async def AttestKey(
        self,
        request: keys_pb2.AttestKeyRequest,
        context: Context,
        identity: Identity,
    ) -> keys_pb2.AttestKeyResponse:
        record = self.registry.get(request.name)
        require_usable(record)
        check_key_policy(identity, record, pb.KEY_OPERATION_ATTEST)
        if len(request.nonce) < 8 or len(request.nonce) > 64:
            raise InvalidArgument("attest.nonce_length", "the nonce must be 8 to 64 bytes")
        evidence = await self.crypto.attest(
            record.provider,
            crypto_pb2.AttestRequest(key_id=record.key_id, nonce=request.nonce),
            timeout=self._timeout(context, self.config.sign_timeout),
        )
        return keys_pb2.AttestKeyResponse(
            format=evidence.format,
            attestation=evidence.attestation,
            signature=evidence.signature,
            signature_algorithm=evidence.signature_algorithm,
            attestation_key_der=evidence.attestation_key_der,
            key_public_area=evidence.key_public_area,
            public_key_der=record.public_key_der,
        )

    # -- encryption ----------------------------------------------------------------------

    async def _seal(
        self, context: Context, record: pb.KeyRecord, plaintext: bytes, aad: bytes
    ) -> tuple[bytes, int, int]:
        """Encrypt under the newest version: (envelope, version, algorithm)."""
        version = record.version or 1
        response = await self.crypto.encrypt(
            record.provider,
            crypto_pb2.EncryptRequest(
                key_id=record.key_id,
                plaintext=plaintext,
                aad=envelope.bound_aad(record.name, version, aad),
            ),
            timeout=self._timeout(context, self.config.sign_timeout),
        )
        sealed = envelope.Envelope(
            response.algorithm, record.name, version, response.nonce, response.ciphertext
        ).encode()
        note(key_version=str(version))
        return sealed, version, response.algorithm

    @rpc("Encrypt")
    async def Encrypt(
        self, request: keys_pb2.EncryptRequest, context: Context, identity: Identity
    ) -> keys_pb2.EncryptResponse:
        record = self.registry.get(request.name)
        require_usable(record)
        check_key_policy(identity, record, pb.KEY_OPERATION_ENCRYPT)
        check_encrypt_request(record.key_type, record.options.usage, request.plaintext, request.aad)
        sealed, version, algorithm = await self._seal(
            context, record, request.plaintext, request.aad
        )
        return keys_pb2.EncryptResponse(
            ciphertext=sealed,
            key_name=record.name,
            key_version=version,
            algorithm=algorithm,  # type: ignore[arg-type]
        )

    @rpc("Decrypt")
    async def Decrypt(
        self, request: keys_pb2.DecryptRequest, context: Context, identity: Identity
    ) -> keys_pb2.DecryptResponse:
        sealed = envelope.decode(request.ciphertext)
        retarget(sealed.key_name)
        note(key_version=str(sealed.key_version))
        if request.name and request.name != sealed.key_name:
            raise InvalidArgument(
                "decrypt.key_mismatch",
                f"the ciphertext was made with key {sealed.key_name!r}, not {request.name!r}",
                {"ciphertext_key": sealed.key_name, "key": request.name},
            )
        if not self.identities.key_allowed(identity, sealed.key_name):
            raise PermissionDenied(
                "authz.key_pattern",
                f"client {identity.client!r} may not use key {sealed.key_name!r}",
                {"client": identity.client, "key": sealed.key_name},
            )
        record = self.registry.get(sealed.key_name)
        require_usable(record)
        check_key_policy(identity, record, pb.KEY_OPERATION_DECRYPT)
        check_encrypt_request(record.key_type, record.options.usage, b"", request.aad)
        key_id = version_key_id(record, sealed.key_version)
        response = await self.crypto.decrypt(
            record.provider,
            crypto_pb2.DecryptRequest(
                key_id=key_id,
                algorithm=sealed.algorithm,
                nonce=sealed.nonce,
                ciphertext=sealed.body,
                aad=envelope.bound_aad(sealed.key_name, sealed.key_version, request.aad),
            ),
            timeout=self._timeout(context, self.config.sign_timeout),
        )
        return keys_pb2.DecryptResponse(
            plaintext=response.plaintext, key_name=record.name, key_version=sealed.key_version
        )

    @rpc("GenerateDataKey")
    async def GenerateDataKey(
        self, request: keys_pb2.GenerateDataKeyRequest, context: Context, identity: Identity
    ) -> keys_pb2.GenerateDataKeyResponse:
        record = self.registry.get(request.name)
        require_usable(record)
        check_key_policy(identity, record, pb.KEY_OPERATION_GENERATE_DATA_KEY)
        check_aad(request.aad)
        data_key = secrets.token_bytes(32)
        check_encrypt_request(record.key_type, record.options.usage, data_key, request.aad)
        sealed, version, _ = await self._seal(context, record, data_key, request.aad)
        if request.without_plaintext:
            note(plaintext="withheld")
        return keys_pb2.GenerateDataKeyResponse(
            plaintext=b"" if request.without_plaintext else data_key,
            ciphertext=sealed,
            key_name=record.name,
            key_version=version,
        )

    @rpc("RotateKey")
    @idempotent("RotateKey", keys_pb2.Key)
    async def RotateKey(
        self, request: keys_pb2.RotateKeyRequest, context: Context, identity: Identity
    ) -> keys_pb2.Key:
        record = self.registry.get(request.name)
        check_key_policy(identity, record, pb.KEY_OPERATION_ROTATE)
        require_usable(record)
        if record.name.startswith(RESERVED_PREFIX):
            raise FailedPrecondition(
                "key.reserved", f"{record.name!r} belongs to EdgeKMS itself and is not rotated"
            )
        if key_usage(record.key_type, record.options.usage) != pb.KEY_USAGE_ENCRYPT_DECRYPT:
            # A signing key's public key is in certificates and verifiers: a new version
            # would silently break them. Make a new key and move its users instead.
            raise FailedPrecondition(
                "key.rotate_unsupported",
                f"key {record.name!r} signs; only encryption keys are rotated in place",
            )
        current = record.version or 1
        if current >= MAX_KEY_VERSIONS:
            raise FailedPrecondition(
                "key.too_many_versions",
                f"key {record.name!r} has {current} versions, the most one key keeps",
                {"max_versions": str(MAX_KEY_VERSIONS)},
            )
        await record_before_change(version=str(current + 1))
        key_id = secrets.token_bytes(16)
        generated = await self.crypto.generate_key(
            record.provider,
            crypto_pb2.GenerateKeyRequest(
                key_id=key_id, label=record.name, key_type=record.key_type, options=record.options
            ),
            timeout=self._timeout(context, self.config.generate_timeout),
        )
        try:
            updated = await self.registry.rotate(
                record.name, current, key_id, generated.public_key_der
            )
        except BaseException:
            # Nothing half-done: the new version's key leaves the token again.
            with contextlib.suppress(KMSError):
                await self.crypto.destroy_key(
                    record.provider,
                    crypto_pb2.DestroyKeyRequest(key_id=key_id),
                    timeout=self._timeout(context, self.config.sign_timeout),
                )
            raise
        log.info(
            "key rotated",
            extra=fields(key=record.name, version=updated.version, client=identity.client),
        )
        return to_key(updated)


class SystemService(keys_pb2_grpc.SystemServiceServicer):
    def __init__(
        self,
        config: BrokerConfig,
        registry: KeyRegistry,
        crypto: CryptoClient,
        identities: IdentityCache,
        bus_check: Callable[[], Awaitable[str]],
        audit: AuditWriter | None = None,
    ):
        self.config = config
        self.registry = registry
        self.crypto = crypto
        self.identities = identities
        self.bus_check = bus_check
        self.audit = audit
        # The audit archiver (broker/archiver.py), set once it runs: its line in status.
        self.archiver: Archiver | None = None

    @rpc("GetStatus")
    async def GetStatus(
        self,
        request: keys_pb2.GetStatusRequest,
        context: Context,
        identity: Identity,
    ) -> keys_pb2.GetStatusResponse:
        components = [keys_pb2.ComponentStatus(name="broker", ok=True, detail="answering")]
        try:
            detail = await self.bus_check()
            components.append(keys_pb2.ComponentStatus(name="bus", ok=True, detail=detail))
        except KMSError as err:
            components.append(keys_pb2.ComponentStatus(name="bus", ok=False, detail=str(err)))
        for provider in self.config.providers:
            try:
                info = await self.crypto.ping(provider, timeout=1.0)
                detail = f"{info.get('name', '')} {info.get('version', '')}".strip()
                components.append(
                    keys_pb2.ComponentStatus(name=f"crypto/{provider}", ok=True, detail=detail)
                )
            except KMSError as err:
                components.append(
                    keys_pb2.ComponentStatus(name=f"crypto/{provider}", ok=False, detail=str(err))
                )
        # The CA answers pings only while it holds its bus connection (it exits when the
        # connection closes for good, and the supervisor restarts it).
        if self.config.ca:
            try:
                info = await natsrpc.ping(self.crypto.nc, CA_SERVICE_NAME, timeout=1.0)
                detail = f"{info.get('name', '')} {info.get('version', '')}".strip()
                components.append(keys_pb2.ComponentStatus(name="ca", ok=True, detail=detail))
            except KMSError as err:
                components.append(keys_pb2.ComponentStatus(name="ca", ok=False, detail=str(err)))
        components.extend(await self._audit_status())
        return keys_pb2.GetStatusResponse(ok=all(c.ok for c in components), components=components)

    async def _audit_status(self) -> list[keys_pb2.ComponentStatus]:
        """One line per audit writer's stream: how full it is, a warning from
        WARN_FRACTION on, and not ok once full (that writer's appends fail closed with
        audit.full; the others' are unaffected)."""
        if self.audit is None:
            return []
        js = self.audit.js
        try:
            usages = [
                StreamUsage.of(await js.stream_info(name)) for name in await audit_streams(js)
            ]
        except (nats.errors.Error, TimeoutError, KMSError) as exc:
            return [keys_pb2.ComponentStatus(name="audit", ok=False, detail=f"unreadable: {exc}")]
        out = []
        for usage in usages:
            if not usage.writer:
                detail = f"legacy stream (closed): {usage.messages} messages, {usage.bytes} bytes"
                out.append(keys_pb2.ComponentStatus(name="audit", ok=True, detail=detail))
                continue
            detail = usage_detail(usage)
            out.append(
                keys_pb2.ComponentStatus(
                    name=f"audit/{usage.writer}", ok=not usage.full, detail=detail
                )
            )
        if self.archiver is not None:
            out.append(archive_status(self.archiver))
        return out

    @rpc("WhoAmI")
    async def WhoAmI(
        self, request: keys_pb2.WhoAmIRequest, context: Context, identity: Identity
    ) -> keys_pb2.WhoAmIResponse:
        return keys_pb2.WhoAmIResponse(
            client=identity.client,
            role=identity.role,
            serial=format(identity.serial, "x"),
            not_after=identity.not_after,
        )
