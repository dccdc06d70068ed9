"""The metrics endpoint itself (edgekms.metrics), over real loopback sockets: what it
answers, what it refuses, and that a flood of scrapes neither stops it nor grows it."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest

from edgekms.errors import FailedPrecondition, InvalidArgument
from edgekms.metrics import (
    MetricsServer,
    ServiceMetrics,
    parse_listen,
    parse_listen_field,
    serve_metrics,
)
from tests.conftest import SLOWDOWN


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10 * SLOWDOWN)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


class _Ready:
    problems: list[str] = []

    def __call__(self) -> list[str]:
        return list(self.problems)


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[MetricsServer, _Ready]]:
    metrics = ServiceMetrics("test")
    ready = _Ready()
    server = MetricsServer(metrics, ready, max_connections=8, head_timeout=0.5)
    await server.start("127.0.0.1", 0)
    yield server, ready
    await server.stop()


async def test_metrics_healthz_and_readyz(endpoint: tuple[MetricsServer, _Ready]) -> None:
    server, ready = endpoint
    server.metrics.observe("Sign", "ok", 0.002)
    server.metrics.observe("Sign", "not_found", 0.001)
    status, body = await _get(server.port, "/metrics")
    assert status == 200
    text = body.decode()
    assert 'edgekms_requests_total{method="Sign",outcome="ok",service="test"} 1.0' in text
    assert 'edgekms_requests_total{method="Sign",outcome="not_found",service="test"} 1.0' in text
    assert 'edgekms_request_duration_seconds_count{method="Sign",service="test"} 2.0' in text
    assert "_created" not in text
    assert await _get(server.port, "/healthz") == (200, b"ok\n")
    assert await _get(server.port, "/readyz") == (200, b"ready\n")
    ready.problems = ["bus not connected"]
    assert await _get(server.port, "/readyz") == (503, b"not ready: bus not connected\n")
    # HEAD: the status without a body.
    assert (await _get(server.port, "/readyz", "HEAD"))[1] == b""


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
        (b"GET /admin HTTP/1.1\r\n\r\n", 404),
        (b"GET /metrics/../secrets HTTP/1.1\r\n\r\n", 404),
        (b"HELLO\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 10_000 + b"\r\n\r\n", 431),
    ],
    ids=["post", "unknown_path", "path_games", "not_http", "head_too_large"],
)
async def test_bad_requests_get_a_status_and_nothing_else(
    endpoint: tuple[MetricsServer, _Ready], request_bytes: bytes, status: int
) -> None:
    server, _ = endpoint
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request_bytes)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10 * SLOWDOWN)
    writer.close()
    assert raw.startswith(f"HTTP/1.1 {status} ".encode()), raw[:80]
    assert b"edgekms_" not in raw
    # ... and the endpoint still serves.
    assert (await _get(server.port, "/healthz"))[0] == 200


async def test_a_flood_of_scrapes_is_bounded_and_the_endpoint_survives(
    endpoint: tuple[MetricsServer, _Ready],
) -> None:
    """Idle connections past the limit are turned away at once (503), slow ones are cut
    after the head timeout, and 400 scrapes at once all get an answer."""
    server, _ = endpoint
    # Eight connections that never send a request hold every slot...
    idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(8)]
    # ...so the ninth is told so at once rather than queued.
    status, _ = await _get(server.port, "/metrics")
    assert status == 503
    # The idle ones are dropped after the head timeout: the server closes them.
    for reader, _ in idle:
        assert await asyncio.wait_for(reader.read(), 10 * SLOWDOWN) == b""
    for _, writer in idle:
        writer.close()

    async def scrape() -> int:
        try:
            return (await _get(server.port, "/metrics"))[0]
        except (ConnectionError, OSError):
            return 0

    started = time.monotonic()
    statuses = await asyncio.gather(*(scrape() for _ in range(400)))
    assert set(statuses) <= {200, 503}, set(statuses)
    assert statuses.count(200) >= 8
    assert time.monotonic() - started < 60 * SLOWDOWN
    text = (await _get(server.port, "/metrics"))[1].decode()
    refused = next(
        line for line in text.splitlines() if line.startswith("edgekms_metrics_connections_refused")
    )
    assert float(refused.rsplit(" ", 1)[1]) >= 9  # the 503 and the eight idle ones
    # Nothing leaks: every connection the flood opened is closed again.
    assert server._open == 0
    assert (await _get(server.port, "/healthz"))[0] == 200


async def test_a_port_another_program_holds_is_a_typed_refusal() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        with pytest.raises(FailedPrecondition) as caught:
            await serve_metrics(ServiceMetrics("test"), list, f"127.0.0.1:{port}")
        assert caught.value.reason == "metrics.port_in_use"
        assert str(port) in caught.value.message
    finally:
        holder.close()


@pytest.mark.parametrize(
    "value",
    ["9464", "localhost:9464", "nas.lan:9464", "127.0.0.1:http", "127.0.0.1:70000", ":9464", ""],
)
def test_a_listen_address_must_be_ip_and_port(value: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_listen(value)
    assert caught.value.reason == "metrics.listen_invalid"


def test_listen_addresses_that_are_fine() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen_field({}) == (None, [])
    assert parse_listen_field({"metrics_listen": ""}) == (None, [])
    assert parse_listen_field({"metrics_listen": 9464})[1][0].startswith("metrics_listen: ")
