"""The requester's side of `kmsctl cert issue --generate`: make the key where the admin
runs kmsctl (it never travels to the CA), the CSR for it, and write the result as PEM or
as a PKCS#12 bundle with the chain.

PKCS#12 uses AES-256-CBC with PBKDF2 and a SHA-256 MAC, which OpenSSL 3, nginx, OpenVPN
and strongSwan read; the password comes from a file, never from argv. `legacy=True`
makes the old form (3DES, SHA-1 MAC, 2048 iterations) that older Android, macOS and
Windows importers insist on: weak against an offline guess of the password, so kmsctl
warns when it writes one.
"""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from edgekms.errors import InvalidArgument

LeafKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def generate_key(key_type: str) -> LeafKey:
    """A fresh key of an edgekms.algorithms cli type ("ec-p256", "rsa-3072", "ed25519")."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa-2048", "rsa-3072", "rsa-4096"):
        return rsa.generate_private_key(65537, int(key_type.split("-")[1]))
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise InvalidArgument("key.type_unknown", f"cannot generate a {key_type!r} key")


def parse_san(text: str) -> x509.GeneralName:
    """ "dns:x", "ip:x", "email:x", "uri:x"; a bare value is a DNS name or an IP address."""
    kind, sep, value = text.partition(":")
    if not sep or kind not in ("dns", "ip", "email", "uri"):
        kind, value = "dns", text
        try:
            ipaddress.ip_address(text)
            kind = "ip"
        except ValueError:
            pass
    try:
        if kind == "dns":
            return x509.DNSName(value)
        if kind == "ip":
            return x509.IPAddress(ipaddress.ip_address(value))
        if kind == "email":
            return x509.RFC822Name(value)
        return x509.UniformResourceIdentifier(value)
    except ValueError as exc:
        raise InvalidArgument("csr.san_invalid", f"{text!r}: {exc}") from None


def make_csr(key: LeafKey, common_name: str, sans: list[str]) -> bytes:
    """PEM PKCS#10 for `key` with this CN (may be empty) and these SANs."""
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    )
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([parse_san(s) for s in sans]), critical=False
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def pem_bundle(cert_der: bytes, chain_der: list[bytes]) -> bytes:
    """Certificate then chain (issuing CA first), as nginx's ssl_certificate wants it."""
    return b"".join(
        x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM)
        for d in [cert_der, *chain_der]
    )


def load_leaf_key(data: bytes) -> LeafKey:
    """An unencrypted PEM private key (what --generate writes), typed error otherwise."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(
            "bundle.key_invalid", f"not an unencrypted PEM private key: {exc}"
        ) from None
    if not isinstance(key, LeafKey):
        raise InvalidArgument("bundle.key_invalid", f"{type(key).__name__} keys are not exported")
    return key


def check_key_matches(key: LeafKey, cert_der: bytes) -> None:
    """Refuse a bundle whose key is not the certificate's: it would import, then fail
    every handshake."""
    public = x509.load_der_x509_certificate(cert_der).public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, spki) != public.public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise InvalidArgument(
            "bundle.key_mismatch", "the key is not the one the certificate was issued for"
        )


def key_pem(key: LeafKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


LEGACY_WARNING = (
    "warning: --legacy writes PKCS#12 with 3DES and a SHA-1 MAC for old importers; "
    "anyone holding the file can guess its password far faster than with the default "
    "AES-256 form: use a long password and delete the file once imported"
)


def pkcs12_bundle(
    name: str,
    key: LeafKey,
    cert_der: bytes,
    chain_der: list[bytes],
    password: bytes,
    legacy: bool = False,
) -> bytes:
    if not password:
        raise InvalidArgument("bundle.password_missing", "a PKCS#12 bundle needs a password")
    builder = serialization.PrivateFormat.PKCS12.encryption_builder()
    if legacy:
        # pbeWithSHAAnd3-KeyTripleDES-CBC for key and certificates, HMAC-SHA1 MAC, and
        # OpenSSL 1.x's iteration count: what pre-2020 importers were built for.
        builder = (
            builder.kdf_rounds(2048)
            .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
            .hmac_hash(hashes.SHA1())  # noqa: S303 - the legacy form is SHA-1 by definition
        )
    else:
        builder = (
            builder.kdf_rounds(200_000)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
        )
    encryption = builder.build(password)
    return pkcs12.serialize_key_and_certificates(
        name.encode(),
        key,
        x509.load_der_x509_certificate(cert_der),
        [x509.load_der_x509_certificate(d) for d in chain_der],
        encryption,
    )
