"""Prometheus metrics and the `/healthz` and `/readyz` endpoints of every EdgeKMS service.

One port per service, not the broker aggregating: a broker that relayed the others'
figures would go dark exactly when the bus does (the case an operator most needs to see),
and would have to be trusted for the other services' health. Each service (broker, CA,
each crypto service) serves its own registry on `metrics_listen` from its TOML; `kmsctl
up` gives them consecutive ports from `--metrics-listen` (docs/architecture.md,
"Metrics").

The endpoint is a small asyncio HTTP/1.0 server of its own on the service's loop rather
than prometheus-client's threaded WSGI server, so that a flood of scrapes costs a bounded
amount: at most MAX_CONNECTIONS connections at once (the rest get a 503 and are closed at
once), a request head of at most MAX_HEAD bytes read within HEAD_TIMEOUT, and the text
rendered at most once per RENDER_TTL however many scrapes ask for it.

Nothing in a registry names a key, a client or a certificate: label values are method
names, outcome codes, provider ids and stream names, all bounded sets fixed by the code,
so 50,000 keys do not make 50,000 series and no scrape shows what is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from edgekms.errors import FailedPrecondition, InvalidArgument
from edgekms.logs import fields

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

# The field every service's TOML takes; absent: no metrics endpoint.
LISTEN_FIELD = "metrics_listen"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_BASE_PORT = 9464
MAX_CONNECTIONS = 32
MAX_HEAD = 8 * 1024
HEAD_TIMEOUT = 5.0
RENDER_TTL = 0.5
REFUSE_WAIT = 0.2
# Request latencies, from a sub-millisecond Sign to a minute-long RSA-4096 generation.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    120.0,
)
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) from "HOST:PORT" or "[V6]:PORT"; the host must be an IP address (a
    name could resolve to an address the operator did not mean to expose). Port 0 takes
    any free port (tests). InvalidArgument("metrics.listen_invalid") otherwise."""

    def bad(problem: str) -> InvalidArgument:
        return InvalidArgument(
            "metrics.listen_invalid",
            f"metrics listen address {text!r}: {problem} (want HOST:PORT, e.g. 127.0.0.1:9464)",
        )

    if not isinstance(text, str) or len(text) > 64:
        raise bad("not an address")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise bad("no port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise bad("the host must be an IP address") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise bad("the port must be a number from 0 to 65535")
    return host, int(port)


def parse_listen_field(raw: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """`metrics_listen` of a service's TOML: (the address or None, problems as
    "metrics_listen: problem"), in the style of edgekms.audit.parse_limit_fields."""
    if LISTEN_FIELD not in raw:
        return None, []
    value = raw[LISTEN_FIELD]
    if not isinstance(value, str):
        return None, [f'{LISTEN_FIELD}: must be a string like "127.0.0.1:9464"']
    if value == "":
        return None, []  # explicitly off
    try:
        parse_listen(value)
    except InvalidArgument as exc:
        return None, [f"{LISTEN_FIELD}: {exc.message}"]
    return value, []


def outcome_of(code_name: str) -> str:
    """ "ok", or the error code in lower case ("not_found"), from an ErrorCode or a gRPC
    StatusCode name: one outcome vocabulary for the broker and the bus services."""
    name = code_name.removeprefix("ERROR_CODE_").lower()
    return name or "unknown"


class ServiceMetrics:
    """One service's registry, its request series and the gauges it adds."""

    def __init__(self, service: str) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Histogram,
            disable_created_metrics,
        )

        # No `_created` series beside every counter and histogram: twice the lines per
        # scrape for a timestamp edgekms_process_start_time_seconds already gives.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.service = service
        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=True)
        self.requests: Counter = Counter(
            "edgekms_requests",
            "Requests served, by method and outcome (ok or the error code).",
            ["service", "method", "outcome"],
            registry=self.registry,
        )
        self.latency: Histogram = Histogram(
            "edgekms_request_duration_seconds",
            "Time from a request's arrival to its answer, by method.",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.refused_scrapes: Counter = Counter(
            "edgekms_metrics_connections_refused",
            "Connections to this metrics endpoint turned away (too many at once, too slow,"
            " too large).",
            ["service"],
            registry=self.registry,
        )
        self.refused_scrapes.labels(service)
        started = self.gauge("edgekms_process_start_time_seconds", "When this service started.")
        started.labels(service).set(time.time())

    def gauge(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
        """A gauge in this registry whose first label is `service`."""
        from prometheus_client import Gauge

        return Gauge(name, documentation, ["service", *labels], registry=self.registry)

    def observe(self, method: str, outcome: str, seconds: float) -> None:
        self.requests.labels(self.service, method, outcome).inc()
        self.latency.labels(self.service, method).observe(seconds)

    def bus_gauge(self, connected: Callable[[], bool]) -> None:
        """edgekms_bus_connected, read at each scrape from the connection itself."""
        gauge = self.gauge("edgekms_bus_connected", "1 while the NATS connection is up.")
        gauge.labels(self.service).set_function(lambda: 1.0 if connected() else 0.0)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# What makes a service not ready: a list of reasons, empty when ready. Cheap and
# synchronous: it reads state that the service's own tasks keep current.
ReadyCheck = Callable[[], list[str]]


class MetricsServer:
    """GET /metrics, /healthz and /readyz on one address, bounded against floods."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        ready: ReadyCheck,
        *,
        max_connections: int = MAX_CONNECTIONS,
        head_timeout: float = HEAD_TIMEOUT,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open = 0
        self._rendered = b""
        self._rendered_at = -RENDER_TTL
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen; the port actually bound. FailedPrecondition metrics.port_in_use when
        another program holds it, metrics.listen_failed for any other refusal."""
        try:
            self._server = await asyncio.start_server(
                self._accept, host, port, limit=MAX_HEAD, reuse_address=True
            )
        except OSError as exc:
            where = f"{host}:{port}"
            if exc.errno == errno.EADDRINUSE:
                raise FailedPrecondition(
                    "metrics.port_in_use",
                    f"metrics port {where} is taken by another program; choose another"
                    " metrics_listen",
                    {"listen": where},
                ) from None
            raise FailedPrecondition(
                "metrics.listen_failed",
                f"cannot serve metrics on {where}: {exc.strerror or exc}",
                {"listen": where},
            ) from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info(
            "metrics endpoint listening",
            extra=fields(event="metrics_listening", host=host, port=self.port),
        )
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._open >= self.max_connections:
                self.metrics.refused_scrapes.labels(self.metrics.service).inc()
                # Read the request head if it comes at once (REFUSE_WAIT), so that the
                # close does not reset the connection and lose the 503 on its way out.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REFUSE_WAIT)
                await self._reply(writer, 503, b"too many scrapes at once\n", "text/plain")
                return
            self._open += 1
            try:
                await self._serve(reader, writer)
            finally:
                self._open -= 1
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.head_timeout)
        except (TimeoutError, asyncio.IncompleteReadError):
            self.metrics.refused_scrapes.labels(self.metrics.service).inc()
            return
        except asyncio.LimitOverrunError:
            self.metrics.refused_scrapes.labels(self.metrics.service).inc()
            # What was sent already is read and dropped (at most 64 KiB, REFUSE_WAIT), so
            # that the close does not reset the connection before the 431 arrives.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.read(64 * 1024), REFUSE_WAIT)
            await self._reply(writer, 431, b"request head too large\n", "text/plain")
            return
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            await self._reply(writer, 400, b"not an HTTP/1 request\n", "text/plain")
            return
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            await self._reply(writer, 405, b"GET only\n", "text/plain")
            return
        head_only = method == b"HEAD"
        if target == b"/metrics":
            await self._reply(writer, 200, self._render(), TEXT_CONTENT_TYPE, head_only)
        elif target == b"/healthz":
            await self._reply(writer, 200, b"ok\n", "text/plain", head_only)
        elif target == b"/readyz":
            problems = self.ready()
            if problems:
                body = ("not ready: " + "; ".join(problems) + "\n").encode()
                await self._reply(writer, 503, body, "text/plain", head_only)
            else:
                await self._reply(writer, 200, b"ready\n", "text/plain", head_only)
        else:
            await self._reply(writer, 404, b"/metrics, /healthz or /readyz\n", "text/plain")

    def _render(self) -> bytes:
        now = time.monotonic()
        if now - self._rendered_at >= RENDER_TTL:
            self._rendered = self.metrics.render()
            self._rendered_at = now
        return self._rendered

    @staticmethod
    async def _reply(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str,
        head_only: bool = False,
    ) -> None:
        reasons = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            431: "Request Header Fields Too Large",
            503: "Service Unavailable",
        }
        head = (
            f"HTTP/1.1 {status} {reasons[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        writer.write(head if head_only else head + body)
        await writer.drain()


async def serve_metrics(
    metrics: ServiceMetrics, ready: ReadyCheck, listen: str | None
) -> MetricsServer | None:
    """Start the endpoint on `listen` (None: no endpoint); errors are typed (see start)."""
    if not listen:
        return None
    host, port = parse_listen(listen)
    server = MetricsServer(metrics, ready)
    await server.start(host, port)
    return server


class Periodic:
    """Runs `job` now and then every `interval` seconds until stopped; a failing run is
    logged and the next one still happens (a metric goes stale, the service lives on)."""

    def __init__(self, name: str, job: Callable[[], object], interval: float) -> None:
        self.name = name
        self.job = job
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Periodic:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            try:
                result = self.job()
                if asyncio.iscoroutine(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "periodic metrics job failed",
                    extra=fields(event="metrics_job_failed", job=self.name, error=repr(exc)),
                )
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
