"""Leaf certificates signed on the event loop, without a worker thread.

cryptography's builder calls the CA key's sign() synchronously, so the CA used to build
each leaf on a worker thread whose sign() waited for the token's answer on the event loop:
four thread hand-offs and a blocked thread per certificate, a quarter of the CA's CPU at
16 in flight. Here the builder runs on the loop with a key object that only records what
it is asked to sign (the hash of the to-be-signed certificate, or the whole of it for
Ed25519) and answers a placeholder; the token signs that asynchronously over the bus; the
real signature replaces the placeholder in the DER (the certificate's outer SEQUENCE is
tbsCertificate, signatureAlgorithm, signatureValue: only the last changes). The result is
checked against the CA certificate before it is used, so a wrong answer from the crypto
service (or a splice gone wrong) never becomes a stored certificate.
"""

from __future__ import annotations

from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from ca_service.builder import CaUrls, build_leaf
from ca_service.policy import IssuePlan
from edgekms.algorithms import SignatureAlgorithm
from edgekms.errors import Internal
from edgekms.remote_key import remote_key

# Long enough for any encoder's sanity checks, never a valid signature.
_PLACEHOLDER = b"\x00" * 8


class AsyncDigestSigner(Protocol):
    """What signs for the CA key without blocking (edgekms.nats_signer.NatsDigestSigner)."""

    async def sign_digest_async(self, algorithm: SignatureAlgorithm, data: bytes) -> bytes: ...


class _Capture:
    """A DigestSigner that keeps the one request it was given and answers a placeholder."""

    def __init__(self) -> None:
        self.asked: tuple[SignatureAlgorithm, bytes] | None = None

    def sign_digest(self, algorithm: SignatureAlgorithm, data: bytes) -> bytes:
        self.asked = (algorithm, bytes(data))
        return _PLACEHOLDER


def _read_length(der: bytes, at: int) -> tuple[int, int]:
    """(length, offset of the contents) of the DER element whose length octets start at
    `at` (definite form only, as DER requires)."""
    first = der[at]
    if first < 0x80:
        return first, at + 1
    count = first & 0x7F
    if not 1 <= count <= 4:
        raise ValueError("not a DER length")
    return int.from_bytes(der[at + 1 : at + 1 + count], "big"), at + 1 + count


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def with_signature(draft_der: bytes, signature: bytes) -> bytes:
    """`draft_der` (a Certificate) with its signatureValue replaced by `signature`."""
    if draft_der[0] != 0x30:
        raise ValueError("not a DER certificate")
    _, start = _read_length(draft_der, 1)
    # tbsCertificate, then signatureAlgorithm: both kept byte for byte.
    at = start
    for _ in range(2):
        if draft_der[at] != 0x30:
            raise ValueError("unexpected certificate layout")
        length, contents = _read_length(draft_der, at + 1)
        at = contents + length
    if draft_der[at] != 0x03:
        raise ValueError("unexpected certificate layout")
    bits = b"\x00" + signature  # no unused bits
    body = draft_der[start:at] + b"\x03" + _length(len(bits)) + bits
    return b"\x30" + _length(len(body)) + body


class LeafSigner:
    """Builds and signs leaves of one CA key on the event loop (see the module doc)."""

    def __init__(self, signer: AsyncDigestSigner, public_key_der: bytes) -> None:
        self._signer = signer
        self._capture = _Capture()
        self._key = remote_key(self._capture, public_key_der)

    async def build(
        self, ca_cert: x509.Certificate, plan: IssuePlan, serial: int, urls: CaUrls
    ) -> tuple[x509.Certificate, bytes]:
        """(certificate, its DER) for an allowed plan, signed by the token."""
        # build_leaf and the read of what it asked for run with no await between them,
        # so concurrent issuances on the loop never see each other's request.
        self._capture.asked = None
        draft = build_leaf(self._key, ca_cert, plan, serial, urls)
        asked, self._capture.asked = self._capture.asked, None
        if asked is None:
            raise Internal("cert.sign_failed", "the builder asked for no signature")
        signature = await self._signer.sign_digest_async(*asked)
        der = with_signature(draft.public_bytes(serialization.Encoding.DER), signature)
        try:
            cert = x509.load_der_x509_certificate(der)
            cert.verify_directly_issued_by(ca_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise Internal(
                "cert.sign_failed", "the CA key's signature does not verify: nothing issued"
            ) from None
        return cert, der


__all__ = ["AsyncDigestSigner", "LeafSigner", "with_signature"]
