"""What relying parties fetch over plain HTTP: the CRL, OCSP (RFC 6960 GET and POST) and
the CA certificates. No authentication: all of it is public and signed.

    GET  /crl            current intermediate's CRL, DER (application/pkix-crl)
    GET  /crl/<KEYID>    one intermediate's CRL (current or retired), as leaves point to
    GET  /root.crl       the root's CRL (revoked intermediates), DER
    GET  /ocsp/<base64>  OCSP request in the URL (RFC 6960 A.1)
    POST /ocsp           OCSP request in the body (application/ocsp-request)
    GET  /ca.crt         issuing CA certificate, DER (the AIA caIssuers target)
    GET  /root.crt       root certificate, DER
    GET  /ca/<KEYID>.crt one intermediate's certificate, DER (a leaf's caIssuers)
    GET  /chain.pem      issuing CA, retired intermediates still in use, root; PEM

The server is a few dozen lines of asyncio rather than aiohttp: six fixed routes, small
bodies, one request per connection, and aiohttp costs the CA service ~13 MB resident.
Anything it does not serve gets a 4xx with a one-line text reason, never a hang: heads
and bodies have size limits and a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_service import spiffe_bundle
from ca_service.authority import CertificateAuthority
from ca_service.spiffe import SpiffeAuthority
from edgekms.errors import KMSError, NotFound

log = logging.getLogger(__name__)

_MAX_OCSP_BODY = 16 * 1024
_MAX_LINE = 8 * 1024  # request line or one header line (the reader's buffer limit)
_MAX_HEADERS = 64
_READ_DEADLINE = 10.0  # for the head and the body of one request
_LINGER_BYTES = 256 * 1024  # read and dropped after a refused request, at most
_LINGER_SECONDS = 1.0
# For sending one answer and closing: a client that stops reading (or vanished without
# a FIN, half-open) would otherwise hold the connection, and its buffers, forever.
_WRITE_DEADLINE = 10.0
OCSP_RESPONSE = "application/ocsp-response"
_TEXT = "text/plain; charset=utf-8"


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = _TEXT
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode("utf-8") + b"\n")


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # still percent-encoded, without the query
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


Handler = Callable[[Request], Awaitable[Response]]


SPIFFE_BUNDLE_PATH = "/spiffe/bundle"


def spiffe_bundle_handler(ca: CertificateAuthority) -> Handler:
    """GET /spiffe/bundle: the trust domain's bundle endpoint (docs/spiffe.md,
    "Federation"), served here in plain HTTP and on the ACME listener over HTTPS (the
    `https_web` profile, with the mini-CA's server certificate)."""
    spiffe = SpiffeAuthority(ca)

    async def spiffe_bundle_document(_: Request) -> Response:
        try:
            bundle = await spiffe.bundle()
        except KMSError as exc:
            return Response.text(503, exc.reason)
        return Response(body=spiffe_bundle.document(bundle), content_type="application/json")

    return spiffe_bundle_document


def make_routes(ca: CertificateAuthority) -> dict[tuple[str, str], Handler]:
    """(method, path) -> handler; "/ocsp/" as a GET path means the prefix of /ocsp/<base64>."""

    def unavailable(exc: KMSError) -> Response:
        return Response.text(503, exc.reason)

    async def crl(_: Request) -> Response:
        try:
            current = await ca.current_crl()
        except KMSError as exc:
            return unavailable(exc)
        return Response(body=current.crl_der, content_type="application/pkix-crl")

    async def issuer_crl(request: Request) -> Response:
        key_id = request.path[len("/crl/") :]
        if not key_id.isalnum():
            return Response.text(404, "no such resource")
        try:
            found = await ca.issuer_crl(key_id)
        except KMSError as exc:
            if isinstance(exc, NotFound):
                return Response.text(404, exc.reason)
            return unavailable(exc)
        return Response(body=found.crl_der, content_type="application/pkix-crl")

    async def root_crl(_: Request) -> Response:
        try:
            found = await ca.root_crl()
        except KMSError as exc:
            return unavailable(exc)
        return Response(body=found.crl_der, content_type="application/pkix-crl")

    async def issuer_cert(request: Request) -> Response:
        name = request.path[len("/ca/") :]
        if not name.endswith(".crt"):
            return Response.text(404, "no such resource")
        try:
            cas = await ca.issuing_cas()
        except KMSError as exc:
            return unavailable(exc)
        for issuing in cas:
            if issuing.key_id_hex == name.removesuffix(".crt").upper():
                return Response(
                    body=issuing.cert.public_bytes(serialization.Encoding.DER),
                    content_type="application/pkix-cert",
                )
        return Response.text(404, "no such intermediate")

    async def ocsp_get(request: Request) -> Response:
        raw = unquote(request.path[len("/ocsp/") :])
        # Clients send standard or URL-safe base64, padded or not.
        raw = raw.replace("-", "+").replace("_", "/")
        try:
            der = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            der = b""  # the CA answers malformedRequest, as OCSP wants
        return Response(body=await ca.ocsp(der), content_type=OCSP_RESPONSE)

    async def ocsp_post(request: Request) -> Response:
        return Response(body=await ca.ocsp(request.body), content_type=OCSP_RESPONSE)

    async def ca_cert(_: Request) -> Response:
        try:
            certs = await ca.ca_certificates()
        except KMSError as exc:
            return unavailable(exc)
        return Response(
            body=certs.intermediate_certificate_der, content_type="application/pkix-cert"
        )

    async def root_cert(_: Request) -> Response:
        try:
            certs = await ca.ca_certificates()
        except KMSError as exc:
            return unavailable(exc)
        return Response(body=certs.root_certificate_der, content_type="application/pkix-cert")

    async def chain(_: Request) -> Response:
        try:
            certs = await ca.ca_certificates()
        except KMSError as exc:
            return unavailable(exc)
        ders = [
            certs.intermediate_certificate_der,
            *certs.retired_intermediates_der,
            certs.root_certificate_der,
        ]
        pem = b"".join(
            x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in ders
        )
        return Response(body=pem, content_type="application/pem-certificate-chain")

    return {
        ("GET", "/crl"): crl,
        ("GET", SPIFFE_BUNDLE_PATH): spiffe_bundle_handler(ca),
        ("GET", "/crl/"): issuer_crl,
        ("GET", "/root.crl"): root_crl,
        ("GET", "/ca/"): issuer_cert,
        ("GET", "/ocsp/"): ocsp_get,
        ("POST", "/ocsp"): ocsp_post,
        ("POST", "/ocsp/"): ocsp_post,
        ("GET", "/ca.crt"): ca_cert,
        ("GET", "/root.crt"): root_cert,
        ("GET", "/chain.pem"): chain,
    }


class HttpServer:
    """The listening socket and its routes; `cleanup()` stops it (aiohttp's runner API)."""

    def __init__(
        self, routes: dict[tuple[str, str], Handler], max_body: int = _MAX_OCSP_BODY
    ) -> None:
        self.routes = routes
        self.max_body = max_body
        self.server: asyncio.Server | None = None
        self.open_connections = 0  # for status and tests: every one ends within deadlines

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        """Listen; with `tls` the same server speaks HTTPS (the ACME side)."""
        self.server = await asyncio.start_server(
            self._connection,
            host,
            port,
            limit=_MAX_LINE,
            ssl=tls,
            ssl_handshake_timeout=_READ_DEADLINE if tls is not None else None,
        )

    def refusal(self, status: int, reason: str) -> Response:
        """The answer to a request refused before any route saw it (too large, malformed
        head, too slow): one line of text here, a problem document on the ACME side."""
        return Response.text(status, reason)

    async def cleanup(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    def _prefix(self, path: str) -> str | None:
        """The GET prefix route ("/ocsp/", "/crl/", ...) a longer path falls under."""
        for method, route in self.routes:
            if (
                method == "GET"
                and route.endswith("/")
                and path.startswith(route) != (path == route)
            ):
                return route
        return None

    def route(self, method: str, path: str) -> Handler | None:
        handler = self.routes.get((method, path))
        prefix = self._prefix(path)
        if handler is None and method == "GET" and prefix is not None:
            handler = self.routes.get(("GET", prefix))
        return handler

    def allowed(self, path: str) -> list[str]:
        methods = {m for (m, p) in self.routes if p == path}
        if self._prefix(path) is not None:
            methods.add("GET")
        if "GET" in methods:
            methods.add("HEAD")
        return sorted(methods)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        try:
            await self._serve_one(reader, writer)
        finally:
            self.open_connections -= 1

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = False
        unread = False  # part of the request is still on the wire
        try:
            try:
                request = await asyncio.wait_for(
                    _read_request(reader, self.max_body), _READ_DEADLINE
                )
                head_only = request.method == "HEAD"
                response = await self._respond(request)
            except (ConnectionError, asyncio.IncompleteReadError):
                return  # the client went away: nobody to answer
            except _BadRequest as exc:
                response = self.refusal(exc.status, exc.reason)
                unread = True
            except TimeoutError:
                response = self.refusal(408, "request not complete in time")
                unread = True
            except Exception as exc:
                log.error("event=ca_http_failed error=%s", type(exc).__name__)
                response = Response.text(500, "internal error")
            writer.write(_serialise(response, head_only))
            await asyncio.wait_for(writer.drain(), _WRITE_DEADLINE)
            if unread:
                await _linger(reader, writer)
        except ConnectionError:
            pass  # the client went away before the answer
        except TimeoutError:
            log.warning("event=ca_http_write_timeout connection=aborted")
            writer.transport.abort()  # unsent data would keep a plain close() waiting
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), _WRITE_DEADLINE)
            if not writer.transport.is_closing() or _unsent(writer.transport):
                writer.transport.abort()

    async def _respond(self, request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        handler = self.route(method, request.path)
        if handler is not None:
            return await handler(request)
        allowed = self.allowed(request.path)
        if allowed:
            response = Response.text(405, f"{request.method} is not allowed here")
            response.headers["Allow"] = ", ".join(allowed)
            return response
        return Response.text(404, "no such resource")


def _unsent(transport: asyncio.WriteTransport) -> int:
    """Bytes the transport still holds. A TLS transport whose connection is already torn
    down has no buffer left to ask (Python 3.11's raises AttributeError then): nothing
    unsent, nothing to abort."""
    try:
        return transport.get_write_buffer_size()
    except AttributeError:
        return 0


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read (a bounded amount of) what the client still sends: closing a
    socket with unread input resets the connection, and the reset can destroy the 4xx
    answer before the client reads it. TLS has no half-close (the ACME side): there the
    input is read all the same, the answer having been sent already."""
    if writer.can_write_eof():
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()
    with contextlib.suppress(Exception):
        discarded = 0
        while discarded < _LINGER_BYTES:
            chunk = await asyncio.wait_for(reader.read(4096), _LINGER_SECONDS)
            if not chunk:
                return
            discarded += len(chunk)


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, "request line or header too long") from None
    return line.rstrip(b"\r\n")


async def _read_request(reader: asyncio.StreamReader, max_body: int = _MAX_OCSP_BODY) -> Request:
    parts = (await _read_line(reader)).split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _BadRequest(400, "not an HTTP/1.x request line")
    try:
        method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(400, "request line is not ASCII") from None
    if not method.isalpha() or not method.isupper():
        raise _BadRequest(400, "bad method")
    if not target.startswith("/"):
        raise _BadRequest(400, "request target must be a path")
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS + 1):
        line = await _read_line(reader)
        if not line:
            break
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, "malformed header line")
        headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    else:
        raise _BadRequest(431, "too many header lines")
    if "transfer-encoding" in headers:
        raise _BadRequest(411, "send the body with a Content-Length")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise _BadRequest(400, "bad Content-Length")
    length = int(length_text)
    if length > max_body:
        raise _BadRequest(413, f"bodies are limited to {max_body} bytes")
    body = await reader.readexactly(length) if length else b""
    return Request(method, target.partition("?")[0], body, headers)


def _serialise(response: Response, head_only: bool) -> bytes:
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = "Status"
    lines = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in response.headers.items()),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


async def start_http(ca: CertificateAuthority, host: str, port: int) -> HttpServer:
    server = HttpServer(make_routes(ca))
    await server.start(host, port)
    log.info("event=ca_http_listening host=%s port=%d", host, port)
    return server
