"""Challenge validation: the CA itself checks that whoever asks for a name controls it.

http-01 (RFC 8555 8.3): GET http://<name>:<http01_port>/.well-known/acme-challenge/<token>
must answer 200 with the key authorization (`token.thumbprint`; trailing whitespace is
ignored). tls-alpn-01 (RFC 8737): a TLS handshake to <name>:<tlsalpn01_port> offering only
ALPN `acme-tls/1` must show a self-signed certificate for exactly that name carrying the
critical acmeIdentifier extension with SHA-256 of the key authorization.

Names resolve through the config's static host map first (`[acme.hosts]`: for tests and
home networks whose DNS the CA cannot ask), then the system resolver. Every fetch has a
deadline, a size limit and follows no redirect, so a challenge aimed at an unreachable or
slow host fails as `connection` within seconds and a hostile one cannot feed the CA
megabytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
import ssl
from collections.abc import Mapping

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

from ca_service.acme.problems import AcmeProblem, Connection, Dns, IncorrectResponse, TLSProblem

HTTP01, TLSALPN01 = "http-01", "tls-alpn-01"
TYPES = (HTTP01, TLSALPN01)
ACME_TLS_ALPN = "acme-tls/1"
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
DEADLINE = 10.0
_MAX_RESPONSE = 16 * 1024


def key_authorization(token: str, thumbprint: str) -> str:
    return f"{token}.{thumbprint}"


async def resolve(name: str, hosts: Mapping[str, str]) -> str:
    """The address to reach `name` at: the static map, an IP literal, or the resolver."""
    if name in hosts:
        return hosts[name]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(name, None, type=socket.SOCK_STREAM), DEADLINE
        )
    except (OSError, TimeoutError):
        raise Dns("acme.dns_failed", f"{name} does not resolve") from None
    if not infos:
        raise Dns("acme.dns_failed", f"{name} does not resolve")
    return str(infos[0][4][0])


def _http_body(raw: bytes, name: str) -> bytes:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise IncorrectResponse("acme.http01_malformed", f"{name} sent no complete HTTP answer")
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ")
    if len(status) < 2 or not status[0].startswith(b"HTTP/1."):
        raise IncorrectResponse("acme.http01_malformed", f"{name} did not answer HTTP/1.x")
    if status[1] != b"200":
        raise IncorrectResponse(
            "acme.http01_status",
            f"{name} answered HTTP {status[1].decode('latin-1')} (redirects are not followed)",
        )
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])
    }
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        return out
    if b"content-length" in headers and headers[b"content-length"].isdigit():
        return body[: int(headers[b"content-length"])]
    return body


async def http01(name: str, token: str, expected: str, port: int, hosts: Mapping[str, str]) -> None:
    """Raise the problem that makes the challenge invalid; return if it passes."""
    address = await resolve(name, hosts)
    host = f"[{name}]" if ":" in name else name
    request = (
        f"GET /.well-known/acme-challenge/{token} HTTP/1.1\r\nHost: {host}\r\n"
        "User-Agent: edgekms-acme\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ).encode()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port), DEADLINE)
    except (OSError, TimeoutError) as exc:
        raise Connection(
            "acme.unreachable", f"cannot connect to {name} ({address}) port {port}: {exc}"
        ) from None
    try:
        writer.write(request)

        async def read_all() -> bytes:
            data = b""
            while len(data) <= _MAX_RESPONSE:
                chunk = await reader.read(4096)
                if not chunk:
                    return data
                data += chunk
            raise IncorrectResponse("acme.http01_too_large", f"{name} answered over 16 KiB")

        raw = await asyncio.wait_for(read_all(), DEADLINE)
    except (OSError, TimeoutError):
        raise Connection(
            "acme.unreachable", f"{name} did not answer within {DEADLINE:.0f} s"
        ) from None
    finally:
        writer.close()
    body = _http_body(raw, name).rstrip(b" \t\r\n")
    if body != expected.encode():
        raise IncorrectResponse(
            "acme.key_authorization_mismatch",
            f"{name} answered another key authorization than this account's",
        )


def _arpa(name: str) -> str:
    try:
        return ipaddress.ip_address(name).reverse_pointer
    except ValueError:
        return name


async def tlsalpn01(name: str, expected: str, port: int, hosts: Mapping[str, str]) -> None:
    address = await resolve(name, hosts)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the certificate is self-signed by design
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols([ACME_TLS_ALPN])
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(address, port, ssl=context, server_hostname=_arpa(name)),
            DEADLINE,
        )
    except (OSError, TimeoutError) as exc:
        raise Connection(
            "acme.unreachable", f"no TLS to {name} ({address}) port {port}: {exc}"
        ) from None
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        protocol = ssl_object.selected_alpn_protocol() if ssl_object else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    finally:
        writer.close()
    if protocol != ACME_TLS_ALPN:
        raise TLSProblem("acme.alpn_missing", f"{name} did not negotiate {ACME_TLS_ALPN}")
    if not der:
        raise TLSProblem("acme.alpn_no_certificate", f"{name} showed no certificate")
    check_alpn_certificate(der, name, expected)


def check_alpn_certificate(der: bytes, name: str, expected: str) -> None:
    """The RFC 8737 3 checks of the validation certificate."""
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    except (ValueError, x509.ExtensionNotFound):
        raise IncorrectResponse(
            "acme.alpn_certificate_invalid",
            "the validation certificate lacks SAN or acmeIdentifier",
        ) from None
    names = [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]
    if names != [name]:
        raise IncorrectResponse(
            "acme.alpn_certificate_invalid", f"the validation certificate names {names}, not {name}"
        )
    digest = hashlib.sha256(expected.encode()).digest()
    value = ext.value.value if isinstance(ext.value, x509.UnrecognizedExtension) else b""
    if not ext.critical or value != b"\x04\x20" + digest:
        raise IncorrectResponse(
            "acme.key_authorization_mismatch",
            f"{name}'s acmeIdentifier is not this account's key authorization",
        )


async def validate(
    kind: str,
    name: str,
    token: str,
    expected: str,
    http_port: int,
    alpn_port: int,
    hosts: Mapping[str, str],
) -> AcmeProblem | None:
    """None if the challenge passes, else the problem to record in it."""
    try:
        if kind == HTTP01:
            await http01(name, token, expected, http_port, hosts)
        else:
            await tlsalpn01(name, expected, alpn_port, hosts)
    except AcmeProblem as problem:
        return problem
    return None
