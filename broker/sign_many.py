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
from typing import TYPE_CHECKING, Any

from broker.audit_service import AuditScope, current_scope
from broker.authz import check_method
from broker.wire import Malformed
from edgekms.errors import ERROR_METADATA_KEY, Internal, InvalidArgument, KMSError
from edgekms.identity import Identity
from edgekms.logs import fields
from edgekms.v1 import keys_pb2

if TYPE_CHECKING:
    import grpc

    from broker.keys import KeyService

    Context = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger(__name__)

# Items in one SignBatch. A batch is answered as a whole, so it is held to what one
# reply carries comfortably (1,000 RSA-4096 signatures are 512 KiB) and to what a caller
# waits for at once; gRPC's 4 MiB message limit bounds the request's bytes.
MAX_BATCH_ITEMS = 1000
# Requests of one stream worked on at once: the stream reads no further until one
# completes, so a fast writer is held back by HTTP/2 flow control, not by memory here.
STREAM_WINDOW = 256


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


async def sign_batch(
    service: KeyService,
    request: keys_pb2.SignBatchRequest,
    context: Context,
    identity: Identity,
) -> keys_pb2.SignBatchResponse:
    """Every item at once: the SignBatcher and the audit writer see them as concurrent
    Signs and coalesce them on the bus and in the log."""
    count = len(request.items)
    if count == 0:
        raise InvalidArgument("batch.empty", "SignBatch: no items")
    if count > MAX_BATCH_ITEMS:
        raise InvalidArgument(
            "batch.too_large",
            f"SignBatch: {count} items, at most {MAX_BATCH_ITEMS}",
            {"items": str(count), "max": str(MAX_BATCH_ITEMS)},
        )
    current = current_scope()
    parent = f"SignBatch:{current.request_id if current is not None else uuid.uuid4().hex}"
    outcomes = await asyncio.gather(
        *(sign_item(service, item, context, identity, parent) for item in request.items)
    )
    return keys_pb2.SignBatchResponse(results=[result for _, result in outcomes])


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
