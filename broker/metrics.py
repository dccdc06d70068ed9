"""The broker's metrics: every gRPC call by method and outcome with its latency, and a
periodic check of the audit chains behind the audit gauges.

Requests are counted in a server interceptor, so every registered method is seen the
same way whatever servicer answers it; an unknown method has no handler and makes no
series (a caller cannot grow the registry with made-up names). The outcome is the gRPC
status the call ended with, in lower case ("ok", "permission_denied").

The audit check walks every audit stream once from its first entry, then only what was
appended since, with one edgekms.audit.ChainVerifier kept across passes (one hash per
writer in memory). It is a monitoring signal, not the proof: `kmsctl audit verify` is
that, run where the broker cannot lie to it (broker/audit_service.py). A stream the
archiver pruned (issue 21, edgekms.retention) starts at its first stored message, linked
to the newest checkpoint's hash when this broker archives and the checkpoint verifies
with its key (unlinked when another broker archives): without that, every restart after
a purge read as entries missing, and edgekms_audit_chain_ok went to 0 for nothing.

The same pass reads each stream's fill (edgekms_audit_stream_*) for alerts well before
a stream refuses appends with audit.full (issue 21, item 3), and the archiver's state
(edgekms_audit_archive_*) when this broker archives.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import nats.errors
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nats.js import JetStreamContext, api

from edgekms.audit import LEGACY_STREAM, ChainVerifier, StreamUsage, audit_streams
from edgekms.metrics import ServiceMetrics, outcome_of
from edgekms.retention import (
    Checkpoint,
    CheckpointError,
    key_id,
    newest_checkpoint,
    stream_chain,
)

if TYPE_CHECKING:
    from broker.archiver import Archiver

# How long the check waits for the next stored message before taking the rest as deleted.
READ_IDLE = 2.0


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts and times each unary call (server-streaming TailAudit: counted when its
    stream ends)."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.lstrip("/")  # type: ignore[attr-defined]
        metrics = self.metrics

        def outcome(context: Any, failed: bool) -> str:
            code = context.code()
            if code is None:
                return "unknown" if failed else "ok"
            if isinstance(code, grpc.StatusCode):
                return outcome_of(code.name)
            return "unknown"

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                started = time.monotonic()
                failed = True
                try:
                    response = await inner(request, context)
                    failed = False
                    return response
                finally:
                    metrics.observe(method, outcome(context, failed), time.monotonic() - started)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: Any) -> Any:
                started = time.monotonic()
                failed = True
                try:
                    async for item in inner_stream(request, context):  # type: ignore[attr-defined]
                        yield item
                    failed = False
                finally:
                    metrics.observe(method, outcome(context, failed), time.monotonic() - started)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class AuditChainCheck:
    """edgekms_audit_chain_entries{stream}, edgekms_audit_chain_problems,
    edgekms_audit_chain_ok and edgekms_audit_last_verification_timestamp_seconds; each
    stream's edgekms_audit_stream_bytes, _max_bytes, _messages, _max_messages and
    _fill_ratio; with `archiver`, edgekms_audit_archive_ok and
    edgekms_audit_archive_last_success_timestamp_seconds."""

    def __init__(
        self, js: JetStreamContext, metrics: ServiceMetrics, archiver: Archiver | None = None
    ) -> None:
        self.js = js
        self.archiver = archiver
        self.service = metrics.service
        self.verifier = ChainVerifier()
        self.positions: dict[str, int] = {}
        self.entries = metrics.gauge(
            "edgekms_audit_chain_entries",
            "Audit entries checked in each stream (the chain's length).",
            ("stream",),
        )
        self.problems = metrics.gauge(
            "edgekms_audit_chain_problems", "Broken links found in the audit chains."
        ).labels(self.service)
        self.ok = metrics.gauge(
            "edgekms_audit_chain_ok", "1 while every audit chain checked whole."
        ).labels(self.service)
        self.checked_at = metrics.gauge(
            "edgekms_audit_last_verification_timestamp_seconds",
            "When the audit chains were last checked to their end.",
        ).labels(self.service)
        usage = (
            ("bytes", "Bytes an audit stream holds.", lambda u: u.bytes),
            ("max_bytes", "An audit stream's byte limit (-1: none).", lambda u: u.max_bytes),
            ("messages", "Messages an audit stream holds.", lambda u: u.messages),
            ("max_messages", "An audit stream's message limit (-1: none).", lambda u: u.max_msgs),
            (
                "fill_ratio",
                "The larger of an audit stream's bytes and messages against their limits: "
                "from 0.8 kmsctl status warns, at 1 appends are refused (audit.full).",
                lambda u: u.fraction,
            ),
        )
        self.usage: list[tuple[Any, Callable[[StreamUsage], float]]] = [
            (metrics.gauge(f"edgekms_audit_stream_{name}", doc, ("stream",)), read)
            for name, doc, read in usage
        ]
        self.archive_ok = self.archive_ok_at = None
        if archiver is not None:
            self.archive_ok = metrics.gauge(
                "edgekms_audit_archive_ok",
                "1 while the audit archiver's last round went well (0: archiving is behind).",
            ).labels(self.service)
            self.archive_ok_at = metrics.gauge(
                "edgekms_audit_archive_last_success_timestamp_seconds",
                "When the audit archiver last finished a round well (0: not yet).",
            ).labels(self.service)
        self._counts: dict[str, int] = {}
        self._keys: dict[str, ec.EllipticCurvePublicKey] | None = None

    async def run_once(self) -> None:
        """Check what was appended to every audit stream since the last pass."""
        for name in await audit_streams(self.js):
            info = await self.js.stream_info(name)
            stream_usage = StreamUsage.of(info)
            for gauge, read in self.usage:
                gauge.labels(self.service, name).set(read(stream_usage))
            last = int(info.state.last_seq)
            done = self.positions.get(name, 0)
            first = int(info.state.first_seq or 0)
            if info.state.messages and first - 1 > done and name != LEGACY_STREAM:
                # Entries before `first` left the stream (archived) before this check
                # read them: start there, from the checkpoint's link if it holds.
                await self._resume_pruned(name, first - 1)
                done = self.positions[name] = first - 1
            if last > done:
                before = self.verifier.report.entries
                self.verifier.resume_stream(name, done)
                await self._walk(name, done + 1, last)
                self.verifier.end_stream(last)
                self.positions[name] = last
                self._counts[name] = self._counts.get(name, 0) + (
                    self.verifier.report.entries - before
                )
            self.entries.labels(self.service, name).set(self._counts.get(name, 0))
        report = self.verifier.report
        self.problems.set(report.problem_count)
        self.ok.set(1 if report.ok else 0)
        self.checked_at.set(time.time())
        if self.archiver is not None and self.archive_ok is not None:
            self.archive_ok.set(0 if self.archiver.last_error is not None else 1)
            assert self.archive_ok_at is not None
            self.archive_ok_at.set(self.archiver.last_ok_at or 0)

    async def _trusted(self) -> dict[str, ec.EllipticCurvePublicKey]:
        """The archiving key (read from the token once), as edgekms.retention wants it."""
        if self._keys is None:
            assert self.archiver is not None
            der = await self.archiver.signer.public_key_der()
            public = serialization.load_der_public_key(der)
            self._keys = (
                {key_id(der): public} if isinstance(public, ec.EllipticCurvePublicKey) else {}
            )
        return self._keys

    async def _resume_pruned(self, stream: str, through: int) -> None:
        """Carry the walk on after `through`, the last sequence purged from `stream`:
        linked to the newest checkpoint's hash if it covers exactly that far and verifies
        with this broker's archiving key; unlinked (the next entry's link unchecked)
        when this broker does not archive or the checkpoint is further on (written, its
        purge not yet run); a problem when this broker archives and the checkpoint is
        missing or does not verify (a purge it cannot vouch for)."""
        v = self.verifier
        v.resume_stream(stream, through)
        chain = stream_chain(stream)
        archiver = self.archiver
        if archiver is None:
            v.resume(through, chain, None, "")
            return
        trusted = await self._trusted()  # unreadable: this pass fails, the next retries
        raw = newest_checkpoint(archiver.archive_dir, stream)
        try:
            if not raw:
                raise CheckpointError(
                    "checkpoint_missing",
                    f"entries 1..{through} left {stream} and no checkpoint vouches for them",
                )
            checkpoint = Checkpoint.from_json(raw)
            checkpoint.verify(trusted)
            if checkpoint.stream != stream:
                raise CheckpointError("checkpoint_invalid", f"a checkpoint of {checkpoint.stream}")
        except CheckpointError as exc:
            v.add_problem(through, exc.kind, f"newest checkpoint of {stream}: {exc}")
            v.resume(through, chain, None, "")
            return
        if checkpoint.last_seq == through:
            name = f"checkpoint {stream} {through}"
            v.resume(through, chain, bytes.fromhex(checkpoint.hash), name)
            return
        if checkpoint.last_seq < through:
            v.add_problem(
                checkpoint.last_seq + 1,
                "missing",
                f"entries {checkpoint.last_seq + 1}..{through} left {stream} past its "
                "newest checkpoint",
            )
        v.resume(through, chain, None, "")

    async def _walk(self, stream: str, start: int, last: int) -> None:
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
                    msg = await sub.next_msg(timeout=READ_IDLE)
                except nats.errors.TimeoutError:
                    return  # the rest up to `last` was deleted: end_stream reports it
                meta = msg.metadata
                seq = meta.sequence.stream
                if seq > last:
                    return
                self.verifier.feed(seq, bytes(msg.data), msg.subject)
                if seq >= last or meta.num_pending == 0:
                    return
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
