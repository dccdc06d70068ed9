"""The crypto service on the bus: a nats.micro service answering kms.crypto.<provider>.<Op>.

It trusts nobody on the bus, so every request is parsed and validated again here
(edgekms.algorithms) before the token sees it. Token calls block, so they run on a bounded
thread pool; nats-py delivers one subscription's messages one after another, so each
request becomes its own task, with at most `workers * 2` in flight per service (the rest
wait in the subscription, which is the back-pressure). Replicas of one provider share a
queue group, so each request is answered by exactly one of them.

Key classes: every operation arrives on the subjects of one key class (user, ca,
internal: edgekms.subjects), and only the rightful bus identity may publish on a class's
subjects (mgmt/natsauth.py). A key gets the class of the subject its GenerateKey came in
on, stored with it in the token; Sign, SignBatch, DestroyKey and Attest refuse a key whose
stored class is not the subject's (PERMISSION_DENIED `key.class_mismatch`), and audit the
refusal under this service's own writer name. Reading a public key or verifying is open
to every class: nothing secret is used.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import nats.micro
from google.protobuf.message import Message
from nats.aio.client import Client
from nats.micro.service import Service

from crypto_service.providers.base import KeyCreateOptions, Provider, RunsSerially
from crypto_service.throttle import AuthGuard
from edgekms import natsrpc
from edgekms.algorithms import (
    MAX_AAD,
    MAX_PLAINTEXT,
    KeyType,
    SignatureAlgorithm,
    check_sign_request,
    check_usage,
    key_type_info,
    verify_signature,
)
from edgekms.errors import Internal, InvalidArgument, KMSError, PermissionDenied
from edgekms.subjects import (
    KEY_CLASS_USER,
    KEY_CLASSES,
    class_operations,
    crypto_queue_group,
    crypto_service_name,
    crypto_subject,
)
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2

if TYPE_CHECKING:
    from edgekms.audit import AuditWriter

log = logging.getLogger(__name__)

SERVICE_VERSION = "0.1.0"
MAX_KEY_ID = 64
MAX_LABEL = 128
MAX_NONCE = 64
# Items in one SignBatch: bounds the reply (128 RSA-4096 signatures are 64 KiB, half of
# the bus's max_payload) and how long one batch holds the token's threads.
MAX_SIGN_BATCH = 128
# Encrypt/Decrypt: the broker's limits, plus the envelope header it binds into the AAD
# and the tag or RSA block the ciphertext grows by.
MAX_BOUND_AAD = MAX_AAD + 256
MAX_CIPHERTEXT = MAX_PLAINTEXT + 1024

T = TypeVar("T")

REQUEST_TYPES: dict[str, type[Message]] = {
    "GenerateKey": crypto_pb2.GenerateKeyRequest,
    "GetPublicKey": crypto_pb2.GetPublicKeyRequest,
    "Sign": crypto_pb2.SignRequest,
    "SignBatch": crypto_pb2.SignBatchRequest,
    "Verify": crypto_pb2.VerifyRequest,
    "DestroyKey": crypto_pb2.DestroyKeyRequest,
    "ListKeys": crypto_pb2.ListProviderKeysRequest,
    "Attest": crypto_pb2.AttestRequest,
    "Encrypt": crypto_pb2.EncryptRequest,
    "Decrypt": crypto_pb2.DecryptRequest,
}


# How long a refusal waits for its audit entry before answering anyway (it is a refusal
# either way; the log line stays).
AUDIT_TIMEOUT = 5.0

# A batch item that passed validation: (position in the batch, key id, algorithm, data).
_SignItem = tuple[int, bytes, SignatureAlgorithm, bytes]


def _for_class(op: Callable[[Any, str], Awaitable[Message]], key_class: str) -> natsrpc.Handler:
    """An operation bound to the key class of the subjects it is served on."""

    async def handle(req: Any) -> Message:
        return await op(req, key_class)

    return handle


def _check_key_id(key_id: bytes) -> None:
    if not key_id:
        raise InvalidArgument("key.id_missing", "key_id is required")
    if len(key_id) > MAX_KEY_ID:
        raise InvalidArgument("key.id_too_long", f"key_id is limited to {MAX_KEY_ID} bytes")


class CryptoService:
    """One provider on the bus. `start()` registers it, `stop()` unregisters and drains."""

    def __init__(
        self,
        nc: Client,
        provider: Provider,
        provider_id: str,
        workers: int,
        auth_guard: AuthGuard | None = None,
        audit: AuditWriter | None = None,
    ) -> None:
        self.nc = nc
        # Refusals of a key used on another class's subjects are audited here: the caller
        # that tried is, by assumption, compromised and would not record them.
        self.audit = audit
        # Wrong TPM auth values are refused here before they can drive the TPM into lockout.
        self.auth_guard = auth_guard or AuthGuard.for_provider(provider)
        # SignBatch consults the guard from the token's threads, item by item, so that a
        # batch cannot spend the TPM's whole auth budget at once: its state is locked.
        self._guard_lock = threading.Lock()
        self.provider = provider
        # A token with a thread of its own (the TPM) takes a batch in one hand-off.
        self._serial = provider.run_serially if isinstance(provider, RunsSerially) else None
        self.provider_id = provider_id
        self.workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kms-token")
        self._responder = natsrpc.Responder("the crypto service", concurrency=workers * 2)
        self._service: Service | None = None
        # Public keys never change, so a key's type is looked up once (dropped on destroy).
        self._public: dict[bytes, tuple[bytes, KeyType]] = {}
        # A key's class never changes either (dropped on destroy).
        self._classes: dict[bytes, str] = {}
        self._ops: dict[str, Callable[[Any, str], Awaitable[Message]]] = {
            "GenerateKey": self._generate,
            "GetPublicKey": self._get_public_key,
            "Sign": self._sign,
            "SignBatch": self._sign_batch,
            "Verify": self._verify,
            "DestroyKey": self._destroy,
            "ListKeys": self._list_keys,
            "Attest": self._attest,
            "Encrypt": self._encrypt,
            "Decrypt": self._decrypt,
        }

    async def start(self) -> None:
        name = crypto_service_name(self.provider_id)
        self._service = await nats.micro.add_service(
            self.nc,
            name=name,
            version=SERVICE_VERSION,
            description=f"EdgeKMS crypto service for provider {self.provider_id}",
            # "workers": the broker's SignBatcher keeps more requests on the bus for a
            # provider with a single worker thread, so that thread never waits for one.
            metadata={
                "provider": self.provider_id,
                "kind": self.provider.kind,
                "workers": str(self.workers),
            },
        )
        for key_class in KEY_CLASSES:
            for op in class_operations(key_class):
                handler = _for_class(self._ops[op], key_class)
                await self._service.add_endpoint(
                    # nats.micro wants distinct names; user keys keep the plain ones.
                    name=op if key_class == KEY_CLASS_USER else f"{key_class}-{op}",
                    subject=crypto_subject(self.provider_id, op, key_class),
                    queue_group=crypto_queue_group(self.provider_id),
                    handler=self._responder.endpoint(op, REQUEST_TYPES[op], handler),
                )
        await natsrpc.subscriptions_live(self.nc)
        log.info(
            "event=service_started service=%s provider=%s kind=%s workers=%d",
            name,
            self.provider_id,
            self.provider.kind,
            self.workers,
        )

    async def stop(self) -> None:
        """Stop taking requests, finish those in flight, release the threads."""
        if self._service is not None:
            # On a connection closed for good there is nothing to unsubscribe from.
            if not self.nc.is_closed:
                await self._service.stop()
            self._service = None
        await self._responder.drain()
        self._executor.shutdown(wait=True)
        log.info("event=service_stopped provider=%s", self.provider_id)

    # -- plumbing ------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _public_key(self, key_id: bytes) -> tuple[bytes, KeyType]:
        cached = self._public.get(key_id)
        if cached is None:
            cached = await self._run(self.provider.public_key, key_id)
            self._public[key_id] = cached
        return cached

    async def _key_class(self, key_id: bytes) -> str:
        cached = self._classes.get(key_id)
        if cached is None:
            cached = await self._run(self.provider.key_class, key_id)
            self._classes[key_id] = cached
        return cached

    async def _check_class(self, key_id: bytes, key_class: str, op: str) -> None:
        """Refuse (and audit) a key whose stored class is not the subject's."""
        stored = await self._key_class(key_id)
        if stored == key_class:
            return
        details = {
            "provider": self.provider_id,
            "operation": op,
            "key_class": stored,
            "subject_class": key_class,
        }
        log.warning(
            "event=key_class_refused provider=%s op=%s key_id=%s key_class=%s subject_class=%s",
            self.provider_id,
            op,
            key_id.hex(),
            stored,
            key_class,
        )
        if self.audit is not None:
            try:
                async with asyncio.timeout(AUDIT_TIMEOUT):
                    await self.audit.append(
                        f"crypto.{op}",
                        "key.class_mismatch",
                        target=key_id.hex(),
                        details=details,
                    )
            except (KMSError, TimeoutError) as exc:
                log.error("event=audit_failed op=%s error=%s", op, type(exc).__name__)
        raise PermissionDenied(
            "key.class_mismatch",
            f"key {key_id.hex()} is a {stored!r} key; it cannot be used through the "
            f"{key_class!r} subjects",
            details,
        )

    def _guard_check(self, key_id: bytes) -> None:
        with self._guard_lock:
            self.auth_guard.check(key_id)

    def _guard_observe(self, key_id: bytes, err: KMSError) -> None:
        with self._guard_lock:
            self.auth_guard.observe(key_id, err)

    # -- operations ----------------------------------------------------------------------

    async def _generate(self, req: crypto_pb2.GenerateKeyRequest, key_class: str) -> Message:
        _check_key_id(req.key_id)
        if req.key_type == pb.KEY_TYPE_UNSPECIFIED:
            raise InvalidArgument("key.type_missing", "key_type is required")
        key_type_info(req.key_type)
        if len(req.label) > MAX_LABEL:
            raise InvalidArgument("key.label_too_long", f"labels are limited to {MAX_LABEL}")
        options = KeyCreateOptions(
            pcr_indexes=tuple(req.options.pcr_indexes),
            require_auth=req.options.require_auth,
            key_class=key_class,
            usage=check_usage(req.key_type, req.options.usage),
        )
        made = await self._run(
            self.provider.generate, bytes(req.key_id), req.label, req.key_type, options
        )
        self._public[made.key_id] = (made.public_key_der, req.key_type)
        self._classes[made.key_id] = key_class
        return crypto_pb2.GenerateKeyResponse(
            key_id=made.key_id, public_key_der=made.public_key_der
        )

    async def _get_public_key(self, req: crypto_pb2.GetPublicKeyRequest, key_class: str) -> Message:
        _check_key_id(req.key_id)
        der, key_type = await self._public_key(bytes(req.key_id))
        return crypto_pb2.GetPublicKeyResponse(public_key_der=der, key_type=key_type)

    async def _sign(self, req: crypto_pb2.SignRequest, key_class: str) -> Message:
        _check_key_id(req.key_id)
        key_id = bytes(req.key_id)
        _, key_type = await self._public_key(key_id)
        await self._check_class(key_id, key_class, "Sign")
        check_sign_request(key_type, req.algorithm, req.data)
        self._guard_check(key_id)
        try:
            signature = await self._run(self.provider.sign, key_id, req.algorithm, bytes(req.data))
        except KMSError as err:
            self._guard_observe(key_id, err)
            raise
        return crypto_pb2.SignResponse(signature=signature)

    async def _sign_batch(self, req: crypto_pb2.SignBatchRequest, key_class: str) -> Message:
        """Each item validated as `_sign` does, the valid ones signed in at most `workers`
        executor jobs (one per thread, so the hand-off is paid per chunk, not per item)."""
        count = len(req.requests)
        if count == 0:
            raise InvalidArgument("batch.empty", "SignBatch needs at least one request")
        if count > MAX_SIGN_BATCH:
            raise InvalidArgument(
                "batch.too_large",
                f"SignBatch takes at most {MAX_SIGN_BATCH} requests, got {count}",
                {"max_items": str(MAX_SIGN_BATCH)},
            )
        results = [crypto_pb2.SignResult() for _ in range(count)]
        todo: list[_SignItem] = []
        for index, item in enumerate(req.requests):
            try:
                _check_key_id(item.key_id)
                key_id = bytes(item.key_id)
                _, key_type = await self._public_key(key_id)
                await self._check_class(key_id, key_class, "SignBatch")
                check_sign_request(key_type, item.algorithm, item.data)
                self._guard_check(key_id)
            except KMSError as err:
                results[index].error.CopyFrom(err.to_proto())
                continue
            todo.append((index, key_id, item.algorithm, bytes(item.data)))
        if todo:
            jobs = min(self.workers, len(todo))
            size = -(-len(todo) // jobs)
            chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
            if self._serial is not None:
                # One hand-off to the token's own thread for the whole batch.
                serial = self._serial
                done = await asyncio.gather(
                    *(self._run(serial, functools.partial(self._sign_chunk, c)) for c in chunks)
                )
            else:
                done = await asyncio.gather(*(self._run(self._sign_chunk, c) for c in chunks))
            for chunk_outcomes in done:
                for index, outcome in chunk_outcomes:
                    if isinstance(outcome, bytes):
                        results[index].signature = outcome
                    else:
                        results[index].error.CopyFrom(outcome.to_proto())
        return crypto_pb2.SignBatchResponse(results=results)

    def _sign_chunk(self, chunk: list[_SignItem]) -> list[tuple[int, bytes | KMSError]]:
        """Runs on a token thread. The guard is asked again before each item, so a
        wrong auth value seen earlier in the batch stops the later guesses on that key."""
        outcomes: list[tuple[int, bytes | KMSError]] = []
        for index, key_id, algorithm, data in chunk:
            try:
                self._guard_check(key_id)
                try:
                    outcomes.append((index, self.provider.sign(key_id, algorithm, data)))
                except KMSError as err:
                    self._guard_observe(key_id, err)
                    raise
            except KMSError as err:
                outcomes.append((index, err))
            except Exception:
                log.exception("event=request_crashed op=SignBatch item=%d", index)
                crash = Internal("internal.error", "Sign failed inside the crypto service")
                outcomes.append((index, crash))
        return outcomes

    async def _verify(self, req: crypto_pb2.VerifyRequest, key_class: str) -> Message:
        _check_key_id(req.key_id)
        der, key_type = await self._public_key(bytes(req.key_id))
        check_sign_request(key_type, req.algorithm, req.data)
        if not req.signature:
            raise InvalidArgument("verify.signature_missing", "signature is required")
        valid = verify_signature(der, req.algorithm, bytes(req.data), bytes(req.signature))
        return crypto_pb2.VerifyResponse(valid=valid)

    async def _destroy(self, req: crypto_pb2.DestroyKeyRequest, key_class: str) -> Message:
        _check_key_id(req.key_id)
        key_id = bytes(req.key_id)
        await self._check_class(key_id, key_class, "DestroyKey")
        self._public.pop(key_id, None)
        try:
            await self._run(self.provider.destroy, key_id)
        finally:
            self._public.pop(key_id, None)
            self._classes.pop(key_id, None)
        return crypto_pb2.DestroyKeyResponse()

    async def _list_keys(self, req: crypto_pb2.ListProviderKeysRequest, key_class: str) -> Message:
        keys = await self._run(self.provider.list_keys)
        return crypto_pb2.ListProviderKeysResponse(
            keys=[
                crypto_pb2.ProviderKey(key_id=k.key_id, label=k.label, key_type=k.key_type)
                for k in keys
            ]
        )

    async def _attest(self, req: crypto_pb2.AttestRequest, key_class: str) -> Message:
        _check_key_id(req.key_id)
        await self._check_class(bytes(req.key_id), key_class, "Attest")
        if len(req.nonce) > MAX_NONCE:
            raise InvalidArgument("attest.nonce_too_long", f"nonces are limited to {MAX_NONCE}")
        self._guard_check(bytes(req.key_id))
        try:
            evidence = await self._run(self.provider.attest, bytes(req.key_id), bytes(req.nonce))
        except KMSError as err:
            self._guard_observe(bytes(req.key_id), err)
            raise
        return crypto_pb2.AttestResponse(
            format=evidence.format,
            attestation=evidence.attestation,
            signature=evidence.signature,
            signature_algorithm=evidence.signature_algorithm,
            attestation_key_der=evidence.attestation_key_der,
            key_public_area=evidence.key_public_area,
        )

    async def _encrypt(self, req: crypto_pb2.EncryptRequest, key_class: str) -> Message:
        _check_key_id(req.key_id)
        key_id = bytes(req.key_id)
        await self._public_key(key_id)
        await self._check_class(key_id, key_class, "Encrypt")
        if len(req.plaintext) > MAX_PLAINTEXT:
            raise InvalidArgument(
                "encrypt.plaintext_too_large", f"plaintexts are limited to {MAX_PLAINTEXT} bytes"
            )
        if len(req.aad) > MAX_BOUND_AAD:
            raise InvalidArgument("encrypt.aad_too_large", f"AAD is limited to {MAX_BOUND_AAD}")
        self._guard_check(key_id)
        try:
            sealed = await self._run(
                self.provider.encrypt, key_id, bytes(req.plaintext), bytes(req.aad)
            )
        except KMSError as err:
            self._guard_observe(key_id, err)
            raise
        return crypto_pb2.EncryptResponse(
            algorithm=sealed.algorithm, nonce=sealed.nonce, ciphertext=sealed.ciphertext
        )

    async def _decrypt(self, req: crypto_pb2.DecryptRequest, key_class: str) -> Message:
        _check_key_id(req.key_id)
        key_id = bytes(req.key_id)
        await self._public_key(key_id)
        await self._check_class(key_id, key_class, "Decrypt")
        if len(req.ciphertext) > MAX_CIPHERTEXT or len(req.nonce) > MAX_NONCE:
            raise InvalidArgument("decrypt.failed", "the ciphertext is longer than any we make")
        if len(req.aad) > MAX_BOUND_AAD:
            raise InvalidArgument("encrypt.aad_too_large", f"AAD is limited to {MAX_BOUND_AAD}")
        self._guard_check(key_id)
        try:
            plaintext = await self._run(
                self.provider.decrypt,
                key_id,
                req.algorithm,
                bytes(req.nonce),
                bytes(req.ciphertext),
                bytes(req.aad),
            )
        except KMSError as err:
            self._guard_observe(key_id, err)
            raise
        return crypto_pb2.DecryptResponse(plaintext=plaintext)
