"""A device enrolls itself (`kmsctl enroll`): from a one-time token and the internal
CA's SHA-256 fingerprint to a client config with its own identity.

First contact pins the CA: a TLS connection to the broker's enrollment listener that
does not verify yet, whose chain must hold a certificate with exactly that fingerprint
which issued the listener's certificate; only then does the token travel, over gRPC
trusting that one CA (docs/security.md, "Enrollment"). The key is made here and never
leaves: a PEM file written 0600, or with `tpm` a key made in the device's TPM
(mgmt.devicekey; the file is then the TPM-wrapped blob, and the client config says
`key_store = "tpm"` so that KMSClient dials through edgekms.keytunnel), or with
`pkcs11` in a PKCS#11 token (no key file at all; the config names the key's URI).
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgekms.errors import InvalidArgument, KMSError, PermissionDenied, Unavailable
from edgekms.v1 import enroll_pb2, enroll_pb2_grpc
from mgmt.client import RETRYABLE, error_from_rpc, new_request_id
from mgmt.devicekey import (
    PIN_ENV,
    TPM_KEY_FILE,
    Pkcs11Slot,
    create_pkcs11_key,
    create_tpm_key,
    delete_pkcs11_key,
    key_uri,
    pkcs11_private_key,
    tpm_private_key,
)
from mgmt.pki import write_client_config, write_private, write_public

KEY_FILE = "device.key"
CERT_FILE = "device.crt"
CA_FILE = "ca.crt"
CONFIG_FILE = "config.toml"


def split_server(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument("enroll.server_invalid", f"{server!r}: give HOST:PORT")
    return host.strip("[]"), int(port)


def normalize_fingerprint(value: str) -> str:
    hexed = value.lower().removeprefix("sha256:").replace(":", "").strip()
    if len(hexed) != 64 or any(c not in "0123456789abcdef" for c in hexed):
        raise InvalidArgument("enroll.fingerprint_invalid", "give the 64 hex digits of SHA-256")
    return hexed


def pinned_ca(
    host: str, port: int, fingerprint: str, timeout: float = 10.0
) -> tuple[x509.Certificate, x509.Certificate]:
    """(CA, server certificate): the CA with this SHA-256 fingerprint from the server's TLS
    chain, if it issued the server's certificate; PermissionDenied otherwise (someone
    else answers). Python 3.13 has get_unverified_chain(); 3.11 has it on _sslobj."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # verified below, against the pinned CA
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            chain_obj = getattr(tls, "get_unverified_chain", None)
            chain = chain_obj() if chain_obj else tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
            ders = [
                c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]
                for c in chain or []
            ]
    except OSError as exc:
        raise Unavailable("enroll.unreachable", f"cannot reach {host}:{port}: {exc}") from None
    if not ders:
        raise PermissionDenied("enroll.fingerprint_mismatch", "the server sent no certificate")
    leaf = x509.load_der_x509_certificate(ders[0])
    for der in ders[1:]:
        if hashlib.sha256(der).hexdigest() == fingerprint:
            ca = x509.load_der_x509_certificate(der)
            try:
                leaf.verify_directly_issued_by(ca)
            except Exception:
                break
            return ca, leaf
    raise PermissionDenied(
        "enroll.fingerprint_mismatch",
        "the server's certificate does not chain to a CA with that fingerprint",
    )


@dataclass(frozen=True)
class Enrolled:
    response: enroll_pb2.EnrollResponse
    config: Path
    files: list[Path]


def send_enroll(
    server: str,
    fingerprint: str,
    request: enroll_pb2.EnrollRequest,
    *,
    timeout: float = 30.0,
    retries: int = 3,
) -> enroll_pb2.EnrollResponse:
    """One EnrollRequest to the enrollment listener, after pinning its CA; retried as the
    same request (same request id) while the broker is unavailable."""
    host, port = split_server(server)
    ca, leaf = pinned_ca(host, port, normalize_fingerprint(fingerprint))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.public_bytes(serialization.Encoding.PEM)
    )
    name = _server_name(leaf)
    options = [("grpc.ssl_target_name_override", name)] if name else []
    with grpc.secure_channel(f"{host}:{port}", credentials, options=options) as channel:
        stub = enroll_pb2_grpc.EnrollmentServiceStub(channel)
        attempt = 0
        while True:
            try:
                response: enroll_pb2.EnrollResponse = stub.Enroll(request, timeout=timeout)
                return response
            except grpc.RpcError as exc:
                err = error_from_rpc(exc)
                if attempt >= retries or err.code_name not in RETRYABLE:
                    raise err from None
                attempt += 1
                time.sleep(min(2.0 * attempt, 10.0))


def enroll(
    server: str,
    token: str,
    fingerprint: str,
    out_dir: Path,
    *,
    request_id: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    tpm: str | None = None,
    pkcs11: Pkcs11Slot | None = None,
) -> Enrolled:
    """Make a key (in the TPM behind TCTI `tpm`, if given), enroll it with the token and
    write key (or TPM blob), certificate, CA and config."""
    host, _ = split_server(server)
    normalize_fingerprint(fingerprint)
    for existing in (out_dir / KEY_FILE, out_dir / TPM_KEY_FILE):
        if existing.exists():
            raise InvalidArgument("enroll.exists", f"{existing} exists; not overwriting it")
    if (out_dir / CONFIG_FILE).exists():
        raise InvalidArgument(
            "enroll.exists", f"{out_dir / CONFIG_FILE} exists; not overwriting it"
        )
    key: ec.EllipticCurvePrivateKey
    token_label = ""
    if pkcs11 is not None:
        # Made in the token (and the CSR signed there) before the token travels: a
        # wrong PIN or a missing token spends nothing and writes nothing.
        token_label, public = create_pkcs11_key(pkcs11)
        key = pkcs11_private_key(pkcs11, token_label, public)  # type: ignore[assignment]
        key_path = out_dir / CONFIG_FILE  # nothing of the key is written
        key_bytes = b""
    elif tpm is not None:
        # Made (and the CSR signed) in the TPM before the token travels: an absent or
        # broken TPM spends nothing and writes nothing.
        key_path = out_dir / TPM_KEY_FILE
        blob, _ = create_tpm_key(tpm)
        key = tpm_private_key(blob, tpm)  # type: ignore[assignment]
        key_bytes = blob
    else:
        key_path = out_dir / KEY_FILE
        key = ec.generate_private_key(ec.SECP256R1())
        key_bytes = _key_pem(key)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    request = enroll_pb2.EnrollRequest(
        token=token,
        csr=csr.public_bytes(serialization.Encoding.DER),
        request_id=request_id or new_request_id(),
    )
    # The key goes to disk before the request: an answer lost after the certificate was
    # stored is recovered by the retry (same request id) for this same key.
    if pkcs11 is None:
        write_private(key_path, key_bytes)
    try:
        response = send_enroll(server, fingerprint, request, timeout=timeout, retries=retries)
    except KMSError as err:
        if err.code_name not in RETRYABLE:  # refused: nothing was stored for this key
            if pkcs11 is not None:
                delete_pkcs11_key(pkcs11, token_label)
            else:
                key_path.unlink(missing_ok=True)
        raise
    cert_path, ca_path, config = out_dir / CERT_FILE, out_dir / CA_FILE, out_dir / CONFIG_FILE
    write_public(cert_path, response.certificate_pem.encode())
    write_public(ca_path, response.ca_certificate_pem.encode())
    values = {
        "broker": f"{host}:{response.broker_port}",
        "ca_cert": CA_FILE,
        "cert": CERT_FILE,
        "key": key_path.name,
    }
    if tpm is not None:
        values["key_store"] = "tpm"
        values["tpm"] = tpm
    if pkcs11 is not None:
        values["key"] = key_uri(pkcs11.token, token_label)
        values["key_store"] = "pkcs11"
        values["pkcs11_module"] = pkcs11.module
        if pkcs11.pin_file:
            values["pin_file"] = str(Path(pkcs11.pin_file).resolve())
        else:
            values["pin_env"] = pkcs11.pin_env or PIN_ENV
    if response.server_name:
        values["server_name"] = response.server_name
    write_client_config(config, **values)
    files = (
        [cert_path, ca_path, config]
        if pkcs11 is not None
        else [key_path, cert_path, ca_path, config]
    )
    return Enrolled(response, config, files)


def _server_name(leaf: x509.Certificate) -> str:
    """The DNS name the listener's certificate carries (the broker's certificate names
    its service, not the address a device dials)."""
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    dns = names.get_values_for_type(x509.DNSName)
    return dns[0] if dns else ""


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
