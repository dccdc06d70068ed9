"""Renewal by the holder, on the holder's side: requests built from the files it holds,
and the files replaced with what comes back.

Two kinds of certificate (docs/security.md, "Renewal by the holder"):

* the client certificate a config names: renewed over the mutual TLS connection it
  authenticates (ClientService.RenewClient). With `rekey` a new key is made here first
  (in the same TPM or PKCS#11 token when the config says `key_store = "tpm"`/"pkcs11").
* a mini-CA certificate (https-server, vpn-server, ...): the CSR is signed by its key,
  and for a new key the old key signs the CSR too (edgekms.renewal_proof).

The key file and the certificate file are each replaced atomically (mgmt.outfile); for
a rekey the new key is written first, under the same mode, then the certificate.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from edgekms.errors import InvalidArgument, KMSError
from edgekms.keytunnel import DEFAULT_TCTI
from edgekms.renewal_proof import PrivateKey, sign_renewal
from edgekms.v1 import ca_pb2, clients_pb2
from mgmt.client import RETRYABLE, KMSClient
from mgmt.clientconfig import load_client_config
from mgmt.devicekey import (
    create_pkcs11_key,
    create_tpm_key,
    delete_pkcs11_key,
    key_uri,
    slot_of,
    uri_attribute,
)
from mgmt.pki import write_client_config, write_private, write_public


def load_private_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidArgument(
            "renew.key_unreadable", f"cannot read a private key from {path}: {exc}"
        ) from None
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise InvalidArgument("renew.key_unreadable", f"{path}: unsupported key type")
    return key


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError, IndexError) as exc:
        raise InvalidArgument(
            "renew.certificate_unreadable", f"cannot read a certificate from {path}: {exc}"
        ) from None


def new_key_like(key: PrivateKey) -> PrivateKey:
    """A fresh key of the same type and size."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return ec.generate_private_key(key.curve)
    if isinstance(key, rsa.RSAPrivateKey):
        return rsa.generate_private_key(65537, key.key_size)
    return ed25519.Ed25519PrivateKey.generate()


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def holder_csr(cert: x509.Certificate, key: PrivateKey) -> bytes:
    """A CSR (DER) for the certificate's subject and SANs, signed by `key`. The CA takes
    the names from the certificate it issued, not from here; they are for the record."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(cert.subject)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        builder = builder.add_extension(san.value, critical=False)
    except x509.ExtensionNotFound:
        pass
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class HeldRenewal:
    response: ca_pb2.IssueCertificateResponse
    new_key: PrivateKey | None


def renew_held(
    kms: KMSClient,
    cert: x509.Certificate,
    key: PrivateKey,
    *,
    rekey: bool = False,
    validity_days: int = 0,
    validity_seconds: int = 0,
    request_id: str | None = None,
) -> HeldRenewal:
    """Renew a mini-CA certificate whose key we hold; with `rekey`, for a new key (made
    here, returned for the caller to write)."""
    new_key = new_key_like(key) if rekey else None
    csr = holder_csr(cert, new_key or key)
    proof = sign_renewal(key, csr) if new_key is not None else b""
    response = kms.renew_held_certificate(
        cert.public_bytes(serialization.Encoding.DER),
        csr,
        old_key_signature=proof,
        validity_days=validity_days,
        validity_seconds=validity_seconds,
        request_id=request_id,
    )
    return HeldRenewal(response, new_key)


@dataclass(frozen=True)
class ClientRenewal:
    response: clients_pb2.AddClientResponse
    cert_path: Path
    key_path: Path
    rekeyed: bool


def renew_client_config(
    config_path: Path,
    *,
    rekey: bool = False,
    validity_days: int = 0,
    request_id: str | None = None,
    timeout: float = 10.0,
) -> ClientRenewal:
    """Renew the client certificate `config_path` names, with its own connection, and
    replace its files (the key first for a rekey, then the certificate)."""
    config = load_client_config(config_path)
    new_key_bytes: bytes | None = None
    public_der = b""
    new_label = ""
    if rekey and config.key_store == "pkcs11":
        # A new key in the same token under a new label; the config is pointed at it and
        # the old key destroyed only once the KMS answered (else the new one goes).
        slot = slot_of(config)
        new_label, public = create_pkcs11_key(slot)
        public_der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif rekey and config.key_store == "tpm":
        # The new key is made in the same TPM (and the TPM closed again) before the
        # tunnel holds it; the old blob is replaced only once the KMS answered.
        blob, public = create_tpm_key(config.tpm or DEFAULT_TCTI)
        new_key_bytes = blob
        public_der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif rekey:
        new_key = new_key_like(load_private_key(config.key))
        new_key_bytes = key_pem(new_key)
        public_der = new_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    try:
        with KMSClient.from_config(config_path, timeout=timeout, retries=3) as kms:
            response = kms.renew_client(
                public_key_der=public_der, validity_days=validity_days, request_id=request_id
            )
    except KMSError as err:
        if new_label and err.code_name not in RETRYABLE:
            delete_pkcs11_key(slot_of(config), new_label)
        raise
    if new_label:
        _point_config_at_key(config_path, key_uri(slot_of(config).token, new_label))
        write_public(config.cert, response.certificate_pem.encode())
        delete_pkcs11_key(slot_of(config), uri_attribute(config.key_uri, "object"))
        return ClientRenewal(response, config.cert, config.key, True)
    if new_key_bytes is not None:
        write_private(config.key, new_key_bytes)
    write_public(config.cert, response.certificate_pem.encode())
    return ClientRenewal(response, config.cert, config.key, new_key_bytes is not None)


def _point_config_at_key(config_path: Path, uri: str) -> None:
    """Rewrite the client config (atomically) with `key` set to the new key's URI."""
    values = tomllib.loads(config_path.read_text())
    values["key"] = uri
    write_client_config(config_path, **{k: str(v) for k, v in values.items()})
