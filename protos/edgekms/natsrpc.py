"""Requests over NATS with typed errors, both sides of every EdgeKMS nats.micro service
(crypto services on kms.crypto.*, the CA service on kms.ca.*).

Caller side, `request`: a service's own error arrives with nats.micro's error headers
and an edgekms.v1.Error payload and is rebuilt as the same KMSError class; bus trouble
becomes Unavailable or DeadlineExceeded with a stable reason naming the service that did
not answer.

Service side, `Responder`: each request parsed into its protobuf type and answered with
the handler's response or, for a KMSError, that error in the form `request` rebuilds;
and `subscriptions_live`, so that a service says it has started only once its endpoints
are in place on the server.
"""

# ruff: noqa: ASYNC109 - `timeout` bounds one NATS request; it is the API, not a wrapper.
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.aio.client
import nats.errors
from google.protobuf.message import DecodeError, Message

from edgekms.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    KMSError,
    Unavailable,
    from_bytes,
)

ERROR_CODE_HEADER = "Nats-Service-Error-Code"
ERROR_HEADER = "Nats-Service-Error"

R = TypeVar("R", bound=Message)
# A service operation: its request message in, its response message out.
Handler = Callable[[Any], Awaitable[Message]]

log = logging.getLogger(__name__)


async def respond_error(req: Any, err: KMSError) -> None:
    """Answer a nats.micro request with `err`, as `request` rebuilds it."""
    await req.respond_error(err.code_name, err.message, err.to_proto().SerializeToString())


class Responder:
    """Serves a nats.micro service's endpoints: each request in a task of its own, at
    most `concurrency` at once (the rest wait in nats.micro's subscription, so a slow
    token or TPM cannot pile up unbounded work), answered with the handler's response,
    its KMSError, or Internal("internal.error") naming the service if it crashed."""

    def __init__(
        self,
        service: str,
        concurrency: int,
        observe: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self.service = service
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        # (op, outcome, seconds) of each answered request: the service's metrics
        # (edgekms.metrics); outcome is "ok" or the error code in lower case.
        self.observe = observe

    def endpoint(
        self, op: str, request_type: type[Message], handler: Handler
    ) -> Callable[[Any], Awaitable[None]]:
        """The nats.micro handler for one operation."""

        async def handle(req: Any) -> None:
            await self._slots.acquire()
            task = asyncio.create_task(self._serve(op, request_type, handler, req))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return handle

    async def drain(self) -> None:
        """Wait for the requests in flight (after the service stopped taking new ones)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(
        self, op: str, request_type: type[Message], handler: Handler, req: Any
    ) -> None:
        started = time.monotonic()
        outcome = "ok"
        try:
            try:
                message = request_type()
                try:
                    message.ParseFromString(req.data)
                except DecodeError:
                    raise InvalidArgument(
                        "request.malformed", f"{op}: the payload is not a {request_type.__name__}"
                    ) from None
                response = await handler(message)
            except KMSError as err:
                outcome = err.code_name.removeprefix("ERROR_CODE_").lower()
                log.info(
                    "event=request_refused service=%s op=%s code=%s reason=%s",
                    self.service,
                    op,
                    err.code_name,
                    err.reason,
                )
                await respond_error(req, err)
                return
            except Exception:
                outcome = "internal"
                log.exception("event=request_crashed service=%s op=%s", self.service, op)
                await respond_error(
                    req, Internal("internal.error", f"{op} failed inside {self.service}")
                )
                return
            await req.respond(response.SerializeToString())
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "event=request_done service=%s op=%s ms=%.1f",
                    self.service,
                    op,
                    (time.monotonic() - started) * 1e3,
                )
        except Exception:
            # The reply itself failed (connection gone): nothing to tell the caller.
            log.exception("event=reply_failed service=%s op=%s", self.service, op)
        finally:
            self._slots.release()
            if self.observe is not None:
                self.observe(op, outcome, time.monotonic() - started)


async def subscriptions_live(nc: nats.aio.client.Client) -> None:
    """Return once the server has every SUB this connection has queued so far.

    One `flush()` does not prove it with nats-py 2.16: flush writes its PING straight
    to the socket, ahead of commands still queued for the client's flusher task, so the
    PONG can come back before the server has seen a SUB made just before (a request from
    another connection then meets "no responders", about once in a hundred tries here).
    The first flush lets the flusher run: it was woken when the SUB was queued, and the
    event loop runs it before a PONG can be read. The second PING is therefore written
    behind the SUB, and the server answers it only after processing the SUB.
    """
    await nc.flush()
    await nc.flush()


async def request(
    nc: nats.aio.client.Client,
    subject: str,
    message: Message,
    response_type: type[R],
    timeout: float,
    *,
    service: str,
    reason_prefix: str,
    details: dict[str, str] | None = None,
) -> R:
    """Send `message` to `subject` and parse the reply as `response_type`.

    `service` names the answering side in messages ("provider 'hsm0'", "the CA
    service"); `reason_prefix` starts the stable reasons ("provider" gives
    provider.unavailable and provider.deadline).
    """
    operation = subject.rsplit(".", 1)[-1]
    try:
        msg = await nc.request(subject, message.SerializeToString(), timeout=timeout)
    except nats.errors.NoRespondersError:
        raise Unavailable(
            f"{reason_prefix}.unavailable", f"nothing answers for {service}", details
        ) from None
    except (TimeoutError, nats.errors.TimeoutError):
        raise DeadlineExceeded(
            f"{reason_prefix}.deadline",
            f"{service} did not answer {operation} within {timeout:g}s",
            details,
        ) from None
    except (
        nats.errors.ConnectionClosedError,
        nats.errors.ConnectionDrainingError,
        nats.errors.ConnectionReconnectingError,
        nats.errors.StaleConnectionError,
        nats.errors.NoServersError,
        nats.errors.OutboundBufferLimitError,
    ):
        raise Unavailable("bus.unavailable", "the NATS connection is not usable") from None
    headers = msg.headers or {}
    if ERROR_CODE_HEADER in headers:
        err = from_bytes(msg.data) if msg.data else None
        if err is None or not isinstance(err, KMSError) or err.reason == "unknown":
            description = headers.get(ERROR_HEADER, "")
            err = Internal(
                f"{reason_prefix}.error", f"{service} {operation}: {description or 'failed'}"
            )
        raise err
    response = response_type()
    try:
        response.ParseFromString(msg.data)
    except DecodeError:
        raise Internal(
            "wire.bad_response", f"{service} {operation}: the reply could not be decoded"
        ) from None
    return response


class BusWatch:
    """Tells a long-running service that its bus connection is gone for good.

    nats-py reconnects after a dropped socket, but closes the connection for good after
    most `-ERR`s from the server (a message over max_payload among them): the process
    then lives on, answering nothing, and its supervisor never restarts it. A service
    passes `options()` to nats.connect and waits on `lost` beside its stop signal, then
    exits non-zero, so `kmsctl up` restarts it with a fresh connection.
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self.lost = asyncio.Event()
        self.last_error = ""
        self._stopping = False

    def options(self) -> dict[str, Any]:
        return {"closed_cb": self._closed, "error_cb": self._error}

    def stopping(self) -> None:
        """The service is closing the connection itself: that is not a loss."""
        self._stopping = True

    async def _error(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.warning("event=bus_error service=%s error=%r", self.service, self.last_error)

    async def _closed(self) -> None:
        if self._stopping:
            return
        log.error(
            # It exits next, so that `kmsctl up` (or systemd) restarts it.
            "event=bus_lost service=%s last_error=%r action=exit_for_restart",
            self.service,
            self.last_error,
        )
        self.lost.set()

    def error(self) -> Unavailable:
        """What the service exits with once `lost` is set."""
        detail = f" ({self.last_error})" if self.last_error else ""
        return Unavailable("bus.lost", f"{self.service} lost its NATS connection{detail}")


async def ping(
    nc: nats.aio.client.Client, service_name: str, timeout: float = 1.0
) -> dict[str, Any]:
    """The first replica's nats.micro $SRV.PING answer (id, name, version): a service
    that lost the bus, or hangs, does not answer, and says so as Unavailable."""
    import json

    try:
        msg = await nc.request(f"$SRV.PING.{service_name}", b"", timeout=timeout)
    except nats.errors.NoRespondersError:
        raise Unavailable(
            "service.unavailable", f"nothing answers for {service_name} (not on the bus)"
        ) from None
    except (TimeoutError, nats.errors.TimeoutError):
        raise Unavailable(
            "service.unavailable", f"{service_name} did not answer a ping within {timeout:g}s"
        ) from None
    except nats.errors.Error:
        raise Unavailable("bus.unavailable", "the NATS connection is not usable") from None
    try:
        answer = json.loads(msg.data)
    except ValueError:
        raise Internal("wire.bad_response", f"{service_name}: the ping reply is not JSON") from None
    return answer if isinstance(answer, dict) else {}


async def first_of(*events: asyncio.Event) -> None:
    """Wait until any of `events` is set (a stop signal, BusWatch.lost)."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _refused_by_server(exc: BaseException) -> bool:
    """An answer from a NATS server that retrying will not change: its certificate is
    not from the CA we trust, or it refused our user or password."""
    import ssl

    if isinstance(exc, ssl.SSLCertVerificationError):
        return True
    return isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower()


async def connect(
    url: str,
    *,
    name: str,
    deadline: float = 10.0,
    give_up_when_refused: bool = False,
    **options: Any,
) -> nats.aio.client.Client:
    """nats.connect that gives up: nats-py retries a failing first connect forever
    (refused TLS, wrong password, nobody listening), which would hang a service's start
    instead of failing it. Once connected, the client reconnects as usual.

    The error nats-py reports while it retries (a certificate that does not verify, an
    authorization violation) is named in the Unavailable, as `bus.refused` when a server
    answered and refused us, since "cannot connect" then sends a person looking for a
    server that is not down. `give_up_when_refused` (kmsctl, a person waiting) fails at
    that answer instead of at the deadline; services keep waiting it out."""
    last: list[BaseException] = []
    # The server's refusal, kept: the broken pipe that follows it is no explanation.
    refusal: list[BaseException] = []
    refused = asyncio.Event()
    # Theirs, or nats-py's own (it logs the error): wrapping must not silence it.
    their_error_cb = options.pop("error_cb", None) or nats.aio.client._default_error_callback

    async def error_cb(exc: Exception) -> None:
        last[:] = [exc]
        if _refused_by_server(exc):
            refusal[:] = [exc]
            refused.set()
        await their_error_cb(exc)

    connecting = asyncio.ensure_future(nats.connect(url, name=name, error_cb=error_cb, **options))
    waiters: set[asyncio.Future[Any]] = {connecting}
    if give_up_when_refused:
        waiters.add(asyncio.ensure_future(refused.wait()))
    try:
        done, _ = await asyncio.wait(waiters, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
        if connecting in done:
            return connecting.result()
        raise TimeoutError
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if refusal:
            raise Unavailable(
                "bus.refused",
                f"a NATS server answers at {url} but refused this client "
                f"({type(refusal[0]).__name__}: {str(refusal[0])[:200]})",
                {"url": url},
            ) from None
        if last:
            detail += f"; last error: {type(last[-1]).__name__}: {str(last[-1])[:200]}"
        raise Unavailable(
            "bus.unavailable", f"cannot connect to NATS at {url} within {deadline:g}s ({detail})"
        ) from None
    finally:
        pending = [w for w in waiters if not w.done()]
        for waiter in pending:
            waiter.cancel()
        # As wait_for did: the abandoned connect is cancelled and awaited, so that
        # nats-py's retry loop and its socket end here.
        await asyncio.gather(*pending, return_exceptions=True)
