"""RemoteKey: cryptography's builders sign through it and the results verify.

Unit tests of pure logic: the DigestSigner here is a software key, standing in for the
KMS; the integration tests run the same builders against real tokens.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from edgekms.algorithms import SignatureAlgorithm, algorithm_info, pss_padding
from edgekms.remote_key import KeyNotExportable, remote_key
from edgekms.v1 import common_pb2 as pb

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class SoftwareSigner:
    """Signs digests the way the KMS does, and records what it was asked."""

    def __init__(self, key: PrivateKey):
        self.key = key
        self.calls: list[SignatureAlgorithm] = []

    def sign_digest(self, algorithm: SignatureAlgorithm, data: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

        self.calls.append(algorithm)
        info = algorithm_info(algorithm)
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(data)
        if isinstance(self.key, ec.EllipticCurvePrivateKey):
            return self.key.sign(data, ec.ECDSA(Prehashed(info.hash())))
        pad: padding.AsymmetricPadding = pss_padding(info) if info.pss else padding.PKCS1v15()
        return self.key.sign(data, pad, Prehashed(info.hash()))


def _der(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


KEYS: dict[str, Callable[[], PrivateKey]] = {
    "ec-p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "rsa-2048": lambda: rsa.generate_private_key(65537, 2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate,
}


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_certificate_builder_signs_through_remote_key(kind: str) -> None:
    key = KEYS[kind]()
    signer = SoftwareSigner(key)
    remote = remote_key(signer, _der(key))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "remote")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(remote.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    algorithm = None if kind == "ed25519" else hashes.SHA256()
    cert = builder.sign(remote, algorithm)
    cert.verify_directly_issued_by(cert)
    assert len(signer.calls) == 1


def test_rsa_pss_certificate_through_remote_key() -> None:
    key = rsa.generate_private_key(65537, 2048)
    signer = SoftwareSigner(key)
    remote = remote_key(signer, _der(key))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pss")]))
        .sign(
            remote,
            hashes.SHA256(),
            rsa_padding=padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
        )
    )
    assert csr.is_signature_valid
    assert signer.calls == [pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA256]


def test_private_material_cannot_be_read() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    remote = remote_key(SoftwareSigner(key), _der(key))
    assert isinstance(remote, ec.EllipticCurvePrivateKey)
    with pytest.raises(KeyNotExportable):
        remote.private_numbers()
    with pytest.raises(KeyNotExportable):
        remote.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def test_unsupported_hash_is_refused_before_reaching_the_kms() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = SoftwareSigner(key)
    remote = remote_key(signer, _der(key))
    assert isinstance(remote, ec.EllipticCurvePrivateKey)
    with pytest.raises(ValueError, match="sha1"):
        remote.sign(b"x", ec.ECDSA(hashes.SHA1()))  # noqa: S303 - refused on purpose
    assert signer.calls == []
