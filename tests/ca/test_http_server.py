"""The CA's small HTTP/1.1 server (ca_service.http) on a real socket: what a relying party
gets for good requests, and the 4xx every kind of bad request gets instead of a hang or
a crash. The routes' CA answers are in test_service.py (real CA, NATS, SoftHSM); here
the handlers are plain functions so that each HTTP rule is checked on its own."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca_service import http
from ca_service.http import HttpServer, Request, Response

seen: list[Request] = []


async def _crl(request: Request) -> Response:
    seen.append(request)
    return Response(body=b"CRL-DER", content_type="application/pkix-crl")


async def _ocsp(request: Request) -> Response:
    seen.append(request)
    return Response(body=b"answer:" + request.body, content_type=http.OCSP_RESPONSE)


async def _boom(_: Request) -> Response:
    raise RuntimeError("handler bug")


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, int]]:
    seen.clear()
    srv = HttpServer(
        {
            ("GET", "/crl"): _crl,
            ("GET", "/ocsp/"): _ocsp,
            ("POST", "/ocsp"): _ocsp,
            ("GET", "/boom"): _boom,
        }
    )
    await srv.start("127.0.0.1", 0)
    assert srv.server is not None
    port = srv.server.sockets[0].getsockname()[1]
    yield "127.0.0.1", port
    await srv.cleanup()
    assert srv.server is None


async def exchange(addr: tuple[str, int], raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)  # the server closes after one answer
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


async def test_get_answers_with_type_length_and_close(server: tuple[str, int]) -> None:
    status, headers, body = await exchange(server, b"GET /crl?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (status, body) == (200, b"CRL-DER")
    assert headers["content-type"] == "application/pkix-crl"
    assert headers["content-length"] == "7" and headers["connection"] == "close"
    assert seen[-1].path == "/crl" and seen[-1].method == "GET"


async def test_head_sends_the_headers_only(server: tuple[str, int]) -> None:
    status, headers, body = await exchange(server, b"HEAD /crl HTTP/1.0\r\n\r\n")
    assert (status, headers["content-length"], body) == (200, "7", b"")


async def test_post_body_reaches_the_handler(server: tuple[str, int]) -> None:
    raw = b"POST /ocsp HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
    status, headers, body = await exchange(server, raw)
    assert (status, body) == (200, b"answer:hello")
    assert headers["content-type"] == http.OCSP_RESPONSE


async def test_ocsp_get_path_is_a_prefix_route(server: tuple[str, int]) -> None:
    status, _, _ = await exchange(server, b"GET /ocsp/MEow%2FAb%3D%3D HTTP/1.1\r\n\r\n")
    assert status == 200 and seen[-1].path == "/ocsp/MEow%2FAb%3D%3D"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"GET /nothing HTTP/1.1\r\n\r\n", 404),
        (b"DELETE /crl HTTP/1.1\r\n\r\n", 405),
        (b"hello\r\n\r\n", 400),
        (b"GET /crl HTTP/2\r\n\r\n", 400),
        (b"GET http://x/crl HTTP/1.1\r\n\r\n", 400),
        (b"get /crl HTTP/1.1\r\n\r\n", 400),
        (b"GET /crl HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /crl HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /crl HTTP/1.1\r\n" + b"X-A: b\r\n" * 70 + b"\r\n", 431),
        (b"POST /ocsp HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
        (b"POST /ocsp HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
        (b"POST /ocsp HTTP/1.1\r\nContent-Length: 16385\r\n\r\n", 413),
        (b"GET /boom HTTP/1.1\r\n\r\n", 500),
    ],
)
async def test_bad_requests_get_a_clear_answer(
    server: tuple[str, int], raw: bytes, expected: int
) -> None:
    status, headers, body = await exchange(server, raw)
    assert status == expected
    assert headers["content-type"].startswith("text/plain") and body.strip()
    if expected == 405:
        assert headers["allow"] == "GET, HEAD"
    assert not seen  # no handler ran for a refused request


async def test_a_stalled_request_times_out(
    server: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http, "_READ_DEADLINE", 0.3)
    status, _, body = await exchange(
        server, b"POST /ocsp HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"
    )
    assert status == 408 and b"time" in body


async def test_a_client_that_leaves_does_not_stop_the_server(server: tuple[str, int]) -> None:
    for partial in (
        b"",
        b"GET /crl HTTP/1.1\r\n",
        b"POST /ocsp HTTP/1.1\r\nContent-Length: 9\r\n\r\nab",
    ):
        _, writer = await asyncio.open_connection(*server)
        writer.write(partial)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    status, _, body = await exchange(server, b"GET /crl HTTP/1.1\r\n\r\n")
    assert (status, body) == (200, b"CRL-DER")


async def test_a_client_that_never_reads_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends a request and then neither reads nor closes (or vanished
    without a FIN) no longer holds its connection: the write deadline aborts it."""
    import socket

    monkeypatch.setattr(http, "_WRITE_DEADLINE", 0.5)
    big = b"x" * (32 * 1024 * 1024)  # far more than both sockets' buffers hold

    async def _big(_: Request) -> Response:
        return Response(body=big, content_type="application/octet-stream")

    srv = HttpServer({("GET", "/big"): _big})
    await srv.start("127.0.0.1", 0)
    assert srv.server is not None
    port = srv.server.sockets[0].getsockname()[1]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /big HTTP/1.1\r\n\r\n")
        assert await _until(lambda: srv.open_connections == 1)
        # The client reads nothing all this time.
        assert await _until(lambda: srv.open_connections == 0)
    finally:
        sock.close()
        await srv.cleanup()


async def _until(condition: Callable[[], bool], seconds: float = 30.0) -> bool:
    """Poll `condition` until it holds or `seconds` pass."""
    for _ in range(int(seconds / 0.05)):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


def _tls_pair(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts around a throwaway self-signed certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ca.home.arpa")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("ca.home.arpa")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = tmp_path / "cert.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = tmp_path / "key.pem"
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_pem, key_pem)
    client = ssl.create_default_context(cafile=str(cert_pem))
    return server, client


async def test_tls_connections_close_without_an_unhandled_error(tmp_path: Path) -> None:
    """Over TLS (the ACME server's listener), connections closed in every order, by the
    server after its answer or by a client gone early, end without the event loop
    reporting an unhandled exception from the connection handler."""
    server_tls, client_tls = _tls_pair(tmp_path)
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    srv = HttpServer({("GET", "/crl"): _crl})
    await srv.start("127.0.0.1", 0, tls=server_tls)
    assert srv.server is not None
    port = srv.server.sockets[0].getsockname()[1]
    try:
        for i in range(20):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_tls, server_hostname="ca.home.arpa"
            )
            writer.write(b"GET /crl HTTP/1.1\r\nHost: ca.home.arpa\r\n\r\n")
            await writer.drain()
            if i % 2:
                data = await asyncio.wait_for(reader.read(), 10)
                assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"CRL-DER")
            writer.close()  # half of them without reading the answer
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
        assert await _until(lambda: srv.open_connections == 0)
        await asyncio.sleep(0.2)  # callbacks scheduled by the last close run now
    finally:
        await srv.cleanup()
        loop.set_exception_handler(previous)
    assert [str(c.get("message")) + repr(c.get("exception")) for c in unhandled] == []
