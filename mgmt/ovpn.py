"""OpenVPN client profiles (.ovpn): one file a user imports into OpenVPN Connect, the
NetworkManager plugin or `openvpn --config`, holding the CA chain, the client's
certificate and key inline and, when the server uses one, its `tls-crypt` key.

The tls-crypt key is the same 2048-bit "OpenVPN Static key V1" that `openvpn --genkey
tls-crypt` writes, made here from the OS's random source so the admin's machine needs
no openvpn binary; it is a shared secret of the server and all its clients, so it is
written 0600 and its bytes never reach a log.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from edgekms.errors import InvalidArgument

STATIC_KEY_BYTES = 256
_BEGIN = "-----BEGIN OpenVPN Static key V1-----"
_END = "-----END OpenVPN Static key V1-----"
_HOST_RE = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")


def new_tls_crypt_key() -> bytes:
    """A fresh key in the format `openvpn --genkey tls-crypt` writes."""
    raw = secrets.token_bytes(STATIC_KEY_BYTES).hex()
    lines = [raw[i : i + 32] for i in range(0, len(raw), 32)]
    return (
        "#\n# 2048 bit OpenVPN static key\n#\n" + "\n".join([_BEGIN, *lines, _END]) + "\n"
    ).encode()


def check_tls_crypt_key(data: bytes) -> bytes:
    """The key as given, once it is seen to be a whole static key (typed error if not):
    a truncated key would only show up as a failed handshake on the user's phone."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    start, end = text.find(_BEGIN), text.find(_END)
    body = text[start + len(_BEGIN) : end].split() if 0 <= start < end else []
    if not body or not all(re.fullmatch(r"[0-9a-f]{32}", line) for line in body):
        raise InvalidArgument(
            "bundle.tls_crypt_invalid", "not an OpenVPN static key (openvpn --genkey tls-crypt)"
        )
    if len(body) * 16 != STATIC_KEY_BYTES:
        raise InvalidArgument(
            "bundle.tls_crypt_invalid", f"a tls-crypt key holds {STATIC_KEY_BYTES} bytes"
        )
    return text[start : end + len(_END)].encode() + b"\n"


@dataclass(frozen=True)
class Remote:
    host: str
    port: int = 1194
    proto: str = "udp"

    @classmethod
    def parse(cls, text: str, proto: str = "udp") -> Remote:
        """ "vpn.home.arpa", "vpn.home.arpa:1194" or "[2001:db8::1]:443"."""
        host, port = text.strip(), "1194"
        if host.startswith("["):
            inner, _, rest = host[1:].partition("]")
            host, port = inner, rest.removeprefix(":") or port
        elif host.count(":") == 1:
            host, port = host.split(":")
        if not _HOST_RE.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(
                "bundle.remote_invalid", f"{text!r} is not HOST or HOST:PORT", {"value": text}
            )
        if proto not in ("udp", "tcp"):
            raise InvalidArgument("bundle.remote_invalid", "proto is udp or tcp")
        return cls(host, int(port), proto)


def check_client_certificate(cert: x509.Certificate) -> None:
    """An .ovpn profile is for a client: its certificate must carry clientAuth, or the
    server's `remote-cert-tls client` turns the user away after import."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is None or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise InvalidArgument(
            "bundle.not_client_certificate",
            "an OpenVPN client profile needs a clientAuth certificate (profile vpn-client)",
        )


def _pem(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def client_profile(
    remote: Remote,
    cert_der: bytes,
    chain_der: list[bytes],
    key_pem: bytes,
    tls_crypt: bytes | None = None,
    server_name: str = "",
) -> bytes:
    """The .ovpn text. `remote-cert-tls server` makes the client insist on a serverAuth
    certificate (the vpn-server profile), so another client cannot pose as the server;
    `verify-x509-name` pins the server's name when one is given."""
    cert = x509.load_der_x509_certificate(cert_der)
    check_client_certificate(cert)
    who = cert.subject.rfc4514_string() or f"serial {cert.serial_number:X}"
    lines = [
        f"# OpenVPN client profile for {who}, made by kmsctl cert export",
        f"# certificate serial {cert.serial_number:X}, valid until "
        f"{cert.not_valid_after_utc.isoformat()}",
        "client",
        "dev tun",
        f"proto {remote.proto}",
        f"remote {remote.host} {remote.port}",
        "resolv-retry infinite",
        "nobind",
        "persist-key",
        "persist-tun",
        "remote-cert-tls server",
    ]
    if server_name:
        if not _HOST_RE.match(server_name):
            raise InvalidArgument("bundle.remote_invalid", f"{server_name!r} is not a name")
        lines.append(f"verify-x509-name {server_name} name")
    lines.append("verb 3")
    blocks = [
        ("ca", "".join(_pem(d) for d in chain_der)),
        ("cert", _pem(cert_der)),
        ("key", key_pem.decode("ascii")),
    ]
    if tls_crypt is not None:
        blocks.append(("tls-crypt", check_tls_crypt_key(tls_crypt).decode("ascii")))
    for tag, body in blocks:
        lines += [f"<{tag}>", body.rstrip("\n"), f"</{tag}>"]
    return ("\n".join(lines) + "\n").encode()
