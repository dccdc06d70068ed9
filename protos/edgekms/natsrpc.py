"""One request over NATS with typed errors back: the caller side of every EdgeKMS
nats.micro service (crypto services on kms.crypto.*, the CA service on kms.ca.*).

A service's own error arrives with nats.micro's error headers and an edgekms.v1.Error
payload and is rebuilt as the same KMSError class; bus trouble becomes Unavailable or
DeadlineExceeded with a stable reason naming the service that did not answer.
"""

# ruff: noqa: ASYNC109 - `timeout` bounds one NATS request; it is the API, not a wrapper.
from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import nats
import nats.aio.client
import nats.errors
from google.protobuf.message import DecodeError, Message

from edgekms.errors import DeadlineExceeded, Internal, KMSError, Unavailable, from_bytes

ERROR_CODE_HEADER = "Nats-Service-Error-Code"
ERROR_HEADER = "Nats-Service-Error"

R = TypeVar("R", bound=Message)


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


async def connect(
    url: str, *, name: str, deadline: float = 10.0, **options: Any
) -> nats.aio.client.Client:
    """nats.connect that gives up: nats-py retries a failing first connect forever
    (refused TLS, wrong password, nobody listening), which would hang a service's start
    instead of failing it. Once connected, the client reconnects as usual."""
    try:
        return await asyncio.wait_for(nats.connect(url, name=name, **options), deadline)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise Unavailable(
            "bus.unavailable", f"cannot connect to NATS at {url} within {deadline:g}s ({detail})"
        ) from None
