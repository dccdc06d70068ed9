"""The broker's side of the audit log: recording every decision, and serving the log.

Recording. `rpc()` in broker/keys.py opens an AuditScope per call. A call that only
reads or uses a key is recorded once, after the decision and before the answer leaves:
if the entry cannot be stored, the answer (a signature, say) is dropped and the caller
gets Unavailable("audit.unavailable"). A call that changes state calls
`record_before_change()` right before the change, so no change happens unrecorded; if
the change then fails, a second entry records the failure.

Serving. TailAudit hands out the stored bytes untouched, with their stream and
sequence, every writer's stream in turn (edgekms.audit: a stream per writer), so that
kmsctl (not the broker) checks the chains: a broker that could be lied to, or that
lies, cannot vouch for the log it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import nats.errors
import nats.js.errors
from google.protobuf.descriptor import Descriptor, EnumDescriptor
from google.protobuf.message import Message
from nats.js import JetStreamContext, api

from broker.authz import check_method
from broker.wire import Malformed
from edgekms.audit import (
    AuditWriter,
    StreamUsage,
    audit_streams,
    parse_message,
    split_message,
    writer_stream,
)
from edgekms.errors import (
    ERROR_METADATA_KEY,
    Internal,
    InvalidArgument,
    KMSError,
    NotFound,
    Unavailable,
)
from edgekms.fleet import SOURCE_HEADER, fleet_stream
from edgekms.fleet_ca import DeviceRegistry
from edgekms.identity import Identity
from edgekms.logs import fields
from edgekms.retention import newest_checkpoint
from edgekms.v1 import audit_pb2, audit_pb2_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

T = TypeVar("T")

AUDIT_UNAVAILABLE = "audit.unavailable"
AUDIT_FULL = "audit.full"  # the stream's limits are reached (edgekms.audit)
# Request fields worth keeping in an entry's details (never data, digests or signatures).
_DETAIL_FIELDS = (
    "provider",
    "key_type",
    "algorithm",
    "prefix",
    "include_destroyed",
    "profile",
    "serial",
    "reason",
)

_current: contextvars.ContextVar[AuditScope | None] = contextvars.ContextVar(
    "edgekms_audit_scope", default=None
)


def request_details(request: Any) -> dict[str, str]:
    """The request's routing parameters, enum values by name; empty fields left out."""
    details: dict[str, str] = {}
    if not isinstance(request, Message):
        return details
    for name, enum_type in _detail_fields(request.DESCRIPTOR):
        value = getattr(request, name)
        if not value:
            continue
        if enum_type is not None:
            details[name] = _enum_name(enum_type, value)
        else:
            details[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return details


@functools.cache
def _detail_fields(descriptor: Descriptor) -> tuple[tuple[str, EnumDescriptor | None], ...]:
    """Which of _DETAIL_FIELDS a message type has: looked up once per type, not per call
    (every request of every method passes here)."""
    present = []
    for name in _DETAIL_FIELDS:
        fd = descriptor.fields_by_name.get(name)
        if fd is not None:
            present.append((name, fd.enum_type))
    return tuple(present)


@functools.cache
def _enum_names(enum_type: EnumDescriptor) -> dict[int, str]:
    """Each known value's lower-case name, once per enum type (a bounded set)."""
    return {number: value.name.lower() for number, value in enum_type.values_by_number.items()}


def _enum_name(enum_type: EnumDescriptor, value: int) -> str:
    # proto3 enums are open: an unknown number is kept as its number, and not cached.
    return _enum_names(enum_type).get(value) or str(value)


@dataclass
class AuditScope:
    """One call's audit trail. With no writer (unit tests of handlers) nothing is stored."""

    writer: AuditWriter | None
    method: str
    target: str = ""
    request_id: str = ""
    identity: Identity | None = None
    details: dict[str, str] = field(default_factory=dict)
    recorded: bool = False
    # What a failure entry says about the "ok" stored before the work that then failed.
    recorded_before: str = "the change"
    # Writes started by the handler to run while the audit record is appended
    # (beside_audit); settle() returns only once they are done too.
    beside: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def for_request(cls, writer: AuditWriter | None, method: str, request: Any) -> AuditScope:
        return cls(
            writer,
            method,
            target=str(getattr(request, "name", "") or ""),
            request_id=str(getattr(request, "request_id", "") or "") or os.urandom(16).hex(),
            details=request_details(request),
        )

    async def _append(self, outcome: str) -> None:
        if self.writer is None:
            return
        await self.writer.append(
            self.method,
            outcome,
            client=self.identity.client if self.identity else "",
            role=self.identity.role if self.identity else "",
            target=self.target,
            request_id=self.request_id,
            details=self.details,
        )

    async def record_ok(self) -> None:
        await self._append("ok")
        self.recorded = True

    async def settle(self, err: KMSError | None) -> KMSError | None:
        """Record how the call ended. Returns the error to answer with: `err`, or
        audit.unavailable when the record could not be stored (fail closed). The writes
        the handler left beside the audit record are finished before it returns."""
        try:
            return await self._settle(err)
        finally:
            if self.beside:
                pending, self.beside = self.beside, []
                await asyncio.gather(*pending, return_exceptions=True)

    async def _settle(self, err: KMSError | None) -> KMSError | None:
        if err is None and self.recorded:
            return None
        if err is not None and err.reason in (AUDIT_UNAVAILABLE, AUDIT_FULL):
            return err  # the log is what failed: nothing more can be written to it
        if err is not None and self.recorded:
            self.details["after"] = f"ok recorded before {self.recorded_before}"
        try:
            await self._append("ok" if err is None else err.reason)
        except KMSError as audit_err:
            return audit_err
        return err

    def bind(self) -> contextvars.Token[AuditScope | None]:
        return _current.set(self)

    @staticmethod
    def unbind(token: contextvars.Token[AuditScope | None]) -> None:
        _current.reset(token)


def current_scope() -> AuditScope | None:
    """The audit scope of the call this task serves (None outside a call)."""
    return _current.get()


async def record_before_change(**details: str) -> None:
    """Called by a handler just before it changes state: the decision is stored first,
    so a change the log cannot record never happens."""
    scope = _current.get()
    if scope is None or scope.recorded:
        return
    scope.details.update(details)
    await scope.record_ok()


async def record_alongside(work: Awaitable[T], what: str) -> T:
    """Run `work` (a signature) while this call's "ok" entry is stored, and return its
    result only once both are done: the entry is still durable before the answer leaves,
    but its fsync'd append no longer waits for the work to finish first. At 1 in flight
    that takes one bus round trip off the answer's path; under load the entry joins the
    writer's group commit while the token works.

    The entry records the decision (the caller may do this, to this key): if `work` then
    fails, the rpc wrapper appends a second entry with the failure and
    details.after = "ok recorded before <what>". If the entry cannot be stored, the
    result is dropped and the call fails with the log's error (fail closed). Outside a
    call with a writer, `work` is simply awaited."""
    scope = _current.get()
    if scope is None or scope.writer is None or scope.recorded:
        return await work
    scope.recorded_before = what
    entry = asyncio.ensure_future(scope.record_ok())
    try:
        result = await work
    except asyncio.CancelledError:
        # The entry is stored or refused on its own; nobody is left to hear which.
        entry.add_done_callback(_consume)
        raise
    except BaseException:
        await entry  # the failure entry must chain after the "ok" (or the log's error wins)
        raise
    await entry
    return result


def _consume(task: asyncio.Future[None]) -> None:
    """Retrieve the outcome of a cancelled call's entry, so a failure is logged once as
    what it is instead of as an unretrieved task exception."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        reason = exc.reason if isinstance(exc, KMSError) else type(exc).__name__
        log.warning("audit entry of a cancelled call failed", extra=fields(reason=reason))


async def beside_audit(write: Coroutine[Any, Any, None]) -> None:
    """Run `write` (which handles its own errors) while this call's audit record is
    appended, instead of before it: both are stored before the caller is answered, in
    one round trip's time instead of two. Outside a call it is simply awaited."""
    scope = _current.get()
    if scope is None:
        await write
        return
    scope.beside.append(asyncio.ensure_future(write))


def note(**details: str) -> None:
    """Add what only the answer knows (a new certificate's serial) to this call's entry,
    which is written after the handler returns."""
    scope = _current.get()
    if scope is not None and not scope.recorded:
        scope.details.update(details)


def retarget(target: str) -> None:
    """Name what this call acted on when the request does not (Decrypt learns its key
    from the ciphertext): the entry written after the handler carries it."""
    scope = _current.get()
    if scope is not None and not scope.recorded:
        scope.target = target


async def abort_with(context: Context, err: KMSError) -> None:
    context.set_trailing_metadata(((ERROR_METADATA_KEY, err.to_proto().SerializeToString()),))
    await context.abort(err.grpc_status, f"{err.reason}: {err.message}")


def _typed(entry: dict[str, Any]) -> audit_pb2.AuditEntry:
    actor = entry["actor"]
    return audit_pb2.AuditEntry(
        time=str(entry["time"]),
        writer=str(entry["writer"]),
        actor=audit_pb2.AuditActor(
            client=str(actor.get("client", "")), role=str(actor.get("role", ""))
        ),
        action=str(entry["action"]),
        target=str(entry["target"]),
        outcome=str(entry["outcome"]),
        request_id=str(entry["request_id"]),
        details={str(k): str(v) for k, v in entry["details"].items()},
        prev_hash=str(entry["prev_hash"]),
        hash=str(entry["hash"]),
    )


def audit_record(seq: int, subject: str, raw: bytes, stream: str = "") -> audit_pb2.AuditRecord:
    """A stored message as TailAudit hands it out: the bytes untouched, plus the typed
    view of the entries they hold (none if they do not parse; the reader says so)."""
    record = audit_pb2.AuditRecord(seq=seq, raw=raw, subject=subject, stream=stream)
    try:
        entries = parse_message(raw)
    except ValueError:
        return record
    record.entries.extend(_typed(e) for e in entries)
    if len(entries) == 1 and split_message(raw) is None:
        record.entry.CopyFrom(record.entries[0])
    return record


def state_message(usage: StreamUsage) -> audit_pb2.AuditStreamState:
    return audit_pb2.AuditStreamState(
        first_seq=usage.first_seq,
        last_seq=usage.last_seq,
        messages=usage.messages,
        stream=usage.stream,
        writer=usage.writer,
        bytes=usage.bytes,
        max_bytes=usage.max_bytes,
        max_msgs=usage.max_msgs,
    )


class AuditService(audit_pb2_grpc.AuditServiceServicer):
    def __init__(
        self,
        js: JetStreamContext,
        writer: AuditWriter,
        identities: Any,
        idle_timeout: float = 1.0,
        archive_dir: Path | None = None,
    ) -> None:
        # Where this broker's archiver keeps checkpoints: each stream's state carries
        # the newest, for the reader to verify the window from (edgekms.retention).
        self.archive_dir = archive_dir
        self.js = js
        self.writer = writer
        self.identities = identities
        self.idle_timeout = idle_timeout
        # A fleet hub's device registry, once it exists (_fleet_knows).
        self._fleet_registry: DeviceRegistry | None = None

    async def _fleet_knows(self, device: str) -> bool:
        """Whether the hub's device registry (edgekms.fleet_ca; a removed device stays
        there, disabled) holds `device`. Without a registry (a hub assembled by hand)
        every device is worth a read: the read itself then decides."""
        if self._fleet_registry is None:
            self._fleet_registry = await DeviceRegistry.existing(self.js)
            if self._fleet_registry is None:
                return True
        try:
            return await self._fleet_registry.get(device) is not None
        except KMSError:
            return True  # an unreadable record: the copy may still be there

    async def TailAudit(  # type: ignore[override]
        self, request: audit_pb2.TailAuditRequest, context: Context
    ) -> AsyncIterator[audit_pb2.TailAuditResponse]:
        # broker.wire hands over a Malformed marker for bytes that are not a request.
        malformed = isinstance(request, Malformed)
        scope = AuditScope.for_request(self.writer, "TailAudit", None if malformed else request)
        if not malformed:
            scope.details.update(from_seq=str(request.from_seq), follow=str(request.follow).lower())
            if request.writer:
                scope.details["writer"] = request.writer[:64]
            if request.device:
                scope.details["device"] = request.device[:64]
        failure: KMSError | None
        try:
            identity = await self.identities.identify(context, scope)
            check_method(identity, "TailAudit")
            if malformed:
                raise InvalidArgument(
                    "request.malformed", "TailAudit: the request is not a TailAuditRequest"
                )
            if request.writer:
                try:
                    writer_stream(request.writer)
                except ValueError:
                    raise InvalidArgument(
                        "audit.writer_invalid", "TailAudit: writer is not a writer's name"
                    ) from None
            if request.device:
                fleet_stream(request.device)  # InvalidArgument fleet.device_invalid
                if request.writer or request.follow:
                    raise InvalidArgument(
                        "audit.device_exclusive",
                        "TailAudit: device reads a device's whole copy; not with writer or follow",
                    )
            failure = await scope.settle(None)
        except KMSError as err:
            failure = await scope.settle(err)
        if failure is not None:
            await abort_with(context, failure)
            return
        try:
            streams = await audit_streams(self.js)
            if request.device:
                # A fleet hub's copy of one device's audit (edgekms.fleet). The bus
                # grant names each copy the broker may read: another name's info is
                # refused by the server, and would show as UNAVAILABLE after the
                # timeout, so a device the hub's registry never held is refused first.
                if not await self._fleet_knows(request.device):
                    raise NotFound(
                        "fleet.device_unknown",
                        f"device {request.device!r} was never in this hub's fleet",
                    )
                streams = [fleet_stream(request.device)]
            elif request.writer or request.follow:
                # Only a stream that exists is asked about: the bus grants this broker
                # the stack's writers' streams, and a question about any other name
                # would go unanswered (a timeout), not be refused.
                name = writer_stream(request.writer or self.writer.writer)
                if name not in streams:
                    raise NotFound(
                        "audit.writer_unknown", f"no audit stream {name}: no such writer"
                    )
                streams = [name]
            infos = [await self.js.stream_info(name) for name in streams]
        except nats.js.errors.NotFoundError:
            await abort_with(
                context,
                NotFound("fleet.device_unknown", "the hub holds no audit for that device")
                if request.device
                else Unavailable(AUDIT_UNAVAILABLE, "an audit stream went away"),
            )
            return
        except (nats.errors.Error, TimeoutError) as exc:
            await abort_with(context, Unavailable(AUDIT_UNAVAILABLE, f"audit stream: {exc}"))
            return
        except KMSError as err:
            await abort_with(context, err)
            return
        start = max(request.from_seq, 1)
        for info in infos:
            usage = StreamUsage.of(info)
            state = state_message(usage)
            if self.archive_dir is not None:
                state.checkpoint = await asyncio.to_thread(
                    newest_checkpoint, self.archive_dir, usage.stream
                )
            yield audit_pb2.TailAuditResponse(state=state)
            if not request.follow and (start > usage.last_seq or usage.messages == 0):
                continue
            try:
                async for record in self._read(
                    usage.stream, start, None if request.follow else usage.last_seq
                ):
                    yield audit_pb2.TailAuditResponse(record=record)
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("audit tail failed", extra=fields(error=type(exc).__name__))
                await abort_with(context, Unavailable(AUDIT_UNAVAILABLE, f"audit stream: {exc}"))
                return
            except KMSError as err:
                await abort_with(context, err)
                return
            except Exception:
                log.exception("audit tail failed unexpectedly")
                await abort_with(context, Internal("internal.error", "the audit tail failed"))
                return

    async def _read(
        self, stream: str, start: int, last: int | None
    ) -> AsyncIterator[audit_pb2.AuditRecord]:
        """Stored messages of `stream` from `start` in order; up to `last`, or forever if
        None. The filter is every subject: the legacy stream's entries kept theirs."""
        sub = await self.js.subscribe(
            ">",
            stream=stream,
            ordered_consumer=True,
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            ),
            inactive_threshold=30.0,
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=self.idle_timeout)
                except nats.errors.TimeoutError:
                    if last is None:
                        continue
                    return  # what is left up to `last` was deleted
                meta = msg.metadata
                seq = meta.sequence.stream
                if last is not None and seq > last:
                    return
                record = audit_record(seq, msg.subject, bytes(msg.data), stream)
                record.source = (msg.headers or {}).get(SOURCE_HEADER, "")
                yield record
                if last is not None and (seq >= last or meta.num_pending == 0):
                    return
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
