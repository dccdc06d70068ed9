"""Many Signs per call: KeyService.SignBatch and the bidirectional KeyService.SignStream.

A unary Sign through CPython's grpc costs ~230 µs of CPU before any EdgeKMS work (issue
19), which caps one broker far below what the token can sign. A caller with many digests
pays that once per batch, or once per stream, instead of once per signature.

Nothing about a Sign's safety is batched away. Every item goes through the unary Sign's
own path (KeyService._sign: registry, key state, key policy, algorithm and data checks,
the crypto service through the SignBatcher) and is audited as its own "Sign" entry,
carrying the batch's or stream's request id in its details, before its result is
returned. The audit writer's group commit (edgekms.audit) stores the items of one batch
in a few messages, so the log costs little more per item than it does per unary call.
An item's refusal is that item's typed error (edgekms.v1.Error in its SignResult), and is
counted against the caller like a refused unary call (broker.clients throttling).

The call itself is authorised and audited too: SignBatch through the `rpc` wrapper like
any unary method (role, throttling, revocation), SignStream when it opens. A stream checks
its caller again for every item (revocation, throttling, expiry), so a client revoked
while its stream is open gets auth errors on the next items instead of signatures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import broker.keys as keys_module
from broker.audit_service import AuditScope, current_scope, request_details
from broker.authz import check_key_policy, check_method
from broker.idempotency import MAX_REQUEST_ID
from broker.wire import Malformed
from edgekms.algorithms import check_sign_request
from edgekms.audit import Decision
from edgekms.errors import (
    ERROR_METADATA_KEY,
    Internal,
    InvalidArgument,
    KMSError,
    PermissionDenied,
    Unauthenticated,
    from_proto,
)
from edgekms.identity import Identity
from edgekms.logs import fields
from edgekms.v1 import common_pb2 as pb
from edgekms.v1 import crypto_pb2, keys_pb2

if TYPE_CHECKING:
    import grpc

    from broker.keys import KeyService

    Context = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger(__name__)

# Items in one SignBatch. A batch is answered as a whole, so it is held to what one
# reply carries comfortably (1,000 RSA-4096 signatures are 512 KiB) and to what a caller
# waits for at once; the broker's gRPC limits (broker/server.py) bound the request's
# bytes (256 KiB) and the reply's (1 MiB).
MAX_BATCH_ITEMS = 1000
# Requests of one stream worked on at once: the stream reads no further until one
# completes, so a fast writer is held back by HTTP/2 flow control, not by memory here.
STREAM_WINDOW = 256
# A batch's items go to their crypto service in SignBatch messages of at most this many
# items (the crypto service's own limit, MAX_SIGN_BATCH) and bytes (half the bus's
# 128 KiB max_payload, leaving room for key ids and framing).
CHUNK_ITEMS = 128
CHUNK_BYTES = 64 * 1024
# An item with more data than this (a long Ed25519 message) is sent as a Sign alone.
MAX_CHUNKED_ITEM_BYTES = 8 * 1024
# Chunks of one batch on the bus at once: one being signed while the next travels in
# keeps the token's threads busy; more only queues in the crypto service.
CHUNKS_IN_FLIGHT = 2
# Error codes of an item's refusal that count against the caller (broker.clients).
_CALLER_REFUSED = frozenset({pb.ERROR_CODE_PERMISSION_DENIED, pb.ERROR_CODE_UNAUTHENTICATED})
# The audit outcome of an item whose batch was cancelled before it was answered.
CANCELLED = "request.cancelled"


async def sign_item(
    service: KeyService,
    item: keys_pb2.SignRequest | Malformed,
    context: Context,
    identity: Identity | None,
    parent: str,
    *,
    admit: bool = False,
) -> tuple[str, keys_pb2.SignResult]:
    """One item: checked, signed and audited as a Sign of its own. Never raises a
    KMSError: an item's failure is its result. `admit`: identify the caller again first
    (a stream's items; a batch was admitted as one call)."""
    request = item if isinstance(item, keys_pb2.SignRequest) else keys_pb2.SignRequest()
    scope = AuditScope.for_request(service.audit, "Sign", request)
    scope.details["via"] = parent
    scope.identity = identity
    bound = scope.bind()
    try:
        if admit or identity is None:
            identity = await service.identities.identify(context, scope, "Sign")
            check_method(identity, "Sign", service.identities.device(identity) is not None)
        if isinstance(item, Malformed):
            raise InvalidArgument("request.malformed", "Sign: the request is not a SignRequest")
        service.identities.check_scope(identity, "Sign", request)
        response = await service._sign(request, context, identity)
        failure = await scope.settle(None)
        if failure is not None:
            raise failure
        return scope.request_id, keys_pb2.SignResult(signature=response)
    except KMSError as err:
        service.identities.failed(context, identity, err)
        err = (await scope.settle(err)) or err
        return scope.request_id, keys_pb2.SignResult(error=err.to_proto())
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error", extra=fields(method="Sign", via=parent))
        internal: KMSError = Internal("internal.error", "the broker failed unexpectedly")
        internal = (await scope.settle(internal)) or internal
        return scope.request_id, keys_pb2.SignResult(error=internal.to_proto())
    finally:
        AuditScope.unbind(bound)


@dataclass
class _Batch:
    """One SignBatch being worked: per item its result and its audit decision."""

    batch_id: str
    parent: str
    results: list[keys_pb2.SignResult]
    outcomes: list[str]
    # Per item: its decision is stored (a cancelled batch records the rest).
    recorded: list[bool]
    # Items that passed every check, by provider: (index, record, request for the token).
    todo: dict[str, list[tuple[int, pb.KeyRecord, crypto_pb2.SignRequest]]] = field(
        default_factory=dict
    )
    # Refusals of the caller's authority the crypto service answered (a TPM key's wrong
    # auth value): counted against the caller afterwards, as for a unary Sign.
    denied: list[KMSError] = field(default_factory=list)

    def fail(self, index: int, err: KMSError) -> None:
        self.results[index].error.CopyFrom(err.to_proto())
        self.outcomes[index] = err.reason


def _check_item(
    service: KeyService, identity: Identity, item: keys_pb2.SignRequest
) -> pb.KeyRecord:
    """The unary Sign's checks (KeyService._sign), in its order; the record to sign with."""
    service.identities.check_scope(identity, "Sign", item)
    record = service.registry.get(item.name)
    keys_module.require_usable(record)
    check_key_policy(identity, record, pb.KEY_OPERATION_SIGN, item.algorithm)
    keys_module.require_signing(record)
    check_sign_request(record.key_type, item.algorithm, item.data)
    return record


def _chunks(
    items: list[tuple[int, pb.KeyRecord, crypto_pb2.SignRequest]],
) -> list[list[tuple[int, pb.KeyRecord, crypto_pb2.SignRequest]]]:
    """Consecutive runs of at most CHUNK_ITEMS items and CHUNK_BYTES of data; an item
    over MAX_CHUNKED_ITEM_BYTES (a long Ed25519 message) is a chunk of its own."""
    out: list[list[tuple[int, pb.KeyRecord, crypto_pb2.SignRequest]]] = []
    current: list[tuple[int, pb.KeyRecord, crypto_pb2.SignRequest]] = []
    size = 0
    for entry in items:
        length = len(entry[2].data)
        if length > MAX_CHUNKED_ITEM_BYTES:
            out.append([entry])
            continue
        if current and (len(current) >= CHUNK_ITEMS or size + length > CHUNK_BYTES):
            out.append(current)
            current, size = [], 0
        current.append(entry)
        size += length
    if current:
        out.append(current)
    return out


async def _sign_chunk(
    service: KeyService,
    batch: _Batch,
    provider: str,
    chunk: list[tuple[int, pb.KeyRecord, crypto_pb2.SignRequest]],
    bus_timeout: float,
    window: asyncio.Semaphore,
) -> None:
    """One crypto-service message for `chunk`: a SignBatch (a Sign for one item), each
    result or typed error put in its item's place. A failure of the whole message (no
    answer, deadline, bus) is every item's own error, as it would be for unary Signs."""
    async with window:
        try:
            if len(chunk) == 1:
                index, record, req = chunk[0]
                try:
                    answer = await service.crypto.sign(provider, req, bus_timeout)
                except KMSError as err:
                    batch.fail(index, err)
                    return
                _signed(batch, index, record, req, answer.signature)
                return
            reply = await service.crypto.sign_batch(
                provider, crypto_pb2.SignBatchRequest(requests=[c[2] for c in chunk]), bus_timeout
            )
            if len(reply.results) != len(chunk):
                raise Internal(
                    "wire.bad_response",
                    f"provider {provider!r} answered {len(reply.results)} of {len(chunk)} Signs",
                    {"provider": provider},
                )
            for (index, record, req), result in zip(chunk, reply.results, strict=True):
                outcome = result.WhichOneof("outcome")
                if outcome == "signature":
                    _signed(batch, index, record, req, result.signature)
                elif outcome == "error":
                    batch.results[index].error.CopyFrom(result.error)
                    batch.outcomes[index] = result.error.reason or "error"
                    if result.error.code in _CALLER_REFUSED:
                        batch.denied.append(from_proto(result.error))
                else:
                    batch.fail(
                        index,
                        Internal(
                            "wire.bad_response",
                            f"provider {provider!r} sent an empty SignBatch result",
                            {"provider": provider},
                        ),
                    )
        except KMSError as err:
            if isinstance(err, Unauthenticated | PermissionDenied):
                batch.denied.append(err)
            for index, _, _ in chunk:
                batch.fail(index, err)
        except Exception:
            log.exception("sign chunk crashed", extra=fields(method="SignBatch", provider=provider))
            crash = Internal("internal.error", "the broker failed unexpectedly")
            for index, _, _ in chunk:
                batch.fail(index, crash)


def _signed(
    batch: _Batch, index: int, record: pb.KeyRecord, req: crypto_pb2.SignRequest, sig: bytes
) -> None:
    signature = batch.results[index].signature
    signature.signature = sig
    signature.algorithm = req.algorithm
    signature.key_name = record.name
    batch.outcomes[index] = "ok"


async def sign_batch(
    service: KeyService,
    request: keys_pb2.SignBatchRequest,
    context: Context,
    identity: Identity,
) -> keys_pb2.SignBatchResponse:
    """Every item checked as a unary Sign is (the checks of one (key, algorithm, length)
    are made once per batch: they depend on nothing else), the valid ones sent to their
    crypto services as whole SignBatch chunks, and every item's decision stored as its
    own "Sign" entry (AuditWriter.append_many; a chunk's as soon as it is answered)
    before any signature is returned."""
    count = len(request.items)
    if count == 0:
        raise InvalidArgument("batch.empty", "SignBatch: no items")
    if count > MAX_BATCH_ITEMS:
        raise InvalidArgument(
            "batch.too_large",
            f"SignBatch: {count} items, at most {MAX_BATCH_ITEMS}",
            {"items": str(count), "max": str(MAX_BATCH_ITEMS)},
        )
    started = time.perf_counter()
    current = current_scope()
    batch_id = current.request_id if current is not None else uuid.uuid4().hex
    batch = _Batch(
        batch_id,
        f"SignBatch:{batch_id}",
        [keys_pb2.SignResult() for _ in range(count)],
        ["ok"] * count,
        [False] * count,
    )
    checked: dict[tuple[str, int, int], pb.KeyRecord | KMSError] = {}
    for index, item in enumerate(request.items):
        if len(item.request_id) > MAX_REQUEST_ID:
            err: KMSError = InvalidArgument(
                "request.id_invalid", f"a request id has at most {MAX_REQUEST_ID} characters"
            )
            batch.fail(index, err)
            continue
        key = (item.name, item.algorithm, len(item.data))
        found = checked.get(key)
        if found is None:
            try:
                found = _check_item(service, identity, item)
            except KMSError as refused:
                found = refused
            except Exception:
                log.exception("unexpected error", extra=fields(method="Sign", via=batch.parent))
                found = Internal("internal.error", "the broker failed unexpectedly")
            checked[key] = found
        if isinstance(found, KMSError):
            # Counted against the caller like a refused unary call (broker.clients).
            service.identities.failed(context, identity, found)
            batch.fail(index, found)
            continue
        crypto_req = crypto_pb2.SignRequest(
            key_id=found.key_id, algorithm=item.algorithm, data=item.data
        )
        batch.todo.setdefault(found.provider, []).append((index, found, crypto_req))

    # Each chunk's decisions are stored as soon as the chunk is answered (and the
    # refusals at once), so the audit's fsyncs overlap the token's work on the next
    # chunks instead of following all of it; the reply still waits for every one.
    records: list[asyncio.Task[None]] = []

    def record(indexes: list[int]) -> asyncio.Task[None]:
        task = asyncio.create_task(_record(service, request, identity, batch, indexes))
        records.append(task)
        return task

    refused_now = [i for i, outcome in enumerate(batch.outcomes) if outcome != "ok"]
    if refused_now:
        record(refused_now)
    timeout = service._timeout(context, service.config.sign_timeout)
    window = asyncio.Semaphore(CHUNKS_IN_FLIGHT)

    async def sign_and_record(
        provider: str, chunk: list[tuple[int, pb.KeyRecord, crypto_pb2.SignRequest]]
    ) -> None:
        await _sign_chunk(service, batch, provider, chunk, timeout, window)
        # Shielded: a cancellation of the call must not cut a group of entries short.
        await asyncio.shield(record([index for index, _, _ in chunk]))

    try:
        await asyncio.gather(
            *(
                sign_and_record(provider, chunk)
                for provider, items in batch.todo.items()
                for chunk in _chunks(items)
            )
        )
        await asyncio.gather(*(asyncio.shield(task) for task in records))
    except asyncio.CancelledError:
        # The caller went away (cancelled, or its deadline passed): no signature
        # leaves, and every decision is still recorded, as cancelled unless refused.
        await _record_cancelled(service, request, identity, batch, records)
        raise

    for denied in batch.denied:
        service.identities.failed(context, identity, denied)
    failed = sum(1 for result in batch.results if result.HasField("error"))
    log.info(
        "batch signed",
        extra=fields(
            method="SignBatch",
            client=identity.client,
            items=count,
            refused=failed,
            ms=round((time.perf_counter() - started) * 1000, 2),
        ),
    )
    return keys_pb2.SignBatchResponse(results=batch.results)


async def _record_cancelled(
    service: KeyService,
    request: keys_pb2.SignBatchRequest,
    identity: Identity,
    batch: _Batch,
    records: list[asyncio.Task[None]],
) -> None:
    """After the groups already under way are stored, the items not yet recorded."""
    await asyncio.gather(*records, return_exceptions=True)
    rest = [i for i, done in enumerate(batch.recorded) if not done]
    for index in rest:
        if batch.outcomes[index] == "ok":
            batch.outcomes[index] = CANCELLED
    try:
        await _record(service, request, identity, batch, rest)
    except Exception:  # the cancellation is what the caller sees; the log says why
        log.exception("cancelled batch not recorded", extra=fields(method="SignBatch"))
    log.warning(
        "batch cancelled",
        extra=fields(method="SignBatch", client=identity.client, items=len(batch.outcomes)),
    )


async def _record(
    service: KeyService,
    request: keys_pb2.SignBatchRequest,
    identity: Identity,
    batch: _Batch,
    indexes: list[int],
) -> None:
    """Store the decisions of these items, each as its own Sign entry; if that fails,
    none of their signatures leaves: each becomes the audit error (fail closed, as for
    a unary Sign)."""
    if not indexes:
        return
    details: dict[int, dict[str, str]] = {}
    decisions = []
    for index in indexes:
        item = request.items[index]
        shared = details.get(item.algorithm)
        if shared is None:
            shared = details[item.algorithm] = {**request_details(item), "via": batch.parent}
        decisions.append(
            Decision(
                batch.outcomes[index],
                target=item.name,
                # The caller's own id, unless missing or refused as too long.
                request_id=(
                    item.request_id
                    if 0 < len(item.request_id) <= MAX_REQUEST_ID
                    else f"{batch.batch_id}.{index}"
                ),
                details=shared,
            )
        )
    if service.audit is not None:
        try:
            await service.audit.append_many(
                "Sign", decisions, client=identity.client, role=identity.role
            )
        except KMSError as err:
            for index in indexes:
                batch.results[index].Clear()
                batch.results[index].error.CopyFrom(err.to_proto())
            return
    for index in indexes:
        batch.recorded[index] = True


async def sign_stream(
    service: KeyService,
    requests: AsyncIterator[keys_pb2.SignRequest | Malformed],
    context: Context,
) -> AsyncIterator[keys_pb2.SignStreamResponse]:
    """Read requests while answering finished ones; at most STREAM_WINDOW in the works."""
    opened = time.perf_counter()
    stream_id = uuid.uuid4().hex
    scope = AuditScope(service.audit, "SignStream", request_id=stream_id)
    bound = scope.bind()
    try:
        identity = await service.identities.identify(context, scope, "SignStream")
        check_method(identity, "SignStream", service.identities.device(identity) is not None)
        failure = await scope.settle(None)
        if failure is not None:
            raise failure
    except KMSError as err:
        service.identities.failed(context, scope.identity, err)
        err = (await scope.settle(err)) or err
        log.warning(
            "request refused",
            extra=fields(method="SignStream", outcome=err.reason, code=err.code_name),
        )
        context.set_trailing_metadata(((ERROR_METADATA_KEY, err.to_proto().SerializeToString()),))
        await context.abort(err.grpc_status, f"{err.reason}: {err.message}")
        raise
    finally:
        AuditScope.unbind(bound)

    parent = f"SignStream:{stream_id}"
    window = asyncio.Semaphore(STREAM_WINDOW)
    done: asyncio.Queue[keys_pb2.SignStreamResponse | None] = asyncio.Queue()
    working: set[asyncio.Task[None]] = set()

    async def one(index: int, item: keys_pb2.SignRequest | Malformed) -> None:
        try:
            request_id, result = await sign_item(
                service, item, context, identity, parent, admit=True
            )
        except BaseException:
            window.release()
            raise
        # The window's place is given back when the answer is taken to be sent, so a
        # caller that does not read its answers stops the stream's reading too.
        done.put_nowait(
            keys_pb2.SignStreamResponse(index=index, request_id=request_id, result=result)
        )

    async def read() -> None:
        index = 0
        try:
            async for item in requests:
                await window.acquire()
                task = asyncio.create_task(one(index, item))
                working.add(task)
                task.add_done_callback(working.discard)
                index += 1
            # The caller has half-closed: answer what is in the works, then end.
            if working:
                await asyncio.gather(*list(working), return_exceptions=True)
        finally:
            await done.put(None)

    reader = asyncio.create_task(read())
    answered = 0
    try:
        while True:
            response = await done.get()
            if response is None:
                break
            window.release()
            answered += 1
            yield response
    finally:
        reader.cancel()
        for task in list(working):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        log.info(
            "stream closed",
            extra=fields(
                method="SignStream",
                client=identity.client,
                answered=answered,
                ms=round((time.perf_counter() - opened) * 1000, 2),
            ),
        )
