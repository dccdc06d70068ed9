"""The one template for certificates of EdgeKMS's own fabric, shared by the bootstrap
ceremony (mgmt.pki), the bus TLS (mgmt.natsauth) and the broker's ClientService, so that
a client added with `kmsctl client add` and the first admin made by `kmsctl init` look
alike and both carry their identity as edgekms.identity documents. (The mini-CA that
serves NAS users builds its certificates from profiles, in ca_service.)

The CA key is whatever private-key object the caller holds: in practice a RemoteKey
whose signatures are made in the token. Building blocks on it (cryptography's builders
call sign() synchronously), so async callers run these functions in a worker thread.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgekms.errors import InvalidArgument
from edgekms.identity import identity_uris

# The registry name of the internal CA's key (made in the token by the ceremony).
INTERNAL_CA_KEY = "edgekms/internal-ca"
LEAF_VALIDITY = datetime.timedelta(days=825)
# Backdating absorbs clock skew between the issuer and the verifier.
BACKDATE = datetime.timedelta(minutes=5)
MIN_RSA_BITS = 2048

ClientPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def host_names(names: Iterable[str]) -> list[x509.GeneralName]:
    """subjectAltNames for a server: IP addresses as such, everything else as DNS names."""
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def self_signed_ca(
    key: CertificateIssuerPrivateKeyTypes, name: x509.Name, validity: datetime.timedelta
) -> x509.Certificate:
    """A CA that issues leaves only (pathLen 0): the internal CA, the bus CA."""
    start = now()
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def check_client_public_key(public_key: object) -> ClientPublicKey:
    """Only keys TLS clients can actually use, and none too weak to trust."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise InvalidArgument(
                "client.key_unsupported", f"EC curve {public_key.curve.name} is not accepted"
            )
        return public_key
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise InvalidArgument(
                "client.key_too_small", f"RSA keys must have at least {MIN_RSA_BITS} bits"
            )
        return public_key
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return public_key
    raise InvalidArgument("client.key_unsupported", "client keys are EC P-256/P-384, RSA, Ed25519")


def leaf_certificate(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    common_name: str,
    public_key: ClientPublicKey,
    sans: list[x509.GeneralName],
    eku: list[x509.ObjectIdentifier],
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """An end-entity certificate; validity is clamped to the CA's own."""
    start = not_before or now() - BACKDATE
    end = min(not_after or now() + LEAF_VALIDITY, ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()  # type: ignore[arg-type]
            ),
            critical=False,
        )
    )
    return builder.sign(ca_key, hashes.SHA256())


def client_certificate(
    ca_cert: x509.Certificate,
    ca_key: CertificateIssuerPrivateKeyTypes,
    public_key: ClientPublicKey,
    client: str,
    role: str,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    eku: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    """A client certificate carrying `client` and `role` the documented way.

    `eku` exists for tests that need a certificate the broker must refuse; everyone
    else gets clientAuth.
    """
    try:
        sans: list[x509.GeneralName] = list(identity_uris(client, role))
    except ValueError as exc:
        raise InvalidArgument("client.identity_invalid", str(exc)) from None
    return leaf_certificate(
        ca_cert,
        ca_key,
        client,
        public_key,
        sans,
        eku if eku is not None else [ExtendedKeyUsageOID.CLIENT_AUTH],
        not_before=not_before,
        not_after=not_after,
    )
