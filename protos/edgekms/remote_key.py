"""Private-key objects whose private half lives in the KMS.

cryptography lets a program bring its own private key class: subclass the EC, RSA or
Ed25519 private-key base and implement sign(). Its X.509 builders (certificates, CSRs,
CRLs, OCSP responses) then sign through it. A RemoteKey hashes locally and hands the
digest to a DigestSigner, which is the KMS seen from wherever the caller is: the gRPC
client for programs, the NATS crypto service for the CA service and the broker (which
issues client certificates with the internal CA key). It lives in the shared package so
that every service and the CLI use this one implementation.

    cert = builder.sign(remote_key(signer, public_key_der), hashes.SHA256())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeAlias

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

if TYPE_CHECKING:
    # Only in the signature RSAPrivateKey.sign has since cryptography 47; the board's
    # cryptography 42 (Yocto scarthgap) has no NoDigestInfo, and an RSA key here never
    # signs without a DigestInfo anyway (_digest refuses anything but a hash).
    from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo

from edgekms.algorithms import SignatureAlgorithm
from edgekms.v1 import common_pb2 as pb


class DigestSigner(Protocol):
    """Signs a digest (or an Ed25519 message) with one KMS key; raises KMSError types."""

    def sign_digest(self, algorithm: SignatureAlgorithm, data: bytes) -> bytes: ...


class KeyNotExportable(TypeError):
    """Raised for any attempt to read private material: it never leaves the token."""


_ECDSA = {
    "sha256": pb.SIGNATURE_ALGORITHM_ECDSA_SHA256,
    "sha384": pb.SIGNATURE_ALGORITHM_ECDSA_SHA384,
    "sha512": pb.SIGNATURE_ALGORITHM_ECDSA_SHA512,
}
_RSA_PKCS1 = {
    "sha256": pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256,
    "sha384": pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA384,
    "sha512": pb.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA512,
}
_RSA_PSS = {
    "sha256": pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA256,
    "sha384": pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA384,
    "sha512": pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA512,
}


Buffer: TypeAlias = "bytes | bytearray | memoryview[int]"


def _digest(data: Buffer, algorithm: object) -> tuple[str, bytes]:
    """(hash name, digest) whether the caller passed a message or a prehashed digest."""
    if isinstance(algorithm, Prehashed):
        return algorithm._algorithm.name, bytes(data)
    if not isinstance(algorithm, hashes.HashAlgorithm):
        raise ValueError("EdgeKMS keys sign with a hash (or a prehashed digest) only")
    h = hashes.Hash(algorithm)
    h.update(data)
    return algorithm.name, h.finalize()


def _pick(table: dict[str, SignatureAlgorithm], hash_name: str) -> SignatureAlgorithm:
    try:
        return table[hash_name]
    except KeyError:
        raise ValueError(f"EdgeKMS keys do not sign with {hash_name}") from None


def _no_export() -> NoReturn:
    raise KeyNotExportable("the private key lives in the KMS and cannot be exported")


class _Remote:
    _signer: DigestSigner

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return self  # nothing private to copy: the key is a handle

    def private_bytes(self, *args: Any, **kwargs: Any) -> bytes:
        _no_export()


class RemoteECKey(_Remote, ec.EllipticCurvePrivateKey):
    def __init__(self, signer: DigestSigner, public_key: ec.EllipticCurvePublicKey):
        self._signer = signer
        self._public = public_key

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise ValueError("EC keys in EdgeKMS sign with ECDSA only")
        name, digest = _digest(data, signature_algorithm.algorithm)
        return self._signer.sign_digest(_pick(_ECDSA, name), digest)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise KeyNotExportable("EdgeKMS keys are signing keys: no key agreement")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _no_export()


class RemoteRSAKey(_Remote, rsa.RSAPrivateKey):
    def __init__(self, signer: DigestSigner, public_key: rsa.RSAPublicKey):
        self._signer = signer
        self._public = public_key

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def sign(
        self,
        data: Buffer,
        padding_: padding.AsymmetricPadding,
        algorithm: Prehashed | hashes.HashAlgorithm | NoDigestInfo,
    ) -> bytes:
        name, digest = _digest(data, algorithm)
        if isinstance(padding_, padding.PKCS1v15):
            return self._signer.sign_digest(_pick(_RSA_PKCS1, name), digest)
        if isinstance(padding_, padding.PSS):
            salt = padding_._salt_length
            mgf = padding_._mgf
            if not (salt is padding.PSS.DIGEST_LENGTH or salt == len(digest)):
                raise ValueError("EdgeKMS signs PSS with a salt as long as the digest")
            if not isinstance(mgf, padding.MGF1) or mgf._algorithm.name != name:
                raise ValueError("EdgeKMS signs PSS with MGF1 over the message hash")
            return self._signer.sign_digest(_pick(_RSA_PSS, name), digest)
        raise ValueError(f"unsupported RSA padding {padding_.name}")

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise KeyNotExportable("EdgeKMS keys are signing keys: no decryption")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _no_export()


class RemoteEd25519Key(_Remote, ed25519.Ed25519PrivateKey):
    def __init__(self, signer: DigestSigner, public_key: ed25519.Ed25519PublicKey):
        self._signer = signer
        self._public = public_key

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._public

    def sign(self, data: Buffer) -> bytes:
        return self._signer.sign_digest(pb.SIGNATURE_ALGORITHM_ED25519, bytes(data))

    def private_bytes_raw(self) -> bytes:
        _no_export()


RemoteKey = RemoteECKey | RemoteRSAKey | RemoteEd25519Key


def remote_key(signer: DigestSigner, public_key_der: bytes) -> RemoteKey:
    """The private-key object for a KMS key, given how to reach it and its public key."""
    public = serialization.load_der_public_key(public_key_der)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return RemoteECKey(signer, public)
    if isinstance(public, rsa.RSAPublicKey):
        return RemoteRSAKey(signer, public)
    if isinstance(public, ed25519.Ed25519PublicKey):
        return RemoteEd25519Key(signer, public)
    raise ValueError(f"unsupported public key type {type(public).__name__}")


__all__ = ["DigestSigner", "KeyNotExportable", "RemoteKey", "remote_key"]
