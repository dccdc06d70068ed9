"""The broker's metrics: every gRPC call by method and outcome with its latency, and a
periodic check of the audit chains behind the audit gauges.

Requests are counted in a server interceptor, so every registered method is seen the
same way whatever servicer answers it; an unknown method has no handler and makes no
series (a caller cannot grow the registry with made-up names). The outcome is the gRPC
status the call ended with, in lower case ("ok", "permission_denied").

The audit check walks every audit stream once from its first entry, then only what was
appended since, with one edgekms.audit.ChainVerifier kept across passes (one hash per
writer in memory). It is a monitoring signal, not the proof: `kmsctl audit verify` is
that, run where the broker cannot lie to it (broker/audit_service.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import nats.errors
from nats.js import JetStreamContext, api

from edgekms.audit import ChainVerifier, audit_streams
from edgekms.metrics import ServiceMetrics, outcome_of

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
    edgekms_audit_chain_ok and edgekms_audit_last_verification_timestamp_seconds."""

    def __init__(self, js: JetStreamContext, metrics: ServiceMetrics) -> None:
        self.js = js
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
        self._counts: dict[str, int] = {}

    async def run_once(self) -> None:
        """Check what was appended to every audit stream since the last pass."""
        for name in await audit_streams(self.js):
            info = await self.js.stream_info(name)
            last = int(info.state.last_seq)
            done = self.positions.get(name, 0)
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
